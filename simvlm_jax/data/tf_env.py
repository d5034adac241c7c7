"""Keeps TensorFlow (loaded by seqio, tfds and the tf.data sources) on the CPU.

TensorFlow only reads data here; accelerators belong to JAX. Its GPU device factory
would otherwise probe CUDA when TensorFlow first runs an op: on a machine without a
GPU that logs `failed call to cuInit: CUDA error` on every run, and on a GPU machine
it initializes CUDA in TensorFlow for nothing. `TF_ENABLED_DEVICE_TYPES` turns the
factory off before TensorFlow loads; unlike `CUDA_VISIBLE_DEVICES` it leaves JAX's
view of the GPUs alone. A value the user set is kept.
"""
from __future__ import annotations

import os

TF_DEVICE_TYPES_ENV = "TF_ENABLED_DEVICE_TYPES"


def keep_tensorflow_on_cpu() -> None:
    """Enables only TensorFlow's CPU device (must run before TensorFlow is imported)."""
    os.environ.setdefault(TF_DEVICE_TYPES_ENV, "CPU")


keep_tensorflow_on_cpu()
