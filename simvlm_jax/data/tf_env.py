"""Keeps TensorFlow (loaded by seqio, tfds and the tf.data sources) on the CPU.

TensorFlow only reads data here; accelerators belong to JAX. Its GPU device factory
would otherwise probe CUDA when TensorFlow first runs an op: on a machine without a
GPU that logs `failed call to cuInit: CUDA error` on every run, and on a GPU machine
it initializes CUDA in TensorFlow for nothing. `TF_ENABLED_DEVICE_TYPES` turns the
factory off before TensorFlow loads; unlike `CUDA_VISIBLE_DEVICES` it leaves JAX's
view of the GPUs alone. A value the user set is kept.

Loading TensorFlow's libraries also prints, before any log level applies, "Could not find
cuda drivers on your machine" (twice) and a CPU-instructions notice. The first `import
tensorflow` therefore runs with the process's native stderr captured, and every other line
it printed is passed on (also the oneDNN round-off notice: JAX does the math, TensorFlow only
decodes data). `TF_CPP_MIN_LOG_LEVEL=1` (unless set) hides TensorFlow's later
INFO lines.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import sys
import tempfile
from typing import Iterator

TF_DEVICE_TYPES_ENV = "TF_ENABLED_DEVICE_TYPES"
# Lines of TensorFlow's library loading that say nothing to a user of this framework.
IMPORT_NOISE = ("cudart_stub.cc", "All log messages before absl::InitializeLog()", "cpu_feature_guard.cc",
                "To enable the following instructions:", "oneDNN custom operations are on")


def keep_tensorflow_on_cpu() -> None:
    """Enables only TensorFlow's CPU device (must run before TensorFlow is imported)."""
    os.environ.setdefault(TF_DEVICE_TYPES_ENV, "CPU")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


@contextlib.contextmanager
def native_stderr_without(noise: tuple[str, ...]) -> Iterator[None]:
    """Captures file descriptor 2 (C++ logging writes there, bypassing sys.stderr) and, at the
    end, writes back every captured line that contains none of `noise`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(keepends=True)
                    if not any(n.encode() in line for n in noise)]
            if kept:
                os.write(2, b"".join(kept))


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Runs the first `import tensorflow` inside `native_stderr_without(IMPORT_NOISE)`."""

    def find_spec(self, fullname, path, target=None):  # pylint: disable=unused-argument
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once; the real finders find the spec
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def quiet_exec_module(module):
                with native_stderr_without(IMPORT_NOISE):
                    exec_module(module)
            spec.loader.exec_module = quiet_exec_module
        return spec


keep_tensorflow_on_cpu()
if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietTensorFlowImport())
