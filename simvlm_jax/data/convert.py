"""Converts image-text (or text) data to ArrayRecord files for fast random access.

    python -m simvlm_jax.data.convert --input '/data/laion/*.tar' --format tar \\
        --output /data/laion_ar/laion.array_record --shard_size 10000

`--format`: tar (webdataset / img2dataset shards), parquet (img2dataset parquet /
Hugging Face exports; `--image_column`, `--caption_column`), coco (captions json or
Karpathy `dataset_coco.json` with `--image_dir` and `--split`), text (one document
per line), jsonl (`--field`).

Each record is one msgpack map `{'__key__': str, 'jpg'|'png'|'webp': bytes,
'txt': bytes, 'json': bytes}` (text: `{'__key__', 'text'}`), see
`sources.encode_record`; read it back with `sources.ArrayRecordSource` (gin:
`image_text_task.source = 'array_record'`). Inputs may be URLs (gs://, s3://, ... through
fsspec, see `sources`); the output is a local path. Records are written in input order,
with `group_size:1` so every record is one seek.

Bad samples are skipped and counted by reason (the same reasons as training):
unreadable samples of the source, missing/corrupt/unsupported/oversized images
(`--check_images`, default on, decodes every image once) and empty, non-UTF-8 or
over-long captions. With `--shard_size N` the output is
`{stem}-00000-of-0000K.array_record`, N records per file. The last stdout line is
one JSON object: {"written", "skipped": {reason: n}, "outputs": [...]}.
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import sys
from typing import Any, Sequence

from array_record.python import array_record_module
from tqdm import tqdm

from simvlm_jax import cli
from simvlm_jax.data import preprocessors as pp
from simvlm_jax.data import sources

FORMATS = ("tar", "parquet", "coco", "text", "jsonl")


def open_source(fmt: str, inputs: str | Sequence[str], image_dir: str | None = None,
                split: str | Sequence[str] | None = None, image_column: str | None = None,
                caption_column: str | None = None, field: str = "text"):
    if fmt == "tar":
        return sources.TarShardSource(inputs)
    if fmt == "parquet":
        return sources.ParquetSource(inputs, image_column=image_column, caption_column=caption_column)
    if fmt == "coco":
        if not image_dir:
            raise ValueError("--format coco needs --image_dir (the folder holding the images).")
        return sources.CocoCaptionsSource(inputs if isinstance(inputs, str) else inputs[0], image_dir, split)
    if fmt == "text":
        return sources.TextLineSource(inputs)
    if fmt == "jsonl":
        return sources.JsonlTextSource(inputs, field=field)
    raise ValueError(f"Unknown --format {fmt!r}; choose one of {FORMATS}.")


def check_record(record: dict[str, Any], text_only: bool, check_images: bool = True,
                 max_caption_chars: int = 2000, max_image_pixels: int = 50_000_000) -> str | None:
    """The reason to skip `record`, or None if it is good."""
    if sources.ERROR_KEY in record:
        return record[sources.ERROR_KEY]
    if not text_only:
        try:
            data = pp.find_image(record)
            if check_images:
                pp.decode_image(data, max_image_pixels)
        except pp.BadImage as e:
            return e.reason
        text = record.get("txt")
        if text is None:
            text = sources.read_json(record).get("caption")
    else:
        text = record.get("text", record.get("txt"))
    if text is not None and not isinstance(text, (str, bytes)):
        return "caption_invalid"
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return "caption_not_utf8"
    text = (text or "").strip()
    if not text:
        return "caption_empty"
    if len(text) > max_caption_chars:
        return "caption_too_long"
    return None


def _normalize(record: dict[str, Any], text_only: bool) -> dict[str, Any]:
    out = {}
    for k, v in record.items():
        if k.startswith("__") and k != "__key__":
            continue
        if isinstance(v, str) and k != "__key__":
            v = v.encode("utf-8")
        if v is None:
            continue
        out[k] = v
    if text_only and "text" in out:
        out["text"] = out["text"].rstrip(b"\r\n")
    return out


def output_paths(output: str, total: int, shard_size: int) -> list[str]:
    if shard_size <= 0 or total <= shard_size:
        return [output]
    n = (total + shard_size - 1) // shard_size
    stem, ext = (output[: -len(".array_record")], ".array_record") if output.endswith(".array_record") \
        else os.path.splitext(output)
    return [f"{stem}-{i:05d}-of-{n:05d}{ext or '.array_record'}" for i in range(n)]


def convert(source, output: str, shard_size: int = 0, text_only: bool = False, check_images: bool = True,
            max_caption_chars: int = 2000, progress: bool = True) -> dict[str, Any]:
    """Writes the good records of `source` to ArrayRecord file(s); returns the summary dict.

    With sharding, files hold `shard_size` input samples each (fewer good records where
    samples were skipped)."""
    if sources.is_remote(output):
        raise ValueError(f"--output {output}: ArrayRecord files are written to a local path (the C++ writer "
                         f"takes no URL). Write locally, then copy (e.g. `gcloud storage cp`).")
    total = len(source)
    outputs = output_paths(output, total, shard_size)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    skipped: collections.Counter = collections.Counter()
    per_file = shard_size if len(outputs) > 1 else max(total, 1)
    written = 0
    bar = tqdm(total=total, desc=f"-> {os.path.basename(output)}", unit="sample", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        for f_idx, path in enumerate(outputs):
            tmp = path + ".tmp"
            writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
            try:
                for i in range(f_idx * per_file, min(total, (f_idx + 1) * per_file)):
                    try:
                        record = source[i]
                        reason = check_record(record, text_only, check_images, max_caption_chars)
                    except Exception:  # pylint: disable=broad-except
                        reason = "read_error"
                    if reason:
                        skipped[reason] += 1
                    else:
                        writer.write(sources.encode_record(_normalize(record, text_only)))
                        written += 1
                    bar.update(1)
                    if skipped:
                        bar.set_postfix(skipped=sum(skipped.values()), refresh=False)
            finally:
                writer.close()
            os.replace(tmp, path)
    finally:
        bar.close()
    return {"written": written, "skipped": dict(sorted(skipped.items())), "outputs": outputs,
            "input_samples": total}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simvlm_jax.data.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, action="append",
                   help="glob / comma-separated paths (repeatable); coco: the annotations json")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, help="output path, e.g. /data/out/train.array_record")
    p.add_argument("--shard_size", type=int, default=0, help="samples per output file (0: one file)")
    p.add_argument("--image_dir", default=None, help="coco: folder of the images")
    p.add_argument("--split", default=None, help="coco Karpathy json: comma-separated splits, e.g. train,restval")
    p.add_argument("--image_column", default=None, help="parquet: image column (default: auto)")
    p.add_argument("--caption_column", default=None, help="parquet: caption column (default: auto)")
    p.add_argument("--field", default="text", help="jsonl: the text field")
    p.add_argument("--check_images", default=True, action=argparse.BooleanOptionalAction,
                   help="decode every image once and drop the bad ones (default on)")
    p.add_argument("--max_caption_chars", type=int, default=2000)
    p.add_argument("--no_progress", action="store_true")
    a = p.parse_args(argv)
    inputs = [x for i in a.input for x in i.split(",") if x]
    src = None
    try:
        src = open_source(a.format, inputs, a.image_dir, a.split.split(",") if a.split else None,
                          a.image_column, a.caption_column, a.field)
        summary = convert(src, a.output, a.shard_size, text_only=a.format in ("text", "jsonl"),
                          check_images=a.check_images, max_caption_chars=a.max_caption_chars,
                          progress=not a.no_progress)
    except (FileNotFoundError, ValueError) as e:  # incl. sources.MissingPackageError
        print(f"error: {cli.one_line(str(e))}", file=sys.stderr)
        return 2
    finally:
        if src is not None:  # release native readers before interpreter teardown
            src.close()
            gc.collect()
    print(f"wrote {summary['written']} of {summary['input_samples']} samples to {len(summary['outputs'])} "
          f"file(s); skipped {sum(summary['skipped'].values())}: {summary['skipped']}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
