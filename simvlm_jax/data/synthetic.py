"""Deterministic synthetic captioned scenes: the framework's built-in dataset.

Each scene holds one or two coloured shapes on a muted background; two-object
scenes carry a spatial relation ("left of", "right of", "above", "below").
A fixed list of (color, shape) pairs is held out: those pairs never appear in
the train split or the text-only corpus, and every held-out sample contains at
least one of them, so the held-out split measures zero-shot compositional
captioning.

Output is webdataset / img2dataset style (tar shards of ``{key}.jpg``,
``{key}.txt``, ``{key}.json``) plus a text-only corpus and a manifest, and is
byte-identical for the same seed. Sample ``i`` of a split depends only on
``(seed, split, i)``, never on the requested counts.

``generate_interleaved`` adds interleaved image-text documents (Flamingo) in
``interleaved/``: OBELICS-style JSON lines + the images they name, documents of
2-5 scenes each followed by its caption (train scenes; held-out ones for the
validation split), same determinism (document ``i`` depends on ``(seed, split, i)``).

Object coordinates in the metadata (``x``, ``y``, bounding radius ``r``) are
fractions of the image side; ``y`` grows downwards, so "above" means smaller y.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import tarfile
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

VERSION = "1.0"

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 200, 60),
    "blue": (40, 80, 235),
    "yellow": (245, 225, 30),
    "purple": (150, 40, 205),
    "orange": (250, 135, 15),
    "white": (245, 245, 245),
}
SIZES: tuple[str, ...] = ("small", "large")
SIZE_RADIUS: dict[str, tuple[float, float]] = {"small": (0.085, 0.115), "large": (0.15, 0.195)}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# The first phrase of each relation is the canonical one (equal to its name).
REL_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above", "on top of", "over"),
    "below": ("below", "under", "beneath"),
}
LEAD_INS: tuple[str, ...] = ("a picture of ", "a photo of ", "an image of ", "there is ")
# Fixed and seed-independent; every color keeps >= 4 and every shape >= 5 training partners.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "star"),
    ("blue", "circle"),
    ("yellow", "square"),
    ("purple", "diamond"),
    ("white", "triangle"),
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELDOUT_PAIRS)

SPLIT_IDS = {"train": 0, "heldout": 1, "text": 2, "interleaved_train": 3, "interleaved_validation": 4}
P_SINGLE = 0.35           # probability of a one-object scene
MARGIN = 0.02             # min distance of an object's bounding circle to the border
GAP = 0.06                # min gap between the bounding circles of two objects
MAX_OFF_AXIS = 0.35       # |off-axis displacement| <= MAX_OFF_AXIS * |on-axis displacement|
MAX_ROTATION = 12.0       # degrees, for non-circles
SUPERSAMPLE = 2           # render at 2x, then box-downsample (antialiasing)
TEXT_LINES_PER_FILE = 10000


@dataclass(frozen=True)
class Obj:
    """One shape; x, y, r are fractions of the image side (r = bounding radius)."""
    shape: str
    color: str
    size: str
    x: float
    y: float
    r: float
    rotation: float = 0.0

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One or two objects; for two, ``objects[0] <relation> objects[1]`` holds."""
    objects: tuple[Obj, ...]
    relation: str | None = None


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Per-sample generator derived from (seed, split, index)."""
    ss = np.random.SeedSequence(seed, spawn_key=(SPLIT_IDS[split], index))
    return np.random.Generator(np.random.PCG64(ss))


def _place_pair(rng: np.random.Generator, r0: float, r1: float, relation: str) -> tuple[float, ...]:
    """Centres (x0, y0, x1, y1) such that object 0 is unambiguously `relation` object 1."""
    horizontal = relation in ("left of", "right of")
    zero_first = relation in ("left of", "above")  # object 0 has the smaller coordinate
    ra, rb = (r0, r1) if zero_first else (r1, r0)
    d = rng.uniform(ra + rb + GAP, 1 - 2 * MARGIN - ra - rb)
    pa = rng.uniform(MARGIN + ra, 1 - MARGIN - rb - d)
    p0, p1 = (pa, pa + d) if zero_first else (pa + d, pa)
    rmax = max(r0, r1)
    q0 = rng.uniform(MARGIN + rmax, 1 - MARGIN - rmax)
    q1 = float(np.clip(q0 + rng.uniform(-1, 1) * MAX_OFF_AXIS * d, MARGIN + r1, 1 - MARGIN - r1))
    return (p0, q0, p1, q1) if horizontal else (q0, p0, q1, p1)


def sample_scene(rng: np.random.Generator, heldout: bool = False) -> Scene:
    """Sample a scene; train scenes avoid HELDOUT_PAIRS, held-out ones contain >= 1."""
    n = 1 if rng.random() < P_SINGLE else 2
    if heldout:
        pairs = [HELDOUT_PAIRS[rng.integers(len(HELDOUT_PAIRS))]]
        if n == 2:
            others = [p for p in ALL_PAIRS if p != pairs[0]]
            pairs.append(others[rng.integers(len(others))])
            if rng.random() < 0.5:
                pairs.reverse()
    else:
        idx = rng.choice(len(TRAIN_PAIRS), size=n, replace=False)
        pairs = [TRAIN_PAIRS[i] for i in idx]
    sizes = [SIZES[rng.integers(len(SIZES))] for _ in pairs]
    radii = [float(rng.uniform(*SIZE_RADIUS[s])) for s in sizes]
    rots = [0.0 if s == "circle" else float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)) for _, s in pairs]
    if n == 1:
        r = radii[0]
        centres = [(rng.uniform(MARGIN + r, 1 - MARGIN - r), rng.uniform(MARGIN + r, 1 - MARGIN - r))]
        relation = None
    else:
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        x0, y0, x1, y1 = _place_pair(rng, radii[0], radii[1], relation)
        centres = [(x0, y0), (x1, y1)]
    objs = tuple(Obj(s, c, sz, float(x), float(y), r, rot)
                 for (c, s), sz, (x, y), r, rot in zip(pairs, sizes, centres, radii, rots))
    return Scene(objs, relation)


# ----------------------------------------------------------------------------- rendering

def _muted(rng: np.random.Generator) -> np.ndarray:
    """A dark / grey low-saturation colour, far from every object colour."""
    return np.clip(rng.uniform(25, 105) + rng.uniform(-18, 18, size=3), 0, 255)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Solid, linear-gradient or low-amplitude noise background (uint8 HxWx3)."""
    kind = rng.integers(3)
    base = _muted(rng)
    if kind == 0:
        arr = np.broadcast_to(base, (size, size, 3))
    elif kind == 1:
        other = _muted(rng)
        theta = rng.uniform(0, 2 * math.pi)
        coords = np.linspace(-0.5, 0.5, size)
        t = coords[None, :] * math.cos(theta) + coords[:, None] * math.sin(theta) + 0.5
        t = np.clip(t, 0, 1)[..., None]
        arr = base * (1 - t) + other * t
    else:
        coarse = Image.fromarray(rng.integers(0, 256, size=(8, 8), dtype=np.uint8), "L")
        smooth = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255 - 0.5
        fine = rng.normal(0, 4, size=(size, size))
        arr = base + (24 * smooth + fine)[..., None]
    return np.clip(arr, 0, 255).astype(np.uint8)


def _polygon(o: Obj, px: float) -> list[tuple[float, float]]:
    """Vertices (pixels) of a non-circle shape with bounding radius o.r."""
    if o.shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in np.deg2rad([45, 135, 225, 315])]
    elif o.shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    elif o.shape == "diamond":
        pts = [(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)]
    elif o.shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.cos(a), (1.0 if k % 2 == 0 else 0.45) * math.sin(a))
               for k, a in enumerate(np.deg2rad(np.arange(10) * 36 - 90))]
    else:
        raise ValueError(o.shape)
    c, s = math.cos(math.radians(o.rotation)), math.sin(math.radians(o.rotation))
    r, cx, cy = o.r * px, o.x * px, o.y * px
    return [(cx + r * (u * c - v * s), cy + r * (u * s + v * c)) for u, v in pts]


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Render a scene to an RGB image of side image_size (antialiased by supersampling)."""
    px = image_size * SUPERSAMPLE
    img = Image.fromarray(_background(rng, px), "RGB")
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        fill = tuple(int(v) for v in np.clip(np.array(COLORS[o.color]) + rng.integers(-12, 13, size=3), 0, 255))
        if o.shape == "circle":
            r, cx, cy = o.r * px, o.x * px, o.y * px
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(o, px), fill=fill)
    return img.reduce(SUPERSAMPLE)


# ----------------------------------------------------------------------------- language

def paraphrases(scene: Scene) -> list[str]:
    """All content descriptions of a scene (no lead-in); the canonical one is first."""
    if len(scene.objects) == 1:
        x = scene.objects[0].phrase
        return [f"a {x}", f"one {x}", f"a single {x}", f"only one {x}"]
    a, b = scene.objects
    rel = scene.relation
    assert rel is not None
    return ([f"a {a.phrase} {p} a {b.phrase}" for p in REL_PHRASES[rel]]
            + [f"a {b.phrase} {p} a {a.phrase}" for p in REL_PHRASES[INVERSE[rel]]])


def references(scene: Scene, rng: np.random.Generator) -> list[str]:
    """3-5 distinct paraphrases: the canonical one followed by random others."""
    allp = paraphrases(scene)
    k = min(len(allp), int(rng.integers(3, 6)))
    rest = [allp[i] for i in rng.permutation(len(allp) - 1)[: k - 1] + 1]
    return [allp[0]] + rest


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """Training caption: optional lead-in (~50% none) + one random paraphrase."""
    allp = paraphrases(scene)
    lead = "" if rng.random() < 0.5 else LEAD_INS[rng.integers(len(LEAD_INS))]
    return lead + allp[rng.integers(len(allp))]


def _facts(scene: Scene) -> list[str]:
    """Extra simple sentences about a scene, referring to objects by a unique shape."""
    objs = scene.objects
    facts = ["there is one object" if len(objs) == 1 else "there are two objects"]
    unique = len({o.shape for o in objs}) == len(objs)
    for o in objs:
        facts.append(f"the {o.color} {o.shape} is {o.size}")
        if unique:
            facts += [f"the {o.shape} is {o.size}", f"the {o.shape} is {o.color}"]
    if len(objs) == 2 and unique:
        a, b = objs
        rel = scene.relation
        assert rel is not None
        facts += [f"the {a.shape} is {p} the {b.shape}" for p in REL_PHRASES[rel]]
        facts += [f"the {b.shape} is {p} the {a.shape}" for p in REL_PHRASES[INVERSE[rel]]]
    return facts


def text_document(scene: Scene, rng: np.random.Generator) -> str:
    """A 1-3 sentence document describing a scene."""
    first = caption(scene, rng)
    if first.startswith(("a picture of ", "a photo of ", "an image of ")):
        first = first.split(" of ", 1)[1]  # documents describe scenes, not images
    facts = _facts(scene)
    k = min(int(rng.integers(0, 3)), len(facts))
    extra = [facts[i] for i in rng.choice(len(facts), size=k, replace=False)]
    return ". ".join([first] + extra) + "."


# ----------------------------------------------------------------------------- samples / io

def make_sample(seed: int, split: str, index: int, image_size: int = 64) -> tuple[bytes, str, dict]:
    """(jpeg bytes, caption, metadata) of sample `index` of `split` ('train' or 'heldout')."""
    rng = sample_rng(seed, split, index)
    scene = sample_scene(rng, heldout=(split == "heldout"))
    img = render_scene(scene, image_size, rng)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, subsampling=0)
    cap = caption(scene, rng)
    key = f"{index:09d}"
    meta = {
        "key": key,
        "caption": cap,
        "width": image_size,
        "height": image_size,
        "status": "success",
        "references": references(scene, rng),
        "objects": [{"shape": o.shape, "color": o.color, "size": o.size,
                     "x": round(o.x, 4), "y": round(o.y, 4), "r": round(o.r, 4)} for o in scene.objects],
        "relation": scene.relation,
        "heldout_pairs": sorted({f"{o.color} {o.shape}" for o in scene.objects
                                 if (o.color, o.shape) in HELDOUT_PAIRS}),
    }
    return buf.getvalue(), cap, meta


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _clean(directory: str, prefix: str) -> None:
    """Remove stale outputs of an earlier run so the manifest matches the directory."""
    for name in os.listdir(directory):
        if name.startswith(prefix):
            os.remove(os.path.join(directory, name))


def _write_split(out_dir: str, split: str, seed: int, count: int, image_size: int,
                 samples_per_shard: int) -> list[str]:
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    _clean(os.path.join(out_dir, split), "shard-")
    shards = []
    for shard_idx, start in enumerate(range(0, count, samples_per_shard)):
        rel = f"{split}/shard-{shard_idx:05d}.tar"
        with tarfile.open(os.path.join(out_dir, rel), "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(count, start + samples_per_shard)):
                jpg, cap, meta = make_sample(seed, split, i, image_size)
                _add_member(tar, f"{meta['key']}.jpg", jpg)
                _add_member(tar, f"{meta['key']}.txt", cap.encode("utf-8"))
                _add_member(tar, f"{meta['key']}.json", json.dumps(meta).encode("utf-8"))
        shards.append(rel)
    return shards


def _write_text(out_dir: str, seed: int, count: int) -> list[str]:
    os.makedirs(os.path.join(out_dir, "text"), exist_ok=True)
    _clean(os.path.join(out_dir, "text"), "text-")
    files = []
    for file_idx, start in enumerate(range(0, count, TEXT_LINES_PER_FILE)):
        rel = f"text/text-{file_idx:05d}.txt"
        lines = []
        for i in range(start, min(count, start + TEXT_LINES_PER_FILE)):
            rng = sample_rng(seed, "text", i)
            lines.append(text_document(sample_scene(rng, heldout=False), rng) + "\n")
        with open(os.path.join(out_dir, rel), "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
        files.append(rel)
    return files


def generate(out_dir: str, seed: int = 0, num_train: int = 8000, num_heldout: int = 500,
             num_text: int = 20000, image_size: int = 64, samples_per_shard: int = 1000) -> dict:
    """Write train/heldout tar shards, the text corpus and manifest.json; return the manifest."""
    os.makedirs(out_dir, exist_ok=True)
    manifest = {
        "generator": "simvlm_jax.data.synthetic",
        "version": VERSION,
        "seed": seed,
        "image_size": image_size,
        "counts": {"train": num_train, "heldout": num_heldout, "text": num_text},
        "shards": {
            "train": _write_split(out_dir, "train", seed, num_train, image_size, samples_per_shard),
            "heldout": _write_split(out_dir, "heldout", seed, num_heldout, image_size, samples_per_shard),
            "text": _write_text(out_dir, seed, num_text),
        },
        "heldout_pairs": [list(p) for p in HELDOUT_PAIRS],
        "shapes": list(SHAPES),
        "colors": list(COLORS),
        "sizes": list(SIZES),
        "relations": list(RELATIONS),
        "lead_ins": [s.strip() for s in LEAD_INS],
    }
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return manifest


# ----------------------------------------------------------------------------- interleaved documents

INTERLEAVED_SPLITS = ("train", "validation")  # validation documents show held-out scenes
P_LEADING_TEXT = 0.4  # documents that open with a text before their first image
P_EXTRA_TEXT = 0.3    # images whose caption is followed by a second text (no image of its own)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")


def make_document(seed: int, split: str, index: int, image_size: int = 64) -> tuple[dict, list[bytes]]:
    """(OBELICS-style document {'key', 'texts', 'images'}, the JPEG bytes of its images in order)
    of document `index` of `split` ('train' or 'validation'): 2-5 scenes, each image followed by
    its caption; some documents open with a text, some captions are followed by a text about the
    scene. Image references are '<split>/<index>-<k>.jpg' (relative to the images directory)."""
    rng = sample_rng(seed, f"interleaved_{split}", index)
    n = int(rng.integers(2, 6))
    texts: list[str | None] = []
    images: list[str | None] = []
    jpegs = []
    if rng.random() < P_LEADING_TEXT:
        texts.append(f"here are {NUMBER_WORDS[n]} pictures of shapes.")
        images.append(None)
    for k in range(n):
        scene = sample_scene(rng, heldout=(split == "validation"))
        buf = io.BytesIO()
        render_scene(scene, image_size, rng).save(buf, format="JPEG", quality=90, subsampling=0)
        jpegs.append(buf.getvalue())
        texts.append(None)
        images.append(f"{split}/{index:06d}-{k}.jpg")
        texts.append(caption(scene, rng))
        images.append(None)
        if rng.random() < P_EXTRA_TEXT:
            texts.append(text_document(scene, rng))
            images.append(None)
    return {"key": f"{index:06d}", "texts": texts, "images": images}, jpegs


def generate_interleaved(out_dir: str, seed: int = 0, num_train: int = 200, num_validation: int = 40,
                         image_size: int = 64) -> dict:
    """Writes out_dir/interleaved/{train,validation}.jsonl, the images under
    out_dir/interleaved/images/<split>/ and interleaved/manifest.json; returns the manifest."""
    root = os.path.join(out_dir, "interleaved")
    counts = {"train": num_train, "validation": num_validation}
    num_images = {}
    for split in INTERLEAVED_SPLITS:
        image_dir = os.path.join(root, "images", split)
        os.makedirs(image_dir, exist_ok=True)
        _clean(image_dir, "")
        lines, num_images[split] = [], 0
        for i in range(counts[split]):
            doc, jpegs = make_document(seed, split, i, image_size)
            for ref, data in zip([r for r in doc["images"] if r], jpegs):
                with open(os.path.join(root, "images", ref), "wb") as f:
                    f.write(data)
            num_images[split] += len(jpegs)
            lines.append(json.dumps(doc) + "\n")
        with open(os.path.join(root, f"{split}.jsonl"), "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
    manifest = {"generator": "simvlm_jax.data.synthetic", "version": VERSION, "seed": seed,
                "image_size": image_size, "counts": counts, "images": num_images,
                "files": {split: f"{split}.jsonl" for split in INTERLEAVED_SPLITS}, "image_dir": "images"}
    with open(os.path.join(root, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return manifest


def read_shard(path: str) -> Iterator[dict]:
    """Yield {"key", "jpg" (bytes), "txt" (str), "json" (dict)} per sample of a tar shard."""
    sample: dict = {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            key, ext = member.name.rsplit(".", 1)
            f = tar.extractfile(member)
            assert f is not None
            data = f.read()
            if sample and sample["key"] != key:
                yield sample
                sample = {}
            sample["key"] = key
            sample[ext] = data.decode("utf-8") if ext == "txt" else json.loads(data) if ext == "json" else data
    if sample:
        yield sample


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Generate the synthetic captioned-scene dataset.")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_train", type=int, default=8000)
    p.add_argument("--num_heldout", type=int, default=500)
    p.add_argument("--num_text", type=int, default=20000)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--samples_per_shard", type=int, default=1000)
    p.add_argument("--num_interleaved", type=int, default=200, help="interleaved train documents (0: none)")
    p.add_argument("--num_interleaved_validation", type=int, default=40)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    m = generate(a.out_dir, a.seed, a.num_train, a.num_heldout, a.num_text, a.image_size, a.samples_per_shard)
    c = m["counts"]
    docs = ""
    if a.num_interleaved or a.num_interleaved_validation:
        generate_interleaved(a.out_dir, a.seed, a.num_interleaved, a.num_interleaved_validation, a.image_size)
        docs = f", {a.num_interleaved} + {a.num_interleaved_validation} interleaved documents"
    print(f"wrote {c['train']} train / {c['heldout']} heldout images ({a.image_size}px) and {c['text']} "
          f"text docs{docs} to {a.out_dir} in {time.perf_counter() - t0:.1f}s (seed {a.seed})")


if __name__ == "__main__":
    main()
