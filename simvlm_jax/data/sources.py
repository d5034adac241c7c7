"""Random-access data sources read by grain, wrapped as seqio DataSources.

Image-text sources return one dict per sample: the image bytes under an image
extension key ('jpg' / 'png' / 'webp'), the caption under 'txt' (bytes or str)
and/or JSON metadata under 'json' (with 'caption', maybe 'references'), and a
'__key__'. Text-only sources return {'__key__', 'text'}. `preprocessors.DecodeImage`
/ `LineToText` take it from there.

* `TarShardSource`: webdataset tar shards as img2dataset writes them
  (`{key}.jpg|png|webp` + `{key}.txt|json` per sample). The tar headers are
  indexed once, then any sample is one positioned read, which gives grain global
  shuffling, exact resume and disjoint per-host slices.
* `ParquetSource`: img2dataset `output_format="parquet"` / Hugging Face parquet
  exports (an image bytes column + a caption column), read by row group.
* `ArrayRecordSource`: ArrayRecord files written by `simvlm_jax.data.convert`
  (one msgpack map per record, see `encode_record`).
* `TfdsSource`: a TFDS dataset prepared in the array_record format
  (`tfds.data_source`), e.g. coco_captions.
* `CocoCaptionsSource`: COCO captions JSON or Karpathy's `dataset_coco.json` +
  an image directory; one record per image with every reference caption.
* `TextLineSource` / `JsonlTextSource`: text-only corpora (one document per line).
* `InterleavedJsonlSource` / `InterleavedTarSource`: interleaved image-text documents
  (OBELICS / MMC4 JSON, see `document_elements`) for Flamingo: {'__key__', 'elements'}.

A sample that cannot be read at read time (its shard disappeared, a truncated
tar member, a missing image file) is returned as `{'__key__', '__error__': reason}`;
the first preprocessor counts it under that reason and drops it, so a run never
stops on bad data. Problems visible at start (a pattern matching nothing, an
unprepared TFDS dataset, a missing column) raise at once with the path and the fix.

Paths with a scheme (gs://, s3://, hf://, memory://, file://, ...) are listed and read
through fsspec, whose package for the scheme must be installed (gs://: gcsfs, s3://: s3fs,
az://: adlfs); a missing one stops at start with the package to install. Tar members and
text lines are fetched with one ranged read each (no read-ahead for random access);
parquet and json files are opened as fsspec files. ArrayRecord files are opened by a C++
reader that takes a path: local (or FUSE-mounted) paths only, and URLs are refused.

`SeqioSource` makes any of them a `seqio.DataSource`, so tasks are registered,
listed and mixed with seqio's registries, while grain does the reading.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence

import fsspec
from fsspec.registry import known_implementations
import grain
import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "json")
# Image members we recognise but do not decode: skipped as 'image_unsupported_format'.
UNSUPPORTED_IMAGE_EXTS = ("gif", "bmp", "tif", "tiff", "heic", "heif", "avif", "svg", "ico", "jp2", "jxl")
ERROR_KEY = "__error__"
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4")


# ----------------------------------------------------------------------------- files

def is_remote(path: str) -> bool:
    """True for URLs (gs://, s3://, memory://, file://, ...), which are read through fsspec."""
    return "://" in str(path)


def _has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


class MissingPackageError(ImportError, ValueError):
    """A URL whose filesystem package is not installed. An ImportError, and a ValueError so that
    the CLI reports it as the one-line config error it is."""


def _backend_package(protocol: str) -> str:
    """The package fsspec needs for `protocol` (e.g. 'gcsfs' for gs)."""
    impl = known_implementations.get(protocol, {}).get("class", "")
    return impl.split(".")[0] or protocol


def filesystem(url: str):
    """(fsspec filesystem, path in it) for a URL. A missing backend is a MissingPackageError naming
    the package to install. Not cached here: fsspec caches instances itself, per process (fork-safe)."""
    protocol = url.split("://", 1)[0]
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        package = _backend_package(protocol)
        raise MissingPackageError(f"Reading {protocol}:// paths ({url}) needs the {package} package: "
                                  f"pip install {package}") from None
    except ValueError as e:
        raise ValueError(f"{url}: unknown filesystem protocol {protocol!r} ({e}).") from None


def _glob_url(pattern: str) -> list[str]:
    fs, path = filesystem(pattern)
    if not _has_magic(pattern):
        return [pattern] if fs.exists(path) else []
    return sorted(fs.unstrip_protocol(p) for p in fs.glob(path))


def _url_error(url: str, e: Exception) -> OSError:
    """Backend errors (HTTP, auth, ...) as OSError, so sources count them as unreadable."""
    return e if isinstance(e, OSError) else OSError(f"{url}: {type(e).__name__}: {e}")


def expand_paths(patterns: str | Sequence[str]) -> list[str]:
    """Expands a glob / comma-separated list / list of globs; errors name what is missing."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [p for p in str(patterns).split(",") if p]
    paths: list[str] = []
    for pattern in patterns:
        pattern = str(pattern)
        if is_remote(pattern):
            matches = _glob_url(pattern)
        else:
            matches = sorted(glob.glob(pattern)) if _has_magic(pattern) else [pattern]
            matches = [m for m in matches if os.path.exists(m)]
        if not matches:
            raise FileNotFoundError(f"No files match {pattern!r}. Check the path in your gin config "
                                    f"(or run the prepare step for the built-in data).")
        paths.extend(matches)
    if not paths:
        raise FileNotFoundError("No data files given: the path list is empty. Set it in your gin config.")
    return paths


def open_file(path: str):
    """Opens a local path, or a URL through fsspec, for binary reading (sequential reads)."""
    if is_remote(path):
        fs, p = filesystem(path)
        try:
            return fs.open(p, "rb")
        except Exception as e:  # pylint: disable=broad-except
            raise _url_error(path, e) from e
    return open(path, "rb")


def read_file(path: str) -> bytes:
    """A whole file's bytes (one request for a URL)."""
    if is_remote(path):
        fs, p = filesystem(path)
        try:
            return fs.cat_file(p)
        except Exception as e:  # pylint: disable=broad-except
            raise _url_error(path, e) from e
    with open(path, "rb") as f:
        return f.read()


def read_range(path: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of a URL: one ranged request (fsspec files would read ahead)."""
    fs, p = filesystem(path)
    try:
        return fs.cat_file(p, start=offset, end=offset + size)
    except Exception as e:  # pylint: disable=broad-except
        raise _url_error(path, e) from e


def is_dir(path: str) -> bool:
    if is_remote(path):
        fs, p = filesystem(path)
        return fs.isdir(p)
    return os.path.isdir(path)


def _reject_compressed(path: str, what: str) -> None:
    if path.lower().endswith(_COMPRESSED):
        raise ValueError(f"{path}: compressed files cannot be read by random access ({what}). "
                         f"Decompress it first (e.g. `gunzip -k {os.path.basename(path)}`).")


def error_record(key: str, reason: str) -> dict[str, Any]:
    """The record of a sample that could not be read (counted under `reason`, then dropped)."""
    return {"__key__": key, ERROR_KEY: reason}


def image_ext(data: bytes) -> str:
    """A record key for image bytes from their magic number ('png', 'webp', 'gif', else 'jpg')."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return "jpg"


class _FileHandles(threading.local):
    """Random-access reads: one open file per local path per thread (grain reads with several
    threads); URLs are read with one ranged request per read instead."""

    def __init__(self):
        self.files: dict[str, Any] = {}

    def get(self, path: str):
        f = self.files.get(path)
        if f is None:
            f = self.files[path] = open_file(path)
        return f

    def read(self, path: str, offset: int, size: int) -> bytes:
        """`size` bytes at `offset`; EOFError if the file is shorter (it shrank since indexing)."""
        if is_remote(path):
            data = read_range(path, offset, size)
        else:
            f = self.get(path)
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise EOFError(path)
        return data

    def drop(self, path: str) -> None:
        f = self.files.pop(path, None)
        if f is not None:
            try:
                f.close()
            except Exception:  # pylint: disable=broad-except
                pass


class _Picklable:
    """Drops per-thread handles / lazily opened readers when pickled (grain workers)."""
    _TRANSIENT = ("_handles",)

    def __getstate__(self):
        state = self.__dict__.copy()
        for k in self._TRANSIENT:
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset_transient()

    def _reset_transient(self):
        self._handles = _FileHandles()

    def close(self) -> None:
        """Closes the files the calling thread opened; a later read reopens them. Call it before
        exiting: native readers alive at interpreter teardown can abort it (pyarrow: SIGABRT)."""
        handles = self.__dict__.get("_handles")
        files = getattr(handles, "files", None) or {}
        while files:
            _, f = files.popitem()
            try:
                f.close()
            except Exception:  # pylint: disable=broad-except  (already broken: nothing to release)
                pass


# ----------------------------------------------------------------------------- tar

def index_tar(path: str) -> list[dict[str, Any]]:
    """Returns one entry per sample: {'key', 'members': {ext: (offset, size)}}.

    A truncated tar keeps the samples read before the damage; the sample cut by it
    (or, if the cut fell between samples, one marker entry) carries
    'error': 'tar_truncated', so every read of it is counted.
    """
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    order: list[str] = []
    damaged = False
    try:
        f = open_file(path)
    except OSError:
        return [{"key": f"{path}:unreadable", "members": {}, "error": "shard_unreadable"}]
    with f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(0)
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
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
            damaged = True  # truncated/corrupt tail: keep what was indexed
    out = []
    for k in order:
        members = {e: (o, s) for e, (o, s) in samples[k].items() if o + s <= size}
        entry = {"key": k, "members": members}
        if len(members) < len(samples[k]):
            entry["error"] = "tar_truncated"
            damaged = False  # counted through this sample
        out.append(entry)
    if damaged and size > 0:
        out.append({"key": f"{path}:truncated", "members": {}, "error": "tar_truncated"})
    return out


class TarShardSource(_Picklable):
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
        path = self.paths[self._shard[index]]
        if "error" in entry:
            return {**error_record(entry["key"], entry["error"]), "__shard__": path}
        record: dict[str, Any] = {"__key__": entry["key"], "__shard__": path}
        try:
            record.update(self._read_members(path, entry["members"]))
        except FileNotFoundError:
            self._handles.drop(path)
            return {**error_record(entry["key"], "shard_missing"), "__shard__": path}
        except (OSError, EOFError):
            self._handles.drop(path)
            return {**error_record(entry["key"], "shard_unreadable"), "__shard__": path}
        return record

    MAX_SPAN_GAP = 64 * 1024  # read a sample's members in one go unless they are further apart

    def _read_members(self, path: str, members: Mapping[str, tuple[int, int]]) -> dict[str, bytes]:
        """A sample's member bytes: one read of the span holding them all (one request for a URL;
        only tar headers lie between a sample's members as webdataset writes them)."""
        if not members:
            return {}
        start = min(o for o, _ in members.values())
        end = max(o + n for o, n in members.values())
        if end - start > sum(n for _, n in members.values()) + self.MAX_SPAN_GAP:
            return {ext: self._handles.read(path, o, n) for ext, (o, n) in members.items()}
        span = self._handles.read(path, start, end - start)
        return {ext: span[o - start: o - start + n] for ext, (o, n) in members.items()}

    def __repr__(self) -> str:
        return f"TarShardSource({len(self.paths)} shards, {len(self)} samples)"


# ----------------------------------------------------------------------------- text

def _index_lines(path: str) -> tuple[list[int], list[int]]:
    """(offset, length) of every non-empty line (the length includes its newline)."""
    offsets, lengths, pos = [], [], 0
    with open_file(path) as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
                lengths.append(len(line))
            pos += len(line)
    return offsets, lengths


class TextLineSource(_Picklable):
    """grain RandomAccessDataSource over non-empty lines of text files."""

    def __init__(self, paths: str | Sequence[str]):
        self.paths = expand_paths(paths)
        file_ids, offsets, lengths = [], [], []
        for i, path in enumerate(self.paths):
            _reject_compressed(path, type(self).__name__)
            offs, lens = _index_lines(path)
            file_ids.extend([i] * len(offs))
            offsets.extend(offs)
            lengths.extend(lens)
        self._file = np.asarray(file_ids, np.int32)
        self._offset = np.asarray(offsets, np.int64)
        self._length = np.asarray(lengths, np.uint32)  # a line over 4 GiB is not a document
        self._handles = _FileHandles()

    def __len__(self) -> int:
        return len(self._offset)

    def _line(self, index: int) -> tuple[str, bytes | dict]:
        path = self.paths[self._file[index]]
        key = f"{self._file[index]}:{self._offset[index]}"
        try:
            return key, self._handles.read(path, int(self._offset[index]), int(self._length[index]))
        except FileNotFoundError:
            self._handles.drop(path)
            return key, error_record(key, "shard_missing")
        except (OSError, EOFError):
            self._handles.drop(path)
            return key, error_record(key, "shard_unreadable")

    def __getitem__(self, index: int) -> dict[str, Any]:
        key, line = self._line(index)
        return line if isinstance(line, dict) else {"__key__": key, "text": line}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.paths)} files, {len(self)} lines)"


class JsonlTextSource(TextLineSource):
    """Text-only documents from JSON-lines files: `field` of each line's object (dots for nesting,
    e.g. 'meta.text'). A line that is not JSON is skipped as 'text_bad_json'."""

    def __init__(self, paths: str | Sequence[str], field: str = "text"):
        super().__init__(paths)
        self.field = field

    def __getitem__(self, index: int) -> dict[str, Any]:
        key, line = self._line(index)
        if isinstance(line, dict):
            return line
        try:
            value: Any = json.loads(line)
            for part in self.field.split("."):
                value = value.get(part) if isinstance(value, dict) else None
        except (ValueError, UnicodeDecodeError):
            return error_record(key, "text_bad_json")
        return {"__key__": key, "text": value if isinstance(value, (str, bytes)) else None}


# ----------------------------------------------------------------------------- parquet

IMAGE_COLUMNS = ("jpg", "image", "image_bytes", "png", "webp", "img")
CAPTION_COLUMNS = ("caption", "txt", "text")


class ParquetSource(_Picklable):
    """Image-text rows of parquet files (img2dataset parquet output, Hugging Face exports).

    `image_column`: a binary column, or a struct with a 'bytes' field (the Hugging Face
    Image feature); None picks the first of IMAGE_COLUMNS present. `caption_column`:
    a string column; None picks the first of CAPTION_COLUMNS. Other scalar columns
    (url, width, key, ...) go into the record's 'json' metadata.

    Rows are read by row group, and the last row groups read are cached per thread,
    so sequential reads are cheap; a globally shuffled read costs one row-group read
    per sample. For shuffled training on large data write small row groups
    (img2dataset: ~1 per shard is too large) or convert to ArrayRecord
    (`python -m simvlm_jax.data.convert --format parquet ...`).
    """
    _TRANSIENT = ("_handles", "_cache")
    CACHED_ROW_GROUPS = 2

    def __init__(self, paths: str | Sequence[str], image_column: str | None = None,
                 caption_column: str | None = None):
        self.paths = expand_paths(paths)
        counts, groups = [], []  # rows per (file, row group)
        schema = None
        for i, path in enumerate(self.paths):
            try:
                with open_file(path) as f:
                    meta = pq.ParquetFile(f).metadata
                    if schema is None:
                        schema = pq.ParquetFile(f).schema_arrow
            except Exception as e:  # pylint: disable=broad-except
                raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e}). "
                                 f"Check the path/pattern in your gin config.") from e
            for g in range(meta.num_row_groups):
                groups.append((i, g))
                counts.append(meta.row_group(g).num_rows)
        names = list(schema.names)
        self.image_column = image_column or next((c for c in IMAGE_COLUMNS if c in names), None)
        self.caption_column = caption_column or next((c for c in CAPTION_COLUMNS if c in names), None)
        for what, col, options in (("image_column", self.image_column, IMAGE_COLUMNS),
                                   ("caption_column", self.caption_column, CAPTION_COLUMNS)):
            if col is None or col not in names:
                raise ValueError(f"{self.paths[0]}: no {what} {col or ''} (looked for {list(options)}); "
                                 f"its columns are {names}. Set ParquetSource({what}=...) "
                                 f"(gin: source_kwargs={{'{what}': '...'}}).")
        self.meta_columns = [f.name for f in schema if f.name not in (self.image_column, self.caption_column)
                             and not pa.types.is_binary(f.type) and not pa.types.is_large_binary(f.type)
                             and not pa.types.is_struct(f.type)]
        self.key_column = "key" if "key" in names else None
        self._groups = np.asarray(groups, np.int64).reshape(-1, 2)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._reset_transient()

    def _reset_transient(self):
        self._handles = threading.local()
        self._cache = threading.local()

    def close(self) -> None:
        """Closes the parquet readers (and the files under them) the calling thread opened."""
        files = getattr(self._handles, "files", None) or {}
        while files:
            _, reader = files.popitem()
            reader.close(force=True)  # force: the file object is ours (open_file), not pyarrow's
        self._cache.groups = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _row_group(self, g: int):
        cache = getattr(self._cache, "groups", None)
        if cache is None:
            cache = self._cache.groups = collections.OrderedDict()
        if g in cache:
            cache.move_to_end(g)
            return cache[g]
        file_idx, group_idx = self._groups[g]
        files = getattr(self._handles, "files", None)
        if files is None:
            files = self._handles.files = {}
        path = self.paths[file_idx]
        if path not in files:
            files[path] = pq.ParquetFile(open_file(path))
        columns = [self.image_column, self.caption_column] + self.meta_columns
        # One thread per read: the pipeline's workers parallelize, and Arrow's pool threads still
        # running at interpreter exit abort it ("terminate called without an active exception").
        table = files[path].read_row_group(int(group_idx), columns=columns, use_threads=False).to_pydict()
        cache[g] = table
        while len(cache) > self.CACHED_ROW_GROUPS:
            cache.popitem(last=False)
        return table

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        g = int(np.searchsorted(self._starts, index, side="right") - 1)
        row = index - int(self._starts[g])
        path = self.paths[self._groups[g][0]]
        key = f"{os.path.basename(path)}:{index}"
        try:
            table = self._row_group(g)
        except FileNotFoundError:
            getattr(self._handles, "files", {}).pop(path, None)
            return error_record(key, "shard_missing")
        except Exception:  # pylint: disable=broad-except
            getattr(self._handles, "files", {}).pop(path, None)
            return error_record(key, "shard_unreadable")
        image = table[self.image_column][row]
        if isinstance(image, dict):  # Hugging Face Image feature: {'bytes': ..., 'path': ...}
            image = image.get("bytes")
        meta = {c: table[c][row] for c in self.meta_columns}
        if self.key_column and meta.get(self.key_column) is not None:
            key = str(meta[self.key_column])
        record: dict[str, Any] = {"__key__": key, "txt": table[self.caption_column][row]}
        if image:
            record[image_ext(image)] = image
        if meta:
            record["json"] = json.dumps(meta, default=str).encode("utf-8")
        return record

    def __repr__(self) -> str:
        return f"ParquetSource({len(self.paths)} files, {len(self)} rows, image={self.image_column!r}, " \
               f"caption={self.caption_column!r})"


# ----------------------------------------------------------------------------- array_record

def encode_record(record: Mapping[str, Any]) -> bytes:
    """The ArrayRecord record format: one msgpack map {str: bytes | str} per sample.

    Keys are the webdataset member names without the key ('jpg', 'txt', 'json', ...)
    plus '__key__' (str); values are the member bytes. Internal keys other than
    '__key__' (e.g. '__shard__') are not written.
    """
    out = {}
    for k, v in record.items():
        if k.startswith("__") and k != "__key__":
            continue
        if isinstance(v, (dict, list)):
            v = json.dumps(v).encode("utf-8")
        out[k] = v
    return msgpack.packb(out, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
    return msgpack.unpackb(data, raw=False)


class ArrayRecordSource(_Picklable):
    """Samples of ArrayRecord files written by `simvlm_jax.data.convert` (see `encode_record`),
    read through `grain.sources.ArrayRecordDataSource`."""
    _TRANSIENT = ("_source",)

    def __init__(self, paths: str | Sequence[str]):
        self.paths = expand_paths(paths)
        for p in self.paths:
            if is_remote(p):  # checked before the reader sees it (it may block trying to open a URL)
                raise ValueError(f"{p}: ArrayRecord files are read by a C++ reader that takes a local path, "
                                 f"not a URL. Copy the files to local disk (e.g. `gcloud storage cp`) or "
                                 f"mount the bucket (gcsfuse, mountpoint-s3) and give that path.")
        try:
            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        except Exception as e:  # pylint: disable=broad-except
            raise ValueError(f"Cannot read ArrayRecord files {self.paths[:3]}...: {type(e).__name__}: {e}. "
                             f"Write them with `python -m simvlm_jax.data.convert`.") from e
        self._len = len(self._source)

    def _reset_transient(self):
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            data = self._source[int(index)]
        except FileNotFoundError:
            return error_record(f"array_record:{index}", "shard_missing")
        except Exception:  # pylint: disable=broad-except
            return error_record(f"array_record:{index}", "shard_unreadable")
        try:
            return decode_record(data)
        except Exception:  # pylint: disable=broad-except
            return error_record(f"array_record:{index}", "record_corrupt")

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} files, {len(self)} records)"


# ----------------------------------------------------------------------------- tfds

def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _to_py(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return [_to_py(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return v


class TfdsSource(_Picklable):
    """Image-text records of a TFDS dataset prepared in the array_record format (random access).

    `image_key` is the image feature (read undecoded); `caption_key` the caption
    feature, '/'-separated for nested features ('captions/text' for coco_captions);
    a list-valued caption gives every element as 'references' and the first as 'txt'.
    None picks the first present of ('captions/text', 'caption', 'text', 'captions').
    Prepare with `tfds build NAME --data_dir=DIR --file_format=array_record`.
    """
    _TRANSIENT = ("_source",)
    CAPTION_KEYS = ("captions/text", "caption", "text", "captions", "sentences/raw")

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
                 image_key: str = "image", caption_key: str | None = None):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.caption_key = image_key, caption_key
        self._source = self._open()
        self._len = len(self._source)

    def _open(self):
        where = f"data_dir={self.data_dir!r}" if self.data_dir else "the default data_dir (~/tensorflow_datasets)"
        build = (f"tfds build {self.name.split(':')[0]} --file_format=array_record"
                 + (f" --data_dir={self.data_dir}" if self.data_dir else ""))
        try:
            builder = tfds.builder(self.name, data_dir=self.data_dir)
        except Exception as e:  # pylint: disable=broad-except
            raise FileNotFoundError(f"TFDS dataset {self.name!r} not found in {where} "
                                    f"({type(e).__name__}). Prepare it with `{build}`.") from None
        if not builder.is_prepared():
            raise FileNotFoundError(f"TFDS dataset {self.name!r} is not prepared in {where} "
                                    f"(looked in {builder.data_dir}). Prepare it with `{build}`.")
        fmt = str(getattr(builder.info.file_format, "value", builder.info.file_format))
        if fmt not in ("array_record", "parquet"):
            raise ValueError(f"TFDS dataset {self.name!r} in {builder.data_dir} is stored as {fmt}, which has no "
                             f"random access. Rebuild it with `{build}` (or `tfds convert_format "
                             f"--dataset_dir={builder.data_dir} --out_file_format=array_record`).")
        if self.split not in builder.info.splits:
            raise ValueError(f"TFDS dataset {self.name!r} has no split {self.split!r}; "
                             f"available: {sorted(builder.info.splits)}")
        decoders = {k: tfds.decode.SkipDecoding() for k, f in builder.info.features.items()
                    if isinstance(f, tfds.features.Image)}
        if self.image_key not in builder.info.features:
            raise ValueError(f"TFDS dataset {self.name!r} has no feature {self.image_key!r}; its features are "
                             f"{list(builder.info.features)}. Set TfdsSource(image_key=...).")
        return builder.as_data_source(split=self.split, decoders=decoders)

    def _reset_transient(self):
        self._source = self._open()

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = f"{self.name}/{self.split}:{index}"
        try:
            ex = _flatten(self._source[int(index)])
        except FileNotFoundError:
            return error_record(key, "shard_missing")
        except Exception:  # pylint: disable=broad-except
            return error_record(key, "shard_unreadable")
        record: dict[str, Any] = {"__key__": key}
        image = ex.get(self.image_key)
        if isinstance(image, (bytes, np.bytes_)) and image:
            record[image_ext(bytes(image))] = bytes(image)
        cap_key = self.caption_key or next((k for k in self.CAPTION_KEYS if k in ex), None)
        caption = _to_py(ex.get(cap_key)) if cap_key else None
        if isinstance(caption, list):
            refs = [c for c in caption if isinstance(c, str)]
            record["json"] = json.dumps({"references": refs}).encode("utf-8")
            caption = refs[0] if refs else None
        record["txt"] = caption
        return record

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} examples)"


# ----------------------------------------------------------------------------- coco

class CocoCaptionsSource(_Picklable):
    """COCO-style captions: one record per image, all its captions as json 'references',
    the first as 'txt'.

    `annotations_json` is either COCO's `captions_*.json` ({'images': [{'id', 'file_name'}],
    'annotations': [{'image_id', 'caption'}]}) or Karpathy's `dataset_coco.json`
    ({'images': [{'filename', 'filepath', 'sentences': [{'raw'}], 'split', 'cocoid'}]});
    `split` (str or list, Karpathy only) keeps those splits, e.g. ['train', 'restval'].
    Images are read from `image_dir/filepath/filename` (Karpathy) or `image_dir/file_name`.
    """

    def __init__(self, annotations_json: str, image_dir: str, split: str | Sequence[str] | None = None):
        (self.annotations_json,) = expand_paths(annotations_json)[:1]
        self.image_dir = image_dir
        if not is_dir(image_dir):
            raise FileNotFoundError(f"COCO image directory not found: {image_dir!r}. Set image_dir "
                                    f"(gin: source_kwargs={{'image_dir': '...'}}) to the folder holding the images.")
        try:
            with open_file(self.annotations_json) as f:
                data = json.load(f)
            images = data["images"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.annotations_json}: not a COCO captions / Karpathy json "
                             f"({type(e).__name__}: {e}).") from e
        splits = None if split is None else ({split} if isinstance(split, str) else set(split))
        self._items: list[tuple[str, list[str], Any]] = []  # (relative image path, captions, image id)
        if "annotations" in data:  # COCO format
            if splits is not None:
                raise ValueError(f"{self.annotations_json}: `split` filters Karpathy's dataset_coco.json; "
                                 f"COCO captions files are already one split.")
            caps: dict[Any, list[str]] = collections.defaultdict(list)
            for ann in data["annotations"]:
                caps[ann["image_id"]].append(ann["caption"])
            for img in images:
                self._items.append((img["file_name"], caps.get(img["id"], []), img["id"]))
        else:  # Karpathy format
            for img in images:
                if splits is not None and img.get("split") not in splits:
                    continue
                rel = os.path.join(img.get("filepath", ""), img["filename"])
                self._items.append((rel, [s["raw"] for s in img.get("sentences", [])],
                                    img.get("cocoid", img.get("imgid"))))
        if not self._items:
            raise ValueError(f"{self.annotations_json}: no images"
                             + (f" in split(s) {sorted(splits)}" if splits else "") + ".")

    def __len__(self) -> int:
        return len(self._items)

    def _image_path(self, rel: str) -> str:
        path = os.path.join(self.image_dir, rel)
        if not is_remote(path) and not os.path.exists(path):
            flat = os.path.join(self.image_dir, os.path.basename(rel))
            if os.path.exists(flat):
                return flat
        return path

    def __getitem__(self, index: int) -> dict[str, Any]:
        rel, captions, image_id = self._items[int(index)]
        try:
            data = read_file(self._image_path(rel))
        except FileNotFoundError:
            return error_record(rel, "image_file_missing")
        except OSError:
            return error_record(rel, "image_file_unreadable")
        ext = rel.rsplit(".", 1)[-1].lower() if "." in rel else image_ext(data)
        meta = {"image_id": image_id, "file_name": rel, "references": captions}
        return {"__key__": rel, ext: data, "txt": captions[0] if captions else None,
                "json": json.dumps(meta).encode("utf-8")}

    def __repr__(self) -> str:
        return f"CocoCaptionsSource({self.annotations_json!r}, {len(self)} images)"


# ----------------------------------------------------------------------------- interleaved documents

def document_elements(doc: Any) -> list[tuple[str, str]]:
    """An interleaved document's elements in order, [('text', str) | ('image', reference)], from
    either layout:

    * OBELICS: {'texts': [str | null, ...], 'images': [ref | null, ...]}, parallel lists with
      exactly one of the two set at each position.
    * MMC4: {'text_list': [str, ...], 'image_info': [{'image_name': ref, 'matched_text_index': i},
      ...]}; each image is placed before its matched sentence (several in image_info order).

    Raises ValueError for anything else (the record is then skipped as 'document_invalid').
    """
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    if "texts" in doc or "images" in doc:
        texts, images = doc.get("texts"), doc.get("images")
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            raise ValueError("'texts' and 'images' must be lists of one length")
        out = []
        for text, image in zip(texts, images):
            if (text is None) == (image is None) or not isinstance(text if image is None else image, str):
                raise ValueError("each position needs exactly one of a text and an image (strings)")
            out.append(("text", text) if image is None else ("image", image))
        return out
    if "text_list" in doc:
        texts, infos = doc["text_list"], doc.get("image_info") or []
        if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts) and isinstance(infos, list)):
            raise ValueError("'text_list' must be a list of strings and 'image_info' a list")
        before: dict[int, list[str]] = collections.defaultdict(list)
        for info in infos:
            name = info.get("image_name") if isinstance(info, dict) else None
            index = info.get("matched_text_index") if isinstance(info, dict) else None
            if not isinstance(name, str) or not isinstance(index, int) or not 0 <= index < len(texts):
                raise ValueError("each image_info needs an 'image_name' and a valid 'matched_text_index'")
            before[index].append(name)
        return [e for i, text in enumerate(texts) for e in [*(("image", n) for n in before[i]), ("text", text)]]
    raise ValueError("neither OBELICS ('texts', 'images') nor MMC4 ('text_list', 'image_info') keys")


class InterleavedJsonlSource(TextLineSource):
    """Interleaved image-text documents, one JSON object per line (`document_elements`' layouts).

    Image references are paths relative to `image_dir` (default: the .jsonl file's directory),
    absolute, or URLs. Returns {'__key__', 'elements': [('text', str) | ('image', bytes) |
    ('image_error', reason)]}: an image file that is missing or unreadable stays in place as
    ('image_error', 'image_file_missing' | 'image_file_unreadable'), for `DecodeDocumentImages`
    to count and drop. A line that is not such a document is skipped as 'document_invalid'.
    """

    def __init__(self, paths: str | Sequence[str], image_dir: str | None = None):
        super().__init__(paths)
        if image_dir is not None and not is_dir(image_dir):
            raise FileNotFoundError(f"interleaved_jsonl image_dir not found: {image_dir!r}. Set it (gin: "
                                    f"source_kwargs={{'image_dir': '...'}}) to the folder the documents' "
                                    f"image paths are relative to.")
        self.image_dir = image_dir

    def _image(self, ref: str, base: str) -> tuple[str, Any]:
        path = ref if is_remote(ref) or os.path.isabs(ref) else os.path.join(base, ref)
        try:
            return "image", read_file(path)
        except FileNotFoundError:
            return "image_error", "image_file_missing"
        except OSError:
            return "image_error", "image_file_unreadable"

    def __getitem__(self, index: int) -> dict[str, Any]:
        key, line = self._line(index)
        if isinstance(line, dict):
            return line
        try:
            elements = document_elements(json.loads(line))
        except (ValueError, UnicodeDecodeError, RecursionError):
            return error_record(key, "document_invalid")
        base = self.image_dir if self.image_dir is not None else os.path.dirname(self.paths[self._file[index]])
        return {"__key__": key, "elements": [e if e[0] == "text" else self._image(e[1], base) for e in elements]}


class InterleavedTarSource(TarShardSource):
    """Interleaved documents in webdataset tar shards: each sample's .json is a document
    (`document_elements`' layouts) whose image references name members of the same sample, by
    their full name ('doc7.0.jpg') or the part after the sample key ('0.jpg'). Records as
    `InterleavedJsonlSource`'s; a named member that is absent is ('image_error', 'missing_image').
    """

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = super().__getitem__(index)
        if ERROR_KEY in record:
            return record
        key = record["__key__"]
        try:
            elements = document_elements(json.loads(record.get("json") or b""))
        except (ValueError, UnicodeDecodeError, RecursionError):
            return {**error_record(key, "document_invalid"), "__shard__": record["__shard__"]}
        prefix = os.path.basename(key).lower() + "."

        def image(ref: str) -> tuple[str, Any]:
            name = ref.lower()  # index_tar lowercases member extensions
            name = name[len(prefix):] if name.startswith(prefix) else name
            data = record.get(name) if not name.startswith("__") else None
            return ("image", data) if isinstance(data, bytes) and data else ("image_error", "missing_image")

        return {"__key__": key, "__shard__": record["__shard__"],
                "elements": [e if e[0] == "text" else image(e[1]) for e in elements]}


# ----------------------------------------------------------------------------- registry

# kind -> (constructor, name of the argument that the per-split spec fills)
SOURCE_TYPES: dict[str, tuple[Callable[..., Any], str]] = {
    "tar": (TarShardSource, "paths"),
    "parquet": (ParquetSource, "paths"),
    "array_record": (ArrayRecordSource, "paths"),
    "tfds": (TfdsSource, "split"),
    "coco": (CocoCaptionsSource, "annotations_json"),
    "text": (TextLineSource, "paths"),
    "jsonl": (JsonlTextSource, "paths"),
    "interleaved_jsonl": (InterleavedJsonlSource, "paths"),
    "interleaved_tar": (InterleavedTarSource, "paths"),
}
INTERLEAVED_SOURCE_TYPES = ("interleaved_jsonl", "interleaved_tar")  # documents; the rest hold pairs or text


def make_source(kind: str, spec: Any, **kwargs):
    """Builds a source of `kind` (a SOURCE_TYPES key). `spec` is the per-split value: a path /
    glob / list of them (a TFDS split name for 'tfds', the annotations json for 'coco'), or a
    dict of constructor arguments; `kwargs` are shared arguments (e.g. tfds `name`)."""
    if kind not in SOURCE_TYPES:
        raise ValueError(f"Unknown source type {kind!r}; choose one of {sorted(SOURCE_TYPES)}.")
    ctor, arg = SOURCE_TYPES[kind]
    args = dict(kwargs)
    if isinstance(spec, Mapping):
        args.update(spec)
    else:
        args[arg] = spec
    try:
        return ctor(**args)
    except TypeError as e:
        raise ValueError(f"Bad arguments for source {kind!r} ({ctor.__name__}): {e}") from e


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
        src = self.grain_source(split)
        index, num = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
        order = np.arange(index, len(src), num)
        if shuffle:
            np.random.default_rng(seed).shuffle(order)
        first = next((r for r in (src[int(i)] for i in order[:100]) if ERROR_KEY not in r), {})
        keys = sorted(first)

        def gen():
            for i in order:
                rec = src[int(i)]
                if ERROR_KEY in rec:
                    continue
                yield {k: (rec.get(k) or b"") if not isinstance(rec.get(k), str) else rec[k].encode()
                       for k in keys}

        sig = {k: tf.TensorSpec((), tf.string) for k in keys}
        return tf.data.Dataset.from_generator(gen, output_signature=sig)


def read_json(record: Mapping[str, Any]) -> dict:
    """The sample's .json metadata ({} if absent or unreadable)."""
    raw = record.get("json")
    if not raw:
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        out = json.loads(raw)
        return out if isinstance(out, dict) else {}
    except (ValueError, UnicodeDecodeError):
        return {}
