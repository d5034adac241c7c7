"""Zero-shot retrieval / classification: metrics against a brute-force reference, CoCa and SimVLM
scores against direct model computations, and the CLI end to end."""
from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from simvlm_jax import export, zero_shot
from simvlm_jax.data import tokenizer
from simvlm_jax.models import coca, layers, registry, simvlm

SENTENCES = [
    "a red square on a blue background",
    "a green circle next to a yellow triangle",
    "two dogs playing in the park",
    "a small cat sleeping on a wooden chair",
    "a white boat on the blue sea",
    "three red apples on a green table",
    "a man riding a bicycle down the street",
    "a photo of a tall tree in a field of grass",
]
TEXTS = ["a red square", "two dogs in the park", "a white boat", "a   cat\non a chair",
         "three red apples on a green table next to a man riding a bicycle down the street", "a dog"]
COCA_TINY = dict(max_text_len=16)  # conftest's tiny CoCa, longer texts


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero_shot_vocab")
    return tokenizer.train_sentencepiece(SENTENCES * 4, str(root / "spm.model"), vocab_size=64)


@pytest.fixture(scope="module")
def vocab(vocab_path):
    return tokenizer.get_vocabulary(vocab_path)


def _images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _ids(vocab, text, max_len):
    """Reference tokenization: whitespace-collapsed caption ids (cut to max_len - 1) + EOS."""
    return list(vocab.encode(" ".join(text.split())))[:max_len - 1] + [vocab.eos_id]


def _pad(rows, length):
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


# ----------------------------------------------------------------------------- metrics

def _brute_force(sim, t2i, ks=(1, 5, 10)):
    """Sort every query's candidates (score descending, negatives before tied positives)."""
    n_img, n_txt = sim.shape
    i2t = []
    for i in range(n_img):
        if i not in t2i:
            continue
        order = sorted(range(n_txt), key=lambda j: (-sim[i, j], t2i[j] == i))
        i2t.append(next(r for r, j in enumerate(order) if t2i[j] == i))
    t2i_ranks = []
    for j in range(n_txt):
        order = sorted(range(n_img), key=lambda i: (-sim[i, j], i == t2i[j]))
        t2i_ranks.append(order.index(t2i[j]))
    out = {}
    for name, ranks in (("image_to_text", np.array(i2t)), ("text_to_image", np.array(t2i_ranks))):
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * np.mean(ranks < k)
        out[f"{name}_median_rank"] = np.floor(np.median(ranks)) + 1
    return out


@pytest.mark.parametrize("seed", range(6))
def test_retrieval_metrics_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_img = int(rng.integers(3, 25))
    caps = rng.integers(0 if seed % 2 else 1, 6, n_img)  # odd seeds: some images have no caption
    caps[0] = max(caps[0], 1)
    t2i = np.repeat(np.arange(n_img), caps)
    rng.shuffle(t2i)
    levels = 3 if seed < 3 else 1000  # few levels: many ties
    sim = rng.integers(0, levels, (n_img, len(t2i))).astype(np.float32)
    got = zero_shot.retrieval_metrics(sim, t2i)
    want = _brute_force(sim, list(t2i))
    for k, v in want.items():
        assert got[k] == pytest.approx(v), k
    assert got["mean_recall"] == pytest.approx(np.mean([want[f"{d}_R@{k}"] for d in ("image_to_text", "text_to_image")
                                                        for k in (1, 5, 10)]))
    assert (got["num_images"], got["num_texts"]) == (n_img, len(t2i))


def test_retrieval_metrics_hand_built():
    n = 20
    perfect = zero_shot.retrieval_metrics(np.eye(n) + 0.01 * np.random.default_rng(0).random((n, n)), np.arange(n))
    assert all(perfect[f"{d}_R@{k}"] == 100.0 for d in ("image_to_text", "text_to_image") for k in (1, 5, 10))
    assert perfect["mean_recall"] == 100.0 and perfect["image_to_text_median_rank"] == 1.0
    # Every positive scored lowest of its row and column: rank n-1 everywhere.
    worst = zero_shot.retrieval_metrics(-np.eye(n) + 0.01 * np.random.default_rng(1).random((n, n)), np.arange(n))
    assert worst["mean_recall"] == 0.0 and worst["text_to_image_median_rank"] == n
    # 2 images, 3 texts (image 0 has two): ranks worked out by hand.
    sim = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    m = zero_shot.retrieval_metrics(sim, np.array([0, 0, 1]))
    assert m["image_to_text_R@1"] == 50.0                 # image 1: caption 2 (0.3) below caption 1 (0.8)
    assert m["text_to_image_R@1"] == pytest.approx(100 / 3)  # only text 0 ranks its image first
    assert m["image_to_text_R@5"] == m["text_to_image_R@5"] == 100.0
    assert (m["image_to_text_median_rank"], m["text_to_image_median_rank"]) == (1.0, 2.0)
    # A constant score retrieves nothing: ties count against the positive.
    flat = zero_shot.retrieval_metrics(np.zeros((n, n)), np.arange(n))
    assert flat["image_to_text_R@10"] == flat["text_to_image_R@1"] == 0.0


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        zero_shot.retrieval_metrics(np.array([[np.nan, 0.0], [0.0, 1.0]]), np.array([0, 1]))
    with pytest.raises(ValueError, match="index"):
        zero_shot.retrieval_metrics(np.zeros((2, 2)), np.array([0, 2]))


def test_classification_metrics():
    scores = np.array([[3, 2, 1, 0, 0, 0, 0], [1, 3, 2, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 9.]])
    m = zero_shot.classification_metrics(scores, np.array([0, 2, 1, 0]))
    # ranks: 0, 1, 1 (tie with class 0 counts against), 6
    assert m["top1"] == 25.0 and m["top5"] == 75.0
    assert m["mean_per_class_top1"] == pytest.approx(100 * (0.5 + 0 + 0) / 3)
    small = zero_shot.classification_metrics(scores[:, :3], np.array([0, 2, 1, 0]))
    assert "top5" not in small  # k >= num_classes would be trivially 100


# ----------------------------------------------------------------------------- tokenization

def test_tokenize_captions(vocab):
    tokens, truncated = zero_shot.tokenize_captions(vocab, TEXTS, max_len=12)
    want = [_ids(vocab, t, 12) for t in TEXTS]
    assert truncated == 1 and tokens.shape == (6, 12)  # only the last text is cut (to 11 ids + EOS)
    short, _ = zero_shot.tokenize_captions(vocab, TEXTS[:1], max_len=12)
    assert short.shape == (1, len(want[0]))
    np.testing.assert_array_equal(tokens, _pad(want, tokens.shape[1]))
    assert all(row[len(w) - 1] == vocab.eos_id for row, w in zip(tokens, want))
    padded, _ = zero_shot.tokenize_captions(vocab, TEXTS[:2], max_len=12, pad_to_max=True, eos_id=7)
    assert padded.shape == (2, 12) and padded[0, len(want[0]) - 1] == 7 and not padded[0, len(want[0]):].any()
    with pytest.raises(ValueError, match="has no tokenizer"):
        zero_shot.tokenize_captions(None, TEXTS, 12)
    with pytest.raises(ValueError, match="template"):
        zero_shot.format_prompts(["dog"], ["a photo"])
    assert zero_shot.format_prompts(["dog", "cat"], ["a {}.", "the {}"]) == ["a dog.", "the dog", "a cat.", "the cat"]


# ----------------------------------------------------------------------------- CoCa

@pytest.fixture(scope="module")
def tiny_coca():
    cfg = tiny_config("coca", **COCA_TINY)
    model = coca.CoCa(cfg)
    params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.key(0), coca.dummy_batch(cfg))["params"]))()
    return model, params


def _coca_direct(model, params, images, target_rows):
    """Normalized embeddings straight from encode_image / encode_text on [bos] + targets."""
    text = coca.with_bos(jnp.asarray(_pad(target_rows, model.config.max_text_len)), model.config.bos_id)
    img = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))(params, images)
    txt = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.encode_text))(params, text)
    return np.asarray(img), np.asarray(txt)


def test_coca_similarity_and_retrieval(tiny_coca, vocab):
    model, params = tiny_coca
    images = _images(3, 32)
    opts = zero_shot.ZeroShotOptions(batch_size=2, text_batch_size=2)  # both padded
    sim, info = zero_shot.similarity_matrix(model, params, vocab, images, TEXTS, opts)
    img, txt = _coca_direct(model, params, images, [_ids(vocab, t, 16) for t in TEXTS])
    np.testing.assert_allclose(sim, img @ txt.T, atol=1e-5)
    assert info == {"model": "CoCa", "num_truncated_texts": 1}
    # The diagonal equals the training forward pass's embeddings for matched pairs.
    targets = _pad([_ids(vocab, t, 16) for t in TEXTS[:3]], 16)
    out = jax.jit(lambda p, b: model.apply({"params": p}, b))(
        params, {"image": jnp.asarray(images), "target_tokens": jnp.asarray(targets)})
    np.testing.assert_allclose(np.diag(sim[:, :3]), np.sum(np.asarray(out["image_embed"] * out["text_embed"]), -1),
                               atol=1e-5)
    t2i = np.array([0, 1, 2, 0, 1, 2])
    metrics = zero_shot.zero_shot_retrieval(model, params, vocab, images, TEXTS, t2i, opts)
    assert {k: metrics[k] for k in zero_shot.retrieval_metrics(sim, t2i)} == pytest.approx(
        zero_shot.retrieval_metrics(img @ txt.T, t2i))


def test_coca_classification_templates(tiny_coca, vocab):
    model, params = tiny_coca
    images = _images(4, 32, seed=1)
    names, templates = ["red square", "dog", "boat"], ["a photo of a {}.", "a {}", "art of the {}."]
    scores, _ = zero_shot.class_scores(model, params, vocab, images, names, templates)
    rows = [_ids(vocab, t.replace("{}", c), 16) for c in names for t in templates]
    img, txt = _coca_direct(model, params, images, rows)
    cls = txt.reshape(3, 3, -1).mean(1)
    cls /= np.linalg.norm(cls, axis=-1, keepdims=True)
    np.testing.assert_allclose(scores, img @ cls.T, atol=1e-5)
    labels = np.array([0, 1, 2, 1])
    m = zero_shot.zero_shot_classification(model, params, vocab, images, labels, names, templates)
    assert m["top1"] == pytest.approx(100 * np.mean(np.argmax(img @ cls.T, 1) == labels))
    assert m["num_templates"] == 3 and m["num_classes"] == 3


# ----------------------------------------------------------------------------- SimVLM

def _simvlm(scan_layers=False):
    cfg = tiny_config(vocab_size=64, max_target_len=16, scan_layers=scan_layers)
    model = simvlm.SimVLM(cfg)
    params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.key(1), simvlm.dummy_batch(cfg))["params"]))()
    return model, params


@pytest.fixture(scope="module")
def tiny_simvlm():
    return _simvlm()


def _simvlm_direct(model, params, vocab, images, texts, prompt=""):
    """[N_img, N_txt] (sum log-lik, num tokens) by teacher forcing through SimVLM.__call__, one row per pair."""
    cfg = model.config
    rows = [_ids(vocab, t, cfg.max_target_len) for t in texts]
    targets = _pad(rows, cfg.max_target_len)
    prefix = np.zeros(cfg.max_prefix_len, np.int32)
    p = list(vocab.encode(prompt)) if prompt else []
    prefix[:len(p)] = p
    n_img, n_txt = len(images), len(texts)
    batch = {"image": jnp.asarray(np.repeat(images, n_txt, 0)),
             "prefix_tokens": jnp.asarray(np.tile(prefix, (n_img * n_txt, 1))),
             "has_image": jnp.ones((n_img * n_txt,), jnp.int32),
             "target_tokens": jnp.asarray(np.tile(targets, (n_img, 1)))}
    logp = jax.jit(lambda p, b: jax.nn.log_softmax(model.apply({"params": p}, b), -1))(params, batch)
    tok = np.take_along_axis(np.asarray(logp), np.asarray(batch["target_tokens"])[..., None], -1)[..., 0]
    mask = np.asarray(batch["target_tokens"]) != 0
    return (tok * mask).sum(-1).reshape(n_img, n_txt), np.array([len(r) for r in rows])


@pytest.mark.parametrize("scan_layers,prompt", [(False, ""), (True, "a photo of")])
def test_simvlm_caption_likelihood(vocab, tiny_simvlm, scan_layers, prompt):
    model, params = _simvlm(True) if scan_layers else tiny_simvlm
    images = _images(3, 32, seed=2)
    total, lengths = _simvlm_direct(model, params, vocab, images, TEXTS, prompt)
    # 2 x 2 blocks (3 images, 6 texts): length buckets of 8 and 16 tokens, a padded image block.
    opts = zero_shot.ZeroShotOptions(prompt=prompt, score="sum", pair_image_batch_size=2, pair_text_batch_size=2)
    assert [c.shape[1] for c in zero_shot.length_sorted_chunks(
        zero_shot.tokenize_captions(vocab, TEXTS, 16)[0], 2)[1]] == [8, 16, 16]
    got_sum, info = zero_shot.similarity_matrix(model, params, vocab, images, TEXTS, opts)
    np.testing.assert_allclose(got_sum, total, rtol=1e-5, atol=1e-4)
    assert info["num_truncated_texts"] == sum(len(vocab.encode(t)) > 15 for t in TEXTS) and info["score"] == "sum"
    got_mean, _ = zero_shot.similarity_matrix(model, params, vocab, images, TEXTS,
                                              dataclasses.replace(opts, score="mean"))
    np.testing.assert_allclose(got_mean, total / lengths[None], rtol=1e-5, atol=1e-5)
    assert np.ptp(got_mean, axis=0).max() > 0  # the score depends on the image


def _interceptor_scores(model, params, images, targets, prompt_ids):
    """The scores of the previous implementation (a flax method interceptor folding the captions
    of one image into its cross-attention queries), kept here as the reference."""
    def shared_image_cross_attention(next_fun, args, kwargs, context):
        module = context.module
        if not (isinstance(module, layers.Attention) and module.is_cross and not module.decode
                and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        x, kv, mask = args
        rows, t, d = x.shape
        bi = kv.shape[0]
        return next_fun(x.reshape(bi, (rows // bi) * t, d), kv, mask, **kwargs).reshape(rows, t, d)

    @jax.jit
    def scores(params, images, prefix, targets):
        encoded, valid = model.apply({"params": params}, images, prefix, jnp.ones((len(images),), jnp.int32),
                                     method=model.encode)
        tiled = jnp.tile(targets, (images.shape[0], 1))
        with nn.intercept_methods(shared_image_cross_attention):
            logits = model.apply({"params": params}, simvlm.shift_right(tiled), encoded, valid, method=model.decode)
        target_logit = jnp.take_along_axis(logits, tiled[..., None], axis=-1)[..., 0]
        logp = target_logit - jax.nn.logsumexp(logits, axis=-1)
        return jnp.sum(jnp.where(tiled != 0, logp, 0.0), axis=-1).reshape(images.shape[0], targets.shape[0])

    return np.asarray(scores(params, images, np.tile(prompt_ids, (len(images), 1)), targets))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_simvlm_scores_bit_identical_to_the_interceptor_path(vocab, tiny_simvlm, scan_layers):
    """Scoring through the family interface (one image encoding shared by its captions in the
    decoder's cross-attention) gives exactly the scores of the old interceptor path."""
    model, params = _simvlm(True) if scan_layers else tiny_simvlm
    images = _images(2, 32, seed=4)
    fam = registry.family_of(model)
    prompt_ids = fam.prompt_ids(vocab, "a photo of")
    targets, _ = zero_shot.tokenize_captions(vocab, TEXTS[:4], 16)
    got = zero_shot.caption_scores(fam, params, images, targets, prompt_ids, score="sum",
                                   image_batch_size=2, text_batch_size=4)
    order, (chunk,) = zero_shot.length_sorted_chunks(targets, 4)  # the same chunk caption_scores decodes
    want = np.zeros_like(got)
    want[:, order] = _interceptor_scores(model, params, images, jnp.asarray(chunk), prompt_ids)
    np.testing.assert_array_equal(got, want)
    assert np.ptp(got) > 0


def test_simvlm_classification_averages_templates(vocab, tiny_simvlm):
    model, params = tiny_simvlm
    images = _images(2, 32, seed=3)
    names, templates = ["cat", "boat"], ["a photo of a {}", "a {} on the sea"]
    prompts = [t.replace("{}", c) for c in names for t in templates]
    total, lengths = _simvlm_direct(model, params, vocab, images, prompts)
    want = (total / lengths[None]).reshape(2, 2, 2).mean(-1)
    scores, _ = zero_shot.class_scores(model, params, vocab, images, names, templates)
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- CLI

COLORS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 220), "yellow": (240, 230, 20)}


def _write_coco(root):
    img_dir = root / "images"
    img_dir.mkdir()
    images, annotations = [], []
    for i, (name, rgb) in enumerate(COLORS.items()):
        arr = np.full((40, 56, 3), rgb, np.uint8)
        arr[10:30, 20:36] = 255 - np.asarray(rgb)
        Image.fromarray(arr).save(img_dir / f"{name}.png")
        images.append({"id": i, "file_name": f"{name}.png"})
        annotations += [{"image_id": i, "caption": f"a {name} square"},
                        {"image_id": i, "caption": f"a small {name} box on a table"}]
    (img_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    images.append({"id": 9, "file_name": "broken.jpg"})
    annotations.append({"image_id": 9, "caption": "never read"})
    ann = root / "captions.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations}))
    return str(ann), str(img_dir)


def _write_image_folder(root):
    folder = root / "classes"
    for c, (name, rgb) in enumerate(list(COLORS.items())[:3]):
        (folder / f"{name}_thing").mkdir(parents=True)
        for k in range(2):
            arr = np.full((36, 36, 3), rgb, np.uint8)
            arr[k * 10:k * 10 + 8] = 0
            Image.fromarray(arr).save(folder / f"{name}_thing" / f"{k}.jpg")
    (folder / "red_thing" / "notes.txt").write_text("not an image")
    return str(folder)


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def simvlm_export(tmp_path_factory, vocab_path, tiny_simvlm):
    root = tmp_path_factory.mktemp("zero_shot_cli")
    model, params = tiny_simvlm
    export_dir = export.export(params, model.config, vocab_path, str(root / "export"))
    return root, export_dir


def test_cli_retrieval_simvlm(simvlm_export, capsys, clean_gin):
    root, export_dir = simvlm_export
    ann, img_dir = _write_coco(root)
    out_file = str(root / "metrics.json")
    code = zero_shot.main(["--export_dir", export_dir, "--mode", "retrieval", "--annotations", ann,
                           "--image_dir", img_dir, "--output", out_file,
                           "--gin.ZeroShotOptions.pair_text_batch_size=3"])
    assert code == 0
    got = _last_json(capsys)
    assert got == json.loads(open(out_file).read())
    assert (got["model"], got["num_images"], got["num_texts"], got["num_unreadable_images"]) == ("SimVLM", 4, 8, 1)
    model, params, vocab = export.load_export(export_dir)
    images, texts, t2i, _ = zero_shot.load_captioned_images(ann, img_dir, model.config.image_size)
    sim, _ = zero_shot.similarity_matrix(model, params, vocab, images, texts)
    want = zero_shot.retrieval_metrics(sim, t2i)
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert texts[:2] == ["a red square", "a small red box on a table"] and list(t2i) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_cli_classify_simvlm(simvlm_export, capsys, clean_gin):
    root, export_dir = simvlm_export
    folder = _write_image_folder(root)
    templates = root / "templates.txt"
    templates.write_text("a photo of a {}.\n\na {} on a table\n")
    code = zero_shot.main(["--export_dir", export_dir, "--mode", "classify", "--image_dir", folder,
                           "--templates", str(templates)])
    assert code == 0
    got = _last_json(capsys)
    assert (got["num_images"], got["num_classes"], got["num_templates"], got["num_unreadable_images"]) == (6, 3, 2, 1)
    model, params, vocab = export.load_export(export_dir)
    images, labels, folders, _ = zero_shot.load_image_folder(folder, model.config.image_size)
    assert folders == ["blue_thing", "green_thing", "red_thing"] and list(labels) == [0, 0, 1, 1, 2, 2]
    scores, _ = zero_shot.class_scores(model, params, vocab, images, ["blue thing", "green thing", "red thing"],
                                       ["a photo of a {}.", "a {} on a table"])
    assert got["top1"] == pytest.approx(zero_shot.classification_metrics(scores, labels)["top1"])


def test_cli_retrieval_coca(tmp_path, tiny_coca, vocab, monkeypatch, capsys, clean_gin):
    """The CLI dispatches on the loaded model type (a CoCa export loader is stubbed with the triple)."""
    model, params = tiny_coca
    monkeypatch.setattr(export, "load_export", lambda d: (model, params, vocab))
    ann, img_dir = _write_coco(tmp_path)
    assert zero_shot.main(["--export_dir", str(tmp_path), "--mode", "retrieval", "--annotations", ann,
                           "--image_dir", img_dir, "--max_images", "3"]) == 0
    got = _last_json(capsys)
    images, texts, t2i, _ = zero_shot.load_captioned_images(ann, img_dir, 32, max_images=3)
    img, txt = _coca_direct(model, params, images, [_ids(vocab, t, 16) for t in texts])
    want = zero_shot.retrieval_metrics(img @ txt.T, t2i)
    assert got["model"] == "CoCa" and got["num_images"] == 3
    assert {k: got[k] for k in want} == pytest.approx(want)


def test_cli_errors(tmp_path, capsys, clean_gin):
    assert zero_shot.main(["--export_dir", str(tmp_path), "--mode", "classify", "--image_dir", str(tmp_path)]) == 2
    assert "not a simvlm_jax export" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        zero_shot.main(["--export_dir", str(tmp_path), "--mode", "retrieval", "--image_dir", str(tmp_path)])
    assert "--annotations" in capsys.readouterr().err
    assert zero_shot.main(["--export_dir", str(tmp_path), "--mode", "classify", "--image_dir", str(tmp_path),
                           "--gin.ZeroShotOptions.no_such_field=1"]) == 2
    assert "bad gin binding --gin.ZeroShotOptions.no_such_field=1" in capsys.readouterr().err
    assert zero_shot.main(["--export_dir", str(tmp_path), "--mode", "classify", "--image_dir", str(tmp_path),
                           "--gin.ZeroShotOptions.pair_text_batch_size=0"]) == 2
    assert "pair_text_batch_size=0 must be >= 1" in capsys.readouterr().err


def test_length_sorted_chunks():
    lengths = [3, 12, 1, 9, 5, 17]
    targets = _pad([list(range(1, n + 1)) for n in lengths], 20)
    order, chunks = zero_shot.length_sorted_chunks(targets, 4)
    assert list(order) == [2, 0, 4, 3, 1, 5]
    assert [c.shape for c in chunks] == [(4, 16), (4, 20)]  # max 9 -> 16; max 17 -> 24, capped at 20
    rebuilt = np.concatenate([np.pad(c, ((0, 0), (0, 20 - c.shape[1]))) for c in chunks])[:6]
    np.testing.assert_array_equal(rebuilt, targets[order])
    assert not chunks[1][2:].any()  # the padded rows are empty


class _TableMatcher(registry.ModelFamily):
    """A family that scores pair (image i, text j) as TABLE[i, j]: images carry their index in
    pixel [0, 0, 0], texts in token 0."""
    name, export_type, config_cls, module_cls = "table_matcher", "TableMatcher", dict, nn.Module
    can_match = True

    def __init__(self, table):  # pylint: disable=super-init-not-called
        self.table = jnp.asarray(table)

    def match_context(self, params, images):
        return images[:, 0, 0, 0].astype(jnp.int32)

    def match_scores(self, params, context, targets):
        return self.table[context, targets[:, 0]]


@pytest.mark.parametrize("k", [1, 3])
def test_rerank_top_k_reorders_only_the_first_stage_candidates(k):
    rng = np.random.default_rng(0)
    n_img, n_txt = 5, 7
    sim = rng.normal(size=(n_img, n_txt))
    table = rng.normal(size=(n_img, n_txt))
    images = np.zeros((n_img, 2, 2, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n_img)
    targets = np.zeros((n_txt, 4), np.int32)
    targets[:, 0] = np.arange(n_txt)
    i2t, t2i = zero_shot.rerank_top_k(_TableMatcher(table), None, images, targets, sim, k, batch_size=4)
    for scores, first, pair, n in ((i2t, sim, table, n_txt), (t2i.T, sim.T, table.T, n_img)):
        for row in range(scores.shape[0]):
            candidates = np.argsort(-first[row], kind="stable")[:k]
            rest = [j for j in np.argsort(-first[row], kind="stable") if j not in candidates]
            # Candidates first, ordered by the pair score; the rest after, in first-stage order.
            expected = list(candidates[np.argsort(-pair[row, candidates], kind="stable")]) + rest
            assert list(np.argsort(-scores[row], kind="stable")) == expected
            np.testing.assert_allclose(scores[row, candidates], pair[row, candidates], rtol=1e-6)
            assert len(expected) == n
