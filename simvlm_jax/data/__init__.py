"""Data: sources, preprocessors, seqio tasks, grain pipeline, tokenizers.

Every module that loads TensorFlow (through seqio, tfds or tf.data) is in this package,
so TensorFlow is kept on the CPU here, before any of them imports it.
"""
from simvlm_jax.data import tf_env  # noqa: F401  (sets TF_ENABLED_DEVICE_TYPES before TensorFlow loads)
