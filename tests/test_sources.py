"""Data sources beyond tar shards (parquet, ArrayRecord, TFDS, COCO, JSONL), the ArrayRecord
converter, mixing two source types, ArrayRecord determinism/resume, and one tar shard holding
every kind of bad data, run through the real pipeline."""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tarfile
import zlib

import numpy as np
import pytest
import seqio
from PIL import Image

from conftest import DATA_IMAGE_SIZE
from simvlm_jax.data import convert, pipeline, preprocessors as pp, sources, synthetic, tasks

SIZE = DATA_IMAGE_SIZE
P_LEN, T_LEN = 8, 24


@pytest.fixture(scope="module")
def vocab(dataset):
    return dataset.vocab()


def _samples(n, start=0):
    """n synthetic (jpeg bytes, caption, metadata)."""
    return [synthetic.make_sample(0, "train", start + i, image_size=SIZE) for i in range(n)]


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for i, (jpg, cap, meta) in enumerate(samples):
            _add(tar, f"s{i:04d}.jpg", jpg)
            _add(tar, f"s{i:04d}.txt", cap.encode())
            _add(tar, f"s{i:04d}.json", json.dumps(meta).encode())
    return str(path)


def _iter(name, seed=0, batch=8, **kw):
    return pipeline.make_train_iterator(name, global_batch_size=batch, seed=seed, num_threads=1,
                                        prefetch_buffer_size=1, **kw)


def _targets(batch, vocab):
    return sorted(vocab.decode([int(t) for t in row if t > 1]) for row in batch["target_tokens"])


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _delta(before, after):
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


# ----------------------------------------------------------------------------- parquet

def _write_parquet(path, samples, hf_style=False, row_group_size=3):
    import pyarrow as pa
    import pyarrow.parquet as pq
    if hf_style:  # Hugging Face Image feature: struct<bytes, path>, caption under 'text'
        table = pa.table({"image": [{"bytes": j, "path": f"{i}.jpg"} for i, (j, _, _) in enumerate(samples)],
                          "text": [c for _, c, _ in samples]})
    else:  # img2dataset parquet output
        table = pa.table({"key": [m["key"] for _, _, m in samples], "jpg": [j for j, _, _ in samples],
                          "caption": [c for _, c, _ in samples], "width": [SIZE] * len(samples),
                          "url": [f"http://x/{i}" for i in range(len(samples))]})
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def test_parquet_source_reads_rows_and_autodetects_columns(tmp_path):
    samples = _samples(7)
    a = _write_parquet(tmp_path / "a.parquet", samples[:4])
    b = _write_parquet(tmp_path / "b.parquet", samples[4:], hf_style=True)
    src = sources.ParquetSource(a)
    assert (src.image_column, src.caption_column, len(src)) == ("jpg", "caption", 4)
    for i in (3, 0, 2, 1):  # out of order: crosses row groups
        rec = src[i]
        assert rec["jpg"] == samples[i][0] and rec["txt"] == samples[i][1]
        assert rec["__key__"] == samples[i][2]["key"]
        assert sources.read_json(rec)["url"] == f"http://x/{i}"
    hf = sources.ParquetSource(b)
    assert (hf.image_column, hf.caption_column) == ("image", "text")
    assert [hf[i]["jpg"] for i in range(3)] == [s[0] for s in samples[4:]]
    # close() releases the readers (native ones alive at interpreter exit can abort it); reads reopen.
    opened = list(src._handles.files.values())
    src.close()
    assert opened and all(f.closed for f in opened) and not src._handles.files
    assert src[2]["jpg"] == samples[2][0]
    both = pickle.loads(pickle.dumps(sources.ParquetSource(str(tmp_path / "a.parquet"))))
    assert both[3]["jpg"] == samples[3][0]
    out = pp.DecodeImage(SIZE).map(src[1])
    assert out["image"].shape == (SIZE, SIZE, 3) and out["text"] == samples[1][1]
    with pytest.raises(ValueError, match="caption_column"):
        sources.ParquetSource(a, caption_column="nope")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="bad.parquet"):
        sources.ParquetSource(str(tmp_path / "bad.parquet"))
    with pytest.raises(FileNotFoundError, match="missing"):
        sources.ParquetSource(str(tmp_path / "missing*.parquet"))


# ----------------------------------------------------------------------------- array_record + converter

def test_convert_tar_to_array_record_round_trip(tmp_path):
    samples = _samples(12)
    shard = _write_tar(tmp_path / "in.tar", samples)
    with tarfile.open(shard, "a") as tar:  # two bad samples: skipped and counted by the converter
        _add(tar, "bad0.jpg", b"\x00garbage")
        _add(tar, "bad0.txt", b"a corrupt image")
        _add(tar, "bad1.jpg", samples[0][0])
        _add(tar, "bad1.txt", b"   ")
    out = tmp_path / "ar" / "train.array_record"
    assert convert.main(["--input", shard, "--format", "tar", "--output", str(out), "--shard_size", "5",
                         "--no_progress"]) == 0
    files = sorted(os.listdir(tmp_path / "ar"))
    assert files == [f"train-0000{i}-of-00003.array_record" for i in range(3)]
    ar = sources.ArrayRecordSource(str(tmp_path / "ar" / "*.array_record"))
    tar_src = sources.TarShardSource(shard)
    assert len(ar) == 12
    for i in range(12):  # the same records, in order (bar the tar-only '__shard__')
        want = {k: v for k, v in tar_src[i].items() if k != "__shard__"}
        assert ar[i] == want
    assert pickle.loads(pickle.dumps(ar))[7] == ar[7]
    # The summary counts the bad ones.
    summary = convert.convert(tar_src, str(tmp_path / "one.array_record"), progress=False)
    assert summary["written"] == 12 and summary["skipped"] == {"image_decode_error": 1, "caption_empty": 1}
    with pytest.raises(FileNotFoundError, match="nothing"):
        sources.ArrayRecordSource(str(tmp_path / "nothing*.array_record"))
    assert convert.main(["--input", str(tmp_path / "nope.tar"), "--format", "tar",
                         "--output", str(tmp_path / "x.array_record"), "--no_progress"]) == 2


def _array_record_task(tmp_path, vocab, name="ar_task", n=40):
    shard = _write_tar(tmp_path / "src.tar", _samples(n))
    convert.convert(sources.TarShardSource(shard), str(tmp_path / "ar" / "d.array_record"), shard_size=16,
                    progress=False)
    return tasks.image_text_task(name=name, shards={"train": str(tmp_path / "ar" / "*.array_record")},
                                 source="array_record", image_size=SIZE, max_prefix_len=P_LEN,
                                 max_target_len=T_LEN, vocabulary=vocab)


def test_array_record_task_is_deterministic_and_resumes(tmp_path, vocab):
    task = _array_record_task(tmp_path, vocab)
    assert task.source.num_input_examples("train") == 40
    a, b, c = _iter("ar_task", seed=5), _iter("ar_task", seed=5), _iter("ar_task", seed=6)
    differs = False
    for _ in range(3):
        ba, bb, bc = next(a), next(b), next(c)
        assert _equal(ba, bb)
        differs |= not _equal(ba, bc)
    assert differs
    state = a.get_state()
    expected = [next(a) for _ in range(3)]  # crosses the epoch boundary (40 examples, batch 8)
    fresh = _iter("ar_task", seed=5)
    fresh.set_state(state)
    for e in expected:
        assert _equal(next(fresh), e)


# ----------------------------------------------------------------------------- tfds

def _tiny_tfds_builder():
    import tensorflow_datasets as tfds

    class SimvlmTinyCaps(tfds.core.GeneratorBasedBuilder):  # registered as 'simvlm_tiny_caps'
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "captions": tfds.features.Sequence({"text": tfds.features.Text(), "id": np.int64})}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(5), "val": self._generate_examples(2)}

        def _generate_examples(self, n):
            for i, (jpg, cap, meta) in enumerate(_samples(n)):
                img = np.asarray(Image.open(io.BytesIO(jpg)))
                yield i, {"image": img, "captions": {"text": [cap] + meta["references"][:1], "id": [i, i + 100]}}

    return SimvlmTinyCaps


def test_tfds_source_reads_an_array_record_dataset(tmp_path, vocab):
    builder_cls = _tiny_tfds_builder()
    data_dir = str(tmp_path / "tfds")
    builder_cls(data_dir=data_dir, file_format="array_record").download_and_prepare()
    src = sources.TfdsSource("simvlm_tiny_caps", split="train", data_dir=data_dir)
    assert len(src) == 5
    samples = _samples(5)
    by_caption = {s[1]: s for s in samples}  # TFDS shuffles examples when it writes them
    assert sorted(src[i]["txt"] for i in range(5)) == sorted(by_caption)
    rec = src[2]
    assert sources.read_json(rec)["references"] == [rec["txt"], by_caption[rec["txt"]][2]["references"][0]]
    out = pp.DecodeImage(SIZE).map(rec)
    assert out["image"].shape == (SIZE, SIZE, 3)
    assert pickle.loads(pickle.dumps(src))[2]["txt"] == rec["txt"]
    tasks.image_text_task(name="tfds_task", source="tfds", shards={"train": "train", "validation": "val"},
                          source_kwargs={"name": "simvlm_tiny_caps", "data_dir": data_dir}, image_size=SIZE,
                          max_prefix_len=P_LEN, max_target_len=T_LEN, vocabulary=vocab)
    assert next(_iter("tfds_task", batch=4))["image"].shape == (4, SIZE, SIZE, 3)
    assert seqio.get_mixture_or_task("tfds_task").source.num_input_examples("validation") == 2
    # Not prepared there / unknown name: the error names the dataset, the data_dir and `tfds build`.
    empty = str(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"simvlm_tiny_caps.*empty.*tfds build simvlm_tiny_caps"):
        sources.TfdsSource("simvlm_tiny_caps", "train", data_dir=empty)
    with pytest.raises(FileNotFoundError, match=r"no_such_dataset_xyz.*tfds build"):
        sources.TfdsSource("no_such_dataset_xyz", "train", data_dir=empty)
    with pytest.raises(ValueError, match="no split"):
        sources.TfdsSource("simvlm_tiny_caps", "test", data_dir=data_dir)


# ----------------------------------------------------------------------------- coco

def _coco_files(tmp_path, samples):
    img_dir = tmp_path / "images" / "val2014"
    img_dir.mkdir(parents=True)
    for i, (jpg, _, _) in enumerate(samples):
        (img_dir / f"COCO_{i}.jpg").write_bytes(jpg)
    coco = {"images": [{"id": 10 + i, "file_name": f"COCO_{i}.jpg"} for i in range(len(samples))],
            "annotations": [{"image_id": 10 + i, "id": k, "caption": c}
                            for i, (_, cap, meta) in enumerate(samples)
                            for k, c in enumerate([cap] + meta["references"][:2])]}
    karpathy = {"images": [{"filename": f"COCO_{i}.jpg", "filepath": "val2014", "cocoid": 10 + i,
                            "split": ["train", "restval", "val", "test"][i % 4],
                            "sentences": [{"raw": cap}, {"raw": meta["references"][0]}]}
                           for i, (_, cap, meta) in enumerate(samples)]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    return str(tmp_path / "captions.json"), str(tmp_path / "dataset_coco.json"), str(tmp_path / "images")


def test_coco_captions_source_both_formats(tmp_path):
    samples = _samples(8)
    coco_json, karpathy_json, image_dir = _coco_files(tmp_path, samples)
    src = sources.CocoCaptionsSource(coco_json, os.path.join(image_dir, "val2014"))
    assert len(src) == 8
    rec = src[3]
    assert rec["jpg"] == samples[3][0] and rec["txt"] == samples[3][1]
    meta = sources.read_json(rec)
    assert meta["references"] == [samples[3][1]] + samples[3][2]["references"][:2] and meta["image_id"] == 13
    kp = sources.CocoCaptionsSource(karpathy_json, image_dir, split=["train", "restval"])
    assert len(kp) == 4
    assert [kp[i]["txt"] for i in range(4)] == [samples[i][1] for i in (0, 1, 4, 5)]
    assert kp[2]["jpg"] == samples[4][0]
    assert len(sources.CocoCaptionsSource(karpathy_json, image_dir, split="test")) == 2
    os.remove(os.path.join(image_dir, "val2014", "COCO_0.jpg"))  # a missing image: counted, not fatal
    assert pickle.loads(pickle.dumps(kp))[0][sources.ERROR_KEY] == "image_file_missing"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        sources.CocoCaptionsSource(coco_json, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no images in split"):
        sources.CocoCaptionsSource(karpathy_json, image_dir, split="nosuchsplit")
    # The converter reads it too.
    summary = convert.convert(sources.CocoCaptionsSource(karpathy_json, image_dir), str(tmp_path / "c.array_record"),
                              progress=False)
    assert summary["written"] == 7 and summary["skipped"] == {"image_file_missing": 1}
    ar = sources.ArrayRecordSource(str(tmp_path / "c.array_record"))
    assert len(sources.read_json(ar[0])["references"]) == 2


# ----------------------------------------------------------------------------- text + mixing

def test_jsonl_text_source(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "first doc"}\n\n{"meta": {"body": "nested"}, "text": "second doc"}\nnot json\n'
                 '{"other": 1}\n')
    src = sources.JsonlTextSource(str(f))
    assert len(src) == 4
    assert [src[i].get("text") for i in range(4)] == ["first doc", "second doc", None, None]
    assert src[2][sources.ERROR_KEY] == "text_bad_json"
    assert sources.JsonlTextSource(str(f), field="meta.body")[1]["text"] == "nested"
    before = pp.skipped_counts()
    assert pp.LineToText().map(src[2]) is None
    assert _delta(before, pp.skipped_counts()) == {"text_bad_json": 1}
    (tmp_path / "docs.jsonl.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="gunzip"):
        sources.JsonlTextSource(str(tmp_path / "docs.jsonl.gz"))
    with pytest.raises(ValueError, match="Unknown source type"):
        sources.make_source("csv", "x")


def test_mixture_of_parquet_and_jsonl_tasks_follows_rates(tmp_path, dataset, vocab):
    _write_parquet(tmp_path / "img.parquet", _samples(30), row_group_size=10)
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in dataset.text_lines[:60]))
    tasks.image_text_task(name="pq_task", source="parquet", shards={"train": str(tmp_path / "*.parquet")},
                          image_size=SIZE, max_prefix_len=P_LEN, max_target_len=T_LEN, vocabulary=vocab)
    tasks.text_task(name="jsonl_task", source="jsonl", files={"train": str(tmp_path / "*.jsonl")},
                    source_kwargs={"field": "text"}, image_size=SIZE, max_prefix_len=P_LEN, max_target_len=T_LEN,
                    vocabulary=vocab)
    tasks.mixture(name="pq_jsonl_mix", tasks_and_rates=[("pq_task", 3), ("jsonl_task", 1)])
    it = _iter("pq_jsonl_mix", batch=32)
    has_image = np.concatenate([next(it)["has_image"] for _ in range(15)])
    assert abs(float(np.mean(has_image == 0)) - 0.25) < 0.05


# ----------------------------------------------------------------------------- remote paths (fsspec)

@pytest.fixture
def memfs():
    """fsspec's in-memory filesystem under a fresh root: the code path of gs:// / s3:// URLs
    (glob, open, ranged reads, whole-file reads) with no network."""
    import uuid
    import fsspec
    fs = fsspec.filesystem("memory")
    root = f"memory://simvlm-{uuid.uuid4().hex[:8]}"
    yield fs, root
    fs.rm(root, recursive=True)


def _upload(fs, local_dir, url):
    for path in sorted(local_dir.rglob("*")):
        if path.is_file():
            fs.pipe(f"{url}/{path.relative_to(local_dir).as_posix()}", path.read_bytes())


def test_sources_read_urls_through_fsspec(memfs, tmp_path, vocab):
    fs, root = memfs
    samples = _samples(10)
    local = tmp_path / "local"
    local.mkdir()
    _write_tar(local / "shard-a.tar", samples[:6])
    _write_tar(local / "shard-b.tar", samples[6:])
    _write_parquet(local / "p.parquet", samples[:5])
    (local / "docs.txt").write_bytes(b"first doc\n\n  \nsecond \xc3\xa9 doc\nthird")
    (local / "docs.jsonl").write_bytes(b'{"text": "one"}\nnot json\n{"meta": {"t": "two"}, "text": "2"}\n')
    _coco_files(local / "coco", samples[:4])
    _upload(fs, local, root)

    # tar: glob + index + one ranged read per sample; the same records as the local files.
    src = sources.TarShardSource(f"{root}/shard-*.tar")
    assert len(src.paths) == 2 and all(p.startswith("memory://") for p in src.paths) and len(src) == 10
    here = sources.TarShardSource(str(local / "shard-*.tar"))
    for i in range(10):
        assert {k: v for k, v in src[i].items() if k != "__shard__"} == \
            {k: v for k, v in here[i].items() if k != "__shard__"}
    assert pickle.loads(pickle.dumps(src))[3]["jpg"] == samples[3][0]
    tasks.image_text_task(name="remote_tar", shards={"train": f"{root}/shard-*.tar"}, image_size=SIZE,
                          max_prefix_len=P_LEN, max_target_len=T_LEN, vocabulary=vocab)
    batch = next(_iter("remote_tar", batch=4))
    assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8

    # The converter reads URLs and writes a local file; ArrayRecord itself cannot read a URL.
    summary = convert.convert(src, str(tmp_path / "ar" / "r.array_record"), progress=False)
    assert summary["written"] == 10
    fs.pipe(f"{root}/ar/r.array_record", (tmp_path / "ar" / "r.array_record").read_bytes())
    with pytest.raises(ValueError, match="local path, not a URL"):
        sources.ArrayRecordSource(f"{root}/ar/*.array_record")
    assert convert.main(["--input", f"{root}/shard-a.tar", "--format", "tar",
                         "--output", f"{root}/out.array_record", "--no_progress"]) == 2

    # parquet, text, jsonl, coco.
    pq_src = sources.ParquetSource(f"{root}/*.parquet")
    assert [pq_src[i]["jpg"] for i in range(5)] == [s[0] for s in samples[:5]]
    text = sources.TextLineSource(f"{root}/docs.txt")
    assert [text[i]["text"] for i in range(len(text))] == [b"first doc\n", b"second \xc3\xa9 doc\n", b"third"]
    jsonl = sources.JsonlTextSource(f"{root}/*.jsonl", field="meta.t")
    assert [jsonl[i].get("text") for i in range(3)] == [None, None, "two"]
    assert jsonl[1][sources.ERROR_KEY] == "text_bad_json"
    coco = sources.CocoCaptionsSource(f"{root}/coco/captions.json", f"{root}/coco/images/val2014")
    assert coco[2]["jpg"] == samples[2][0] and coco[2]["txt"] == samples[2][1]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        sources.CocoCaptionsSource(f"{root}/coco/captions.json", f"{root}/nowhere")

    # Files that vanish mid-run are counted, not fatal.
    fs.rm(f"{root}/shard-b.tar")
    fs.rm(f"{root}/coco/images/val2014/COCO_1.jpg")
    fs.rm(f"{root}/docs.txt")
    assert src[7][sources.ERROR_KEY] == "shard_missing" and src[2]["jpg"] == samples[2][0]
    assert coco[1][sources.ERROR_KEY] == "image_file_missing"
    assert text[0][sources.ERROR_KEY] == "shard_missing"
    with pytest.raises(FileNotFoundError, match="shard-c"):
        sources.TarShardSource(f"{root}/shard-c*.tar")


def test_file_urls_take_the_fsspec_path(tmp_path):
    samples = _samples(4)
    _write_tar(tmp_path / "a.tar", samples)
    (tmp_path / "t.txt").write_bytes(b"one\ntwo\n")
    src = sources.TarShardSource(f"file://{tmp_path}/*.tar")
    assert src.paths == [f"file://{tmp_path}/a.tar"]
    assert [src[i]["jpg"] for i in range(4)] == [s[0] for s in samples]
    assert sources.TextLineSource(f"file://{tmp_path}/t.txt")[1]["text"] == b"two\n"


def test_missing_filesystem_package_is_one_clear_error(monkeypatch):
    import importlib.util
    from fsspec.registry import known_implementations
    monkeypatch.setitem(known_implementations, "simvlmfake",
                        {"class": "simvlm_no_such_pkg.FakeFileSystem", "err": "Install simvlm_no_such_pkg"})
    with pytest.raises(ImportError, match=r"simvlmfake://.*pip install simvlm_no_such_pkg") as e:
        sources.TarShardSource("simvlmfake://bucket/laion/*.tar")
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)  # the CLIs print ValueErrors in one line
    assert convert.main(["--input", "simvlmfake://bucket/a.tar", "--format", "tar", "--output", "x.array_record",
                         "--no_progress"]) == 2
    for url, package in (("gs://bucket/laion/*.tar", "gcsfs"), ("s3://bucket/cc3m/x.parquet", "s3fs")):
        if importlib.util.find_spec(package) is None:  # only where it is really missing
            with pytest.raises(ImportError, match=f"needs the {package} package: pip install {package}"):
                sources.expand_paths(url)
    with pytest.raises(ValueError, match="unknown filesystem protocol 'nosuchproto'"):
        sources.expand_paths("nosuchproto://x/*.tar")


# ----------------------------------------------------------------------------- bad data

def _png(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _bomb_png():
    """A valid PNG header claiming 100000 x 100000 pixels (never decoded)."""
    data = bytearray(_png(Image.new("L", (8, 8))))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", 100_000, 100_000)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def _converted_modes():
    """Images that must be converted to RGB (not skipped): grayscale, 16-bit, CMYK, alpha, palette."""
    gray = _png(Image.new("L", (40, 30), 128))
    gray16 = _png(Image.fromarray(np.full((30, 40), 40000, np.uint16)))
    buf = io.BytesIO()
    Image.new("CMYK", (40, 30), (0, 255, 0, 0)).save(buf, format="JPEG")
    cmyk = buf.getvalue()
    rgba = _png(Image.new("RGBA", (20, 50), (255, 0, 0, 100)))
    la = _png(Image.new("LA", (30, 30), (10, 0)))
    pal = Image.new("P", (30, 30), 1)
    pal.putpalette([0, 0, 0, 200, 10, 10] * 128)
    palette = _png(pal, transparency=0)
    return [("gray.png", gray), ("gray16.png", gray16), ("cmyk.jpg", cmyk), ("rgba.png", rgba),
            ("la.png", la), ("palette.png", palette)]


def test_one_shard_of_every_bad_case_runs_through_the_pipeline(tmp_path, vocab, dataset):
    samples = _samples(12)
    captions = [s[1] for s in samples]
    good_jpg = samples[0][0]
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="GIF")
    gif = buf.getvalue()
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="BMP")
    bmp = buf.getvalue()
    good, bad = [], []  # (name, image name, image bytes, caption bytes)
    for i in range(3):
        good.append((f"good{i}", "jpg", samples[i][0], captions[i].encode()))
    for j, (fname, data) in enumerate(_converted_modes()):
        stem, ext = fname.split(".")
        good.append((stem, ext, data, captions[3 + j].encode()))
    bad = [
        ("corrupt", "jpg", b"\x00garbage that is no image", b"a corrupt image", "image_decode_error"),
        ("truncimg", "jpg", good_jpg[: len(good_jpg) // 2], b"a truncated image", "image_decode_error"),
        ("zerobyte", "jpg", b"", b"a zero-byte image", "missing_image"),
        ("noimage", None, None, b"a caption without an image", "missing_image"),
        ("anim", "gif", gif, b"a gif", "image_unsupported_format"),
        ("bmpinjpg", "jpg", bmp, b"a bmp named jpg", "image_unsupported_format"),
        ("bomb", "png", _bomb_png(), b"a decompression bomb", "image_too_large"),
        ("emptycap", "jpg", good_jpg, b"  \n ", "caption_empty"),
        ("longcap", "jpg", good_jpg, b"very long " * 300, "caption_too_long"),
        ("badutf8", "jpg", good_jpg, b"\xff\xfe\xfa caption", "caption_not_utf8"),
    ]
    shard = tmp_path / "bad-00000.tar"
    with tarfile.open(shard, "w") as tar:
        for k, (name, ext, data, cap) in enumerate(good):
            _add(tar, f"{name}.{ext}", data)
            _add(tar, f"{name}.txt", cap)
            if k < len(bad):
                name_b, ext_b, data_b, cap_b, _ = bad[k]
                if ext_b:
                    _add(tar, f"{name_b}.{ext_b}", data_b)
                _add(tar, f"{name_b}.txt", cap_b)
        for name_b, ext_b, data_b, cap_b, _ in bad[len(good):]:
            _add(tar, f"{name_b}.{ext_b}", data_b)
            _add(tar, f"{name_b}.txt", cap_b)
        _add(tar, "cut.txt", b"the sample cut by the truncation")
        _add(tar, "cut.jpg", samples[11][0])
    raw = shard.read_bytes()
    # Truncate inside the last member (tar pads to 10 KiB records: cut relative to its data).
    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    shard.write_bytes(raw[: last.offset_data + last.size // 2])
    # A second shard that disappears after the task indexed it.
    gone = _write_tar(tmp_path / "bad-00001.tar", samples[9:11])
    tasks.image_text_task(name="bad_data_task", shards={"train": str(tmp_path / "bad-*.tar")}, image_size=SIZE,
                          max_prefix_len=P_LEN, max_target_len=T_LEN, text_prefix_prob=0.0, vocabulary=vocab)
    task = seqio.get_mixture_or_task("bad_data_task")
    assert task.source.num_input_examples("train") == len(good) + len(bad) + 1 + 2
    os.remove(gone)
    want = {reason: 0 for *_, reason in bad}
    for *_, reason in bad:
        want[reason] += 1
    want.update(tar_truncated=1, shard_missing=2)

    # The real pipeline: the first batch is exactly the good samples of the first epoch.
    before = pp.skipped_counts()
    it = _iter("bad_data_task", batch=len(good))
    batch = next(it)
    assert _targets(batch, vocab) == sorted(c.decode() for *_, c in good)
    assert batch["image"].shape == (len(good), SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
    next(it)  # and it keeps going
    got = _delta(before, pp.skipped_counts())
    assert set(got) == set(want), got
    assert all(got[r] >= n for r, n in want.items()), (got, want)

    # One ordered pass: exact counts per reason.
    before = pp.skipped_counts()
    examples = list(pipeline.task_dataset(task, "train", seed=0, shuffle=False, repeat=False).to_iter_dataset())
    assert len(examples) == len(good)
    assert _delta(before, pp.skipped_counts()) == want

    # Converted modes come out as RGB uint8, alpha composited onto white.
    for name, data in _converted_modes():
        img = pp.open_image(data)
        assert img.mode == "RGB", name
    assert np.asarray(pp.open_image(_converted_modes()[0][1])).max() == 128
    assert np.asarray(pp.open_image(_converted_modes()[1][1])).min() == round(40000 / 257)
    # The glob matching nothing is an error at start.
    with pytest.raises(FileNotFoundError, match="nothing-"):
        sources.TarShardSource(str(tmp_path / "nothing-*.tar"))


def test_random_resized_crop_is_deterministic_and_varies():
    """crop='random': same rng -> same crop; different rngs -> different crops; size and
    aspect bounds respected; bad data still skipped and counted."""
    import io  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from simvlm_jax.data import preprocessors as pp  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (96, 128, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    record = {"__key__": "k", "png": buf.getvalue(), "txt": b"a red circle"}
    t = pp.DecodeImageRandomCrop(32, scale=(0.3, 0.6))
    a = t.random_map(dict(record), np.random.default_rng(1))["image"]
    b = t.random_map(dict(record), np.random.default_rng(1))["image"]
    c = t.random_map(dict(record), np.random.default_rng(2))["image"]
    center = pp.DecodeImage(32).map(dict(record))["image"]
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, center)
    before = pp.skipped_counts().get("image_decode_error", 0)
    assert t.random_map({"__key__": "bad", "jpg": b"not an image", "txt": b"x"}, np.random.default_rng(0)) is None
    assert pp.skipped_counts().get("image_decode_error", 0) == before + 1
