"""Data: tokenizer, tar/text sources, grain pipeline determinism/resume/sharding, mixing, PrefixLM split,
bad-data handling."""
from __future__ import annotations

import io
import os
import tarfile

import grain
import numpy as np
import pytest
import seqio
from PIL import Image

from conftest import DATA, DATA_IMAGE_SIZE, register_builtin
from simvlm_jax.data import pipeline, preprocessors as pp, sources, synthetic, tasks

BATCH = 8


@pytest.fixture(scope="module")
def vocab(dataset):
    return dataset.vocab()


@pytest.fixture(scope="module")
def mixture(dataset):
    return register_builtin(dataset)


def _iter(name, seed=0, **kw):
    return pipeline.make_train_iterator(name, global_batch_size=kw.pop("global_batch_size", BATCH), seed=seed,
                                        num_threads=1, prefetch_buffer_size=2, **kw)


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _batches_equal(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_and_special_ids(dataset, vocab):
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    sp = vocab.tokenizer
    assert sp.pad_id() == 0 and sp.eos_id() == 1 and sp.unk_id() == 2 and sp.bos_id() == -1
    assert 100 < vocab.vocab_size <= 256
    for caption in dataset.captions[:100]:
        ids = list(vocab.encode(caption))
        assert ids and min(ids) > 2, caption  # no pad/eos/unk inside a caption
        assert vocab.decode(ids) == caption
    for line in dataset.text_lines[:50]:
        assert vocab.decode(list(vocab.encode(line))) == line
    # Subword pieces actually merge (it is not a character-level model).
    assert len(vocab.encode(dataset.captions[0])) < len(dataset.captions[0]) / 2


# ----------------------------------------------------------------------------- sources

def test_tar_shard_source_indexes_every_sample(dataset):
    src = sources.TarShardSource(os.path.join(dataset.data_dir, "train", "*.tar"))
    assert len(src.paths) == DATA["num_train"] // DATA["samples_per_shard"]
    assert len(src) == DATA["num_train"]
    expected = [s for p in src.paths for s in synthetic.read_shard(p)]
    assert len(expected) == DATA["num_train"]
    for i in [0, 1, 99, 100, 150, 199]:
        rec = src[i]
        assert {"jpg", "txt", "json"} <= set(rec)
        assert rec["__key__"] == expected[i]["key"]
        assert rec["jpg"] == expected[i]["jpg"]
        assert rec["txt"].decode("utf-8") == expected[i]["txt"]
        assert sources.read_json(rec) == expected[i]["json"]
        assert Image.open(io.BytesIO(rec["jpg"])).size == (DATA_IMAGE_SIZE, DATA_IMAGE_SIZE)
    assert len({src[i]["__key__"] + src[i]["__shard__"] for i in range(len(src))}) == len(src)


def test_tar_shard_source_survives_truncated_shard(dataset, tmp_path):
    path = os.path.join(dataset.data_dir, "train", "shard-00000.tar")
    with open(path, "rb") as f:
        data = f.read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    src = sources.TarShardSource(str(cut))
    assert 0 < len(src) < DATA["samples_per_shard"]
    full = sources.TarShardSource(path)
    for i in range(len(src) - 1):  # all but possibly the damaged last sample are intact
        assert src[i]["jpg"] == full[i]["jpg"] and src[i]["txt"] == full[i]["txt"]


def test_text_line_source_returns_every_non_empty_line(dataset, tmp_path):
    src = sources.TextLineSource(os.path.join(dataset.data_dir, "text", "*.txt"))
    assert len(src) == DATA["num_text"]
    assert [src[i]["text"].decode("utf-8").strip() for i in range(len(src))] == list(dataset.text_lines)
    f = tmp_path / "t.txt"
    f.write_bytes(b"first line\n\n   \nsecond \xc3\xa9\n\nthird")
    src = sources.TextLineSource(str(f))
    assert [src[i]["text"].rstrip(b"\n") for i in range(len(src))] == [
        b"first line", b"second \xc3\xa9", b"third"]


def test_expand_paths_missing_names_the_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        sources.expand_paths(str(tmp_path / "nothing-here" / "*.tar"))
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        sources.TarShardSource(str(tmp_path / "missing.tar"))


def test_registry_holds_tasks_and_mixture(mixture):
    assert mixture == "builtin_pretrain"
    mix = seqio.get_mixture_or_task(mixture)
    rates = {t.name: mix.get_rate(t) for t in mix.tasks}
    assert rates == pytest.approx({"builtin_image_text": 0.875, "builtin_text": 0.125})
    it_task = seqio.get_mixture_or_task("builtin_image_text")
    assert it_task.source.num_input_examples("train") == DATA["num_train"]
    assert it_task.source.num_input_examples("validation") == DATA["num_heldout"]


# ----------------------------------------------------------------------------- pipeline

def test_pipeline_batches_have_model_shapes(mixture):
    batch = next(_iter(mixture))
    assert set(batch) == set(pp.MODEL_FEATURES)
    assert batch["image"].shape == (BATCH, DATA_IMAGE_SIZE, DATA_IMAGE_SIZE, 3)
    assert batch["image"].dtype == np.uint8
    assert batch["prefix_tokens"].shape == (BATCH, 8) and batch["prefix_tokens"].dtype == np.int32
    assert batch["target_tokens"].shape == (BATCH, 10) and batch["target_tokens"].dtype == np.int32
    assert batch["has_image"].shape == (BATCH,)
    assert np.all(batch["target_tokens"][:, 0] > 0)  # every example has a target
    text_only = batch["has_image"] == 0
    assert np.all(batch["image"][text_only] == 0)


def test_pipeline_is_deterministic_per_seed(mixture):
    a, b, c = _iter(mixture, seed=3), _iter(mixture, seed=3), _iter(mixture, seed=4)
    differs = False
    for _ in range(3):
        ba, bb, bc = next(a), next(b), next(c)
        _assert_batches_equal(ba, bb)
        differs |= not _batches_equal(ba, bc)
    assert differs
    # Successive batches differ (the iterator advances).
    assert not _batches_equal(next(a), next(a))


@pytest.mark.slow
def test_pipeline_same_batches_with_worker_processes(mixture):
    """grain multiprocessing workers change nothing about the batches, and their state resumes."""
    plain = _iter(mixture, seed=5)
    workers = _iter(mixture, seed=5, worker_count=2)
    for _ in range(3):
        _assert_batches_equal(next(plain), next(workers))
    state = workers.get_state()
    expected = next(plain)
    fresh = _iter(mixture, seed=5, worker_count=2)
    fresh.set_state(state)
    _assert_batches_equal(next(fresh), expected)


def test_pipeline_state_resumes_at_next_batch(mixture):
    it = _iter(mixture, seed=1)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    fresh = _iter(mixture, seed=1)
    next(fresh)
    fresh.set_state(state)
    for e in expected:
        _assert_batches_equal(next(fresh), e)


def _rows(batch):
    rows = np.concatenate([batch["has_image"][:, None], batch["prefix_tokens"], batch["target_tokens"],
                           batch["image"].reshape(len(batch["image"]), -1).sum(1, keepdims=True)], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


def test_two_processes_together_yield_the_global_batch(mixture):
    one = _iter(mixture, seed=2)
    p0 = _iter(mixture, seed=2, process_index=0, process_count=2)
    p1 = _iter(mixture, seed=2, process_index=1, process_count=2)
    for _ in range(4):
        g, a, b = next(one), next(p0), next(p1)
        assert len(a["target_tokens"]) == len(b["target_tokens"]) == BATCH // 2
        merged = {k: np.concatenate([a[k], b[k]]) for k in g}
        np.testing.assert_array_equal(_rows(merged), _rows(g))
        # The two processes' slices are disjoint examples (not duplicates).
        assert not np.array_equal(_rows(a), _rows(b))
    with pytest.raises(ValueError, match="process count"):
        _iter(mixture, global_batch_size=7, process_index=0, process_count=2)


def test_mixture_rate_of_text_only_examples(dataset):
    name = register_builtin(dataset, text_only_rate=0.25)
    try:
        it = _iter(name, global_batch_size=32)
        has_image = np.concatenate([next(it)["has_image"] for _ in range(20)])
        frac = float(np.mean(has_image == 0))
        assert abs(frac - 0.25) < 0.04, frac
    finally:
        register_builtin(dataset)  # restore the default rate for other tests


# ----------------------------------------------------------------------------- PrefixLM split

def _split(ex_tokens, has_image, rng, p=8, t=24, prob=0.5):
    split = pp.PrefixLMSplit(p, t, prob)
    return split.random_map({"tokens": np.asarray(ex_tokens, np.int32), "has_image": np.int32(has_image),
                             "text": "x"}, rng)


def _nonzero(x):
    return [int(v) for v in x if v != 0]


def test_prefix_lm_split_image_text(dataset, vocab):
    rng = np.random.default_rng(0)
    tok = pp.Tokenize(vocab, 32)
    prefix_lens = []
    for caption in dataset.captions[:80]:
        tokens = tok.map({"text": caption})["tokens"]
        assert tokens[-1] == 1 and list(tokens[:-1]) == list(vocab.encode(caption))
        for _ in range(3):
            out = _split(tokens, 1, rng)
            assert "text" not in out and "tokens" not in out
            prefix, target = _nonzero(out["prefix_tokens"]), _nonzero(out["target_tokens"])
            k = len(prefix)
            assert prefix == list(tokens[:k])  # a leading slice of the caption
            assert target == list(tokens[k:])  # the rest, EOS included
            assert len(target) >= 1
            assert out["prefix_tokens"].shape == (8,) and out["target_tokens"].shape == (24,)
            prefix_lens.append(k)
    prefix_lens = np.asarray(prefix_lens)
    # text_prefix_prob=0.5: about half are plain captioning (empty prefix), the rest take 1..8 tokens.
    assert 0.35 < np.mean(prefix_lens == 0) < 0.65
    assert prefix_lens.max() == 8 and set(range(1, 9)) <= set(prefix_lens.tolist())
    # text_prefix_prob=0 -> always plain captioning; 1 -> always a non-empty prefix.
    tokens = np.asarray(list(range(10, 20)) + [1])
    assert all(_nonzero(_split(tokens, 1, rng, prob=0.0)["prefix_tokens"]) == [] for _ in range(20))
    assert all(_nonzero(_split(tokens, 1, rng, prob=1.0)["prefix_tokens"]) for _ in range(20))
    # A one-token caption (just EOS) keeps it as the target.
    out = _split(np.asarray([1]), 1, rng, prob=1.0)
    assert _nonzero(out["prefix_tokens"]) == [] and _nonzero(out["target_tokens"]) == [1]


def test_prefix_lm_split_text_only(dataset, vocab):
    rng = np.random.default_rng(1)
    tok = pp.Tokenize(vocab, 32)
    ks = []
    for line in dataset.text_lines[:100]:
        tokens = tok.map({"text": line})["tokens"]
        if len(tokens) > 24:  # keep to texts whose every split fits (see the truncation test)
            continue
        for _ in range(3):
            out = _split(tokens, 0, rng, prob=0.0)  # text_prefix_prob does not apply to text-only
            prefix, target = _nonzero(out["prefix_tokens"]), _nonzero(out["target_tokens"])
            assert 1 <= len(prefix) <= min(8, len(tokens) - 1)
            assert len(target) >= 1
            assert prefix + target == list(tokens)
            ks.append(len(prefix))
    assert len(ks) > 100 and set(ks) == set(range(1, 9))
    # Too short to split (only EOS): skipped and counted.
    before = pp.skipped_counts().get("text_too_short", 0)
    assert _split(np.asarray([1]), 0, rng) is None
    assert pp.skipped_counts()["text_too_short"] == before + 1


def test_prefix_lm_split_keeps_every_token_that_fits():
    rng = np.random.default_rng(0)
    p, t = 4, 6
    tokens = np.asarray(list(range(10, 19)) + [1])  # 10 tokens == p + t: Tokenize's maximum
    for has_image in (0, 1):
        for _ in range(20):
            out = _split(tokens, has_image, rng, p=p, t=t, prob=1.0)
            assert _nonzero(out["prefix_tokens"]) + _nonzero(out["target_tokens"]) == list(tokens)


def test_pipeline_examples_are_split_captions(dataset, vocab, mixture):
    """End to end through the registered task: prefix + target == tokenized caption + EOS."""
    task = seqio.get_mixture_or_task("builtin_image_text")
    ds = pipeline.task_dataset(task, "train", seed=0, shuffle=False, repeat=False)
    short = 0
    for i in range(40):
        ex = ds[i]
        tokens = list(vocab.encode(dataset.captions[i])) + [1]
        prefix, target = _nonzero(ex["prefix_tokens"]), _nonzero(ex["target_tokens"])
        assert prefix == tokens[: len(prefix)]
        if len(tokens) - len(prefix) <= 10:
            short += 1
            assert prefix + target == tokens, i
        else:  # target longer than max_target_len: a leading slice of the rest
            assert target == tokens[len(prefix): len(prefix) + 10]
        assert ex["image"].shape == (DATA_IMAGE_SIZE, DATA_IMAGE_SIZE, 3) and ex["has_image"] == 1
    assert short > 20
    # The per-example randomness is keyed by the index: reading twice gives the same split.
    np.testing.assert_array_equal(ds[5]["prefix_tokens"], ds[5]["prefix_tokens"])


# ----------------------------------------------------------------------------- bad data

def _good_jpeg():
    return synthetic.make_sample(0, "train", 0, image_size=DATA_IMAGE_SIZE)[0]


def test_decode_image_skips_and_counts_bad_images():
    dec = pp.DecodeImage(DATA_IMAGE_SIZE)
    before = pp.skipped_counts()
    assert dec.map({"jpg": b"this is not a jpeg at all", "txt": b"a cat"}) is None
    assert dec.map({"jpg": _good_jpeg()[:40], "txt": b"a cat"}) is None  # truncated JPEG
    assert dec.map({"jpg": b"", "txt": b"a cat"}) is None  # zero-byte file
    assert dec.map({"txt": b"a cat"}) is None  # no image member at all
    after = pp.skipped_counts()
    assert after.get("image_decode_error", 0) - before.get("image_decode_error", 0) == 2
    assert after.get("missing_image", 0) - before.get("missing_image", 0) == 2
    # A good image decodes; grayscale / RGBA / non-square PNGs are converted and center-cropped.
    ok = dec.map({"jpg": _good_jpeg(), "txt": b"a cat", "__key__": "k"})
    assert ok["image"].shape == (DATA_IMAGE_SIZE, DATA_IMAGE_SIZE, 3) and ok["has_image"] == 1
    assert ok["text"] == b"a cat" and ok["key"] == "k"
    for mode, size in (("L", (50, 40)), ("RGBA", (20, 90)), ("P", (64, 64))):
        buf = io.BytesIO()
        Image.new(mode, size).save(buf, format="PNG")
        out = dec.map({"png": buf.getvalue(), "json": b'{"caption": "from json"}'})
        assert out["image"].shape == (DATA_IMAGE_SIZE, DATA_IMAGE_SIZE, 3) and out["image"].dtype == np.uint8
        assert out["text"] == "from json"
    assert dec.map(None) is None


def test_decode_image_rejects_decompression_bombs():
    buf = io.BytesIO()
    Image.new("RGB", (300, 300)).save(buf, format="PNG")
    before = pp.skipped_counts().get("image_too_large", 0)
    assert pp.DecodeImage(DATA_IMAGE_SIZE, max_image_pixels=10_000).map({"png": buf.getvalue()}) is None
    assert pp.skipped_counts()["image_too_large"] == before + 1


def test_clean_caption_skips_and_counts_bad_text():
    clean = pp.CleanCaption(max_chars=50)
    before = pp.skipped_counts()
    assert clean.map({"text": b""}) is None
    assert clean.map({"text": "  \n\t "}) is None
    assert clean.map({"text": None}) is None
    assert clean.map({"text": b"\xff\xfe caption"}) is None
    assert clean.map({"text": "x" * 51}) is None
    after = pp.skipped_counts()
    assert after.get("caption_empty", 0) - before.get("caption_empty", 0) == 3
    assert after.get("caption_not_utf8", 0) - before.get("caption_not_utf8", 0) == 1
    assert after.get("caption_too_long", 0) - before.get("caption_too_long", 0) == 1
    assert clean.map({"text": "  A  red\tcircle \n", "k": 1}) == {"text": "A red circle", "k": 1}
    assert pp.CleanCaption(lowercase=True).map({"text": "A Red Circle".encode()})["text"] == "a red circle"


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# The mixed shard's records in order: a good sample (None) or the reason a bad one is skipped for.
MIXED_SHARD = ("good0", "good1", "image_decode_error", "missing_image", "caption_empty", "caption_not_utf8",
               "good2")


def _mixed_shard_task(vocab, tmp_path, name):
    """Registers task `name` over one tar shard laid out as MIXED_SHARD; returns the good captions."""
    shard = tmp_path / f"{name}.tar"
    good = [synthetic.make_sample(0, "train", i, image_size=DATA_IMAGE_SIZE) for i in range(4)]
    with tarfile.open(shard, "w") as tar:
        for i, (jpg, cap, _) in enumerate(good[:2]):
            _add(tar, f"good{i}.jpg", jpg)
            _add(tar, f"good{i}.txt", cap.encode())
        _add(tar, "corrupt.jpg", b"\x00garbage")
        _add(tar, "corrupt.txt", b"a corrupt image")
        _add(tar, "empty.jpg", b"")
        _add(tar, "empty.txt", b"a zero-byte image")
        _add(tar, "nocap.jpg", good[2][0])
        _add(tar, "nocap.txt", b"   ")
        _add(tar, "badutf.jpg", good[2][0])
        _add(tar, "badutf.txt", b"\xff\xff")
        _add(tar, "good2.jpg", good[3][0])
        _add(tar, "good2.txt", good[3][1].encode())
    tasks.image_text_task(name=name, shards={"train": str(shard)}, image_size=DATA_IMAGE_SIZE,
                          max_prefix_len=8, max_target_len=24, text_prefix_prob=0.0, vocabulary=vocab)
    assert seqio.get_mixture_or_task(name).source.num_input_examples("train") == len(MIXED_SHARD)
    return [good[0][1], good[1][1], good[3][1]]


def _delta(before, after):
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


def test_pipeline_drops_bad_samples_and_keeps_going(vocab, tmp_path):
    captions = _mixed_shard_task(vocab, tmp_path, "test_bad_data")
    task = seqio.get_mixture_or_task("test_bad_data")
    before = pp.skipped_counts()
    ds = pipeline.task_dataset(task, "train", seed=0, shuffle=False, repeat=False)
    examples = list(ds.to_iter_dataset())
    got = [_nonzero(e["target_tokens"]) for e in examples]
    assert got == [list(vocab.encode(c)) + [1] for c in captions]
    want = {r: 1 for r in MIXED_SHARD if not r.startswith("good")}
    assert _delta(before, pp.skipped_counts()) == want
    # The trainer's view: pipeline.skipped_counts() reads the same counters.
    assert _delta(before, pipeline.skipped_counts()) == want


def _skips_before_good(order, n_good):
    """Skip counts over the stream positions before the `n_good`-th good example (the elements
    `n_good / batch` batches consumed); `order[p]` = the MIXED_SHARD index at position p."""
    counts, seen, p = {}, 0, 0
    while seen < n_good:
        record = MIXED_SHARD[order[p]]
        if record.startswith("good"):
            seen += 1
        else:
            counts[record] = counts.get(record, 0) + 1
        p += 1
    return counts


@pytest.mark.slow
def test_skipped_counts_are_exact_with_grain_workers(vocab, tmp_path):
    """With 2 grain worker processes, pipeline.skipped_counts() in this (the trainer's) process
    counts exactly the bad samples before the batches read, by reason; batches equal the
    worker-free pipeline's, bad data included."""
    name = "test_bad_data_workers"
    captions = dict(zip(("good0", "good1", "good2"), _mixed_shard_task(vocab, tmp_path, name)))
    # Independent oracle: the pipeline's per-epoch shuffle of the 7 records, rebuilt from its seed.
    seed = pipeline._task_seed(0, name)  # pylint: disable=protected-access
    order = grain.MapDataset.range(len(MIXED_SHARD)).seed(seed).shuffle().repeat()
    good_order = [MIXED_SHARD[order[p]] for p in range(60) if MIXED_SHARD[order[p]].startswith("good")]
    batch, steps = 2, 6  # batches straddle epochs (3 good samples each)
    runs = {}
    for workers in (2, 0):
        before = pipeline.skipped_counts()
        it = _iter(name, global_batch_size=batch, worker_count=workers)
        runs[workers] = []
        for step in range(1, steps + 1):
            runs[workers].append(next(it))
            want = _skips_before_good(order, step * batch)
            assert _delta(before, pipeline.skipped_counts()) == want, (workers, step)
            got = [vocab.decode([int(t) for t in row if t > 1]) for row in runs[workers][-1]["target_tokens"]]
            assert got == [captions[g] for g in good_order[(step - 1) * batch: step * batch]], (workers, step)
        it.close()
    assert sum(_skips_before_good(order, steps * batch).values()) >= 8  # the test saw bad data
    for a, b in zip(runs[2], runs[0]):
        _assert_batches_equal(a, b)


# ----------------------------------------------------------------------------- fast image path

def _jpeg(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _psnr(a, b):
    return 10 * np.log10(255.0 ** 2 / max(np.mean((a.astype(np.float64) - b) ** 2), 1e-12))


def test_fast_jpeg_decode_is_pixel_identical_to_pil():
    """simplejpeg (libjpeg-turbo) gives PIL's pixels, DCT draft scale included; CMYK and
    non-JPEG images fall through to PIL."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8))
    cases = {"synthetic": _good_jpeg(), "444": _jpeg(noise, subsampling=0, quality=95),
             "420 progressive": _jpeg(noise, progressive=True), "gray": _jpeg(noise.convert("L")),
             "large, drafted 1/4": _jpeg(noise.resize((800, 600))), "cmyk": _jpeg(noise.convert("CMYK")),
             "png": _png_bytes(noise)}
    for name, data in cases.items():
        fast = pp.decode_image(data, min_size=DATA_IMAGE_SIZE)
        pil = pp.decode_image(data, min_size=DATA_IMAGE_SIZE, fast=False)
        assert fast.dtype == np.uint8 and fast.shape[2] == 3, name
        np.testing.assert_array_equal(fast, pil, err_msg=name)
    assert pp.decode_image(cases["large, drafted 1/4"], min_size=150).shape == (150, 200, 3)
    assert pp.draft_factor(800, 600, 150) == 4 and pp.draft_factor(800, 600, None) == 1
    # The pixel limit still holds on the fast path (from the header, nothing decoded).
    before = pp.skipped_counts().get("image_too_large", 0)
    assert pp.DecodeImage(DATA_IMAGE_SIZE, max_image_pixels=100).map({"jpg": cases["444"], "txt": b"x"}) is None
    assert pp.skipped_counts()["image_too_large"] == before + 1


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_resize_box_matches_resize_then_crop():
    """The PIL path equals PIL's resize-then-crop pixel for pixel (only the box is resampled);
    the fast resizer (same Catmull-Rom kernel) is within rounding of it."""
    rng = np.random.default_rng(1)
    for h, w in ((96, 128), (128, 96), (64, 64), (300, 301), (20, 50)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        size = 32
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (nw - size) // 2, (nh - size) // 2
        want = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC).crop(
            (left, top, left + size, top + size)))
        np.testing.assert_array_equal(pp.resize_center_crop(img, size, fast=False), want)
        fast = pp.resize_center_crop(img, size)
        assert fast.shape == (size, size, 3) and fast.dtype == np.uint8 and fast.flags.writeable
        assert _psnr(fast, want) > 45, (h, w)  # uniform noise: the worst case for rounding differences
    # PIL images are accepted too (caption / zero-shot callers pass them).
    pil_img = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    np.testing.assert_array_equal(pp.resize_center_crop(pil_img, 16),
                                  pp.resize_center_crop(np.asarray(pil_img), 16))


def test_decode_image_without_the_fast_packages(monkeypatch):
    """Where simplejpeg / cykooz_resizer are not installed, PIL does everything, bad data included."""
    monkeypatch.setattr(pp, "simplejpeg", None)
    monkeypatch.setattr(pp, "cykooz_resizer", None)
    dec = pp.DecodeImage(DATA_IMAGE_SIZE)
    out = dec.map({"jpg": _good_jpeg(), "txt": b"a cat"})
    assert out["image"].shape == (DATA_IMAGE_SIZE, DATA_IMAGE_SIZE, 3)
    np.testing.assert_array_equal(out["image"], pp.DecodeImage(DATA_IMAGE_SIZE, fast=False).map(
        {"jpg": _good_jpeg(), "txt": b"a cat"})["image"])
    before = pp.skipped_counts().get("image_decode_error", 0)
    assert dec.map({"jpg": _good_jpeg()[:40], "txt": b"a cat"}) is None
    assert pp.skipped_counts()["image_decode_error"] == before + 1


def test_resize_never_crashes_on_rounded_or_upscaled_boxes():
    """Regressions: a crop box whose edge float-rounds past the image (506.00000000000006 on a
    506-px side) made the Rust resizer raise, and upscaling 50x70 -> 64 killed the process
    (SIGSEGV). Every center crop of many random sizes, down and up, gives the PIL result."""
    rng = np.random.default_rng(7)
    cases = [(506, 515, 224), (50, 70, 64), (30, 58, 32)]
    cases += [(int(rng.integers(8, 600)), int(rng.integers(8, 600)), int(rng.choice([32, 64, 224])))
              for _ in range(150)]
    for h, w, size in cases:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        fast = pp.resize_center_crop(img, size)
        slow = pp.resize_center_crop(img, size, fast=False)
        assert fast.shape == (size, size, 3)
        assert _psnr(fast, slow) > 40, (h, w, size)
