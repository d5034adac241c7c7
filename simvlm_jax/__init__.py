"""simvlm_jax: vision-language pretraining in JAX/Flax (SimVLM, CoCa, mPLUG, Flamingo)."""
from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os


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
    # An explicit choice (JAX_PLATFORMS, jax_platforms, JAX_FORCE_TPU_INIT) always wins. Set in
    # this process's JAX config only (backends start lazily), not in os.environ, so that the
    # processes it launches (sbatch, a TPU VM's ssh) do not inherit a CPU-only setting.
    if "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ or not _cpu_only_machine_with_libtpu():
        return
    import jax  # pylint: disable=g-import-not-at-top
    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")


_skip_absent_tpu()
