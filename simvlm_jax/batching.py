"""Fixed-size batches over host arrays: the last one zero-padded, so every call of a jitted
function sees one compiled shape (captioning, evaluation, zero-shot)."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """`x` with zero rows appended up to `size` rows (unchanged if it has them)."""
    n = len(x)
    if n >= size:
        return x
    return np.concatenate([x, np.zeros((size - n,) + x.shape[1:], x.dtype)])


def padded_batches(x: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """(batch of exactly `batch_size` rows, number of real rows) over `x`."""
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        yield pad_rows(chunk, batch_size), len(chunk)


def map_batches(fn: Callable[[np.ndarray], Any], x: np.ndarray, batch_size: int) -> np.ndarray:
    """fn over fixed-size batches of x (at most len(x) rows each); outputs of the real rows
    concatenated along axis 0."""
    batch_size = max(1, min(batch_size, len(x)))
    return np.concatenate([np.asarray(fn(chunk))[:n] for chunk, n in padded_batches(x, batch_size)])
