"""Zero-shot captioning evaluation: prompt-prefixed greedy decoding, COCO metrics, HTML report.

Each image is encoded with the text prompt (SimVLM's "a picture of") as the
encoder's text prefix; the decoder's continuation is the caption. Outputs in
`out_dir`: `captions.json` (COCO results format), `metrics.json`,
`report.html` (thumbnails, prediction vs references, per-image CIDEr, worst first).
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from collections import Counter
from typing import Any, Iterable

import gin
import jax
import numpy as np
from PIL import Image

from simvlm_jax import batching, caption_metrics, decoding, partitioning
from simvlm_jax.data import preprocessors as pp
from simvlm_jax.data import sources
from simvlm_jax.models import registry

log = logging.getLogger("simvlm_jax")


def load_eval_examples(shards: str | list[str] | None, image_size: int, max_examples: int | None = None,
                       source: Any = None) -> list[dict[str, Any]]:
    """Images + reference captions from webdataset shards (refs: json 'references', else .txt)
    or from a random-access `source` (e.g. `sources.CocoCaptionsSource`). Unreadable images
    are skipped and logged. 'image_id': the json's image_id (COCO), else the record key."""
    src = source if source is not None else sources.TarShardSource(shards)
    decode = pp.DecodeImage(image_size)
    examples, skipped = [], 0
    for i in range(len(src) if max_examples is None else min(max_examples, len(src))):
        record = src[i]
        ex = decode.map(record)
        meta = sources.read_json(record) if ex is not None else {}
        refs = meta.get("references") or ([ex["text"].decode("utf-8", "replace")
                                            if isinstance(ex["text"], bytes) else ex["text"]]
                                           if ex is not None and ex.get("text") else [])
        if ex is None or not refs:
            skipped += 1
            continue
        examples.append({"key": record["__key__"], "image_id": meta.get("image_id", record["__key__"]),
                         "image": ex["image"], "references": list(refs)})
    if skipped:
        log.warning("eval: skipped %d examples without a readable image or reference captions", skipped)
    if not examples:
        raise ValueError(f"No readable evaluation examples in {source if source is not None else shards}")
    return examples


def generate_captions(model: Any, params: Any, vocab, images: np.ndarray, prompt: str,
                      mesh: jax.sharding.Mesh, batch_size: int = 64, max_len: int | None = None,
                      **decode_kwargs) -> list[str]:
    """Captions uint8 images [N,H,W,3] on `mesh` (batch-sharded) with any generating model
    family (`model`: a family, its module or config); `decode_kwargs` go to
    `decoding.make_decoder` (num_beams, min_len, length_penalty, repetition_penalty)."""
    fam = registry.family_of(model)
    if not fam.can_generate:
        raise ValueError(f"the {fam.name} model family does not generate captions")
    shards = partitioning.num_batch_shards(mesh)
    batch_size = max(shards, batch_size // shards * shards)
    prompt_ids = fam.prompt_ids(vocab, prompt)
    fn = decoding.make_decoder(fam, max_len=max_len, **decode_kwargs)
    captions: list[str] = []
    with partitioning.activate(mesh):
        for chunk, n in batching.padded_batches(images, batch_size):
            inputs = partitioning.host_batch_to_global(fam.decode_inputs(chunk, prompt_ids), mesh)
            tokens = np.asarray(jax.device_get(fn(params, inputs)))
            captions.extend(decoding.tokens_to_text(vocab, row, fam.eos_id, fam.pad_id) for row in tokens[:n])
    return captions


def best_constant_caption(references: dict[str, list[str]], max_candidates: int = 300) -> tuple[str, float]:
    """The single caption (among the most frequent references) with the highest CIDEr-D
    when predicted for every image: the score a model gets without looking."""
    counts = Counter(r for refs in references.values() for r in refs)
    candidates = [c for c, _ in counts.most_common(max_candidates)]
    keys = list(references)
    cider = caption_metrics.CiderD([caption_metrics.ptb_tokenize_python(references[k]) for k in keys])
    best = ("", -1.0)
    for cand, hyp in zip(candidates, caption_metrics.ptb_tokenize_python(candidates)):
        scores = cider.scores([hyp] * len(keys))
        score = float(np.mean(scores)) * 100
        if score > best[1]:
            best = (cand, score)
    return best


def _thumbnail(image: np.ndarray, size: int = 128) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).resize((size, size), Image.NEAREST).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_report(path: str, rows: list[dict[str, Any]], metrics: dict[str, Any], title: str) -> str:
    """HTML page: summary metrics, then one row per image sorted by CIDEr (worst first)."""
    rows = sorted(rows, key=lambda r: r["cider"])
    summary = " · ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, (int, float)))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}td{padding:6px;vertical-align:top;"
             "border-bottom:1px solid #ddd}img{image-rendering:pixelated}.pred{font-weight:bold}"
             ".refs{color:#555}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>",
             "<table><tr><th>image</th><th>CIDEr</th><th>prediction / references</th></tr>"]
    for r in rows:
        refs = "".join(f"<li>{html.escape(x)}</li>" for x in r["references"])
        parts.append(f"<tr><td><img src='data:image/png;base64,{_thumbnail(r['image'])}' width=128></td>"
                     f"<td>{r['cider']:.1f}</td><td><div class='pred'>{html.escape(r['prediction'])}</div>"
                     f"<ul class='refs'>{refs}</ul><small>{html.escape(str(r['key']))}</small></td></tr>")
    parts.append("</table></body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path


@gin.configurable
def evaluate_captioning(model: Any, params: Any, vocab, mesh: jax.sharding.Mesh, out_dir: str,
                        shards: str | None = None, annotations_json: str | None = None,
                        image_dir: str | None = None, split: str | None = None,
                        prompt: str = "a picture of", batch_size: int = 64,
                        max_examples: int | None = None, max_decode_len: int | None = None,
                        metrics: Iterable[str] = ("bleu", "rouge_l", "cider"),
                        with_constant_baseline: bool = True, num_beams: int = 1, min_len: int = 0,
                        length_penalty: float = 1.0, repetition_penalty: float = 1.0) -> dict[str, Any]:
    """Zero-shot captioning (greedy, or beam search with `num_beams > 1`) on webdataset
    `shards`, or on a COCO-style set: `annotations_json` (COCO captions json or
    Karpathy's dataset_coco.json, with `split`, e.g. 'test') + `image_dir`.
    Writes captions.json (COCO results format), metrics.json, report.html."""
    os.makedirs(out_dir, exist_ok=True)
    if annotations_json:
        if not image_dir:
            raise ValueError("evaluate_captioning.annotations_json needs evaluate_captioning.image_dir "
                             "(the folder holding the images)")
        source = sources.CocoCaptionsSource(annotations_json, image_dir, split)
    elif shards:
        source = None
    else:
        raise ValueError("Nothing to evaluate: set evaluate_captioning.shards (webdataset tar glob) or "
                         "evaluate_captioning.annotations_json + .image_dir (COCO / Karpathy json)")
    examples = load_eval_examples(shards, model.config.image_size, max_examples, source)
    images = np.stack([e["image"] for e in examples])
    preds = generate_captions(model, params, vocab, images, prompt, mesh, batch_size, max_decode_len,
                              num_beams=num_beams, min_len=min_len, length_penalty=length_penalty,
                              repetition_penalty=repetition_penalty)
    references = {e["key"]: e["references"] for e in examples}
    predictions = {e["key"]: p for e, p in zip(examples, preds)}
    result = caption_metrics.compute_caption_metrics(references, predictions, metrics=tuple(metrics))
    summary = {k: result[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "spice")
               if result.get(k) is not None}
    summary["num_images"] = len(examples)
    if with_constant_baseline:
        caption, score = best_constant_caption(references)
        summary["best_constant_caption_cider"] = score
        summary["best_constant_caption"] = caption
    out = {"metrics": summary, "tokenizer": result["tokenizer"], "notes": result["notes"], "prompt": prompt}
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, "captions.json"), "w", encoding="utf-8") as f:
            json.dump([{"image_id": e["image_id"], "caption": predictions[e["key"]]} for e in examples], f, indent=1)
        with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
        rows = [{"key": e["key"], "image": e["image"], "references": e["references"],
                 "prediction": p, "cider": result["per_image"][e["key"]]["cider"]}
                for e, p in zip(examples, preds)]
        out["report"] = write_report(os.path.join(out_dir, "report.html"), rows,
                                     {k: v for k, v in summary.items() if isinstance(v, float)},
                                     f"Zero-shot captioning (prompt: {prompt!r})")
    log.info("eval: %s", caption_metrics.format_metrics(result))
    out["samples"] = [{"image": e["image"], "prediction": p, "references": e["references"]}
                      for e, p in list(zip(examples, preds))[:8]]
    return out
