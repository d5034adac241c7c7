"""grain input pipeline: a seqio task or mixture -> per-host batches -> global jax.Arrays.

Stage order (each example passes each stage once):
  source -> global shuffle (per epoch) -> repeat -> preprocessors (per-example
  RNG keyed by the global index) -> mixture -> this host's slice -> batch.
Because randomness and mixing are keyed by the *global* position, the global
batch at step s holds the same examples whatever the host or worker count, and
the iterator state (`get_state()`) is a few integers that orbax checkpoints.
"""
from __future__ import annotations

import hashlib

# The input pipeline must never take accelerator memory: hide GPUs from TF
# (imported by seqio/tfds) before anything imports it.
import tensorflow as tf  # noqa: E402  pylint: disable=g-import-not-at-top
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # already initialized; nothing was placed on a GPU by us
    pass

from typing import Any, Sequence  # noqa: E402

import gin  # noqa: E402
import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import seqio  # noqa: E402

from simvlm_jax.data import preprocessors as pp  # noqa: E402


def _task_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)) % (2**31)


class Preprocess(grain.transforms.RandomMap):
    """A task's preprocessors as one grain transform: one dataset stage per example instead of
    one per preprocessor (each grain stage costs ~30 us/example of bookkeeping). RandomMaps
    draw from the example's rng, keyed by its global index as grain keys it."""

    def __init__(self, transforms: Sequence[Any]):
        self.transforms = tuple(transforms)

    def random_map(self, element: Any, rng: np.random.Generator) -> Any:
        for t in self.transforms:
            if element is None:  # skipped (bad data): grain drops it
                return None
            if isinstance(t, grain.transforms.RandomMap):
                element = t.random_map(element, rng)
            elif isinstance(t, grain.transforms.Map):
                element = t.map(element)
            else:
                element = t(element)
        return element


def task_dataset(task: seqio.Task, split: str, seed: int, shuffle: bool = True,
                 repeat: bool = True) -> grain.MapDataset:
    """One task as a grain MapDataset of preprocessed examples (None = skipped)."""
    src = task.source.grain_source(split)
    if len(src) == 0:
        raise ValueError(f"Task {task.name!r} split {split!r} has no examples ({src!r})")
    ds = grain.MapDataset.source(src).seed(_task_seed(seed, task.name))
    if shuffle:
        ds = ds.shuffle()
    if repeat:
        ds = ds.repeat()
    return ds.random_map(Preprocess(task.preprocessors))


@gin.configurable
def make_train_iterator(mixture_or_task_name: str = gin.REQUIRED, global_batch_size: int = gin.REQUIRED,
                        seed: int = 0, split: str = "train", num_threads: int = 4,
                        prefetch_buffer_size: int = 32, worker_count: int = 0,
                        process_index: int | None = None, process_count: int | None = None
                        ) -> grain.DatasetIterator:
    """Infinite iterator of this host's batches (dicts of numpy arrays).

    `worker_count > 0` adds grain multiprocessing workers (output order unchanged).
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be divisible by the "
                         f"process count {process_count}")
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    if isinstance(provider, seqio.Mixture):
        tasks = provider.tasks
        weights = [provider.get_rate(t) for t in tasks]
        ds = grain.MapDataset.mix([task_dataset(t, split, seed) for t in tasks], weights)
    else:
        ds = task_dataset(provider, split, seed)
    ds = ds[process_index::process_count]
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=prefetch_buffer_size))
    if worker_count > 0:
        # Workers preprocess interleaved elements (worker w: w, w+W, ...) and are read back
        # round-robin, then batched here: batches equal the worker-free pipeline's (as long
        # as no example is skipped for bad data, which shifts later examples by one).
        from absl import flags  # pylint: disable=g-import-not-at-top
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; we don't use absl's CLI
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    it_ds = it_ds.batch(global_batch_size // process_count, drop_remainder=True)
    return iter(it_ds)


def skipped_counts() -> dict[str, int]:
    """Examples skipped for bad data in this process, by reason."""
    return pp.skipped_counts()
