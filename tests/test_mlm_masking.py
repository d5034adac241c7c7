"""mPLUG's text features: the MaskedText preprocessor (BERT-style MLM masking: statistics,
special ids, labels, determinism, shapes, argument errors) and its wiring into image_text_task /
register_builtin."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import seqio

from conftest import DATA_IMAGE_SIZE, register_builtin
from simvlm_jax.data import pipeline, preprocessors as pp, synthetic, tasks

V = 1000        # tokenizer pieces in the unit tests
MASK = V        # the mask id, one past the pieces (as mPLUG's gin files set it)


def _mask(tokens, rng, text_len=None, **kw):
    tokens = np.asarray(tokens, np.int32)
    t = pp.MaskedText(text_len or len(tokens), MASK, V, **kw)
    return t.random_map({"tokens": tokens, "has_image": np.int32(1), "text": "x"}, rng)


def _caption(rng, n):
    """n caption ids (no pad/eos/unk) + EOS."""
    return np.append(rng.integers(3, V, n), 1).astype(np.int32)


# ----------------------------------------------------------------------------- statistics

def test_masking_statistics_and_labels():
    rng = np.random.default_rng(0)
    n_words, text_len = 100, 110  # 100 eligible ids, EOS, 9 pads per row
    rows = [_mask(_caption(rng, n_words), rng, text_len) for _ in range(2000)]
    text = np.stack([r["text_tokens"] for r in rows])
    mlm = np.stack([r["mlm_tokens"] for r in rows])
    labels = np.stack([r["mlm_labels"] for r in rows])
    selected = labels != 0
    eligible = np.zeros_like(selected)
    eligible[:, :n_words] = True
    n = eligible.sum()
    assert n == 200_000
    # Pad and EOS positions are never selected nor changed.
    assert not selected[~eligible].any()
    np.testing.assert_array_equal(mlm[~eligible], text[~eligible])
    assert (text[:, n_words] == 1).all() and (text[:, n_words + 1:] == 0).all()
    # Labels: the original id exactly at the selected positions, 0 elsewhere; only they change.
    np.testing.assert_array_equal(labels[selected], text[selected])
    assert not (labels[~selected]).any()
    assert ((mlm != text) <= selected).all()
    # ~15% of the eligible positions selected (5 sigma of the binomial).
    frac = selected.sum() / n
    assert abs(frac - 0.15) < 5 * np.sqrt(0.15 * 0.85 / n), frac
    # Of the selected: 80% mask, 10% a random other id, 10% unchanged (random == original: 1/998).
    k = selected.sum()
    masked = np.mean(mlm[selected] == MASK)
    random_other = np.mean((mlm[selected] != MASK) & (mlm[selected] != text[selected]))
    unchanged = np.mean(mlm[selected] == text[selected])
    p_same = 1 / (V - 2)  # the random id is drawn from [0, V) without pad, eos (mask is >= V)
    for got, want in ((masked, 0.8), (random_other, 0.1 * (1 - p_same)), (unchanged, 0.1 + 0.1 * p_same)):
        assert abs(got - want) < 5 * np.sqrt(want * (1 - want) / k), (got, want)
    # Random replacements: in [0, V), never pad/eos/mask, spread over the vocabulary.
    rand = mlm[selected & (mlm != MASK) & (mlm != text)]
    assert rand.min() >= 2 and rand.max() < V and not np.isin(rand, [0, 1, MASK]).any()
    assert abs(rand.mean() - (V + 1) / 2) < 5 * np.sqrt((V - 2) ** 2 / 12 / len(rand))
    assert rand.min() < 50 and rand.max() > V - 50  # the whole range, not e.g. a slice of it


def test_mlm_probability_is_honored():
    rng = np.random.default_rng(1)
    rows = [_mask(_caption(rng, 100), rng, mlm_probability=0.5) for _ in range(400)]
    frac = np.mean([np.mean(r["mlm_labels"][:100] != 0) for r in rows])
    assert abs(frac - 0.5) < 5 * np.sqrt(0.25 / 40_000), frac


def test_extra_special_ids_are_never_selected_nor_drawn():
    rng = np.random.default_rng(2)
    tokens = np.asarray([2, 7] * 50 + [1], np.int32)  # UNK (2) listed as special below
    picks = []
    for _ in range(300):
        out = _mask(tokens, rng, special_ids=(0, 1, 2))
        sel = out["mlm_labels"] != 0
        assert not sel[tokens == 2].any()
        picks.append(out["mlm_tokens"][sel])
    picks = np.concatenate(picks)
    assert (picks == MASK).mean() > 0.7 and not np.isin(picks, [0, 1, 2]).any()


def test_a_caption_always_trains_at_least_one_position():
    rng = np.random.default_rng(3)
    # One eligible id: selected every time (15% alone would leave it unselected 85% of the time).
    for _ in range(50):
        out = _mask([5, 1], rng, text_len=4)
        np.testing.assert_array_equal(out["mlm_labels"], [5, 0, 0, 0])
    # Three ids: exactly one or more selected, the forced one spread over them.
    first = []
    for _ in range(300):
        labels = _mask([5, 6, 7, 1], rng)["mlm_labels"]
        assert (labels != 0).sum() >= 1
        first.append(int(np.flatnonzero(labels)[0]))
    assert set(first) == {0, 1, 2}
    # Only EOS: nothing eligible, so nothing selected nor changed.
    out = _mask([1], rng, text_len=3)
    np.testing.assert_array_equal(out["text_tokens"], [1, 0, 0])
    np.testing.assert_array_equal(out["mlm_tokens"], [1, 0, 0])
    np.testing.assert_array_equal(out["mlm_labels"], [0, 0, 0])


# ----------------------------------------------------------------------------- determinism

def test_same_seed_same_masks_different_seed_different():
    tokens = _caption(np.random.default_rng(0), 60)

    def run(seed):
        rng = np.random.default_rng(seed)
        return [_mask(tokens, rng, text_len=64) for _ in range(3)]

    a, b, c = run(7), run(7), run(8)
    for x, y in zip(a, b):
        for k in pp.MLM_FEATURES:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    assert any(not np.array_equal(x["mlm_tokens"], z["mlm_tokens"]) for x, z in zip(a, c))
    assert not np.array_equal(a[0]["mlm_labels"], a[1]["mlm_labels"])  # each call draws anew


# ----------------------------------------------------------------------------- shapes, passthrough, errors

def test_shapes_dtypes_truncation_and_passthrough():
    rng = np.random.default_rng(4)
    tokens = np.arange(10, 40, dtype=np.int32)
    tokens[-1] = 1
    ex = {"tokens": tokens, "has_image": np.int32(1), "text": "x", "key": "k"}
    out = pp.MaskedText(8, MASK, V).random_map(ex, rng)
    assert out["tokens"] is tokens and ex.keys() == {"tokens", "has_image", "text", "key"}  # input untouched
    np.testing.assert_array_equal(tokens, np.r_[np.arange(10, 39), 1])
    assert {"tokens", "has_image", "text", "key"} <= out.keys()
    np.testing.assert_array_equal(out["text_tokens"], np.arange(10, 18))  # the first 8 (EOS cut off)
    out = pp.MaskedText(40, MASK, V).random_map(ex, rng)
    np.testing.assert_array_equal(out["text_tokens"], np.r_[tokens, np.zeros(10)])
    for k in pp.MLM_FEATURES:
        assert out[k].shape == (40,) and out[k].dtype == np.int32, k
    assert pp.MaskedText(8, MASK, V).random_map(None, rng) is None
    # PrefixLMSplit runs after it on the same example and still finds the tokens.
    split = pp.PrefixLMSplit(8, 32, 0.0).random_map(out, rng)
    assert {"text_tokens", "mlm_tokens", "mlm_labels", "prefix_tokens", "target_tokens"} <= split.keys()
    assert pp.SelectFeatures(pp.MODEL_FEATURES + pp.MLM_FEATURES).map(
        {**split, "image": np.zeros(1)}).keys() == set(pp.MODEL_FEATURES + pp.MLM_FEATURES)


@pytest.mark.parametrize("kwargs, binding", [
    (dict(mlm_probability=0.0), "image_text_task.mlm_probability"),
    (dict(mlm_probability=1.0), "image_text_task.mlm_probability"),
    (dict(mlm_probability=-0.1), "image_text_task.mlm_probability"),
    (dict(text_len=0), "image_text_task.text_len"),
    (dict(mask_id=-1), "image_text_task.mask_id"),
    (dict(mask_id=1), "image_text_task.mask_id"),  # EOS
    (dict(vocab_size=2, mask_id=2), "vocab_size"),
])
def test_bad_arguments_name_the_binding(kwargs, binding):
    args = {"text_len": 8, "mask_id": MASK, "vocab_size": V, **kwargs}
    with pytest.raises(ValueError, match=binding):
        pp.MaskedText(**args)


# ----------------------------------------------------------------------------- task wiring

@pytest.fixture(scope="module")
def vocab(dataset):
    return dataset.vocab()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    samples = [synthetic.make_sample(0, "train", i, image_size=DATA_IMAGE_SIZE) for i in range(12)]
    path = tmp_path_factory.mktemp("mlm") / "s.tar"
    with tarfile.open(path, "w") as tar:
        for i, (jpg, cap, _) in enumerate(samples):
            _add(tar, f"s{i:03d}.jpg", jpg)
            _add(tar, f"s{i:03d}.txt", cap.encode())
    return str(path), [cap for _, cap, _ in samples]


def _task(vocab, shard, name, **kw):
    tasks.image_text_task(name=name, shards={"train": shard}, image_size=DATA_IMAGE_SIZE, max_prefix_len=8,
                          max_target_len=24, vocabulary=vocab, **kw)
    return pipeline.task_dataset(seqio.get_mixture_or_task(name), "train", seed=0, shuffle=False, repeat=False)


def test_image_text_task_adds_the_mlm_features(vocab, shard):
    path, captions = shard
    text_len = 12
    ds = _task(vocab, path, "test_mlm_task", text_len=text_len, mask_id=vocab.vocab_size, text_prefix_prob=0.5)
    cut = 0
    for i, caption in enumerate(captions):
        ex = ds[i]
        assert set(ex) == set(pp.MODEL_FEATURES + pp.MLM_FEATURES)
        tokens = list(vocab.encode(caption)) + [1]
        cut += len(tokens) > text_len
        text = [int(t) for t in ex["text_tokens"] if t]
        assert text == tokens[:text_len], i
        for k in pp.MLM_FEATURES:
            assert ex[k].shape == (text_len,) and ex[k].dtype == np.int32
        sel = ex["mlm_labels"] != 0
        assert sel.sum() >= 1 and not sel[ex["text_tokens"] <= 1].any()
        np.testing.assert_array_equal(ex["mlm_labels"][sel], ex["text_tokens"][sel])
        np.testing.assert_array_equal(ex["mlm_tokens"][~sel], ex["text_tokens"][~sel])
        assert ex["mlm_tokens"].max() <= vocab.vocab_size
        # The PrefixLM split still sees the whole caption.
        prefix = [int(t) for t in ex["prefix_tokens"] if t]
        target = [int(t) for t in ex["target_tokens"] if t]
        assert prefix + target == tokens, i
        # Keyed by the example's index: reading it again gives the same masks.
        np.testing.assert_array_equal(ds[i]["mlm_tokens"], ex["mlm_tokens"])
    assert cut >= 1 and np.mean([(ds[i]["mlm_tokens"] == vocab.vocab_size).any() for i in range(12)]) > 0.5
    # Off by default: the model features only, and the same PrefixLM split as before.
    plain = _task(vocab, path, "test_mlm_task_off", text_prefix_prob=0.5)
    assert set(plain[0]) == set(pp.MODEL_FEATURES)
    assert _task(vocab, path, "test_mlm_task_zero", text_len=0, mask_id=5)[0].keys() == plain[0].keys()


class _OtherEos:
    """The test vocabulary with another EOS id (as CLIP BPE's <end_of_text>)."""

    def __init__(self, vocab, eos_id):
        self._vocab, self.eos_id, self.vocab_size = vocab, eos_id, vocab.vocab_size

    def encode(self, text):
        return self._vocab.encode(text)


def test_the_vocabularys_eos_is_never_masked(vocab, shard):
    eos = 7
    ds = _task(_OtherEos(vocab, eos), shard[0], "test_mlm_eos", text_len=40, mask_id=256, mlm_probability=0.9)
    for i in range(12):
        ex = ds[i]
        end = int(np.count_nonzero(ex["text_tokens"])) - 1
        assert ex["text_tokens"][end] == eos and ex["mlm_labels"][end] == 0 and ex["mlm_tokens"][end] == eos
        assert not np.isin(ex["mlm_tokens"][ex["mlm_labels"] != 0], [0, eos]).any()


def test_image_text_task_errors(vocab, shard):
    with pytest.raises(ValueError, match=r"image_text_task\.mask_id.*tokenizer size"):
        _task(vocab, shard[0], "test_mlm_bad", text_len=12)
    with pytest.raises(ValueError, match=r"image_text_task\.text_len"):
        _task(vocab, shard[0], "test_mlm_bad", text_len=-1, mask_id=300)
    with pytest.raises(ValueError, match=r"image_text_task\.mlm_probability"):
        _task(vocab, shard[0], "test_mlm_bad", text_len=12, mask_id=300, mlm_probability=1.5)


@pytest.mark.parametrize("rate", [0.125, 0.0])
def test_register_builtin_forwards_mlm_args_to_image_text_only(dataset, caplog, rate):
    try:
        with pytest.raises(ValueError, match=r"register_builtin.text_only_rate=1.5 must be in \[0, 1\]"):
            register_builtin(dataset, text_only_rate=1.5)
        with caplog.at_level("WARNING", logger="simvlm_jax"):
            name = register_builtin(dataset, text_only_rate=rate, text_len=12, mask_id=256, mlm_probability=0.3)
        # Text-only examples lack the MLM features: the mixture is image-text only (a batch of both fails).
        assert ("text_only_rate=0.125 ignored" in caplog.text) == bool(rate)
        mix = seqio.get_mixture_or_task(name)
        assert [t.name for t in mix.tasks] == ["builtin_image_text"]
        it = pipeline.make_train_iterator(name, global_batch_size=8, seed=0, num_threads=1,
                                          prefetch_buffer_size=1)
        batch = next(it)
        assert set(batch) == set(pp.MODEL_FEATURES + pp.MLM_FEATURES)
        assert batch["mlm_labels"].shape == (8, 12) and batch["prefix_tokens"].shape == (8, 8)
        masked = [t for t in seqio.get_mixture_or_task("builtin_image_text").preprocessors
                  if isinstance(t, pp.MaskedText)]
        assert len(masked) == 1 and masked[0].mlm_probability == 0.3 and masked[0].vocab_size == 256
        assert not any(isinstance(t, pp.MaskedText) for t in seqio.get_mixture_or_task("builtin_text").preprocessors)
    finally:
        register_builtin(dataset)  # restore the default tasks for other tests
