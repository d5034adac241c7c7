"""Zero-shot captioning eval on COCO-style sets (COCO captions json / Karpathy json + image
folder), for SimVLM and CoCa: COCO results json keyed by image_id, metrics, report."""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from simvlm_jax import evaluate, partitioning
from simvlm_jax.models import coca, registry

CAPTIONS = {1: ["a red square", "a small red square"], 2: ["a blue circle"], 3: ["a green star"]}


def _write_images(image_dir: str, names: list[str]) -> None:
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)).save(os.path.join(image_dir, name))


def coco_captions_json(tmp_path) -> tuple[str, str]:
    """COCO captions format; image 3's file is missing (skipped, not a crash)."""
    image_dir = str(tmp_path / "images")
    _write_images(image_dir, ["a.jpg", "b.png"])
    data = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.png"},
                       {"id": 3, "file_name": "missing.jpg"}],
            "annotations": [{"image_id": i, "caption": c} for i, caps in CAPTIONS.items() for c in caps]}
    path = str(tmp_path / "captions_val.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path, image_dir


def karpathy_json(tmp_path) -> tuple[str, str]:
    image_dir = str(tmp_path / "kimages")
    _write_images(os.path.join(image_dir, "val2014"), ["x.jpg", "y.jpg", "z.jpg"])
    images = [{"filepath": "val2014", "filename": f, "cocoid": 10 + i, "split": split,
               "sentences": [{"raw": f"caption {i} {j}"} for j in range(5)]}
              for i, (f, split) in enumerate([("x.jpg", "test"), ("y.jpg", "train"), ("z.jpg", "test")])]
    path = str(tmp_path / "dataset_coco.json")
    with open(path, "w") as f:
        json.dump({"images": images}, f)
    return path, image_dir


@pytest.fixture(scope="module")
def simvlm_model(dataset):
    cfg = tiny_config()
    fam = registry.family_of(cfg)
    model = fam.module
    params = jax.jit(lambda: nn.meta.unbox(fam.init_params(jax.random.key(0))))()
    return model, params, dataset.vocab()


def test_coco_captions_json_eval_writes_results_by_image_id(tmp_path, simvlm_model):
    model, params, vocab = simvlm_model
    ann, image_dir = coco_captions_json(tmp_path)
    mesh = partitioning.make_mesh(data=8, fsdp=1, tensor=1)
    out = evaluate.evaluate_captioning(model, params, vocab, mesh, str(tmp_path / "eval"), annotations_json=ann,
                                       image_dir=image_dir, batch_size=8, with_constant_baseline=False)
    assert out["metrics"]["num_images"] == 2  # the missing file is skipped
    results = json.load(open(tmp_path / "eval" / "captions.json"))
    assert sorted(r["image_id"] for r in results) == [1, 2]
    assert all(isinstance(r["caption"], str) for r in results)
    assert os.path.exists(tmp_path / "eval" / "report.html")
    assert "cider" in json.load(open(tmp_path / "eval" / "metrics.json"))["metrics"]


def test_karpathy_split_eval_for_coca(tmp_path, dataset):
    cfg = coca.CoCaConfig(vocab_size=256, image_size=32, patch_size=16, encoder_width=32, encoder_layers=1,
                          encoder_heads=2, encoder_mlp_dim=64, decoder_width=32, unimodal_layers=1,
                          multimodal_layers=1, decoder_heads=2, decoder_mlp_dim=64, embed_dim=32, n_queries=4,
                          max_text_len=6)
    fam = registry.family_of(cfg)
    model = fam.module
    params = jax.jit(lambda: nn.meta.unbox(fam.init_params(jax.random.key(0))))()
    ann, image_dir = karpathy_json(tmp_path)
    mesh = partitioning.make_mesh(data=4, fsdp=2, tensor=1)
    out = evaluate.evaluate_captioning(model, params, dataset.vocab(), mesh, str(tmp_path / "eval"),
                                       annotations_json=ann, image_dir=image_dir, split="test", prompt="",
                                       batch_size=8, with_constant_baseline=False)
    assert out["metrics"]["num_images"] == 2
    results = json.load(open(tmp_path / "eval" / "captions.json"))
    assert sorted(r["image_id"] for r in results) == [10, 12]


def test_eval_without_data_or_image_dir_is_a_clear_error(tmp_path, simvlm_model):
    model, params, vocab = simvlm_model
    mesh = partitioning.make_mesh(data=8, fsdp=1, tensor=1)
    with pytest.raises(ValueError, match="evaluate_captioning.shards"):
        evaluate.evaluate_captioning(model, params, vocab, mesh, str(tmp_path))
    with pytest.raises(ValueError, match="image_dir"):
        evaluate.evaluate_captioning(model, params, vocab, mesh, str(tmp_path), annotations_json="x.json")


def test_report_states_what_was_evaluated(tmp_path, simvlm_model):
    """The report names model, step, data + split, decoding settings, image count and the best
    constant caption; draws the run's loss curve and the per-image CIDEr histogram; links
    captions.json. metrics.json carries the same run description."""
    from test_report import parse_report  # pylint: disable=import-outside-toplevel
    model, params, vocab = simvlm_model
    ann, image_dir = karpathy_json(tmp_path)
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("".join(json.dumps({"step": s, "loss": 10.0 / s}) + "\n" for s in (1, 5, 10)))
    mesh = partitioning.make_mesh(data=8, fsdp=1, tensor=1)
    out_dir = tmp_path / "eval"
    out = evaluate.evaluate_captioning(model, params, vocab, mesh, str(out_dir), annotations_json=ann,
                                       image_dir=image_dir, split="test", batch_size=8, num_beams=2,
                                       length_penalty=0.6, max_decode_len=6, prompt="a photo of", step=10,
                                       run_info={"model config": "models/simvlm_tiny.gin"},
                                       metrics_jsonl=str(jsonl), histogram_bins=4)
    report = parse_report(out["report"])
    info = report.info
    assert info["model"].startswith("simvlm: SimVLM") and info["model"].endswith(" params")
    assert info["model config"] == "models/simvlm_tiny.gin"
    assert info["checkpoint step"] == "10"
    assert info["data"] == f"{ann} (images: {image_dir}), split test"
    assert info["images"] == "2"
    assert info["decoding"] == ("beam search: num_beams=2, length_penalty=0.6, max_len=6, min_len=0, "
                                "repetition_penalty=1, prompt='a photo of'")
    metrics = out["metrics"]
    assert info["best constant caption"] == (f"{metrics['best_constant_caption']!r}: CIDEr-D "
                                             f"{metrics['best_constant_caption_cider']:.1f}")
    assert report.polyline_counts == [3]
    assert sum(report.bar_counts) == 2 and len(report.bar_counts) == 4
    assert "captions.json" in report.hrefs and (out_dir / "captions.json").exists()
    saved = json.load(open(out_dir / "metrics.json"))
    assert saved["step"] == 10 and saved["run"]["checkpoint step"] == 10
    assert saved["run"]["decoding"] == info["decoding"]
