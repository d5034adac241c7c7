"""Zero-shot captioning evaluation: prompt-prefixed greedy decoding, COCO metrics, HTML report.

Each image is encoded with the text prompt (SimVLM's "a picture of") as the
encoder's text prefix; the decoder's continuation is the caption. Outputs in
`out_dir`: `captions.json` (COCO results format), `metrics.json`,
`report.html`: what was evaluated (model, checkpoint step, data, decoding settings, the
best constant caption), the training loss curve (from the run's metrics.jsonl), a
histogram of per-image CIDEr, and one row per image (thumbnail, prediction vs
references, CIDEr, worst first). The report is one self-contained file: inline SVG,
no scripts, nothing fetched.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import gin
import jax
import numpy as np
from etils import epath
from PIL import Image

from simvlm_jax import batching, caption_metrics, decoding, partitioning, storage
from simvlm_jax.data import preprocessors as pp
from simvlm_jax.data import sources
from simvlm_jax.models import registry
from simvlm_jax.models.family import count_params

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


def load_shots(shards: str | list[str], image_size: int, k: int, seed: int = 0) -> list[dict[str, Any]]:
    """`k` solved examples for in-context captioning, drawn from `shards` (the train split) in a
    random order fixed by `seed`: the first k with a readable image and a caption (its first
    reference). Smaller k take a prefix of the same draw, so 4 shots are in the 8."""
    src = sources.TarShardSource(shards)
    decode = pp.DecodeImage(image_size)
    shots = []
    for i in np.random.default_rng(seed).permutation(len(src)):
        if len(shots) == k:
            break
        record = src[int(i)]
        ex = decode.map(record)
        if ex is None:
            continue
        meta = sources.read_json(record)
        text = (meta.get("references") or [None])[0] or ex.get("text")
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        if text:
            shots.append({"key": record["__key__"], "image": ex["image"], "caption": text})
    if len(shots) < k:
        raise ValueError(f"evaluate_captioning.num_shots asks for {k} solved examples but {shards} has only "
                         f"{len(shots)} readable captioned images; lower num_shots or point shots_shards at "
                         f"a larger split")
    return shots


def generate_captions(model: Any, params: Any, vocab, images: np.ndarray, prompt: str,
                      mesh: jax.sharding.Mesh, batch_size: int = 64, max_len: int | None = None,
                      shots: Sequence[Mapping[str, Any]] = (), **decode_kwargs) -> list[str]:
    """Captions uint8 images [N,H,W,3] on `mesh` (batch-sharded) with any generating model
    family (`model`: a family, its module or config); `decode_kwargs` go to
    `decoding.make_decoder` (num_beams, min_len, length_penalty, repetition_penalty).
    `shots`: solved examples ({'image', 'caption'}, from `load_shots`) shown before every
    image, for families that caption in context (`can_few_shot`)."""
    fam = registry.family_of(model)
    if not fam.can_generate:
        raise ValueError(f"the {fam.name} model family does not generate captions")
    if shots and not fam.can_few_shot:
        raise ValueError(f"the {fam.name} model family does not caption in context; set "
                         f"evaluate_captioning.num_shots=0")
    shards = partitioning.num_batch_shards(mesh)
    batch_size = max(shards, batch_size // shards * shards)
    prompt_ids = fam.prompt_ids(vocab, prompt)
    fn = decoding.make_decoder(fam, max_len=max_len, **decode_kwargs)
    captions: list[str] = []
    with partitioning.activate(mesh):
        for chunk, n in batching.padded_batches(images, batch_size):
            if shots:
                host = fam.few_shot_inputs(chunk, prompt_ids, np.stack([s["image"] for s in shots]),
                                           [np.asarray(vocab.encode(s["caption"]), np.int32) for s in shots])
            else:
                host = fam.decode_inputs(chunk, prompt_ids)
            inputs = partitioning.host_batch_to_global(host, mesh)
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


def read_loss_curve(metrics_jsonl: str | None, key: str = "loss") -> list[tuple[int, float]]:
    """(step, value) of every training row of a run's metrics.jsonl that logged `key`, by step.
    A resumed run appends rows again from its checkpoint: the last row of a step wins.
    Unreadable lines (a run killed mid-write) and non-finite values are left out."""
    if not metrics_jsonl or not epath.Path(metrics_jsonl).exists():
        return []
    by_step: dict[int, float] = {}
    with epath.Path(metrics_jsonl).open(encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            value = row.get(key) if isinstance(row, dict) else None
            if isinstance(value, (int, float)) and math.isfinite(value) and "step" in row:
                by_step[int(row["step"])] = float(value)
    return sorted(by_step.items())


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (steps of 1, 2 or 5 x 10^k) spanning [lo, hi]."""
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    return [round(i * step, 10) for i in range(first, last + 1)]


def _fmt_tick(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.3g}"


# Chart geometry in px: plot area inside the margins (left margin holds the y tick labels).
CHART_WIDTH, CHART_HEIGHT = 640, 220
CHART_MARGIN = {"left": 56, "right": 16, "top": 12, "bottom": 40}
PLOT_WIDTH = CHART_WIDTH - CHART_MARGIN["left"] - CHART_MARGIN["right"]
PLOT_HEIGHT = CHART_HEIGHT - CHART_MARGIN["top"] - CHART_MARGIN["bottom"]
MARKER_ROW_PX = 12  # one row of marker labels at the top of the plot area


def _y_ticks(lo: float, hi: float, label_rows: int) -> list[float]:
    """Round y ticks spanning [lo, hi] with headroom above `hi` for `label_rows` rows of
    marker labels (`_Axes.marker`), so a label never sits on the data."""
    band = MARKER_ROW_PX * label_rows + 4 if label_rows else 0
    return _nice_ticks(lo, lo + (hi - lo) * PLOT_HEIGHT / (PLOT_HEIGHT - band))


class _Axes:
    """Maps data coordinates into the plot area of a `CHART_WIDTH` x `CHART_HEIGHT` SVG and
    draws its grid, tick labels and axis titles."""

    def __init__(self, x_ticks: list[float], y_ticks: list[float]):
        self.x_ticks, self.y_ticks = x_ticks, y_ticks
        m = CHART_MARGIN
        self.left, self.top = m["left"], m["top"]
        self.w, self.h = PLOT_WIDTH, PLOT_HEIGHT

    def x(self, v: float) -> float:
        lo, hi = self.x_ticks[0], self.x_ticks[-1]
        return self.left + (v - lo) / ((hi - lo) or 1) * self.w

    def y(self, v: float) -> float:
        lo, hi = self.y_ticks[0], self.y_ticks[-1]
        return self.top + self.h - (v - lo) / ((hi - lo) or 1) * self.h

    def frame(self, x_label: str, y_label: str) -> list[str]:
        bottom = self.top + self.h
        parts = [f"<rect x='{self.left}' y='{self.top}' width='{self.w}' height='{self.h}' fill='none' stroke='#999'/>"]
        for t in self.y_ticks:
            y = self.y(t)
            parts.append(f"<line x1='{self.left}' x2='{self.left + self.w}' y1='{y:.1f}' y2='{y:.1f}' stroke='#eee'/>"
                         f"<text x='{self.left - 4}' y='{y + 4:.1f}' text-anchor='end'>{_fmt_tick(t)}</text>")
        for t in self.x_ticks:
            x = self.x(t)
            parts.append(f"<line x1='{x:.1f}' x2='{x:.1f}' y1='{bottom}' y2='{bottom + 4}' stroke='#999'/>"
                         f"<text x='{x:.1f}' y='{bottom + 16}' text-anchor='middle'>{_fmt_tick(t)}</text>")
        parts.append(f"<text x='{self.left + self.w / 2:.0f}' y='{CHART_HEIGHT - 4}' text-anchor='middle'>"
                     f"{html.escape(x_label)}</text>"
                     f"<text transform='translate(12,{self.top + self.h / 2:.0f}) rotate(-90)' "
                     f"text-anchor='middle'>{html.escape(y_label)}</text>")
        return parts

    def marker(self, x: float, label: str, color: str, row: int = 0) -> str:
        """A labelled vertical line at data x (e.g. the evaluated step, a mean); labels of
        several markers go on separate `row`s so they do not overlap."""
        px, ty = self.x(x), self.top + MARKER_ROW_PX * (row + 1)
        # Labels of lines in the right part of the plot go on their left, inside the chart.
        tx, anchor = (px - 3, "end") if px > self.left + 0.7 * self.w else (px + 3, "start")
        return (f"<line class='marker' x1='{px:.1f}' x2='{px:.1f}' y1='{self.top}' y2='{self.top + self.h}' "
                f"stroke='{color}' stroke-dasharray='4 3'/><text x='{tx:.1f}' y='{ty}' fill='{color}' "
                f"text-anchor='{anchor}' stroke='white' stroke-width='3' paint-order='stroke'>"
                f"{html.escape(label)}</text>")


def _svg(element_id: str, title: str, parts: list[str]) -> str:
    return (f"<svg id='{element_id}' xmlns='http://www.w3.org/2000/svg' width='{CHART_WIDTH}' "
            f"height='{CHART_HEIGHT}' font-size='11' font-family='sans-serif'><title>{html.escape(title)}</title>"
            + "".join(parts) + "</svg>")


def svg_line_chart(points: Sequence[tuple[float, float]], *, element_id: str, title: str, x_label: str,
                   y_label: str, marker_x: float | None = None, marker_label: str = "") -> str:
    """Inline SVG line chart of (x, y) `points`, sorted by x; optional vertical marker."""
    xs = [p[0] for p in points] + ([marker_x] if marker_x is not None else [])
    ys = [p[1] for p in points]
    ax = _Axes(_nice_ticks(min(xs), max(xs), count=8), _y_ticks(min(ys), max(ys), int(marker_x is not None)))
    parts = ax.frame(x_label, y_label)
    coords = " ".join(f"{ax.x(x):.1f},{ax.y(y):.1f}" for x, y in points)
    parts.append(f"<polyline points='{coords}' fill='none' stroke='#1f77b4' stroke-width='1.5' "
                 f"data-count='{len(points)}'/>")
    last_x, last_y = points[-1]
    parts.append(f"<circle cx='{ax.x(last_x):.1f}' cy='{ax.y(last_y):.1f}' r='3' fill='#1f77b4'>"
                 f"<title>{html.escape(f'{x_label} {last_x:g}: {y_label} {last_y:.4g}')}</title></circle>")
    if marker_x is not None:
        parts.append(ax.marker(marker_x, marker_label, "#d62728"))
    return _svg(element_id, title, parts)


def svg_histogram(values: Sequence[float], bins: int, *, element_id: str, title: str, x_label: str,
                  markers: Sequence[tuple[float, str, str]] = ()) -> str:
    """Inline SVG histogram of `values` in `bins` equal bins over round bounds spanning
    min(0, values) .. max(values); `markers`: (x, label, color) vertical lines. Each bar
    carries its count (data-count)."""
    x_ticks = _nice_ticks(min(0.0, min(values)), max(values), count=8)
    lo, hi = x_ticks[0], x_ticks[-1]
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    ax = _Axes(x_ticks, _y_ticks(0, max(int(counts.max()), 1), len(markers)))
    parts = ax.frame(x_label, "images")
    for n, a, b in zip(counts, edges[:-1], edges[1:]):
        x0, x1, y = ax.x(a), ax.x(b), ax.y(int(n))
        parts.append(f"<rect class='bar' x='{x0 + 0.5:.1f}' y='{y:.1f}' width='{max(x1 - x0 - 1, 0.5):.1f}' "
                     f"height='{ax.y(0) - y:.1f}' fill='#1f77b4' data-count='{int(n)}' data-lo='{a:.4g}' "
                     f"data-hi='{b:.4g}'><title>{a:.1f} to {b:.1f}: {int(n)} images</title></rect>")
    for row, (x, label, color) in enumerate(markers):
        if lo <= x <= hi:
            parts.append(ax.marker(x, label, color, row))
    return _svg(element_id, title, parts)


def _info_table(info: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in info.items())
    return f"<table id='run-info'>{rows}</table>"


def write_report(path: str, rows: list[dict[str, Any]], metrics: dict[str, Any], title: str, *,
                 run_info: Mapping[str, Any] | None = None, loss_curve: Sequence[tuple[int, float]] = (),
                 loss_curve_source: str | None = None, step: int | None = None, histogram_bins: int = 20,
                 constant_caption_cider: float | None = None,
                 links: Sequence[str] = ("captions.json", "metrics.json"),
                 few_shot: Mapping[int, Mapping[str, float]] | None = None) -> str:
    """HTML page: what was evaluated (`run_info`), summary metrics, links to `links` (files
    beside the report), a table of metrics by number of solved examples (`few_shot`: k ->
    metrics, in-context captioning), the training loss curve (`loss_curve`, with the evaluated
    `step` marked), a histogram of per-image CIDEr, then one row per image sorted by CIDEr
    (worst first; a row's 'other_predictions' {label: caption} are listed under its own)."""
    rows = sorted(rows, key=lambda r: r["cider"])
    summary = " · ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, (int, float)))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}td{padding:6px;vertical-align:top;"
             "border-bottom:1px solid #ddd}img{image-rendering:pixelated}.pred{font-weight:bold}.other{color:#335}"
             ".refs{color:#555}#run-info th{text-align:left;padding-right:1em;font-weight:normal;color:#555}"
             "#run-info td{border:0;padding:2px 6px}svg{display:block;margin:0.5em 0 1.5em}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if run_info:
        parts.append(_info_table(run_info))
    parts.append(f"<p id='metrics'>{html.escape(summary)}</p>")
    if links:
        parts.append("<p id='links'>" + " · ".join(f"<a href='{html.escape(h)}'>{html.escape(h)}</a>" for h in links)
                     + "</p>")
    if few_shot:
        names = [m for m in next(iter(few_shot.values()))]
        head = "".join(f"<th>{html.escape(m)}</th>" for m in names)
        body = "".join("<tr><td>" + str(k) + "</td>" + "".join(f"<td>{few_shot[k].get(m, float('nan')):.2f}</td>"
                                                             for m in names) + "</tr>" for k in few_shot)
        parts.append(f"<h2>By number of solved examples in the prompt</h2><table id='few-shot'><tr><th>shots</th>"
                     f"{head}</tr>{body}</table>")
    parts.append("<h2>Training loss</h2>")
    if loss_curve:
        parts.append(svg_line_chart(loss_curve, element_id="loss-curve", title="training loss by step",
                                    x_label="step", y_label="loss", marker_x=step,
                                    marker_label=f"evaluated: step {step}" if step is not None else ""))
        if loss_curve_source:
            parts.append(f"<p><small>from {html.escape(loss_curve_source)}</small></p>")
    else:
        where = f" in {loss_curve_source}" if loss_curve_source else " (no metrics.jsonl given)"
        parts.append(f"<p id='no-loss-curve'>No training loss logged{html.escape(where)}.</p>")
    if rows:
        ciders = [r["cider"] for r in rows]
        markers = [(float(np.mean(ciders)), "mean", "#2ca02c")]
        if constant_caption_cider is not None:
            markers.append((constant_caption_cider, "best constant caption", "#d62728"))
        parts.append("<h2>Per-image CIDEr</h2>")
        parts.append(svg_histogram(ciders, histogram_bins, element_id="cider-histogram",
                                   title="per-image CIDEr-D histogram", x_label="CIDEr-D", markers=markers))
    parts.append("<h2>Images, worst first</h2>"
                 "<table id='images'><tr><th>image</th><th>CIDEr</th><th>prediction / references</th></tr>")
    for r in rows:
        refs = "".join(f"<li>{html.escape(x)}</li>" for x in r["references"])
        parts.append(f"<tr><td><img src='data:image/png;base64,{_thumbnail(r['image'])}' width=128></td>"
                     f"<td>{r['cider']:.1f}</td><td><div class='pred'>{html.escape(r['prediction'])}</div>"
                     + "".join(f"<div class='other'>{html.escape(label)}: {html.escape(text)}</div>"
                               for label, text in r.get("other_predictions", {}).items()) +
                     f"<ul class='refs'>{refs}</ul><small>{html.escape(str(r['key']))}</small></td></tr>")
    parts.append("</table></body></html>")
    storage.write_text(path, "\n".join(parts))
    return path


def decoding_settings(num_beams: int, max_len: int, min_len: int, length_penalty: float,
                      repetition_penalty: float, prompt: str) -> str:
    """One line naming the decoder and every setting that changes its captions."""
    if num_beams > 1:
        head = f"beam search: num_beams={num_beams}, length_penalty={length_penalty:g}"
    else:  # greedy decoding has no length penalty
        head = "greedy: num_beams=1"
    return (f"{head}, max_len={max_len}, min_len={min_len}, repetition_penalty={repetition_penalty:g}, "
            f"prompt={prompt!r}")


def describe_data(shards: str | None, annotations_json: str | None, image_dir: str | None,
                  split: str | None, max_examples: int | None) -> str:
    """Where the eval images and references came from."""
    if annotations_json:
        where = f"{annotations_json} (images: {image_dir})" + (f", split {split}" if split else "")
    else:
        where = f"{shards} (webdataset shards)"
    return where + (f", first {max_examples} examples" if max_examples is not None else "")


def _metric_summary(result: Mapping[str, Any]) -> dict[str, float]:
    return {k: result[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "spice")
            if result.get(k) is not None}


def describe_model(model: Any, params: Any) -> str:
    """Family, architecture and parameter count."""
    fam = registry.family_of(model)
    return f"{fam.name}: {fam.describe()} {count_params(params):,} params"


@gin.configurable
def evaluate_captioning(model: Any, params: Any, vocab, mesh: jax.sharding.Mesh, out_dir: str,
                        shards: str | None = None, annotations_json: str | None = None,
                        image_dir: str | None = None, split: str | None = None,
                        prompt: str = "a picture of", batch_size: int = 64,
                        max_examples: int | None = None, max_decode_len: int | None = None,
                        metrics: Iterable[str] = ("bleu", "rouge_l", "cider"),
                        with_constant_baseline: bool = True, num_beams: int = 1, min_len: int = 0,
                        length_penalty: float = 1.0, repetition_penalty: float = 1.0,
                        num_shots: int | Sequence[int] = 0, shots_shards: str | None = None,
                        shots_seed: int = 0, *,
                        step: int | None = None, run_info: Mapping[str, Any] | None = None,
                        metrics_jsonl: str | None = None, histogram_bins: int = 20) -> dict[str, Any]:
    """Zero-shot captioning (greedy, or beam search with `num_beams > 1`) on webdataset
    `shards`, or on a COCO-style set: `annotations_json` (COCO captions json or
    Karpathy's dataset_coco.json, with `split`, e.g. 'test') + `image_dir`.
    Writes captions.json (COCO results format), metrics.json, report.html.

    What the caller knows goes into the report and metrics.json: `step` (the checkpoint's
    training step), `run_info` (extra "what was evaluated" rows, e.g. {'model config':
    'models/simvlm_base.gin', 'checkpoint': path}; a key equal to a built-in row replaces it)
    and `metrics_jsonl` (the run's WORK_DIR/metrics.jsonl: the training loss curve).
    `histogram_bins`: bins of the per-image CIDEr histogram.

    In-context captioning (families with `can_few_shot`, e.g. Flamingo): `num_shots` k, or
    several, e.g. (0, 4, 8, 32); each image is captioned after k solved examples drawn from
    `shots_shards` (the train split) in an order fixed by `shots_seed` (smaller k: a prefix of
    the same draw). The first k is the headline (metrics, captions.json, per-image rows); the
    others add `<metric>_<k>shot` metrics, `captions_<k>shot.json` and a k-shot table."""
    ks = (num_shots,) if isinstance(num_shots, int) else tuple(int(k) for k in num_shots)
    if not ks or min(ks) < 0 or len(set(ks)) != len(ks):
        raise ValueError(f"evaluate_captioning.num_shots={num_shots!r}: give a count of solved examples "
                         f"(0 = zero-shot) or distinct counts, e.g. (0, 4, 8)")
    if max(ks) and not shots_shards:
        raise ValueError(f"evaluate_captioning.num_shots={num_shots!r} needs evaluate_captioning.shots_shards: "
                         f"the train split's tar glob the solved examples are drawn from")
    storage.makedirs(out_dir)
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
    shots = load_shots(shots_shards, model.config.image_size, max(ks), shots_seed) if max(ks) else []
    preds_by_k = {k: generate_captions(model, params, vocab, images, prompt, mesh, batch_size, max_decode_len,
                                       shots=shots[:k], num_beams=num_beams, min_len=min_len,
                                       length_penalty=length_penalty, repetition_penalty=repetition_penalty)
                  for k in ks}
    preds = preds_by_k[ks[0]]
    references = {e["key"]: e["references"] for e in examples}
    predictions = {e["key"]: p for e, p in zip(examples, preds)}
    result = caption_metrics.compute_caption_metrics(references, predictions, metrics=tuple(metrics))
    summary = _metric_summary(result)
    few_shot = {}
    if ks != (0,):
        few_shot[ks[0]] = dict(summary)
        for k in ks[1:]:
            by_key = {e["key"]: p for e, p in zip(examples, preds_by_k[k])}
            few_shot[k] = _metric_summary(caption_metrics.compute_caption_metrics(
                references, by_key, metrics=tuple(metrics)))
            summary.update({f"{name}_{k}shot": v for name, v in few_shot[k].items()})
    summary["num_images"] = len(examples)
    if with_constant_baseline:
        caption, score = best_constant_caption(references)
        summary["best_constant_caption_cider"] = score
        summary["best_constant_caption"] = caption
    fam = registry.family_of(model)
    # The length the decoder used: a longer max_decode_len is capped at the model's position table.
    max_len = min(max_decode_len or fam.max_decode_len, fam.max_decode_len)
    info = {"model": describe_model(fam, params),
            "checkpoint step": step if step is not None else "not given",
            "data": describe_data(shards, annotations_json, image_dir, split, max_examples),
            "images": len(examples),
            "decoding": decoding_settings(num_beams, max_len, min_len,
                                          length_penalty, repetition_penalty, prompt),
            "best constant caption": (f"{summary['best_constant_caption']!r}: CIDEr-D "
                                      f"{summary['best_constant_caption_cider']:.1f}" if with_constant_baseline
                                      else "not computed (with_constant_baseline=False)"),
            **({"solved examples (shots)": f"k = {', '.join(map(str, ks))} from {shots_shards} (seed {shots_seed}): "
                                           + ", ".join(s["key"] for s in shots)} if shots else {}),
            **{str(k): v for k, v in (run_info or {}).items()}}
    out = {"metrics": summary, "tokenizer": result["tokenizer"], "notes": result["notes"], "prompt": prompt,
           "run": {k: v if isinstance(v, (int, float)) else str(v) for k, v in info.items()}}
    if few_shot:
        out["few_shot"] = {str(k): m for k, m in few_shot.items()}
    if step is not None:
        out["step"] = int(step)
    if jax.process_index() == 0:
        for k in ks:
            name = "captions.json" if k == ks[0] else f"captions_{k}shot.json"
            storage.write_text(os.path.join(out_dir, name), json.dumps(
                [{"image_id": e["image_id"], "caption": p} for e, p in zip(examples, preds_by_k[k])], indent=1))
        storage.write_text(os.path.join(out_dir, "metrics.json"), json.dumps(out, indent=1))
        rows = [{"key": e["key"], "image": e["image"], "references": e["references"],
                 "prediction": p, "cider": result["per_image"][e["key"]]["cider"],
                 "other_predictions": {f"{k}-shot": preds_by_k[k][i] for k in ks[1:]}}
                for i, (e, p) in enumerate(zip(examples, preds))]
        at_step = f", step {step}" if step is not None else ""
        kind = "Zero-shot captioning" if ks == (0,) else f"{ks[0]}-shot captioning"
        links = ("captions.json", *(f"captions_{k}shot.json" for k in ks[1:]), "metrics.json")
        out["report"] = write_report(
            os.path.join(out_dir, "report.html"), rows,
            {k: v for k, v in summary.items() if isinstance(v, float) and "shot" not in k},
            f"{kind}: {fam.name}{at_step} (prompt: {prompt!r})", run_info=info,
            loss_curve=read_loss_curve(metrics_jsonl), loss_curve_source=metrics_jsonl, step=step,
            histogram_bins=histogram_bins, constant_caption_cider=summary.get("best_constant_caption_cider"),
            links=links, few_shot=few_shot)
    log.info("eval: %s", caption_metrics.format_metrics(result))
    out["samples"] = [{"image": e["image"], "prediction": p, "references": e["references"]}
                      for e, p in list(zip(examples, preds))[:8]]
    return out
