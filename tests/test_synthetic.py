"""Tests for simvlm_jax.data.synthetic (small counts; the whole file runs in a few seconds)."""
from __future__ import annotations

import io
import json
import os
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from simvlm_jax.data import synthetic as syn

SMALL = dict(num_train=60, num_heldout=24, num_text=300, image_size=48, samples_per_shard=25)

# Independent statement of the caption language (not imported from the module on purpose).
REL_WORDS = {
    "left of": "left", "to the left of": "left", "right of": "right", "to the right of": "right",
    "above": "above", "on top of": "above", "over": "above",
    "below": "below", "under": "below", "beneath": "below",
}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
LEAD_INS = ("a picture of ", "a photo of ", "an image of ", "there is ")
_OBJ = r"(small|large) ({}) ({})".format("|".join(syn.COLORS), "|".join(syn.SHAPES))
_REL = "|".join(sorted(REL_WORDS, key=len, reverse=True))
SINGLE_RE = re.compile(rf"^(?:a|one|a single|only one) {_OBJ}$")
PAIR_RE = re.compile(rf"^a {_OBJ} ({_REL}) a {_OBJ}$")


def parse(text: str) -> tuple[str | None, str, list[tuple[str, str, str]], str | None]:
    """(lead-in, content, [(size, color, shape)...], relation direction of first wrt second)."""
    lead = next((l for l in LEAD_INS if text.startswith(l)), None)
    content = text[len(lead):] if lead else text
    m = SINGLE_RE.match(content)
    if m:
        return lead, content, [m.groups()], None
    m = PAIR_RE.match(content)
    assert m, f"caption outside the caption language: {text!r}"
    g = m.groups()
    return lead, content, [g[0:3], g[4:7]], REL_WORDS[g[3]]


def check_document(doc: str) -> None:
    """A text document: a scene description, then facts that must agree with it."""
    first, *facts = [x.strip() for x in doc.rstrip(".").split(". ")]
    _, _, named, rel = parse(first)
    shapes = [s for _, _, s in named]
    for fact in facts:
        if fact in ("there is one object", "there are two objects"):
            assert (fact == "there is one object") == (len(named) == 1), doc
            continue
        m = re.fullmatch(rf"the (\w+) is ({_REL}) the (\w+)", fact)
        if m:
            a, r, b = m.groups()
            assert rel is not None and shapes.count(a) == shapes.count(b) == 1, doc
            assert (a, REL_WORDS[r], b) in {(shapes[0], rel, shapes[1]), (shapes[1], OPPOSITE[rel], shapes[0])}, doc
            continue
        m = re.fullmatch(r"the (?:(\w+) )?(\w+) is (\w+)", fact)
        assert m, doc
        color, shape, attr = m.groups()
        match = [o for o in named if o[2] == shape and color in (None, o[1])]
        assert len(match) == 1 and attr in match[0][:2], doc


def read_split(out: str, manifest: dict, split: str) -> list[dict]:
    samples = []
    for rel in manifest["shards"][split]:
        samples.extend(syn.read_shard(os.path.join(out, rel)))
    return samples


def all_files(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("syn"))
    return out, syn.generate(out, seed=0, **SMALL)


def test_deterministic_and_seed_dependent(data, tmp_path) -> None:
    out, _ = data
    syn.generate(str(tmp_path / "same"), seed=0, **SMALL)
    syn.generate(str(tmp_path / "other"), seed=1, **SMALL)
    a, b, c = all_files(out), all_files(str(tmp_path / "same")), all_files(str(tmp_path / "other"))
    assert sorted(a) == sorted(b) and a == b
    for rel in ("train/shard-00000.tar", "heldout/shard-00000.tar", "text/text-00000.txt"):
        assert a[rel] != c[rel], rel
    # Sample i does not depend on the requested count: the first (full) shard is identical.
    syn.generate(str(tmp_path / "more"), seed=0, **{**SMALL, "num_train": 90, "num_text": 10})
    d = all_files(str(tmp_path / "more"))
    assert d["train/shard-00000.tar"] == a["train/shard-00000.tar"]
    assert d["heldout/shard-00000.tar"] == a["heldout/shard-00000.tar"]


def test_tar_layout_and_manifest(data) -> None:
    out, manifest = data
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f) == manifest
    assert manifest["counts"] == {"train": 60, "heldout": 24, "text": 300}
    assert manifest["shards"]["train"] == [f"train/shard-{i:05d}.tar" for i in range(3)]
    assert manifest["heldout_pairs"] == [list(p) for p in syn.HELDOUT_PAIRS]
    size = manifest["image_size"]
    for split in ("train", "heldout"):
        keys = []
        for rel in manifest["shards"][split]:
            with tarfile.open(os.path.join(out, rel)) as tar:
                members = tar.getmembers()
                assert len(members) % 3 == 0
                for i in range(0, len(members), 3):
                    names = [m.name for m in members[i:i + 3]]
                    key = names[0].rsplit(".", 1)[0]
                    assert re.fullmatch(r"\d{9}", key)
                    assert names == [f"{key}.jpg", f"{key}.txt", f"{key}.json"]
                    for m in members[i:i + 3]:
                        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
                    img = Image.open(io.BytesIO(tar.extractfile(members[i]).read()))
                    assert img.format == "JPEG" and img.mode == "RGB" and img.size == (size, size)
                    meta = json.loads(tar.extractfile(members[i + 2]).read())
                    assert meta["key"] == key and meta["status"] == "success"
                    assert (meta["width"], meta["height"]) == (size, size)
                    assert meta["caption"] == tar.extractfile(members[i + 1]).read().decode("utf-8")
                    keys.append(key)
        assert keys == [f"{i:09d}" for i in range(manifest["counts"][split])]
    lines = []
    for rel in manifest["shards"]["text"]:
        with open(os.path.join(out, rel), encoding="utf-8") as f:
            lines += f.read().splitlines()
    assert len(lines) == 300 and all(lines)


def test_heldout_pairs_separated(data) -> None:
    out, manifest = data
    held = [tuple(p) for p in manifest["heldout_pairs"]]
    # Every color and every shape keeps training partners.
    assert 4 <= len(held) <= 8
    for c in syn.COLORS:
        assert sum((c, s) not in held for s in syn.SHAPES) >= 3
    for s in syn.SHAPES:
        assert sum((c, s) not in held for c in syn.COLORS) >= 3
    seen = set()
    for sample in read_split(out, manifest, "train"):
        meta = sample["json"]
        assert meta["heldout_pairs"] == []
        for o in meta["objects"]:
            assert (o["color"], o["shape"]) not in held
            seen.add((o["color"], o["shape"]))
        for text in [sample["txt"], *meta["references"]]:
            assert not any(f"{c} {s}" in text for c, s in held), text
    assert {c for c, _ in seen} == set(syn.COLORS) and {s for _, s in seen} == set(syn.SHAPES)
    for rel in manifest["shards"]["text"]:
        with open(os.path.join(out, rel), encoding="utf-8") as f:
            for line in f:
                for c, s in held:
                    assert f"{c} {s}" not in line and f"the {s} is {c}" not in line, line
    for sample in read_split(out, manifest, "heldout"):
        meta = sample["json"]
        present = {f"{o['color']} {o['shape']}" for o in meta["objects"]} & {f"{c} {s}" for c, s in held}
        assert present and sorted(present) == meta["heldout_pairs"]
        assert all(any(p in r for p in present) for r in meta["references"])


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_captions_match_scene_and_pixels(data, split) -> None:
    out, manifest = data
    palette = {k: np.array(v, dtype=float) for k, v in syn.COLORS.items()}
    for sample in read_split(out, manifest, split):
        meta = sample["json"]
        objs = meta["objects"]
        assert len(objs) in (1, 2) and (meta["relation"] is None) == (len(objs) == 1)
        for o in objs:  # size classes are separated
            assert (o["r"] < 0.12) if o["size"] == "small" else (o["r"] > 0.14)
        if len(objs) == 2:
            a, b = objs
            dx, dy = b["x"] - a["x"], b["y"] - a["y"]
            assert np.hypot(dx, dy) > a["r"] + b["r"]  # no overlap
            expected = {"left of": dx > 0, "right of": dx < 0, "above": dy > 0, "below": dy < 0}
            assert expected[meta["relation"]]
            on, off = (dx, dy) if meta["relation"] in ("left of", "right of") else (dy, dx)
            assert abs(off) <= 0.5 * abs(on)
        by_name = {(o["size"], o["color"], o["shape"]): o for o in objs}
        assert len(by_name) == len(objs)
        for text in [sample["txt"], *meta["references"]]:
            _, _, named, rel = parse(text)
            assert sorted(named) == sorted(by_name), text
            if rel is not None:
                first, second = by_name[named[0]], by_name[named[1]]
                dx, dy = second["x"] - first["x"], second["y"] - first["y"]
                ok = {"left": dx > abs(dy), "right": -dx > abs(dy), "above": dy > abs(dx), "below": -dy > abs(dx)}
                assert ok[rel], (text, objs)
        img = np.asarray(Image.open(io.BytesIO(sample["jpg"])), dtype=float)
        h, w, _ = img.shape
        for o in objs:
            cx, cy = int(o["x"] * w), int(o["y"] * h)
            pix = img[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)
            dist = {k: np.linalg.norm(pix - v) for k, v in palette.items()}
            assert min(dist, key=dist.get) == o["color"] and dist[o["color"]] < 60, (o, pix)


def test_caption_variety_and_references(data) -> None:
    out, manifest = data
    samples = read_split(out, manifest, "train")
    templates, leads, vocab = set(), set(), set()
    for sample in samples:
        meta = sample["json"]
        lead, content, named, _ = parse(sample["txt"])
        leads.add(lead)
        t = content
        for obj in named:
            t = t.replace(" ".join(obj), "OBJ", 1)
        templates.add(t)
        refs = meta["references"]
        assert 3 <= len(refs) <= 5 and len(set(refs)) == len(refs)
        for r in refs:
            assert parse(r)[0] is None, r  # references carry no lead-in
        assert all(not x.endswith(".") and x == x.lower() for x in [sample["txt"], *refs])
        vocab.update(sample["txt"].split())
    assert len(templates) >= 8, templates
    assert leads == {None, *LEAD_INS}
    none_frac = sum(parse(s["txt"])[0] is None for s in samples) / len(samples)
    assert 0.25 < none_frac < 0.75
    for rel in manifest["shards"]["text"]:
        with open(os.path.join(out, rel), encoding="utf-8") as f:
            docs = f.read().splitlines()
        assert len(set(docs)) > 0.5 * len(docs)
        for doc in docs:
            assert 1 <= doc.count(".") <= 3 and doc.endswith(".")
            check_document(doc)
            vocab.update(doc.replace(".", " ").split())
    assert len(vocab) <= 60, sorted(vocab)


def test_cli(tmp_path, capsys) -> None:
    out = str(tmp_path / "cli")
    syn.main(["--out_dir", out, "--seed", "3", "--num_train", "5", "--num_heldout", "2",
              "--num_text", "4", "--image_size", "32"])
    line = capsys.readouterr().out.strip()
    assert "5 train" in line and "2 heldout" in line and "\n" not in line
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    assert m["seed"] == 3 and m["image_size"] == 32
    assert m["counts"] == {"train": 5, "heldout": 2, "text": 4}
    assert os.path.exists(os.path.join(out, m["shards"]["train"][0]))
