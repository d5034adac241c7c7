"""The timed train step behind `benchmark step` and `benchmark train-compare`: any model family,
any mesh, synthetic data, the executable compiled once and timed, optionally a profiler trace
summarized into the top device operations (simvlm_jax.profile_summary)."""
from __future__ import annotations

import os
import sys
import time
from typing import Any

import jax
import numpy as np

from simvlm_jax import flops, host_memory, partitioning, profile_summary, train
from simvlm_jax.models.family import ModelFamily, count_params


def random_batch(fam: ModelFamily, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A host batch of the family's training inputs with random pixels and token ids (never
    zeros: they can run faster than real data); `ModelFamily.random_batch`."""
    return fam.random_batch(batch_size, np.random.default_rng(seed))


def time_train_step(fam: ModelFamily, mesh: jax.sharding.Mesh, batch_size: int, *, steps: int = 20,
                    warmup: int = 3, microbatches: int = 1,
                    profile_dir: str | None = None, profile_steps: int = 3) -> dict[str, Any]:
    """Compiles `fam`'s sharded train step for `batch_size` once, runs `warmup` untimed steps and
    `steps` timed ones (each waited for), and returns times, throughput, MFU (analytic FLOPs vs
    the device's peak) and XLA's FLOP count. With `profile_dir`, then traces `profile_steps` more
    steps there and adds the trace's summary (top device operations) under "profile"."""
    trainer = train.Trainer(fam, mesh, train.make_optimizer(10_000), microbatches=microbatches,
                            rules=partitioning.axis_rules())
    batch = trainer.model_inputs(partitioning.host_batch_to_global(random_batch(fam, batch_size), mesh))
    t0 = time.perf_counter()
    with trainer.activate():
        compiled = trainer._step.lower(trainer.abstract_state, {k: jax.ShapeDtypeStruct(  # pylint: disable=protected-access
            v.shape, v.dtype, sharding=v.sharding) for k, v in batch.items()}).compile()
    compile_sec = time.perf_counter() - t0
    host_memory.release_freed_memory()  # as Trainer.compile_step does
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state = trainer.init_state()
    # The timed steps run the executable compiled above (calling the jitted step would compile
    # it a second time, doubling compile time and host memory).
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    times = []
    for _ in range(max(steps, 1)):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    step_sec = float(np.median(times))
    ex_per_sec = batch_size / step_sec
    per_example = fam.train_flops_per_example(trainer.frozen)
    peak = flops.peak_flops_per_device()
    n = jax.device_count()
    cfg = fam.config
    result = {
        "model": fam.name, "device_kind": jax.devices()[0].device_kind, "devices": n, "mesh": dict(mesh.shape),
        "global_batch_size": batch_size, "num_params": count_params(state.params),
        "dtype": cfg.dtype, "attention_impl": cfg.attention_impl, "remat_policy": cfg.remat_policy,
        "scan_layers": cfg.scan_layers, "compile_sec": round(compile_sec, 2),
        "step_time_ms_median": step_sec * 1e3, "step_time_ms_min": min(times) * 1e3,
        "examples_per_sec": ex_per_sec, "tokens_per_sec": ex_per_sec * fam.tokens_per_example(),
        "analytic_train_flops_per_example": per_example,
        "xla_flops_per_step_per_device": float(cost.get("flops", 0.0)) if cost else None,
        "achieved_tflops_per_device": per_example * ex_per_sec / n / 1e12,
        "mfu": per_example * ex_per_sec / (peak * n) if peak else None,
        "final_loss": float(metrics["loss"]),
    }
    stats = compiled.memory_analysis()
    if stats is not None:
        result["temp_bytes_per_device"] = getattr(stats, "temp_size_in_bytes", None)
        result["argument_bytes_per_device"] = getattr(stats, "argument_size_in_bytes", None)
    if profile_dir:
        result["profile"] = _profile(compiled, state, batch, profile_dir, profile_steps)
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a (unknown peak)"
    print(f"{result['device_kind']} x{n}: {step_sec * 1e3:.1f} ms/step, {ex_per_sec:.1f} ex/s, "
          f"{result['achieved_tflops_per_device']:.1f} TFLOP/s/device, MFU {mfu}", file=sys.stderr)
    return result


def _profile(compiled, state, batch, profile_dir: str, steps: int) -> dict[str, Any]:
    """Traces `steps` steps into `profile_dir` and summarizes the trace; a failed trace or
    summary is reported in the result, not raised (the timings above stand)."""
    os.makedirs(profile_dir, exist_ok=True)
    try:
        jax.profiler.start_trace(profile_dir)  # writes the Chrome-trace JSON profile_summary reads
        try:
            for _ in range(steps):
                state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
        finally:
            jax.profiler.stop_trace()
        summary = profile_summary.summarize(profile_dir, steps=steps)
    except Exception as e:  # pylint: disable=broad-except  (a profiler problem must not lose the timings)
        return {"error": f"{type(e).__name__}: {e}"}
    print(profile_summary.format_table(summary), file=sys.stderr)
    return summary
