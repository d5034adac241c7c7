"""simvlm_jax: vision-language pretraining in JAX/Flax (SimVLM, CoCa, mPLUG, Flamingo)."""
from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import sys


def _cpu_only_machine_with_libtpu() -> bool:
    """libtpu is installed (the `aot`/`test` extras) but this machine has no TPU chips and no
    other accelerator plugin. JAX would still load libtpu's runtime, which costs ~2 s and prints
    a screen of TPU_ACCELERATOR_TYPE/TPU_WORKER_HOSTNAMES warnings on every run."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):  # TPU chips (as JAX looks for them)
        return False
    if glob.glob("/dev/nvidia[0-9]*") or importlib.metadata.entry_points(group="jax_plugins"):
        return False
    return importlib.util.find_spec("jax_plugins") is None


def _skip_absent_tpu() -> None:
    # An explicit choice (JAX_PLATFORMS, JAX_FORCE_TPU_INIT) always wins.
    if "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ or not _cpu_only_machine_with_libtpu():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported before us: set it in JAX's config too (backends start lazily)
        sys.modules["jax"].config.update("jax_platforms", "cpu")


_skip_absent_tpu()
