"""Host (CPU) memory housekeeping."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc only


def release_freed_memory() -> bool:
    """Hands the pages that malloc holds free back to the OS (glibc `malloc_trim`); False where
    the C library has no such call (macOS, musl). Called after compiling, after the init and after
    each checkpoint save (tensorstore's writer threads hold 0.4 GB of CoCa-B/32's save).

    XLA compiles on worker threads, each allocating from its own malloc arena, and an arena keeps
    what was freed in it: after compiling CoCa-B/32's train step on CPU the process held 1.07 GB
    of RSS, 0.51 GB after this call; the step benchmark's peak RSS fell from 5.71 to 5.11 GB."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
