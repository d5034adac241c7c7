"""The captioning report (evaluate.write_report): what was evaluated, the training loss curve,
the per-image CIDEr histogram and the links, read back from the HTML as a browser would."""
from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from simvlm_jax import evaluate


class ReportParser(HTMLParser):
    """Collects from a report: the run-info table ({th: td}), each svg's element ids, the
    line chart's point count, the histogram bars' counts, link targets, tags used, and the
    sources of every <img>/<script>/<link>."""

    def __init__(self):
        super().__init__()
        self.info: dict[str, str] = {}
        self.svg_ids: list[str] = []
        self.polyline_counts: list[int] = []
        self.bar_counts: list[int] = []
        self.hrefs: list[str] = []
        self.tags: set[str] = set()
        self.sources: list[str] = []
        self.text: list[str] = []
        self._in_info = False
        self._cell: str | None = None
        self._key = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "table":
            self._in_info = a.get("id") == "run-info"
        if self._in_info and tag in ("th", "td"):
            self._cell, buf = tag, ""
            self._buf = buf
        if tag == "svg":
            self.svg_ids.append(a.get("id", ""))
        if tag == "polyline":
            self.polyline_counts.append(int(a["data-count"]))
            assert len(a["points"].split()) == int(a["data-count"])
        if tag == "rect" and a.get("class") == "bar":
            self.bar_counts.append(int(a["data-count"]))
        if tag == "a":
            self.hrefs.append(a.get("href", ""))
        if tag in ("img", "script", "link", "iframe"):
            self.sources.append(a.get("src") or a.get("href") or "")

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_info = False
        if self._in_info and tag == self._cell:
            if tag == "th":
                self._key = self._buf.strip()
            else:
                self.info[self._key] = self._buf.strip()
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell:
            self._buf += data


def parse_report(path: str) -> ReportParser:
    parser = ReportParser()
    with open(path, encoding="utf-8") as f:
        parser.feed(f.read())
    return parser


def _rows(ciders):
    rng = np.random.default_rng(0)
    return [{"key": f"k{i}", "image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
             "references": [f"ref {i}"], "prediction": f"pred <{i}>", "cider": c} for i, c in enumerate(ciders)]


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_read_loss_curve_keeps_the_last_row_of_each_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_jsonl(path, [
        {"step": 1, "loss": 9.0}, {"step": 50, "loss": 4.0}, {"step": 100, "loss": 3.0},
        {"step": 100, "eval/cider": 50.0},            # an eval row: no loss
        {"step": 50, "loss": 3.9},                    # resumed from the step-50 checkpoint
        '{"step": 120, "loss": 2.',                   # a line cut by a killed run
        {"step": 120, "loss": float("nan")},          # not plotted
        {"step": 150, "loss": 2.5}])
    assert evaluate.read_loss_curve(str(path)) == [(1, 9.0), (50, 3.9), (100, 3.0), (150, 2.5)]
    assert evaluate.read_loss_curve(str(tmp_path / "absent.jsonl")) == []
    assert evaluate.read_loss_curve(None) == []


def test_report_states_the_run_and_draws_curve_histogram_and_links(tmp_path):
    ciders = [0.0, 12.5, 80.0, 140.0, 141.0, 300.0, 310.0]
    curve = [(1, 11.2), (50, 4.2), (100, 2.4), (150, 1.6)]
    info = {"model": "simvlm: tiny, 1,234 params", "checkpoint step": 150,
            "data": "/data/heldout/*.tar (webdataset shards)", "images": len(ciders),
            "decoding": evaluate.decoding_settings(3, 20, 0, 0.6, 1.0, "a picture of"),
            "best constant caption": "'a red square': CIDEr-D 55.0"}
    path = evaluate.write_report(str(tmp_path / "report.html"), _rows(ciders), {"cider": 140.5}, "t",
                                 run_info=info, loss_curve=curve, loss_curve_source="m.jsonl", step=150,
                                 histogram_bins=10, constant_caption_cider=55.0)
    report = parse_report(path)
    assert report.info == {k: str(v) for k, v in info.items()}
    assert report.info["decoding"] == ("beam search: num_beams=3, length_penalty=0.6, max_len=20, min_len=0, "
                                       "repetition_penalty=1, prompt='a picture of'")
    assert report.svg_ids == ["loss-curve", "cider-histogram"]
    assert report.polyline_counts == [len(curve)]
    assert len(report.bar_counts) == 10 and sum(report.bar_counts) == len(ciders)
    assert report.hrefs == ["captions.json", "metrics.json"]
    text = "".join(report.text)
    assert "evaluated: step 150" in text and "best constant caption" in text and "pred <3>" in text
    # Self-contained: no scripts, every image inline.
    assert "script" not in report.tags
    assert all(src.startswith("data:image/png;base64,") for src in report.sources)


def test_histogram_bins_hold_each_value_once():
    svg = evaluate.svg_histogram([0.0, 5.0, 5.0, 9.99, 10.0, 250.0], 5, element_id="h", title="t", x_label="x")
    parser = ReportParser()
    parser.feed(svg)
    # Round bounds 0..250 in 5 bins of 50: five values in the first bin, 250 (the right edge) in the last.
    assert parser.bar_counts == [5, 0, 0, 0, 1]


def test_histogram_marker_labels_sit_above_the_tallest_bar():
    # Seen in the demo's report: a marker label drawn across the tallest bar.
    values = [110.0] * 75 + [250.0] * 40 + [600.0]
    markers = [(245.0, "mean", "#2ca02c"), (109.5, "best constant caption", "#d62728")]
    svg = evaluate.svg_histogram(values, 20, element_id="h", title="t", x_label="x", markers=markers)
    bar_tops = [float(y) for y in re.findall(r"<rect class='bar' x='[^']*' y='([^']*)'", svg)]
    label_baselines = [float(y) for y in re.findall(r"<text x='[^']*' y='([^']*)' fill=", svg)]
    assert len(bar_tops) == 20 and len(label_baselines) == 2
    assert min(bar_tops) > max(label_baselines) + 2  # descenders clear the bar
    # The loss curve's marker label ("evaluated: step N", top right) clears a curve at its max there.
    line = evaluate.svg_line_chart([(0, 1.0), (50, 5.0), (100, 5.0)], element_id="l", title="t", x_label="step",
                                   y_label="loss", marker_x=100, marker_label="evaluated: step 100")
    curve_top = min(float(p.split(",")[1]) for p in re.search(r"<polyline points='([^']*)'", line)[1].split())
    label_baseline = float(re.search(r"<text x='[^']*' y='([^']*)' fill=", line)[1])
    assert curve_top > label_baseline + 2
    # Without markers the tallest bar may reach the top tick.
    plain = evaluate.svg_histogram([1.0] * 80, 4, element_id="h", title="t", x_label="x")
    assert min(float(y) for y in re.findall(r"<rect class='bar' x='[^']*' y='([^']*)'", plain)) == (
        evaluate.CHART_MARGIN["top"])


def test_report_without_a_training_log_says_so(tmp_path):
    path = evaluate.write_report(str(tmp_path / "r.html"), _rows([1.0, 2.0]), {}, "t", loss_curve=[],
                                 loss_curve_source=str(tmp_path / "metrics.jsonl"))
    report = parse_report(path)
    assert report.svg_ids == ["cider-histogram"]
    assert f"No training loss logged in {tmp_path / 'metrics.jsonl'}." in "".join(report.text)


def test_decoding_settings_name_the_decoder():
    greedy = evaluate.decoding_settings(1, 30, 2, 0.6, 1.2, "a photo of")
    assert greedy == "greedy: num_beams=1, max_len=30, min_len=2, repetition_penalty=1.2, prompt='a photo of'"
    assert "length_penalty" not in greedy  # greedy decoding ignores it: saying it would mislead


@pytest.mark.parametrize("lo,hi", [(0.0, 1200.0), (0.7, 11.2), (5.0, 5.0), (-3.0, 0.01)])
def test_nice_ticks_span_the_range_in_round_steps(lo, hi):
    ticks = evaluate._nice_ticks(lo, hi)  # pylint: disable=protected-access
    assert ticks[0] <= lo and ticks[-1] >= hi and len(ticks) >= 2
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
    assert len(steps) == 1
    step = steps.pop()
    assert round(step / 10 ** math.floor(math.log10(step)), 6) in (1, 2, 5)


def test_report_has_the_few_shot_table_and_each_rows_other_predictions(tmp_path):
    rows = _rows([1.0, 2.0])
    rows[0]["other_predictions"] = {"4-shot": "a <red> cube"}
    few_shot = {0: {"cider": 10.0, "bleu4": 1.5}, 4: {"cider": 42.25, "bleu4": 3.0}}
    path = evaluate.write_report(str(tmp_path / "r.html"), rows, {"cider": 10.0}, "t", few_shot=few_shot,
                                 links=("captions.json", "captions_4shot.json", "metrics.json"))
    text = open(path).read()
    table = text[text.index("<table id='few-shot'>"):]
    table = table[:table.index("</table>")]
    assert "<td>4</td><td>42.25</td><td>3.00</td>" in table and "<td>0</td><td>10.00</td>" in table
    assert "4-shot: a &lt;red&gt; cube" in text and "captions_4shot.json" in text
    plain = evaluate.write_report(str(tmp_path / "p.html"), _rows([1.0]), {}, "t")
    assert "few-shot" not in open(plain).read()
