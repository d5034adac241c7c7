"""Every speed number of docs/performance.md from one command, in priority order within a time budget.

    python -m simvlm_jax.benchmark gpu-suite --out_dir=/tmp/suite            # on the GPU
    python -m simvlm_jax.benchmark gpu-suite --out_dir=/tmp/suite --smoke    # tiny configs, any machine

Runs the parts below in order, each as its own `python -m simvlm_jax.benchmark ...` process: a
crash or an out-of-memory loses one row, not the run, and each process hands its GPU memory back
before the next (JAX and torch each keep what they took). A part that would start with less than
its `min_s` of `--budget_s` left is skipped and says so (on one H200 the parts that finished took 61-164 s each, and
CoCa-B/32 did not finish in 195 s; `--only=a,b` picks some). After every part DIR/gpu_suite.json
holds everything so far (each part's JSON, its command, its wall time, or its error and the
end of its log); at the end DIR/gpu_suite.md holds the table and DIR/gpu_suite.log all logs.

Parts (full size; `--smoke` swaps in tiny configs and small batches):
  coca_b32_vs_open_clip   CoCa-B/32 training, ours vs open_clip eager (AMP bf16, fused AdamW),
                          batch 256, 224 px, 76 tokens; ours profiled (top device operations).
  simvlm_base[_*]         SimVLM-Base MFU, bf16 + cuDNN attention, batch 256: no remat, layers
                          unrolled (profiled; the fastest), then scanned layers without remat
                          (the profile's dynamic-update-slice fusions), then the old 23.3%
                          configuration (scan, remat dots_no_batch).
  coca_base, simvlm_large MFU of CoCa-Base (paper config, 288 px, no remat, unrolled) and
                          SimVLM-Large (scan, remat dots_no_batch).
  decode_coca_b32         beam search (3 beams) and greedy, 64 images per call, ours vs open_clip.
  open_clip_compiled      open_clip under torch.compile (last: its compile time is unknown).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any

import jax  # only its version: importing starts no backend


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    argv: tuple[str, ...]   # after `python -m simvlm_jax.benchmark`
    timeout_s: int          # hard limit of its process
    min_s: int              # skip it when less budget than this is left
    # Out of memory: the part runs again once at half its --batch_size (largest batch that fits).


SIMVLM_GPU = ("--gin.SimVLMConfig.attention_impl='cudnn'",)
COCA_GPU = ("--gin.CoCaConfig.attention_impl='cudnn'",)


def _step(model_gin: str, batch: int, *overrides: str, steps: int = 10) -> tuple[str, ...]:
    return ("step", f"--gin_file=gin/models/{model_gin}.gin", "--gin_file=gin/runs/bench_step.gin",
            f"--batch_size={batch}", f"--steps={steps}", "--warmup=2", *overrides)


def parts(smoke: bool, profile_root: str) -> list[Part]:
    """The suite, in priority order (what matters most runs first)."""
    prof = lambda name: f"--profile_dir={os.path.join(profile_root, name)}"  # noqa: E731
    if smoke:  # the same commands on tiny configs: every code path, minutes on a CPU
        tiny_simvlm = ("--gin.SimVLMConfig.dtype='float32'",)
        return [
            Part("coca_b32_vs_open_clip", ("train-compare", "--open_clip_model=tiny", "--batch_size=4",
                                           "--steps=2", "--warmup=1", prof("coca_b32")), 600, 30),
            Part("simvlm_base_remat", _step("simvlm_tiny", 4, *tiny_simvlm, steps=2), 300, 20),
            Part("simvlm_base", _step("simvlm_tiny", 4, *tiny_simvlm, "--gin.SimVLMConfig.remat_policy='none'",
                                      prof("simvlm_base"), steps=2), 300, 20),
            Part("coca_base", _step("coca_tiny", 4, steps=2), 300, 20),
            Part("decode_coca_b32", ("decode", "--open_clip_model=tiny", "--decode_batch=2", "--decode_len=6",
                                     "--num_beams=3", "--repeats=1"), 600, 20),
        ]
    no_remat, unrolled = "--gin.SimVLMConfig.remat_policy='none'", "--gin.SimVLMConfig.scan_layers=False"
    return [
        # On an H200 this part did not finish in 195 s (which of compile, steps or profile was
        # slow was not seen): 6 min limit.
        Part("coca_b32_vs_open_clip", ("train-compare", "--open_clip_model=coca_ViT-B-32", "--batch_size=256",
                                       "--compare_dtype=bfloat16", "--steps=10", "--warmup=3", prof("coca_b32")),
             360, 240),
        Part("simvlm_base", _step("simvlm_base", 256, *SIMVLM_GPU, no_remat, unrolled, prof("simvlm_base")), 180, 90),
        Part("simvlm_base_scan", _step("simvlm_base", 256, *SIMVLM_GPU, no_remat), 150, 45),
        Part("simvlm_base_remat", _step("simvlm_base", 256, *SIMVLM_GPU), 150, 45),
        Part("coca_base", _step("coca_base", 256, *COCA_GPU, "--gin.CoCaConfig.remat_policy='none'",
                                "--gin.CoCaConfig.scan_layers=False"), 240, 120),
        Part("simvlm_large", _step("simvlm_large", 256, *SIMVLM_GPU), 180, 60),
        Part("decode_coca_b32", ("decode", "--open_clip_model=coca_ViT-B-32", "--decode_batch=64",
                                 "--decode_len=20", "--num_beams=3", "--repeats=3"), 180, 90),
        Part("open_clip_compiled", ("train-compare", "--open_clip_model=coca_ViT-B-32", "--batch_size=256",
                                    "--compare_dtype=bfloat16", "--steps=10", "--warmup=3",
                                    "--contenders=open_clip_compiled"), 240, 90),
    ]


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("gpu-suite")
    g.add_argument("--out_dir", default="gpu_suite", help="where gpu_suite.json / .md / .log go (gpu-suite)")
    g.add_argument("--smoke", action="store_true", help="tiny configs: checks every part on any machine")
    g.add_argument("--budget_s", type=float, default=540.0, help="wall-clock budget of the whole suite")
    g.add_argument("--only", default="", help="comma-separated part names to run (default: all)")
    g.add_argument("--profile_root", default="", help="where the profiled parts write their traces "
                   "(default: OUT_DIR/profiles; open them in Perfetto or TensorBoard)")


def _last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def run_part(part: Part, timeout_s: float, log: Any) -> dict[str, Any]:
    """Runs one part's process; its JSON result, or its error with the end of its log."""
    cmd = [sys.executable, "-m", "simvlm_jax.benchmark", *part.argv]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        stdout, stderr, rc = out.stdout, out.stderr, out.returncode
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = (e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")) + \
            f"\n[gpu-suite] killed after {timeout_s:.0f} s"
        rc = None
    wall = time.perf_counter() - t0
    log.write(f"===== {part.name}: {' '.join(cmd)} (rc {rc}, {wall:.0f} s)\n{stderr}\n")
    log.flush()
    entry: dict[str, Any] = {"command": " ".join(["python -m simvlm_jax.benchmark", *part.argv]),
                             "wall_sec": round(wall, 1)}
    result = _last_json(stdout) if rc == 0 else None
    if result is None:
        entry["error"] = f"exit code {rc}" if rc is not None else f"timed out after {timeout_s:.0f} s"
        entry["log_tail"] = stderr[-2000:]
    else:
        entry["result"] = result
    return entry


def _out_of_memory(entry: dict[str, Any]) -> bool:
    tail = entry.get("log_tail", "")
    return "RESOURCE_EXHAUSTED" in tail or "out of memory" in tail.lower()


def halved(part: Part) -> Part | None:
    """The part at half its --batch_size (None if it has none or it is 1)."""
    argv = list(part.argv)
    for i, a in enumerate(argv):
        if a.startswith("--batch_size="):
            batch = int(a.split("=", 1)[1])
            if batch <= 1:
                return None
            argv[i] = f"--batch_size={batch // 2}"
            return dataclasses.replace(part, argv=tuple(argv))
    return None


def _fmt(x: Any, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def table(results: dict[str, Any]) -> str:
    """The suite's results as a Markdown table (one row per measured thing)."""
    rows = ["| part | what | batch | ms/step | examples/s | MFU | vs open_clip | note |",
            "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, entry in results["parts"].items():
        if "result" not in entry:
            rows.append(f"| {name} | | | | | | | {entry.get('error', 'skipped')} |")
            continue
        r = entry["result"]
        if "ours" in r or "open_clip_compiled" in r:  # train-compare
            for side in ("ours", "open_clip", "open_clip_compiled"):
                if side not in r:
                    continue
                s = r[side]
                ratio = r.get(f"speedup_vs_{side}") if side != "ours" else None
                note = s.get("error", "") or (f"warm-up {s['warmup_sec']} s" if "warmup_sec" in s else
                                              f"remat {s.get('remat_policy')}, scan {s.get('scan_layers')}")
                rows.append(f"| {name} | {side} {r['dtype']} | {r['batch_size']} | {_fmt(s.get('step_time_ms_median'), '.1f')} "
                            f"| {_fmt(s.get('examples_per_sec'), ',.1f')} | {_fmt(s.get('mfu'), '.1%')} "
                            f"| {_fmt(ratio, '.2f')} | {note} |")
        elif "beam" in r or "greedy" in r:  # decode
            for strategy in ("beam", "greedy"):
                if strategy in r:
                    s = r[strategy]
                    rows.append(f"| {name} | {strategy} captions/s: ours {s['ours_captions_per_sec']:.1f}, "
                                f"open_clip {s['open_clip_captions_per_sec']:.1f} | {r['batch']} | | | | "
                                f"{s['speedup']:.2f} | identical {s['token_agreement']:.0%} |")
        else:  # step
            rows.append(f"| {name} | {r['model']} {r['dtype']}, remat {r['remat_policy']}, scan {r['scan_layers']} "
                        f"| {r['global_batch_size']} | {r['step_time_ms_median']:.1f} | {r['examples_per_sec']:,.1f} "
                        f"| {_fmt(r.get('mfu'), '.1%')} | | compile {r['compile_sec']} s |")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the suite; returns (and writes) its results."""
    os.makedirs(args.out_dir, exist_ok=True)
    only = {s for s in args.only.split(",") if s}
    profile_root = args.profile_root or os.path.join(args.out_dir, "profiles")
    todo = [p for p in parts(args.smoke, profile_root) if not only or p.name in only]
    if only - {p.name for p in todo}:
        raise ValueError(f"--only: unknown part(s) {sorted(only - {p.name for p in todo})}; "
                         f"parts: {[p.name for p in parts(args.smoke, '')]}")
    results: dict[str, Any] = {"smoke": args.smoke, "budget_s": args.budget_s, "jax_version": jax.__version__,
                               "xla_flags": os.environ.get("XLA_FLAGS", ""), "parts": {}}
    path = os.path.join(args.out_dir, "gpu_suite.json")
    t_start = time.perf_counter()
    with open(os.path.join(args.out_dir, "gpu_suite.log"), "w") as log:
        for part in todo:
            left = args.budget_s - (time.perf_counter() - t_start)
            if left < part.min_s:
                results["parts"][part.name] = {"error": f"skipped: {left:.0f} s of the budget left, needs {part.min_s} s"}
            else:
                print(f"[gpu-suite] {part.name} ({left:.0f} s left)", file=sys.stderr, flush=True)
                entry = run_part(part, min(part.timeout_s, left), log)
                smaller = halved(part) if _out_of_memory(entry) else None
                left = args.budget_s - (time.perf_counter() - t_start)
                if smaller is not None and left >= part.min_s:  # the largest batch that fits, by halving
                    print(f"[gpu-suite] {part.name}: out of memory, again at half the batch", file=sys.stderr)
                    first = entry
                    entry = run_part(smaller, min(part.timeout_s, left), log)
                    entry["out_of_memory_at"] = first["command"]
                results["parts"][part.name] = entry
            with open(path, "w") as f:
                json.dump(results, f, indent=1)
    _add_comparisons(results)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    text = table(results)
    with open(os.path.join(args.out_dir, "gpu_suite.md"), "w") as f:
        f.write(text + "\n")
    print(text, file=sys.stderr)
    return results


def _add_comparisons(results: dict[str, Any]) -> None:
    """open_clip_compiled ran alone (see parts()): its ratio is against ours from the first part."""
    parts_ = results["parts"]
    ours = parts_.get("coca_b32_vs_open_clip", {}).get("result", {}).get("ours", {})
    comp = parts_.get("open_clip_compiled", {}).get("result", {})
    theirs = comp.get("open_clip_compiled", {}).get("examples_per_sec")
    if ours.get("examples_per_sec") and theirs:
        comp["speedup_vs_open_clip_compiled"] = ours["examples_per_sec"] / theirs
