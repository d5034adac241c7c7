"""Random-access data sources read by grain, wrapped as seqio DataSources.

* `TarShardSource`: webdataset tar shards as img2dataset writes them
  (`{key}.jpg|png|webp` + `{key}.txt|json` per sample). The tar headers are
  indexed once, then any sample is one positioned read, which gives grain global
  shuffling, exact resume and disjoint per-host slices.
* `TextLineSource`: text-only corpora, one document per line.

`SeqioSource` makes either one a `seqio.DataSource`, so tasks are registered,
listed and mixed with seqio's registries, while grain does the reading.
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import numpy as np
import seqio

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "json")


def expand_paths(patterns: str | Sequence[str]) -> list[str]:
    """Expands a glob / comma-separated list / list of globs; errors name what is missing."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p]
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        matches = [m for m in matches if os.path.exists(m)]
        if not matches:
            raise FileNotFoundError(f"No files match {pattern!r}. Check the path in your gin config "
                                    f"(or run the prepare step for the built-in data).")
        paths.extend(matches)
    return paths


class _FileHandles(threading.local):
    """One open file per path per thread (grain reads with several threads)."""

    def __init__(self):
        self.files: dict[str, Any] = {}

    def get(self, path: str):
        f = self.files.get(path)
        if f is None:
            f = self.files[path] = open(path, "rb")
        return f


def index_tar(path: str) -> list[dict[str, Any]]:
    """Returns one entry per sample: {'key', 'members': {ext: (offset, size)}}.

    A truncated tar keeps the samples read before the damage.
    """
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                base = os.path.basename(info.name)
                key, _, ext = base.partition(".")
                full_key = os.path.join(os.path.dirname(info.name), key)
                if full_key not in samples:
                    samples[full_key] = {}
                    order.append(full_key)
                samples[full_key][ext.lower()] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError, EOFError):
        pass  # truncated/corrupt tail: keep what was indexed
    size = os.path.getsize(path)
    out = []
    for k in order:
        members = {e: (o, s) for e, (o, s) in samples[k].items() if o + s <= size}
        out.append({"key": k, "members": members})
    return out


class TarShardSource:
    """grain RandomAccessDataSource over the samples of webdataset tar shards."""

    def __init__(self, paths: str | Sequence[str], num_index_threads: int = 8):
        self.paths = expand_paths(paths)
        with ThreadPoolExecutor(num_index_threads) as pool:
            per_shard = list(pool.map(index_tar, self.paths))
        self._shard = np.concatenate([np.full(len(s), i, np.int32) for i, s in enumerate(per_shard)]
                                     or [np.zeros(0, np.int32)])
        self._entries = [e for s in per_shard for e in s]
        self._handles = _FileHandles()

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self._entries[index]
        f = self._handles.get(self.paths[self._shard[index]])
        record: dict[str, Any] = {"__key__": entry["key"], "__shard__": self.paths[self._shard[index]]}
        for ext, (offset, size) in entry["members"].items():
            f.seek(offset)
            record[ext] = f.read(size)
        return record

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_handles")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._handles = _FileHandles()

    def __repr__(self) -> str:
        return f"TarShardSource({len(self.paths)} shards, {len(self)} samples)"


class TextLineSource:
    """grain RandomAccessDataSource over non-empty lines of text files."""

    def __init__(self, paths: str | Sequence[str]):
        self.paths = expand_paths(paths)
        file_ids, offsets = [], []
        for i, path in enumerate(self.paths):
            pos = 0
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        file_ids.append(i)
                        offsets.append(pos)
                    pos += len(line)
        self._file = np.asarray(file_ids, np.int32)
        self._offset = np.asarray(offsets, np.int64)
        self._handles = _FileHandles()

    def __len__(self) -> int:
        return len(self._offset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        f = self._handles.get(self.paths[self._file[index]])
        f.seek(int(self._offset[index]))
        return {"__key__": f"{self._file[index]}:{self._offset[index]}", "text": f.readline()}

    __getstate__ = TarShardSource.__getstate__
    __setstate__ = TarShardSource.__setstate__

    def __repr__(self) -> str:
        return f"TextLineSource({len(self.paths)} files, {len(self)} lines)"


class SeqioSource(seqio.DataSource):
    """A seqio DataSource backed by a grain random-access source.

    `grain_source(split)` is what the grain pipeline reads; `get_dataset` exposes
    the same raw records to tf.data-based seqio tooling for inspection.
    """

    def __init__(self, split_to_factory: Mapping[str, Any]):
        """`split_to_factory`: split name -> zero-arg callable building the grain source
        (built on first use, so registering a task touches no files)."""
        self._split_to_factory = dict(split_to_factory)
        self._built: dict[str, Any] = {}
        super().__init__(splits=tuple(self._split_to_factory))

    def grain_source(self, split: str):
        if split not in self._split_to_factory:
            raise ValueError(f"Split {split!r} not in this task's source; "
                             f"available: {sorted(self._split_to_factory)}")
        if split not in self._built:
            self._built[split] = self._split_to_factory[split]()
        return self._built[split]

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str) -> Sequence[str]:
        return list(getattr(self.grain_source(split), "paths", []))

    def num_input_examples(self, split: str) -> int:
        return len(self.grain_source(split))

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None, *args, **kwargs):
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        src = self.grain_source(split)
        index, num = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
        order = np.arange(index, len(src), num)
        if shuffle:
            np.random.default_rng(seed).shuffle(order)

        def gen():
            for i in order:
                rec = src[int(i)]
                yield {k: (v.encode() if isinstance(v, str) else v) for k, v in rec.items()}

        first = src[int(order[0])] if len(order) else {}
        sig = {k: tf.TensorSpec((), tf.string) for k in first}
        return tf.data.Dataset.from_generator(gen, output_signature=sig)


def read_json(record: Mapping[str, Any]) -> dict:
    """The sample's .json metadata ({} if absent or unreadable)."""
    raw = record.get("json")
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
