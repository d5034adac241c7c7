"""Will it fit, and how fast? The real sharded train step compiled for a TPU slice on any machine.

`python -m simvlm_jax.benchmark aot --topology v5p:4x4x4 --gin_file=...` builds the mesh from a
TPU topology description (`jax.experimental.topologies`, backed by the PyPI `libtpu` package:
`pip install -e '.[aot]'`), lowers the gin-configured train step with its real shardings and
compiles it with XLA's TPU compiler on the CPU. No TPU is needed or touched. It reports per-chip
HBM (params, optimizer state, XLA temporaries) against the chip's HBM, the compiler's roofline
estimate of the step time and the MFU that estimate implies.

The estimate is XLA's cost model (`cost_analysis()['optimal_seconds']`): a lower bound that
assumes every op runs at its roofline, so the implied MFU is an upper bound; use it to compare
meshes and remat policies, and `benchmark step` on hardware for the real number.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import time
from typing import Any, Sequence

import jax
from jax.experimental import topologies

from simvlm_jax import flops, partitioning, train
from simvlm_jax.cli import UserError
from simvlm_jax.models.family import count_params

GIB = 1024 ** 3

# Per chip: name and HBM bytes (vendor figures), keyed by the topology's device_kind; the peak
# FLOP/s come from simvlm_jax.flops. v4 is left out: its topologies expose both cores of a chip.
TPU_CHIPS = {
    "TPU v5": ("v5p", 95 * GIB),
    "TPU v6 lite": ("v6e", 32 * GIB),
    "TPU v5 lite": ("v5e", 16 * GIB),
}
_TOPOLOGY_RE = re.compile(r"^(v5p|v6e|v5e):\d+(x\d+)+$")


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: str) -> list[Any]:
    """The devices of a TPU slice, e.g. 'v5p:4x4x4' (64 chips) or 'v6e:8x8', for compiling only."""
    if not _TOPOLOGY_RE.match(topology):
        raise UserError(f"--topology={topology!r}: use <chip>:<AxB[xC]> with chip v5p, v6e or v5e, "
                        f"e.g. v5p:4x4x4 (64 chips) or v6e:8x8")
    if not libtpu_installed():
        raise UserError("benchmark aot compiles with XLA's TPU compiler from the PyPI libtpu package, which "
                        "is not installed; pip install -e '.[aot]' (Linux x86_64)")
    # libtpu initializes as if on a TPU VM: without these it probes the (absent) metadata server and
    # prints screens of warnings. They only affect this compile-only process (JAX_PLATFORMS=cpu).
    # ALLOW_MULTIPLE_LIBTPU_LOAD: several compiles may run at once; the lock file is for real chips.
    for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                       ("TPU_ACCELERATOR_TYPE", "v5p-8"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("TPU_WORKER_ID", "0"), ("TPU_HOST_BOUNDS", "1,1,1"), ("TPU_MIN_LOG_LEVEL", "3")):
        os.environ.setdefault(key, value)
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # pylint: disable=broad-except
        raise UserError(f"--topology={topology!r}: libtpu rejected it ({str(e).splitlines()[0][:200]}); "
                        f"use a slice shape the chip has, e.g. v5p:2x2x2, v5p:4x4x4, v6e:4x4, v6e:8x8") from e
    return list(desc.devices)


def chip_info(device: Any) -> tuple[str, int, float]:
    """(chip name, HBM bytes, peak bf16 FLOP/s) of a topology device."""
    try:
        return (*TPU_CHIPS[device.device_kind], flops.peak_flops_per_device(device))
    except KeyError as e:
        raise UserError(f"no HBM/peak figures for device kind {device.device_kind!r}; "
                        f"known: {sorted(TPU_CHIPS)}") from e


@dataclasses.dataclass
class AotResult:
    """What one ahead-of-time compile says about a config on a slice (bytes are per chip)."""
    topology: str
    chip: str
    chips: int
    mesh: dict[str, int]
    global_batch_size: int
    microbatches: int
    remat_policy: str
    num_params: int
    params_bytes: int
    opt_state_bytes: int
    temp_bytes: int
    peak_bytes: int
    hbm_bytes: int
    fits: bool
    estimated_step_sec: float | None
    train_flops_per_step: float
    estimated_mfu: float | None
    compile_sec: float

    def summary(self) -> str:
        est = (f"estimated step {self.estimated_step_sec * 1e3:.0f} ms (XLA's roofline, a lower bound), "
               f"MFU <= {self.estimated_mfu:.0%}" if self.estimated_step_sec else "no step-time estimate")
        return (f"{self.topology} ({self.chips} x {self.chip}), mesh {self.mesh}, batch {self.global_batch_size}"
                f"{f' in {self.microbatches} microbatches' if self.microbatches > 1 else ''}, remat "
                f"{self.remat_policy}: per chip params {self.params_bytes / GIB:.2f} GiB + optimizer "
                f"{self.opt_state_bytes / GIB:.2f} GiB + temporaries {self.temp_bytes / GIB:.2f} GiB = "
                f"{self.peak_bytes / GIB:.2f} of {self.hbm_bytes / GIB:.0f} GiB HBM: "
                f"{'fits' if self.fits else 'DOES NOT FIT'}; {est}")


def compile_abstract_step(family: Any, mesh: jax.sharding.Mesh, batch_size: int,
                          microbatches: int = 1) -> tuple[train.Trainer, Any]:
    """(trainer, compiled train step) for `mesh` from abstract state and batch: nothing is
    allocated or run, so any mesh (simulated devices, a TPU topology) works."""
    trainer = train.Trainer(family, mesh, train.make_optimizer(1000), microbatches=microbatches,
                            rules=partitioning.axis_rules())
    abstract_batch = {k: jax.ShapeDtypeStruct((batch_size,) + v.shape[1:], v.dtype,
                                              sharding=trainer.batch_shardings[k])
                      for k, v in family.dummy_batch().items()}
    with trainer.activate():
        compiled = trainer._step.lower(trainer.abstract_state, abstract_batch).compile()  # pylint: disable=protected-access
    return trainer, compiled


def compile_train_step(family: Any, devices: Sequence[Any], topology: str, batch_size: int,
                       microbatches: int = 1) -> AotResult:
    """Compiles `family`'s sharded train step (gin's mesh and optimizer) for `devices`."""
    chip, hbm, peak_flops = chip_info(devices[0])
    mesh = partitioning.make_mesh(devices=devices)
    t0 = time.perf_counter()
    trainer, compiled = compile_abstract_step(family, mesh, batch_size, microbatches)
    compile_sec = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    params_dev, _ = partitioning.shard_bytes(trainer.abstract_state.params)
    opt_dev, _ = partitioning.shard_bytes(trainer.abstract_state.opt_state)
    temp = int(stats.temp_size_in_bytes)
    # The donated state is updated in place, so arguments + temporaries is the step's peak.
    peak_bytes = int(stats.argument_size_in_bytes) + temp
    est = float(cost.get("optimal_seconds", 0.0)) if cost else 0.0
    step_flops = family.train_flops_per_example(trainer.frozen) * batch_size
    return AotResult(
        topology=topology, chip=chip, chips=len(devices), mesh=dict(mesh.shape), global_batch_size=batch_size,
        microbatches=microbatches, remat_policy=str(getattr(family.config, "remat_policy", "n/a")),
        num_params=count_params(trainer.abstract_state.params), params_bytes=params_dev, opt_state_bytes=opt_dev,
        temp_bytes=temp, peak_bytes=peak_bytes, hbm_bytes=hbm, fits=peak_bytes <= hbm,
        estimated_step_sec=est or None, train_flops_per_step=step_flops,
        estimated_mfu=step_flops / (est * peak_flops * len(devices)) if est > 0 else None,
        compile_sec=round(compile_sec, 1))
