"""`python -m simvlm_jax.caption`: captions image files from an export, in input order; bad files
are reported on stderr and skipped (exit 1); a bad export dir exits 2 with a one-line error."""
from __future__ import annotations

import os
import subprocess

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from conftest import PYTHON, REPO_ROOT, tiny_config
from simvlm_jax import caption, decoding, export
from simvlm_jax.data import preprocessors, tokenizer
from simvlm_jax.models import family, simvlm

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
CLI_ARGS = ("--num_beams", "2", "--max_len", "6", "--batch_size", "3")  # 4 good images: 3 + 1 padded


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


def _images(paths, size=32):
    """Preprocessed by the training pipeline's decoder (independently of caption.load_image)."""
    return np.stack([preprocessors.DecodeImage(size).map({"png": open(p, "rb").read(), "txt": b"x"})["image"]
                     for p in paths])


@pytest.fixture(scope="module")
def loaded(bundle):
    export_dir, p = bundle
    model, params, vocab = export.load_export(export_dir)
    good = [p["a.png"], p["b.jpg"], p["c.webp"], p["d.png"]]
    want = caption.caption_arrays(model, params, vocab, _images(good), batch_size=3, num_beams=2, max_len=6)
    return model, params, vocab, good, want


@pytest.mark.slow
def test_caption_cli_subprocess(bundle, loaded, tmp_path):
    export_dir, p = bundle
    good, want = loaded[3], loaded[4]
    mixed = [p["a.png"], p["broken.jpg"], p["b.jpg"], p["missing.png"], p["c.webp"], p["notes.txt"],
             os.path.dirname(p["a.png"]), p["d.png"]]
    procs = {"mixed": _start("--export_dir", export_dir, *CLI_ARGS, *mixed),
             "nodir": _start("--export_dir", str(tmp_path / "nope"), p["a.png"])}
    results = {k: _finish(proc) for k, proc in procs.items()}

    # Good and bad files: the good ones are captioned in input order, the bad reported, exit code 1.
    rc, out, err = results["mixed"]
    assert rc == 1, (rc, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = out.splitlines()
    assert all(l.count("\t") == 1 for l in lines), out
    assert [l.split("\t")[0] for l in lines] == good, out
    captions = [l.split("\t")[1] for l in lines]
    assert captions == want, (captions, want, err[-2000:])
    assert len(set(captions)) >= 2, captions  # captions depend on the image: the order is checked
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(errors) == 4, err[-3000:]
    for bad, reason in ((p["broken.jpg"], "image"), (p["missing.png"], "no such file"),
                        (p["notes.txt"], "not a readable image"),
                        (os.path.dirname(p["a.png"]), "is a directory")):
        assert any(l.startswith(f"error: {bad}: ") and reason in l for l in errors), (bad, errors)

    # A missing export dir: exit code 2, one error line naming it, nothing captioned.
    rc, out, err = results["nodir"]
    assert (rc, out) == (2, ""), (rc, out, err)
    assert err.strip().splitlines() == [f"error: export dir {tmp_path / 'nope'}: not a directory"], err


def test_caption_main_in_process(bundle, loaded, tmp_path, capsys):
    export_dir, p = bundle
    good, want = loaded[3], loaded[4]
    assert caption.main(["--export_dir", export_dir, *CLI_ARGS, *good]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{g}\t{c}" for g, c in zip(good, want)]
    assert "error" not in err
    # Bad export dirs: lacking the bundle files, or a corrupt params file.
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in os.listdir(export_dir):
        (corrupt / name).write_bytes(open(os.path.join(export_dir, name), "rb").read())
    (corrupt / "params.safetensors").write_bytes(b"garbage")
    for bad, needle in ((tmp_path / "empty", "missing params.safetensors"), (corrupt, "")):
        assert caption.main(["--export_dir", str(bad), p["a.png"]]) == 2
        out, err = capsys.readouterr()
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: export dir {bad}: ") and needle in lines[0], err
    # Only bad images: exit code 1, nothing on stdout.
    assert caption.main(["--export_dir", export_dir, p["missing.png"]]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == f"error: {p['missing.png']}: no such file"


def test_caption_arrays_matches_direct_decoding(bundle, loaded):
    _, p = bundle
    model, params, vocab, good, want = loaded
    images = _images(good)
    np.testing.assert_array_equal(caption.load_image(p["c.webp"], 32), images[2])  # RGBA webp
    np.testing.assert_array_equal(caption.load_image(p["b.jpg"], 32), images[1])   # grayscale jpg
    with pytest.raises(Exception):
        caption.load_image(p["broken.jpg"], 32)
    prompt = family.encode_prompt(vocab, "a picture of", model.config.max_prefix_len)
    assert np.count_nonzero(prompt) >= 3  # the prompt is really encoded
    # Batches of 3: [a, b, c], [d, pad, pad].
    fn = jax.jit(lambda p, inputs: decoding.beam_search(model, p, inputs, num_beams=2, max_len=6))
    padded = np.concatenate([images, np.zeros_like(images[:2])])
    direct = []
    for start in (0, 3):
        tokens, _ = fn(params, {"image": padded[start:start + 3], "prefix_tokens": np.tile(prompt, (3, 1)),
                                "has_image": np.ones(3, np.int32)})
        direct += [decoding.tokens_to_text(vocab, row) for row in np.asarray(tokens)]
    assert direct[:4] == want
    assert any(len(c.split()) >= 1 for c in want), want
