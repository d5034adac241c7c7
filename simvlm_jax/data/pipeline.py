"""grain input pipeline: a seqio task or mixture -> per-host batches -> global jax.Arrays.

Stage order (each example passes each stage once):
  source -> global shuffle (per epoch) -> repeat -> preprocessors (per-example
  RNG keyed by the global index) -> mixture -> this host's slice -> [worker
  processes] -> drop skipped -> batch.
Because randomness and mixing are keyed by the *global* position, the global
batch at step s holds the same examples whatever the host or worker count, and
the iterator state (`get_state()`) is a few integers that orbax checkpoints.

An example skipped for bad data stays in the stream as a `Skipped` marker until
"drop skipped", in the trainer's process, counts its reasons and drops it: so
`skipped_counts()` holds the examples skipped before the batches read so far,
whatever the worker count (a worker's own counters never reach the trainer).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any, Sequence

# The input pipeline must never take accelerator memory. `simvlm_jax.data.tf_env` (run by
# this package's __init__) already keeps TensorFlow's device factories to the CPU, with no
# CUDA probe; if a user enabled TF's GPUs anyway, hide them here before seqio/tfds below
# use TF, so the imports after this block are below code on purpose.
import tensorflow as tf
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # already initialized; nothing was placed on a GPU by us
    pass

# pylint: disable=g-import-not-at-top  (after hiding GPUs from TensorFlow, above)
from absl import flags  # noqa: E402
import gin  # noqa: E402
import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import seqio  # noqa: E402

from simvlm_jax.data import preprocessors as pp  # noqa: E402

log = logging.getLogger("simvlm_jax")
# pylint: enable=g-import-not-at-top


def _task_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)) % (2**31)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Stands in for an example dropped for bad data: carries its skip reasons out of the grain
    worker process that preprocessed it, to be counted where the trainer reads the counts."""
    reasons: tuple[str, ...]


class Preprocess(grain.transforms.RandomMap):
    """A task's preprocessors as one grain transform: one dataset stage per example instead of
    one per preprocessor (each grain stage costs ~30 us/example of bookkeeping). RandomMaps
    draw from the example's rng, keyed by its global index as grain keys it.

    A skipped example is None, its reasons counted in this process; with `carry_skips` it is a
    `Skipped` marker instead (for `drop_skipped` to count in the batching process), and a kept
    example that lost parts (an interleaved document's unreadable images) carries their reasons
    under `SKIPS_KEY` to the same place.
    """

    def __init__(self, transforms: Sequence[Any], carry_skips: bool = False):
        self.transforms = tuple(transforms)
        self.carry_skips = carry_skips

    def random_map(self, element: Any, rng: np.random.Generator) -> Any:
        if not self.carry_skips:
            return self._apply(element, rng)
        with pp.collect_skips() as reasons:
            element = self._apply(element, rng)
        if element is None:
            return Skipped(tuple(reasons))
        if reasons and isinstance(element, dict):
            element = {**element, SKIPS_KEY: tuple(reasons)}
        return element

    def _apply(self, element: Any, rng: np.random.Generator) -> Any:
        for t in self.transforms:
            if element is None:  # skipped (bad data): later transforms do not run
                return None
            if isinstance(t, grain.transforms.RandomMap):
                element = t.random_map(element, rng)
            elif isinstance(t, grain.transforms.Map):
                element = t.map(element)
            else:
                element = t(element)
        return element


SKIPS_KEY = "__skips__"  # a kept example's reasons for the parts of it that were dropped


def drop_skipped(element: Any) -> bool:
    """grain filter: counts a `Skipped` marker's reasons in this process and drops it; counts a
    kept example's `SKIPS_KEY` reasons and removes them from it (here rather than in a map stage
    of its own: a grain stage costs ~30 us per example)."""
    if isinstance(element, Skipped):
        pp.count_skipped(element.reasons)
        return False
    if isinstance(element, dict) and SKIPS_KEY in element:
        pp.count_skipped(element.pop(SKIPS_KEY))
    return True


def _features(task: seqio.Task) -> tuple[str, ...] | None:
    """The features a task's examples end with (its last `SelectFeatures`), None if unknown."""
    return next((p.features for p in reversed(task.preprocessors) if isinstance(p, pp.SelectFeatures)), None)


def check_mixable(mixture: seqio.Mixture) -> None:
    """One batch holds one kind of example: a mixture of tasks whose examples have different
    features is an error naming them. (seqio itself refuses tasks of other output features, e.g.
    PrefixLM and interleaved; this catches the rest, e.g. image-text with and without the MLM
    features.)"""
    by_task = {t.name: _features(t) for t in mixture.tasks}
    if len({tuple(f) for f in by_task.values() if f is not None}) > 1:
        raise ValueError(f"Mixture {mixture.name!r} mixes tasks with different features, which cannot share a "
                         f"batch: {by_task}. Mix tasks of one kind (image_text_task / text_task, or "
                         f"interleaved_task).")


def task_dataset(task: seqio.Task, split: str, seed: int, shuffle: bool = True,
                 repeat: bool = True, carry_skips: bool = False) -> grain.MapDataset:
    """One task as a grain MapDataset of preprocessed examples; a skipped one is None (counted
    in the process that preprocessed it) or with `carry_skips` a `Skipped` marker."""
    src = task.source.grain_source(split)
    if len(src) == 0:
        raise ValueError(f"Task {task.name!r} split {split!r} has no examples ({src!r})")
    ds = grain.MapDataset.source(src).seed(_task_seed(seed, task.name))
    if shuffle:
        ds = ds.shuffle()
    if repeat:
        ds = ds.repeat()
    return ds.random_map(Preprocess(task.preprocessors, carry_skips))


@gin.configurable
def make_train_iterator(mixture_or_task_name: str = gin.REQUIRED, global_batch_size: int = gin.REQUIRED,
                        seed: int = 0, split: str = "train", num_threads: int = 4,
                        prefetch_buffer_size: int = 32, worker_count: int = 0,
                        process_index: int | None = None, process_count: int | None = None,
                        num_steps: int | None = None, warn_epochs: float = 10.0
                        ) -> grain.DatasetIterator:
    """Infinite iterator of this host's batches (dicts of numpy arrays).

    `worker_count > 0` adds grain multiprocessing workers (output order unchanged). With
    `num_steps`, a dataset smaller than the batch, or one a run would repeat more than
    `warn_epochs` times, is logged once with the numbers (`epochs_per_run`).
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be divisible by the "
                         f"process count {process_count}")
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    if num_steps:
        for line in dataset_size_warnings(epochs_per_run(mixture_or_task_name, split, global_batch_size,
                                                         num_steps), global_batch_size, warn_epochs):
            log.warning("%s", line)
    if isinstance(provider, seqio.Mixture):
        check_mixable(provider)
        tasks = provider.tasks
        weights = [provider.get_rate(t) for t in tasks]
        ds = grain.MapDataset.mix([task_dataset(t, split, seed, carry_skips=True) for t in tasks], weights)
    else:
        ds = task_dataset(provider, split, seed, carry_skips=True)
    ds = ds[process_index::process_count]
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=prefetch_buffer_size))
    if worker_count > 0:
        # Workers preprocess interleaved elements (worker w: w, w+W, ...) and are read back
        # round-robin, then batched here: batches equal the worker-free pipeline's, bad data
        # included, because a skipped example stays in its worker's stream as a marker.
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; we don't use absl's CLI
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    # Here, in the trainer's process: counts what the workers skipped, where skipped_counts() reads.
    it_ds = it_ds.filter(drop_skipped)
    it_ds = it_ds.batch(global_batch_size // process_count, drop_remainder=True)
    return iter(it_ds)


def epochs_per_run(mixture_or_task_name: str, split: str, global_batch_size: int,
                   num_steps: int) -> dict[str, tuple[int, float]]:
    """{task: (examples in its split, times a run of `num_steps` reads them)}; a mixture
    draws from each task in proportion to its rate."""
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    rates = [provider.get_rate(t) for t in tasks] if isinstance(provider, seqio.Mixture) else [1.0]
    total = float(sum(rates))
    out = {}
    for task, rate in zip(tasks, rates):
        size = len(task.source.grain_source(split))
        out[task.name] = (size, num_steps * global_batch_size * rate / total / max(size, 1))
    return out


def dataset_size_warnings(sizes: dict[str, tuple[int, float]], global_batch_size: int,
                          warn_epochs: float) -> list[str]:
    """Lines for tasks smaller than the batch or read more than `warn_epochs` times per run."""
    lines = []
    for name, (size, epochs) in sizes.items():
        if size < global_batch_size:
            lines.append(f"task {name!r} has {size:,} examples, fewer than the global batch of "
                         f"{global_batch_size:,}: every batch repeats examples ({epochs:,.0f} epochs "
                         f"this run); lower BATCH_SIZE or add data")
        elif epochs > warn_epochs:
            lines.append(f"task {name!r} has {size:,} examples and this run reads it {epochs:,.1f} "
                         f"times (> make_train_iterator.warn_epochs={warn_epochs:g}); check NUM_STEPS "
                         f"and BATCH_SIZE")
    return lines


def skipped_counts() -> dict[str, int]:
    """Examples skipped for bad data, by reason: those before the batches this process's train
    iterators returned (grain workers' included), plus any that `task_dataset` (without
    `carry_skips`) or the preprocessors themselves skipped in this process."""
    return pp.skipped_counts()
