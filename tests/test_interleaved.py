"""Interleaved image-text documents (Flamingo): the token / loss-mask layout on hand-made
documents, the OBELICS / MMC4 JSONL and tar sources, bad images counted and dropped, pairs as
1-image documents, and the built-in documents through the real pipeline into a global batch."""
from __future__ import annotations

import filecmp
import io
import json
import os
import tarfile

import numpy as np
import pytest
import seqio

from conftest import DATA_IMAGE_SIZE
from simvlm_jax import partitioning
from simvlm_jax.data import pipeline, preprocessors as pp, sources, synthetic, tasks

SIZE = DATA_IMAGE_SIZE
MEDIA, EOC, BOS, EOS = 50, 51, 52, 1


class WordVocab:
    """One id per word ('a' -> 10, 'b' -> 11, ...), '<image>' -> MEDIA (as a tokenizer holding that
    piece would): expected token arrays can be written out by hand."""
    eos_id, vocab_size = EOS, 40

    def encode(self, text):
        return [MEDIA if w == "<image>" else 10 + ord(w) - ord("a") for w in text.split()]


def _ids(text):
    return WordVocab().encode(text)


def _doc(*elements, max_images=3):
    """A decoded document: str -> a text, int k -> image slot k (its pixels all k + 1)."""
    images = np.zeros((max_images, 2, 2, 3), np.uint8)
    mask = np.zeros((max_images,), np.int32)
    for e in elements:
        if isinstance(e, int):
            images[e], mask[e] = e + 1, 1
    return {"key": "k", "images": images, "image_mask": mask,
            "elements": [("image", e) if isinstance(e, int) else ("text", e) for e in elements]}


def _tokens(doc, max_len=16, bos_id=None):
    return pp.InterleavedTokens(WordVocab(), max_len, MEDIA, EOC, bos_id).map(doc)


def _padded(values, n=16):
    return list(values) + [0] * (n - len(values))


def _delta(before, after):
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


def _jpegs(n, start=0):
    return [synthetic.make_sample(0, "train", start + i, image_size=SIZE)[0] for i in range(n)]


# ----------------------------------------------------------------------------- layout and labels

@pytest.mark.parametrize("bos", [None, BOS])
def test_pair_layout_with_and_without_bos(bos):
    out = _tokens(_doc(0, "a b"), bos_id=bos)
    head = [] if bos is None else [BOS]
    assert out["tokens"].tolist() == _padded(head + [MEDIA, 10, 11, EOC, EOS])
    assert out["loss_mask"].tolist() == _padded([0] * len(head) + [0, 1, 1, 1, 1])
    assert out["tokens"].dtype == out["loss_mask"].dtype == np.int32
    assert out["image_mask"].tolist() == [1, 0, 0]


def test_leading_text_text_after_a_chunk_and_image_without_text():
    # "x" leads; "y z" follows image 0's chunk (MMC4 rule: not a target); image 1 has no text.
    out = _tokens(_doc("x", 0, "a", "y z", 1, 2, "b"))
    assert out["tokens"].tolist() == _padded(
        [_ids("x")[0], MEDIA, 10, EOC, *_ids("y z"), MEDIA, EOC, MEDIA, 11, EOC, EOS])
    assert out["loss_mask"].tolist() == _padded([0, 0, 1, 1, 0, 0, 0, 1, 0, 1, 1, 1])
    assert out["image_mask"].tolist() == [1, 1, 1]
    # With BOS the mask only gains a leading 0.
    with_bos = _tokens(_doc("x", 0, "a", "y z", 1, 2, "b"), bos_id=BOS)
    assert with_bos["tokens"][1:].tolist() == out["tokens"][:-1].tolist() and with_bos["tokens"][0] == BOS
    assert with_bos["loss_mask"].tolist() == [0] + out["loss_mask"][:-1].tolist()


def test_text_after_the_last_chunk_then_eos():
    out = _tokens(_doc(0, "a", "b c"))
    assert out["tokens"].tolist() == _padded([MEDIA, 10, EOC, 11, 12, EOS])
    assert out["loss_mask"].tolist() == _padded([0, 1, 1, 0, 0, 1])  # EOS is a target


def test_whitespace_empty_texts_and_literal_special_tokens():
    # An empty text is no text (image 0 then has none); '<image>' inside a text is not an image.
    out = _tokens(_doc(0, "  ", 1, " a \n <image>  b "))
    assert out["tokens"].tolist() == _padded([MEDIA, EOC, MEDIA, 10, 11, EOC, EOS])
    assert out["loss_mask"].tolist() == _padded([0, 1, 0, 1, 1, 1, 1])
    assert (out["tokens"] == MEDIA).sum() == out["image_mask"].sum() == 2


def test_truncation_cuts_eos_then_images_whose_image_token_is_cut():
    doc = _doc(0, "a b", 1, "c")  # full: M a b E M c E EOS
    out = _tokens(doc, max_len=7)
    assert out["tokens"].tolist() == [MEDIA, 10, 11, EOC, MEDIA, 12, EOC]  # the cut took the EOS
    assert out["loss_mask"].tolist() == [0, 1, 1, 1, 0, 1, 1]
    assert out["image_mask"].tolist() == [1, 1, 0]
    out = _tokens(doc, max_len=4)  # image 1's <image> is cut: its image goes too
    assert out["tokens"].tolist() == [MEDIA, 10, 11, EOC]
    assert out["image_mask"].tolist() == [1, 0, 0]
    assert np.all(out["images"][1:] == 0) and np.all(out["images"][0] == 1)
    assert np.all(doc["images"][1] == 2)  # the input was not modified


def test_document_without_target_in_max_len_is_skipped_and_counted():
    before = pp.skipped_counts()
    assert _tokens(_doc("a b c d", 0, "e"), max_len=4) is None  # leading text fills the window
    assert _tokens(_doc("a b c", 0, "e"), max_len=4) is None  # the <image> is the last token
    assert _delta(before, pp.skipped_counts()) == {"document_no_target": 2}


def test_images_past_max_images_are_dropped_with_their_image_token():
    jpg = _jpegs(3)
    record = {"__key__": "d", "elements": [("image", jpg[0]), ("text", "a"), ("image", jpg[1]), ("text", "b"),
                                           ("image", jpg[2]), ("text", "c")]}
    doc = pp.DecodeDocumentImages(SIZE, 2).map(record)
    assert doc["elements"] == [("image", 0), ("text", "a"), ("image", 1), ("text", "b"), ("text", "c")]
    assert doc["images"].shape == (2, SIZE, SIZE, 3) and doc["images"].dtype == np.uint8
    np.testing.assert_array_equal(doc["images"][1], pp.DecodeImage(SIZE).map({"jpg": jpg[1]})["image"])
    out = _tokens(doc)
    # The third image's text stays, after image 1's chunk: context, not a target.
    assert out["tokens"].tolist() == _padded([MEDIA, 10, EOC, MEDIA, 11, EOC, 12, EOS])
    assert out["loss_mask"].tolist() == _padded([0, 1, 1, 0, 1, 1, 0, 1])


def test_pair_to_document_pads_the_images():
    ex = {"image": np.full((SIZE, SIZE, 3), 7, np.uint8), "has_image": np.int32(1), "text": "a b", "key": "p"}
    doc = pp.PairToDocument(3).map(ex)
    assert doc["image_mask"].tolist() == [1, 0, 0]
    assert np.all(doc["images"][0] == 7) and np.all(doc["images"][1:] == 0)
    assert _tokens(doc)["tokens"].tolist() == _padded([MEDIA, 10, 11, EOC, EOS])


def test_special_ids_must_be_distinct_and_not_pad_or_eos():
    for media, eoc, bos in ((MEDIA, MEDIA, None), (0, EOC, None), (MEDIA, EOS, None), (MEDIA, EOC, MEDIA)):
        with pytest.raises(ValueError, match="media_id"):
            pp.InterleavedTokens(WordVocab(), 8, media, eoc, bos)


# ----------------------------------------------------------------------------- sources

def _write_images(directory, names, datas):
    os.makedirs(directory, exist_ok=True)
    for name, data in zip(names, datas):
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)


def _elements(record):
    return [(k, v if k != "image" else bytes(v)) for k, v in record["elements"]]


def test_jsonl_source_reads_obelics_and_mmc4_alike(tmp_path):
    jpg = _jpegs(3)
    _write_images(tmp_path / "imgs", ["p.jpg", "q.jpg"], jpg[:2])
    absolute = str(tmp_path / "abs.jpg")
    _write_images(tmp_path, ["abs.jpg"], jpg[2:])
    obelics = {"texts": ["lead", None, "one", None, "two", "more"],
               "images": [None, "p.jpg", None, absolute, None, None]}
    mmc4 = {"text_list": ["lead", "one", "two", "more"],
            "image_info": [{"image_name": "p.jpg", "matched_text_index": 1},
                           {"image_name": absolute, "matched_text_index": 2}]}
    invalid = [{"texts": ["a", "b"], "images": [None, "p.jpg"]},  # a position with both
               {"text_list": ["a"], "image_info": [{"image_name": "p.jpg", "matched_text_index": 3}]},
               {"caption": "x"}]
    lines = [json.dumps(obelics), json.dumps(mmc4), "not json", *map(json.dumps, invalid)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    src = sources.make_source("interleaved_jsonl", str(tmp_path / "docs.jsonl"), image_dir=str(tmp_path / "imgs"))
    assert len(src) == 6
    want = [("text", "lead"), ("image", jpg[0]), ("text", "one"), ("image", jpg[2]), ("text", "two"),
            ("text", "more")]
    assert _elements(src[0]) == want and _elements(src[1]) == want
    assert [src[i][sources.ERROR_KEY] for i in range(2, 6)] == ["document_invalid"] * 4
    # Without image_dir, paths are relative to the .jsonl's folder.
    (tmp_path / "imgs" / "d.jsonl").write_text(json.dumps({"texts": [None], "images": ["q.jpg"]}) + "\n")
    assert _elements(sources.InterleavedJsonlSource(str(tmp_path / "imgs" / "d.jsonl"))[0]) == [("image", jpg[1])]
    with pytest.raises(FileNotFoundError, match="image_dir"):
        sources.InterleavedJsonlSource(str(tmp_path / "docs.jsonl"), image_dir=str(tmp_path / "nowhere"))


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_tar_source_finds_images_by_member_name(tmp_path):
    jpg = _jpegs(2)
    path = str(tmp_path / "docs.tar")
    with tarfile.open(path, "w") as tar:
        _add(tar, "doc0.json", json.dumps({"texts": [None, "a", None, "b"],
                                           "images": ["doc0.0.jpg", None, "1.PNG", None]}).encode())
        _add(tar, "doc0.0.jpg", jpg[0])
        _add(tar, "doc0.1.png", jpg[1])
        _add(tar, "doc1.json", json.dumps({"text_list": ["c"], "image_info": [
            {"image_name": "doc1.x.jpg", "matched_text_index": 0}]}).encode())
        _add(tar, "doc2.json", b"{broken")
    src = sources.make_source("interleaved_tar", path)
    assert len(src) == 3
    assert _elements(src[0]) == [("image", jpg[0]), ("text", "a"), ("image", jpg[1]), ("text", "b")]
    assert src[1]["elements"] == [("image_error", "missing_image"), ("text", "c")]
    assert src[2][sources.ERROR_KEY] == "document_invalid"


def _bad_image_docs(tmp_path, vocab):
    """docs.jsonl: doc 0 good (2 images), doc 1 a corrupt + a missing + a good image, doc 2 only a
    missing image; registered as task 'test_interleaved_bad'."""
    jpg = _jpegs(3)
    _write_images(tmp_path / "imgs", ["g0.jpg", "g1.jpg", "g2.jpg", "bad.jpg"], [*jpg, jpg[0][:200]])
    docs = [{"texts": [None, "a", None, "b"], "images": ["g0.jpg", None, "g1.jpg", None]},
            {"texts": [None, "c", None, "d", None, "e"],
             "images": ["bad.jpg", None, "gone.jpg", None, "g2.jpg", None]},
            {"texts": ["f", None], "images": [None, "gone.jpg"]}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return tasks.interleaved_task(name="test_interleaved_bad", shards={"train": str(tmp_path / "docs.jsonl")},
                                  image_size=SIZE, max_images=3, max_len=12, media_id=MEDIA, eoc_id=EOC,
                                  source_kwargs={"image_dir": str(tmp_path / "imgs")}, vocabulary=vocab)


def test_corrupt_and_missing_images_are_counted_and_dropped(tmp_path):
    task = _bad_image_docs(tmp_path, WordVocab())
    before = pp.skipped_counts()
    ds = pipeline.task_dataset(task, "train", seed=0, shuffle=False, repeat=False)
    out = list(ds.to_iter_dataset())
    assert _delta(before, pp.skipped_counts()) == {"image_decode_error": 1, "image_file_missing": 2,
                                                   "document_no_image": 1}
    assert len(out) == 2 and set(out[0]) == set(pp.INTERLEAVED_FEATURES)
    # The unreadable images went with their places: "c" and "d" now lead the document (context).
    assert out[1]["tokens"].tolist() == _padded([12, 13, MEDIA, 14, EOC, EOS], 12)
    assert out[1]["loss_mask"].tolist() == _padded([0, 0, 0, 1, 1, 1], 12)
    assert out[1]["image_mask"].tolist() == [1, 0, 0]
    good = pp.DecodeImage(SIZE).map({"jpg": _jpegs(3)[2]})["image"]
    np.testing.assert_array_equal(out[1]["images"][0], good)


def test_train_iterator_counts_dropped_images_of_kept_documents(tmp_path):
    """Through the trainer's iterator (reasons carried out of the preprocessing stage): every
    kept document here lost one image, so a batch of 4 counts exactly 4."""
    jpg = _jpegs(1)
    _write_images(tmp_path / "imgs", ["g.jpg", "bad.jpg"], [jpg[0], b"not an image"])
    doc = {"texts": [None, "a", None, "b"], "images": ["bad.jpg", None, "g.jpg", None]}
    (tmp_path / "docs.jsonl").write_text((json.dumps(doc) + "\n") * 3)
    tasks.interleaved_task(name="test_interleaved_partial", shards={"train": str(tmp_path / "docs.jsonl")},
                           image_size=SIZE, max_images=2, max_len=8, media_id=MEDIA, eoc_id=EOC,
                           source_kwargs={"image_dir": str(tmp_path / "imgs")}, vocabulary=WordVocab())
    before = pipeline.skipped_counts()
    batch = next(pipeline.make_train_iterator("test_interleaved_partial", global_batch_size=4, num_threads=1,
                                              prefetch_buffer_size=1))
    assert set(batch) == set(pp.INTERLEAVED_FEATURES)  # the carried reasons left the example
    assert _delta(before, pipeline.skipped_counts()) == {"image_decode_error": 4}
    assert batch["tokens"][0].tolist() == [10, MEDIA, 11, EOC, EOS, 0, 0, 0]  # "a" lost its image


def test_random_crop_is_deterministic_per_rng():
    jpg = _jpegs(2)
    record = {"__key__": "d", "elements": [("image", jpg[0]), ("text", "a"), ("image", jpg[1])]}
    crop = pp.DecodeDocumentImagesRandomCrop(SIZE // 2, 2)
    a, b = (crop.random_map(record, np.random.default_rng(s)) for s in (1, 1))
    c = crop.random_map(record, np.random.default_rng(2))
    np.testing.assert_array_equal(a["images"], b["images"])
    assert not np.array_equal(a["images"], c["images"]) and a["image_mask"].tolist() == [1, 1]


def test_task_arguments_are_checked(tmp_path):
    kw = dict(shards={"train": "x"}, image_size=SIZE, max_images=2, max_len=8, media_id=MEDIA, eoc_id=EOC,
              vocabulary=WordVocab())
    with pytest.raises(ValueError, match="pairs=True reads an image-text source"):
        tasks.interleaved_task(name="t", pairs=True, **kw)
    with pytest.raises(ValueError, match="or pairs=True"):
        tasks.interleaved_task(name="t", source="tar", **kw)
    with pytest.raises(ValueError, match="interleaved_task.crop"):
        tasks.interleaved_task(name="t", crop="middle", **kw)
    with pytest.raises(ValueError, match="register them with interleaved_task"):
        tasks.image_text_task(name="t", shards={"train": "x"}, image_size=SIZE, max_prefix_len=4, max_target_len=4,
                              source="interleaved_jsonl", vocabulary=WordVocab())


# ----------------------------------------------------------------------------- built-in data

@pytest.fixture(scope="module")
def flamingo_data(dataset, tmp_path_factory):
    """The session's built-in data (train/heldout shards, tokenizer) + 24 + 8 interleaved documents."""
    root = tmp_path_factory.mktemp("flamingo_data")
    for sub in ("train", "heldout"):
        os.symlink(os.path.join(dataset.data_dir, sub), root / sub)
    manifest = synthetic.generate_interleaved(str(root), seed=0, num_train=24, num_validation=8, image_size=SIZE)
    return str(root), manifest


def test_builtin_documents_are_deterministic_and_well_formed(flamingo_data, tmp_path):
    root, manifest = flamingo_data
    assert manifest["counts"] == {"train": 24, "validation": 8}
    again = synthetic.generate_interleaved(str(tmp_path), seed=0, num_train=24, num_validation=8, image_size=SIZE)
    assert again == manifest
    for rel in ("train.jsonl", "validation.jsonl", "images/train/000003-1.jpg", "images/validation/000007-0.jpg"):
        assert filecmp.cmp(os.path.join(root, "interleaved", rel), os.path.join(tmp_path, "interleaved", rel),
                           shallow=False), rel
    # Document i depends on (seed, split, i) only; another seed differs.
    assert synthetic.make_document(0, "train", 5, SIZE) == synthetic.make_document(0, "train", 5, SIZE)
    assert synthetic.make_document(1, "train", 5, SIZE)[0] != synthetic.make_document(0, "train", 5, SIZE)[0]
    with open(os.path.join(root, "interleaved", "train.jsonl"), encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    n_images = [sum(i is not None for i in d["images"]) for d in docs]
    assert len(docs) == 24 and min(n_images) >= 2 and max(n_images) <= 5
    assert sum(n_images) == manifest["images"]["train"]
    leading = [d["images"][0] is None for d in docs]
    extra = [any(a is None and b is None for a, b in zip(d["images"], d["images"][1:])) for d in docs]
    assert any(leading) and not all(leading) and any(extra)  # leading texts; texts without image
    for d in docs:
        elements = sources.document_elements(d)
        for (kind, _), nxt in zip(elements, elements[1:] + [("end", None)]):
            assert kind != "image" or nxt[0] == "text"  # every image has its caption


def test_builtin_flamingo_mixture_makes_global_batches(flamingo_data, dataset):
    root, _ = flamingo_data
    vocab = dataset.vocab()
    media, eoc = vocab.vocab_size, vocab.vocab_size + 1
    name = tasks.register_builtin_interleaved(root, image_size=SIZE, max_images=3, max_len=24, media_id=media,
                                              eoc_id=eoc, bos_id=None, vocabulary=vocab)
    assert name == "builtin_flamingo"
    mix = seqio.get_mixture_or_task(name)
    rates = {t.name: mix.get_rate(t) for t in mix.tasks}
    assert rates == {"builtin_interleaved": 1.0, "builtin_interleaved_pairs": 1.0}
    # Pairs are "<image>caption<|endofchunk|>" EOS.
    pairs = pipeline.task_dataset(seqio.get_mixture_or_task("builtin_interleaved_pairs"), "train", 0,
                                  shuffle=False, repeat=False)
    first = pairs[0]
    caption = list(vocab.encode(dataset.captions[0]))
    assert first["tokens"].tolist() == _padded([media, *caption, eoc, vocab.eos_id], 24)
    assert first["loss_mask"].tolist() == _padded([0] + [1] * (len(caption) + 2), 24)
    # Documents: the first validation document's captions are the targets.
    docs = pipeline.task_dataset(seqio.get_mixture_or_task("builtin_interleaved"), "validation", 0,
                                 shuffle=False, repeat=False)
    doc = docs[0]
    trained = [t for t, m in zip(doc["tokens"], doc["loss_mask"]) if m and t not in (eoc, vocab.eos_id)]
    d0 = synthetic.make_document(0, "validation", 0, SIZE)[0]
    captions = [t for t, prev in zip(d0["texts"], [None] + d0["images"]) if prev is not None]
    assert "".join(captions).replace(" ", "").startswith(vocab.decode([int(t) for t in trained]).replace(" ", ""))
    assert (doc["tokens"] == media).sum() == doc["image_mask"].sum() >= 1
    # The real pipeline, then global arrays over the 8 CPU devices.
    batch = next(pipeline.make_train_iterator(name, global_batch_size=8, seed=1, num_threads=1,
                                              prefetch_buffer_size=2))
    mesh = partitioning.make_mesh()
    assert mesh.devices.size == 8
    arrays = partitioning.host_batch_to_global(batch, mesh)
    assert set(arrays) == set(pp.INTERLEAVED_FEATURES)
    want = {"images": ((8, 3, SIZE, SIZE, 3), np.uint8), "image_mask": ((8, 3), np.int32),
            "tokens": ((8, 24), np.int32), "loss_mask": ((8, 24), np.int32)}
    for k, (shape, dtype) in want.items():
        assert arrays[k].shape == shape and arrays[k].dtype == dtype, k
        assert len(arrays[k].addressable_shards) == 8
    mask = np.asarray(arrays["image_mask"])
    assert np.all(mask.sum(1) == (np.asarray(arrays["tokens"]) == media).sum(1))
    assert np.all(np.asarray(arrays["images"])[mask == 0] == 0) and np.all(mask[:, 0] == 1)
    assert np.all(np.asarray(arrays["loss_mask"]).sum(1) > 0)
    # One batch holds one kind of example: seqio refuses to mix interleaved and PrefixLM tasks
    # (other output features); the pipeline refuses tasks whose examples have other features.
    shards = {"train": os.path.join(root, "train", "*.tar")}
    kw = dict(shards=shards, image_size=SIZE, max_prefix_len=4, max_target_len=8, vocabulary=vocab)
    tasks.image_text_task(name="test_prefix_lm", **kw)
    with pytest.raises(ValueError, match="different output features"):
        tasks.mixture(name="test_bad_mix", tasks_and_rates=[("builtin_interleaved", 1), ("test_prefix_lm", 1)])
    tasks.image_text_task(name="test_prefix_lm_mlm", text_len=6, mask_id=vocab.vocab_size, **kw)
    tasks.mixture(name="test_bad_mix", tasks_and_rates=[("test_prefix_lm_mlm", 1), ("test_prefix_lm", 1)])
    with pytest.raises(ValueError, match="different features"):
        pipeline.make_train_iterator("test_bad_mix", global_batch_size=8)


def test_register_builtin_interleaved_needs_the_prepared_documents(tmp_path):
    with pytest.raises(FileNotFoundError, match="--mode=prepare"):
        tasks.register_builtin_interleaved(str(tmp_path), image_size=SIZE, max_images=2, max_len=8,
                                           media_id=MEDIA, eoc_id=EOC, vocabulary=WordVocab())


def test_prepare_adds_the_documents_to_an_existing_data_dir(tmp_path):
    from simvlm_jax import experiment
    (tmp_path / "manifest.json").write_text("{}")  # prepared before the interleaved documents existed
    (tmp_path / "spm.model").write_bytes(b"")
    experiment.prepare_builtin(str(tmp_path), num_interleaved=3, num_interleaved_validation=1, image_size=16)
    with open(tmp_path / "interleaved" / "manifest.json", encoding="utf-8") as f:
        assert json.load(f)["counts"] == {"train": 3, "validation": 1}
    assert (tmp_path / "manifest.json").read_text() == "{}"  # the rest is left as it was
    assert len((tmp_path / "interleaved" / "train.jsonl").read_text().splitlines()) == 3
