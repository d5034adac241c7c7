"""TPU slice shapes: accelerator type (`v5p-16`) -> chips, hosts, topology, GKE labels and the
TPU VM runtime image."""
from __future__ import annotations

import dataclasses
import re

from simvlm_jax.cli import UserError


@dataclasses.dataclass(frozen=True)
class Generation:
    cores_per_chip: int  # accelerator-type sizes count TensorCores for v4/v5p, chips for v5e/v6e
    three_d: bool
    runtime_version: str  # gcloud compute tpus tpu-vm create --version
    gke_accelerator: str  # cloud.google.com/gke-tpu-accelerator
    hbm_gib: int


GENERATIONS = {
    "v4": Generation(2, True, "tpu-ubuntu2204-base", "tpu-v4-podslice", 32),
    "v5p": Generation(2, True, "v2-alpha-tpuv5", "tpu-v5p-slice", 95),
    "v5litepod": Generation(1, False, "v2-alpha-tpuv5-lite", "tpu-v5-lite-podslice", 16),
    "v6e": Generation(1, False, "v2-alpha-tpuv6e", "tpu-v6e-slice", 32),
}

# chips -> topology (the shapes GKE node pools and queued resources offer by default)
TOPOLOGY_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
               512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
TOPOLOGY_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


@dataclasses.dataclass(frozen=True)
class Slice:
    accelerator_type: str
    generation: str
    chips: int
    hosts: int
    chips_per_host: int
    topology: str
    runtime_version: str
    gke_accelerator: str


def parse_slice(accelerator_type: str, flag: str = "--tpu_type") -> Slice:
    m = re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", accelerator_type)
    if not m:
        raise UserError(f"{flag}={accelerator_type!r}: expected <generation>-<size> with generation one of "
                        f"{', '.join(GENERATIONS)}, e.g. {flag}=v5p-16")
    gen = GENERATIONS[m.group(1)]
    size = int(m.group(2))
    chips, rem = divmod(size, gen.cores_per_chip)
    table = TOPOLOGY_3D if gen.three_d else TOPOLOGY_2D
    if rem or chips not in table:
        sizes = ", ".join(f"{m.group(1)}-{c * gen.cores_per_chip}" for c in sorted(table))
        raise UserError(f"{flag}={accelerator_type!r}: not a slice size this launcher knows; choose from {sizes}")
    # 4 chips per host, except single-host v5e/v6e slices of up to 8 chips
    per_host = chips if (not gen.three_d and chips <= 8) or chips < 4 else 4
    return Slice(accelerator_type, m.group(1), chips, chips // per_host, per_host, table[chips],
                 gen.runtime_version, gen.gke_accelerator)
