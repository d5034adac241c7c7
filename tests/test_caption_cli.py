"""`python -m simvlm_jax.caption`: captions image files from an export, in input order; bad files
are reported on stderr and skipped (exit 1); a bad export dir exits 2 with a one-line error."""
from __future__ import annotations

import os
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import PYTHON, REPO_ROOT, tiny_config
from simvlm_jax import caption, decoding, export
from simvlm_jax.data import preprocessors, tokenizer
from simvlm_jax.models import simvlm

SENTENCES = [
    "a picture of a red square on a blue background",
    "a picture of a green circle next to a yellow triangle",
    "a photo of two dogs playing in the park",
    "a small cat sleeping on a wooden chair",
    "a picture of a white boat on the blue sea",
    "three red apples on a green table",
    "a man riding a bicycle down the street",
    "a picture of a tall tree in a field of grass",
]
CLI_ARGS = ("--num_beams", "2", "--max_len", "6", "--batch_size", "2")


def _noisy(params, seed=0):
    """Random init emits one token forever; shrink the embedding and perturb the rest so that
    the caption depends on the image."""
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        x = np.asarray(x)
        if "token_embed" in jax.tree_util.keystr(path):
            return x * 0.3
        return (x * (1 + rng.standard_normal(x.shape)) + 0.7 * rng.standard_normal(x.shape)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(perturb, params)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny export (SentencePiece + perturbed weights) and a folder of good and bad files."""
    root = tmp_path_factory.mktemp("caption_cli")
    vocab_path = tokenizer.train_sentencepiece(SENTENCES * 4, str(root / "spm.model"), vocab_size=64)
    cfg = tiny_config(vocab_size=64, max_target_len=8, image_size=32, patch_size=8)
    model = simvlm.SimVLM(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), simvlm.dummy_batch(cfg)))["params"]
    export_dir = export.export(_noisy(params), cfg, vocab_path, str(root / "export"))

    rng = np.random.default_rng(0)
    files = root / "images"
    files.mkdir()
    paths = {}
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(files / "a.png")
    Image.fromarray(rng.integers(0, 256, (64, 48), dtype=np.uint8), "L").save(files / "b.jpg")  # grayscale
    Image.fromarray(rng.integers(0, 256, (50, 50, 4), dtype=np.uint8), "RGBA").save(files / "c.webp",
                                                                                    lossless=True)
    Image.fromarray(np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[:, None, None], (1, 90, 3))).save(
        files / "d.png")
    (files / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (files / "notes.txt").write_text("not an image")
    for name in ("a.png", "b.jpg", "c.webp", "d.png", "broken.jpg", "notes.txt", "missing.png"):
        paths[name] = str(files / name)
    return export_dir, paths


def _env():
    env = dict(os.environ)
    # A plain single-device CPU process (conftest's 8 simulated devices are for the mesh tests).
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "force_host_platform_device_count" not in f)
    return env


def _start(*args):
    return subprocess.Popen([PYTHON, "-m", "simvlm_jax.caption", *args], cwd=REPO_ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _expected(export_dir, paths, num_beams=2, max_len=6, batch_size=2):
    """In-process reference: load the export, preprocess like training, decode directly."""
    model, params, vocab = export.load_export(export_dir)
    images = np.stack([preprocessors.resize_center_crop(Image.open(p).convert("RGB"), model.config.image_size)
                       for p in paths])
    prompt = caption.encode_prompt(vocab, "a picture of", model.config.max_prefix_len)
    assert np.count_nonzero(prompt) >= 3  # the prompt is really encoded
    fn = jax.jit(lambda *a: decoding.beam_search(model, *a, num_beams=num_beams, max_len=max_len)[0])
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        n = len(chunk)
        chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], np.uint8)])
        tokens = np.asarray(fn(params, chunk, np.tile(prompt, (batch_size, 1)), np.ones(batch_size, np.int32)))
        for row in tokens[:n]:
            ids = [int(t) for t in row if t > 0]
            ids = ids[:ids.index(vocab.eos_id)] if vocab.eos_id in ids else ids
            out.append(" ".join(vocab.decode(ids).split()))
    return out


def test_caption_cli(bundle, tmp_path):
    export_dir, p = bundle
    # A directory lacking the bundle files is a bad export dir, as is a corrupt params file.
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in os.listdir(export_dir):
        (corrupt / name).write_bytes(open(os.path.join(export_dir, name), "rb").read())
    (corrupt / "params.safetensors").write_bytes(b"garbage")
    good = [p["a.png"], p["b.jpg"], p["c.webp"], p["d.png"]]
    mixed = [p["a.png"], p["broken.jpg"], p["b.jpg"], p["missing.png"], p["c.webp"], p["notes.txt"],
             os.path.dirname(p["a.png"]), p["d.png"]]
    # Run the CLIs concurrently (each pays the jax/seqio import).
    procs = {
        "mixed": _start("--export_dir", export_dir, *CLI_ARGS, *mixed),
        "good": _start("--export_dir", export_dir, "--num_beams", "1", "--max_len", "6", *good),
        "empty": _start("--export_dir", str(tmp_path / "empty"), p["a.png"]),
        "corrupt": _start("--export_dir", str(corrupt), p["a.png"]),
        "nodir": _start("--export_dir", str(tmp_path / "nope"), p["a.png"]),
    }
    results = {k: _finish(proc) for k, proc in procs.items()}

    # Mixed good and bad files: the good ones are captioned in input order, exit code 1.
    rc, out, err = results["mixed"]
    assert rc == 1, (rc, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = out.splitlines()
    assert [l.split("\t")[0] for l in lines] == good, out
    assert all(l.count("\t") == 1 for l in lines), out
    captions = [l.split("\t")[1] for l in lines]
    assert captions == _expected(export_dir, good), (captions, err[-2000:])
    assert len(set(captions)) >= 2, captions  # captions depend on the image (order is checked)
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(errors) == 4, err[-3000:]
    for bad, reason in ((p["broken.jpg"], "not a readable image"), (p["missing.png"], "no such file"),
                        (p["notes.txt"], "not a readable image"),
                        (os.path.dirname(p["a.png"]), "is a directory")):
        assert any(l.startswith(f"error: {bad}: ") and reason in l for l in errors), (bad, errors)

    # All good, greedy: exit code 0 and no errors.
    rc, out, err = results["good"]
    assert rc == 0, (rc, err[-3000:])
    assert [l.split("\t")[0] for l in out.splitlines()] == good, out
    assert not [l for l in err.splitlines() if l.startswith("error:")], err[-3000:]

    # Bad export dirs: exit code 2, one error line naming the dir, nothing captioned.
    for key, needle in (("empty", "missing params.safetensors"), ("corrupt", ""), ("nodir", "not a directory")):
        rc, out, err = results[key]
        assert rc == 2, (key, rc, err[-3000:])
        assert out == "", (key, out)
        errors = [l for l in err.splitlines() if l.startswith("error:")]
        assert len(errors) == 1, (key, err[-3000:])
        assert errors[0].startswith(f"error: export dir {tmp_path / key if key != 'corrupt' else corrupt}: ")
        assert needle in errors[0], (key, errors[0])
        assert "Traceback" not in err


def test_caption_arrays_and_load_image(bundle):
    export_dir, p = bundle
    model, params, vocab = export.load_export(export_dir)
    image = caption.load_image(p["c.webp"], model.config.image_size)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    want = preprocessors.resize_center_crop(Image.open(p["c.webp"]).convert("RGB"), 32)
    np.testing.assert_array_equal(image, want)
    with pytest.raises(Exception):
        caption.load_image(p["broken.jpg"], 32)
    # Batched (padded last batch) = one at a time, greedy path.
    images = np.stack([caption.load_image(p[n], 32) for n in ("a.png", "b.jpg", "c.webp")])
    batched = caption.caption_arrays(model, params, vocab, images, batch_size=2, num_beams=1, max_len=6)
    single = caption.caption_arrays(model, params, vocab, images[1:2], batch_size=2, num_beams=1, max_len=6)
    assert len(batched) == 3 and batched[1] == single[0]
    tokens = np.asarray(decoding.greedy_decode(
        model, params, jnp.asarray(images), jnp.tile(caption.encode_prompt(vocab, "a picture of", 8), (3, 1)),
        jnp.ones(3, jnp.int32), max_len=6))
    assert batched == [caption.tokens_to_text(vocab, row) for row in tokens]
