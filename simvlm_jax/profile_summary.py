"""Where did device time go? A text + JSON summary of a JAX profiler trace directory.

`jax.profiler.trace(log_dir)` (or `start_trace(log_dir)` ... `stop_trace()`) writes (JAX 0.10-0.11)
`<log_dir>/plugins/profile/<run>/<host>.xplane.pb` and, from it, the Chrome-trace JSON
`<host>.trace.json.gz`; `create_perfetto_trace=True` adds the same events again as
`perfetto_trace.json.gz`. The newest run's JSON is read with the standard library alone (no
TensorFlow, TensorBoard or xprof); a run with only the `.xplane.pb` (e.g. a capture from
TensorBoard) is read through `jax.profiler.ProfileData`.

Device events are the `/device:GPU:N` processes' stream threads (CUPTI kernels, memcpys and
memsets; "source": "gpu") when the trace has any, else the XLA CPU runtime's op events (host
events carrying an `hlo_op` argument; "source": "cpu"). On CPU, XLA's default YNNPACK fusions
run a dot with its neighbours (or a reduction) as one `ynn_fusion` (category "cpu library");
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=` keeps dots separate. Durations are summed
per op (kernel) name, without instance suffixes (`fusion.12`, `loop_add_fusion_3`), and per
category. `busy_ms` sums op durations (concurrent streams add up); `busy_fraction` is the share
of the traced window (first to last device event) in which a device ran anything, averaged
over devices: a low value means the devices waited, e.g. on the host.

    python -m simvlm_jax.profile_summary LOG_DIR [--top N] [--steps N]

prints the table; its last stdout line is the summary as one JSON object.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
from typing import Any

# (category, pattern over the lowercased kernel / op name), first match wins.
CATEGORIES = (
    ("cpu library", r"(ynn|xnn)_fusion|onednn"),  # XLA CPU's YNNPACK/XNNPACK/oneDNN calls: dots or not
    ("collective", r"nccl|(?<![a-z])all[-_]?(reduce|gather|to[-_]?all)|reduce[-_]?scatter|collective[-_]permute"),
    ("attention", r"fmha|flash|sdpa|attention|cudnn::fusion"),  # cuDNN fused attention (fprop and bprop)
    ("conv", r"conv(?!ert)|fprop|dgrad|wgrad"),  # cuDNN convolutions: "sm90_xmma_fprop_implicit_gemm_..."
    ("matmul", r"gemm|cublas|cutlass|xmma|nvjet|wgmma|dot|matmul"),
    ("copy/transpose", r"copy|transpose|memcpy|memset"),
    ("fusion", r"fusion|loop_|input_|triton|wrapped_|reduce|broadcast|softmax|convert|elementwise"),
    ("attention", r"cudnn"),  # cuDNN's other kernels (after conv: cuDNN runs convolutions too)
)
OTHER = "other"
_GPU_PROCESS = re.compile(r"^/device:GPU:\d+")
_INSTANCE_SUFFIX = re.compile(r"[._ ]\d+$")
_HOW = ("record one with jax.profiler.trace(log_dir, create_perfetto_trace=True) or "
        "jax.profiler.start_trace(log_dir, create_perfetto_trace=True) ... jax.profiler.stop_trace()")


def find_trace(log_dir: str) -> str:
    """The trace file of the newest profiler run under `log_dir` (or `log_dir` itself if a file):
    `<host>.trace.json.gz`, else `perfetto_trace.json.gz`, else `<host>.xplane.pb`."""
    if os.path.isfile(log_dir):
        return log_dir
    kinds = ("*.trace.json.gz", "perfetto_trace.json.gz", "*.xplane.pb")
    found = {p: kinds.index(k) for k in kinds
             for p in glob.glob(os.path.join(glob.escape(log_dir), "**", k), recursive=True)}
    if not found:
        state = "has no profiler trace" if os.path.isdir(log_dir) else "does not exist"
        raise FileNotFoundError(f"{log_dir!r} {state} (no plugins/profile/<run>/*.trace.json.gz, "
                                f"perfetto_trace.json.gz or *.xplane.pb): {_HOW}")
    newest_run = max({os.path.dirname(p) for p in found}, key=os.path.getmtime)
    return min((p for p in found if os.path.dirname(p) == newest_run), key=lambda p: (found[p], p))


def load_events(path: str) -> list[dict[str, Any]]:
    """Chrome-trace events of a trace JSON (gzipped or not) or, converted, of an `.xplane.pb`."""
    if path.endswith(".xplane.pb"):
        return _xplane_events(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _xplane_events(path: str) -> list[dict[str, Any]]:
    """An XPlane protobuf's events as Chrome-trace events (planes -> processes, lines -> threads)."""
    from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top  (only for .xplane.pb)
    events = []
    for pid, plane in enumerate(ProfileData.from_file(path).planes):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": plane.name}})
        for tid, line in enumerate(plane.lines):
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": line.name}})
            events.extend({"ph": "X", "pid": pid, "tid": tid, "name": e.name, "ts": e.start_ns / 1e3,
                           "dur": e.duration_ns / 1e3, "args": dict(e.stats)} for e in line.events)
    return events


def device_events(events: list[dict[str, Any]]) -> tuple[str, list[tuple[Any, dict[str, Any]]]]:
    """("gpu" | "cpu", [(device, complete event)]): the GPU stream events if any, else the CPU
    runtime's XLA op events."""
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e["pid"], e.get("tid"))] = e["args"]["name"]
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    gpu = [e for e in complete if _GPU_PROCESS.match(process.get(e.get("pid"), ""))]
    # Only the "Stream #N(...)" threads: lines derived by xprof ("XLA Ops", "Steps") repeat them.
    streams = [e for e in gpu if thread.get((e["pid"], e.get("tid")), "").startswith("Stream")]
    if gpu:
        return "gpu", [(e["pid"], e) for e in (streams or gpu)]
    return "cpu", [(e["args"].get("device_ordinal"), e) for e in complete if "hlo_op" in e.get("args", {})]


def op_name(name: str) -> str:
    """A kernel / op name without its instance suffix (`fusion.12` -> `fusion`) or, for a
    demangled C++ kernel, its return type and parameter list."""
    if name.endswith(")"):
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i].removeprefix("void ")
                break
    return _INSTANCE_SUFFIX.sub("", name)


def categorize(name: str, hlo_op: str = "") -> str:
    """The category of a kernel / XLA op (CATEGORIES) by its name, else by its HLO op's name."""
    for text in (name.lower(), hlo_op.lower()):
        for category, pattern in CATEGORIES:
            if text and re.search(pattern, text):
                return category
    return OTHER


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def _rows(groups: dict[str, list[float]], busy_us: float) -> list[dict[str, Any]]:
    rows = [{"name": k, "ms": round(us / 1e3, 3), "pct": round(100 * us / busy_us, 2) if busy_us else 0.0,
             "count": int(n)} for k, (us, n) in groups.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def summarize(log_dir: str, top: int = 15, steps: int | None = None) -> dict[str, Any]:
    """Summary of the newest trace under `log_dir`: totals, time per category, the `top` ops."""
    path = find_trace(log_dir)
    source, selected = device_events(load_events(path))
    if not selected:
        raise ValueError(f"{path}: no device or XLA op events (did the traced code run a jitted computation?)")
    by_op, by_cat = collections.defaultdict(lambda: [0.0, 0]), collections.defaultdict(lambda: [0.0, 0])
    per_device, op_category = collections.defaultdict(list), {}
    for device, e in selected:
        name = op_name(e["name"])
        category = op_category.setdefault(name, categorize(e["name"], str(e.get("args", {}).get("hlo_op", ""))))
        for groups, key in ((by_op, name), (by_cat, category)):
            groups[key][0] += e["dur"]
            groups[key][1] += 1
        per_device[device].append((e["ts"], e["ts"] + e["dur"]))
    busy_us = sum(us for us, _ in by_cat.values())
    start = min(s for iv in per_device.values() for s, _ in iv)
    span_us = max(e for iv in per_device.values() for _, e in iv) - start
    union_us = sum(_union_us(iv) for iv in per_device.values()) / len(per_device)
    ops = _rows(by_op, busy_us)[:top]
    for row in ops:
        row["category"] = op_category[row["name"]]
    summary = {"trace": path, "source": source, "devices": len(per_device), "events": len(selected),
               "busy_ms": round(busy_us / 1e3, 3), "span_ms": round(span_us / 1e3, 3),
               "busy_fraction": round(union_us / span_us, 4) if span_us else 1.0,
               "categories": _rows(by_cat, busy_us), "ops": ops, "steps": steps}
    if steps:
        summary["busy_ms_per_step"] = round(busy_us / 1e3 / steps, 3)
        summary["span_ms_per_step"] = round(span_us / 1e3 / steps, 3)
    return summary


def format_table(summary: dict[str, Any], width: int = 60) -> str:
    """The summary as aligned text: totals, categories, top ops (names cut to `width`)."""
    s = summary
    lines = [s["trace"],
             f"source {s['source']} ({s['devices']} device(s), {s['events']} events): busy {s['busy_ms']:.3f} ms "
             f"(summed over ops) in a {s['span_ms']:.3f} ms window, devices busy {s['busy_fraction']:.1%} of it"]
    if s.get("steps"):
        lines.append(f"per step ({s['steps']} steps): busy {s['busy_ms_per_step']:.3f} ms, "
                     f"window {s['span_ms_per_step']:.3f} ms")
    for title, rows in (("category", s["categories"]), ("op", s["ops"])):
        lines.append(f"\n{title:<{width}} {'ms':>10} {'%':>6} {'count':>7}" + ("  category" if title == "op" else ""))
        for r in rows:
            name = r["name"] if len(r["name"]) <= width else r["name"][:width - 3] + "..."
            lines.append(f"{name:<{width}} {r['ms']:>10.3f} {r['pct']:>6.2f} {r['count']:>7}"
                         + (f"  {r['category']}" if title == "op" else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("log_dir", help="the directory given to jax.profiler.trace / start_trace (or a trace file)")
    parser.add_argument("--top", type=int, default=15, help="op rows to show")
    parser.add_argument("--steps", type=int, default=None, help="steps traced (adds per-step times)")
    args = parser.parse_args(argv)
    summary = summarize(args.log_dir, top=args.top, steps=args.steps)
    print(format_table(summary))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
