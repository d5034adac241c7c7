"""A run's files -- WORK_DIR, eval and export directories -- on a local disk or in a bucket.

Any of them may be a URL such as gs://bucket/run: I/O on them goes through `etils.epath`,
which reaches gs:// through TensorFlow's GCS filesystem (TensorFlow is a dependency), as
orbax's checkpoints do; credentials are Google's Application Default Credentials (on a Cloud
VM, its service account). Local paths keep their plain-file behaviour, byte for byte.

Object stores have no appends and no directory renames (a rename is a copy + delete of each
object), but a single-object write is atomic: readers see the old object or the new one. So
remote files are written whole and directly (no tmp-then-rename, which a local export keeps);
files that grow (metrics.jsonl, TensorBoard events) live in a local staging directory that
`LocalMirror` uploads whole, and directories are uploaded file by file (`upload_dir`).
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import tempfile
from typing import Iterable, Iterator

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs (gs://, s3://, ...): files reached through etils.epath, not the local disk."""
    return "://" in os.fspath(path)


def display_path(path: str | os.PathLike) -> str:
    """`path` for logs and summaries: a URL as given, a local path made absolute."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(path)


def makedirs(path: str | os.PathLike) -> None:
    """`os.makedirs(path, exist_ok=True)`, also for URLs."""
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of a local file or URL."""
    return epath.Path(path).read_text(encoding="utf-8")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes UTF-8 `text` to a local file (as `open(path, 'w', encoding='utf-8')`) or a URL
    (one object, replaced whole)."""
    epath.Path(path).write_text(text, encoding="utf-8")


def mtime(path: str | os.PathLike) -> float:
    """Modification time in seconds since the epoch (whole seconds for URLs)."""
    return float(epath.Path(path).stat().mtime) if is_remote(path) else os.path.getmtime(path)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies one file; either side may be a URL (local to local: `shutil.copy`, mode bits too)."""
    if is_remote(src) or is_remote(dst):
        epath.Path(src).copy(epath.Path(dst), overwrite=True)
    else:
        shutil.copy(src, dst)


def upload_dir(local_dir: str, dst: str | os.PathLike, last: Iterable[str] = ()) -> None:
    """Copies the files under `local_dir` to `dst` (a URL or a local path), keeping relative
    paths; the files named in `last` (relative paths) go last, so that a reader that checks for
    them never sees a half-copied directory as complete."""
    last = list(last)
    files = sorted(os.path.relpath(os.path.join(root, f), local_dir)
                   for root, _, names in os.walk(local_dir) for f in names)
    for rel in [f for f in files if f not in last] + [f for f in last if f in files]:
        _upload(os.path.join(local_dir, rel), epath.Path(dst) / rel)


def _upload(local: str, target: epath.Path) -> None:
    """Copies the local file `local` to `target` (one object on a bucket), streaming."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(local, "rb") as src, target.open("wb") as dst:
        dst.write(b"")  # tf.io.gfile creates the file at the first write: an empty one too
        shutil.copyfileobj(src, dst)


@functools.cache
def _download_dir() -> str:
    """A per-process directory for `local_copy`, removed at exit."""
    path = tempfile.mkdtemp(prefix="simvlm_jax_download_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def local_copy(path: str) -> str:
    """`path` itself if local; for a URL, a local copy of the file (downloaded once per process and
    kept until exit), for readers that take only a local path and may read it later (tokenizers)."""
    if not is_remote(path):
        return path
    dst = os.path.join(_download_dir(), path.replace("://", "/", 1).lstrip("/"))
    if not os.path.exists(dst):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        _download(epath.Path(path), dst + ".part")  # a failed download leaves only the .part file
        os.replace(dst + ".part", dst)
    return dst


@contextlib.contextmanager
def as_local_file(path: str) -> Iterator[str]:
    """`path` itself if local; for a URL, a temporary local copy of the file, removed on exit."""
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="simvlm_jax_download_") as tmp:
        local = os.path.join(tmp, os.path.basename(path))
        _download(epath.Path(path), local)
        yield local


def _download(src: epath.Path, local: str) -> None:
    """Copies `src` (a URL) to the local file `local`, streaming; FileNotFoundError if it is missing."""
    with src.open("rb") as f, open(local, "wb") as out:
        shutil.copyfileobj(f, out)


class LocalMirror:
    """A local staging directory whose files are uploaded, whole, to the remote directory
    `remote_dir`: for files that grow by appends (metrics.jsonl, TensorBoard event files),
    which object stores cannot append to. `pull` fetches a file to append to; `push` uploads
    the files that changed since the last push. The staging directory goes with the object."""

    def __init__(self, remote_dir: str):
        self.remote_dir = remote_dir
        self._tmp = tempfile.TemporaryDirectory(prefix="simvlm_jax_mirror_")
        self.local_dir = self._tmp.name
        self._pushed: dict[str, tuple[int, int]] = {}

    def pull(self, name: str) -> None:
        """Copies `remote_dir/name` into the staging directory if it exists (and marks it pushed)."""
        src = epath.Path(self.remote_dir) / name
        if src.exists():
            dst = os.path.join(self.local_dir, name)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            _download(src, dst)
            self._pushed[name] = self._signature(dst)

    def push(self) -> None:
        """Uploads every staged file whose size or mtime changed since it was last pushed."""
        for root, _, names in os.walk(self.local_dir):
            for f in names:
                local = os.path.join(root, f)
                rel = os.path.relpath(local, self.local_dir)
                sig = self._signature(local)
                if self._pushed.get(rel) != sig:
                    _upload(local, epath.Path(self.remote_dir) / rel)
                    self._pushed[rel] = sig

    def cleanup(self) -> None:
        """Removes the staging directory (push first)."""
        self._tmp.cleanup()

    @staticmethod
    def _signature(path: str) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
