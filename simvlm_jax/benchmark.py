"""Benchmarks that print numbers: `python -m simvlm_jax.benchmark memory --gin_file=...`.

step     Times the sharded train step of the gin-selected model family (`model_family.name`,
         or --model) on synthetic data (random images and tokens) for a config and mesh: median step time, examples/s, tokens/s
         and MFU from the analytic FLOP count (simvlm_jax.flops) against the
         device's peak; also XLA's own FLOP count of the compiled step.
data     Input pipeline images/s per core (read + decode + resize/crop +
         tokenize + batch) from tar and ArrayRecord via grain, side by side with
         a plain tf.data pipeline doing the same work (simvlm_jax/data/data_benchmark.py).
train-compare  CoCa train step images/s, ours vs open_clip's (torch, AMP bf16 or fp32, fused
         AdamW, optionally torch.compile) on the same device, model, batch and dtype
         (simvlm_jax/train_benchmark.py).
gpu-suite  Every GPU measurement in one call: MFU of SimVLM-Base/Large and CoCa-Base, CoCa-B/32
         vs open_clip (training and decoding), profiles; one JSON file plus a table
         (simvlm_jax/gpu_suite.py, docs/performance.md). `--smoke`: tiny configs, any machine.
decode   Caption decoding captions/s, ours (jitted, KV cache) vs open_clip CoCa's
         `generate` on the same CPU, model, images and strategy (beam search,
         greedy); needs the open_clip test stack (simvlm_jax/decode_benchmark.py).
memory   Compiles the sharded train step ahead of time (no training, no data)
         for a config and mesh and prints per-device bytes of params, optimizer
         state and XLA temporaries. `--devices N` compiles for N simulated host
         devices, so a config can be checked against a target device count and
         per-device memory (`--hbm_gib`) without the hardware. The last stdout
         line is one JSON object.
aot      The same compile for a TPU slice on any machine (`--topology v5p:4x4x4`), with XLA's TPU
         compiler from the `aot` extra (libtpu): per-chip HBM of params, optimizer state and
         temporaries against the chip's HBM, whether it fits, the compiler's step-time estimate
         and the MFU it implies (simvlm_jax/aot.py; docs/cluster.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Sequence

# Importing JAX does not start its backends: `--devices` sets XLA_FLAGS before they do.
import gin
import jax

from simvlm_jax import aot, cli, decode_benchmark, gpu_suite, partitioning, step_benchmark, train_benchmark
from simvlm_jax.cli import UserError, add_gin_args, split_gin_args
from simvlm_jax.models import registry
from simvlm_jax.models.family import count_params


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The `data` command's options. Defined here, not in `data_benchmark` (which imports
    TensorFlow), so that registering them does not load TensorFlow for `step` / `memory`."""
    g = parser.add_argument_group("data benchmark")
    g.add_argument("--data_num_images", type=int, default=512, help="generated images (data)")
    g.add_argument("--data_passes", type=int, default=2, help="timed passes over them per round (data)")
    g.add_argument("--data_rounds", type=int, default=3, help="rounds of timing every pipeline in turn (data)")
    g.add_argument("--data_image_size", type=int, default=224, help="output image size (data)")
    g.add_argument("--data_source_size", type=int, default=256, help="generated JPEG size (data)")
    g.add_argument("--data_batch_size", type=int, default=32, help="batch size (data)")
    g.add_argument("--data_work_dir", default=None, help="where to write the data (default: a temp dir)")


def _family(model: str | None):
    """The gin-selected model family (`model_family.name`), or `--model`'s."""
    if model:
        gin.bind_parameter("model_family.name", model)
    return registry.model_family()


def memory(args: argparse.Namespace, bindings: list[str]) -> dict[str, Any]:
    cli.load_gin(args.gin_file, bindings, args.gin_search_path, skip_unknown=True)

    fam = _family(args.model)
    mesh = partitioning.make_mesh()
    batch_size = args.batch_size or gin.query_parameter("train.global_batch_size")
    trainer, compiled = aot.compile_abstract_step(fam, mesh, batch_size, _microbatches())
    stats = compiled.memory_analysis()
    params_dev, params_total = partitioning.shard_bytes(trainer.abstract_state.params)
    opt_dev, opt_total = partitioning.shard_bytes(trainer.abstract_state.opt_state)
    aux_dev, _ = partitioning.shard_bytes(trainer.abstract_state.aux_state)  # e.g. EMA params, queues
    n = jax.device_count()
    gib = 1024 ** 3
    result = {
        "devices": n, "mesh": dict(mesh.shape), "global_batch_size": batch_size,
        "num_params": count_params(trainer.abstract_state.params),
        "params_bytes_per_device": params_dev, "opt_state_bytes_per_device": opt_dev,
        "aux_state_bytes_per_device": aux_dev,
        "params_plus_opt_total_bytes": params_total + opt_total,
        "params_plus_opt_ratio_to_ideal": (params_dev + opt_dev) / ((params_total + opt_total) / n),
        "argument_bytes_per_device": getattr(stats, "argument_size_in_bytes", None),
        "output_bytes_per_device": getattr(stats, "output_size_in_bytes", None),
        "temp_bytes_per_device": getattr(stats, "temp_size_in_bytes", None),
    }
    peak = (result["argument_bytes_per_device"] or 0) + (result["temp_bytes_per_device"] or 0)
    result["estimated_peak_bytes_per_device"] = peak
    if args.hbm_gib:
        result["hbm_gib"] = args.hbm_gib
        result["fits"] = peak <= args.hbm_gib * gib
    print(f"{n} devices, mesh {dict(mesh.shape)}, batch {batch_size}, {result['num_params']:,} params", file=sys.stderr)
    print(f"  per device: params {params_dev / gib:.3f} GiB, optimizer {opt_dev / gib:.3f} GiB "
          f"({result['params_plus_opt_ratio_to_ideal']:.3f} x the ideal total/{n}), "
          + (f"aux state {aux_dev / gib:.3f} GiB, " if aux_dev else "") + f"temporaries {(result['temp_bytes_per_device'] or 0) / gib:.3f} GiB", file=sys.stderr)
    return result


def aot_compile(args: argparse.Namespace, bindings: list[str]) -> dict[str, Any]:
    if not args.topology:
        raise UserError("benchmark aot needs --topology, e.g. --topology=v5p:4x4x4 (64 chips) or v6e:8x8")
    devices = aot.topology_devices(args.topology)
    cli.load_gin(args.gin_file, bindings, args.gin_search_path, skip_unknown=True)
    fam = _family(args.model)
    batch_size = args.batch_size or gin.query_parameter("train.global_batch_size")
    result = aot.compile_train_step(fam, devices, args.topology, batch_size, microbatches=_microbatches())
    print(result.summary(), file=sys.stderr)
    return dataclasses.asdict(result)


def _microbatches() -> int:
    try:
        return gin.query_parameter("train.microbatches")
    except ValueError:
        return 1


def step(args: argparse.Namespace, bindings: list[str]) -> dict[str, Any]:
    cli.load_gin(args.gin_file, bindings, args.gin_search_path, skip_unknown=True)
    fam = _family(args.model)
    batch_size = args.batch_size or gin.query_parameter("train.global_batch_size")
    return step_benchmark.time_train_step(fam, partitioning.make_mesh(), batch_size, steps=args.steps,
                                          warmup=args.warmup, microbatches=_microbatches(),
                                          profile_dir=args.profile_dir or None)


def make_parser() -> argparse.ArgumentParser:
    """The command line of `python -m simvlm_jax.benchmark` (gin flags are parsed apart)."""
    parser = argparse.ArgumentParser(prog="python -m simvlm_jax.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["memory", "step", "aot", "data", "decode", "train-compare", "gpu-suite"])
    parser.add_argument("--model", default=None, choices=registry.names(),
                        help="model family (step, memory); default: the gin files' model_family.name")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (step)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compile (step)")
    add_gin_args(parser)
    parser.add_argument("--devices", type=int, default=0,
                        help="compile for this many simulated CPU devices (set before JAX starts)")
    parser.add_argument("--batch_size", type=int, default=0, help="global batch (default: train.global_batch_size)")
    parser.add_argument("--topology", default="", help="TPU slice to compile for (aot), e.g. v5p:4x4x4")
    parser.add_argument("--hbm_gib", type=float, default=0.0, help="per-device memory budget to check against")
    add_data_args(parser)
    decode_benchmark.add_args(parser)
    train_benchmark.add_args(parser)
    gpu_suite.add_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        bindings, unknown = split_gin_args(rest)
    except UserError as e:
        print(f"error: {cli.one_line(str(e))}", file=sys.stderr)
        return 2
    if unknown:
        print(f"error: unknown argument(s) {' '.join(unknown)}", file=sys.stderr)
        return 2
    if args.what == "aot":  # compiles for the topology's devices; runs nothing on this machine's
        os.environ["JAX_PLATFORMS"] = "cpu"
    if args.devices:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
    try:
        if args.what == "data":
            # Imported here only: it imports TensorFlow, which `step` / `memory` must not load.
            from simvlm_jax.data import data_benchmark  # pylint: disable=g-import-not-at-top  (TensorFlow)
            result = data_benchmark.run(args)
        elif args.what == "decode":
            result = decode_benchmark.run(args)
        elif args.what == "train-compare":
            result = train_benchmark.run(args)
        elif args.what == "gpu-suite":
            result = gpu_suite.run(args)
        elif args.what == "aot":
            result = aot_compile(args, bindings)
        else:
            result = memory(args, bindings) if args.what == "memory" else step(args, bindings)
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"error: {cli.one_line(str(e))}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
