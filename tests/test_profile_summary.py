"""profile_summary: real CPU profiler traces of small jitted programs (matmul-heavy vs
elementwise-heavy), and a hand-written GPU-like Chrome trace (names as CUPTI reports them)."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from simvlm_jax import profile_summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
DOTS_PER_STEP = 4
# XLA CPU runs dots with their neighbours as one YNNPACK `ynn_fusion` by default; keep them separate.
SEPARATE_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _matmul_heavy(x, w):
    for _ in range(DOTS_PER_STEP):
        x = (x @ w) * 0.5
    return x


def _elementwise_heavy(x, v):
    for _ in range(10):
        x = jnp.sin(x) * 1.01 + jnp.cos(x)
    return x, v[:8] @ v[:, :8]  # one small dot


def _trace(log_dir: str, fn, *args, compiler_options=None, perfetto: bool = True) -> str:
    compiled = jax.jit(fn).lower(*args).compile(compiler_options=compiler_options)
    jax.block_until_ready(compiled(*args))  # warm-up, untraced
    with jax.profiler.trace(log_dir, create_perfetto_trace=perfetto):
        for _ in range(STEPS):
            jax.block_until_ready(compiled(*args))
    return log_dir


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    root = tmp_path_factory.mktemp("profiles")
    x, w = jnp.ones((256, 512)) * 0.01, jnp.ones((512, 512)) * 0.01
    y, v = jnp.ones((512, 512)) * 0.5, jnp.ones((512, 512)) * 0.01
    return {
        "matmul": _trace(str(root / "matmul"), _matmul_heavy, x, w, compiler_options=SEPARATE_DOTS),
        # Without create_perfetto_trace: stop_trace writes <host>.trace.json.gz anyway.
        "elementwise": _trace(str(root / "elementwise"), _elementwise_heavy, y, v,
                              compiler_options=SEPARATE_DOTS, perfetto=False),
        "default": _trace(str(root / "default"), _matmul_heavy, x, w),  # XLA's default CPU fusions
    }


def _categories(summary: dict) -> dict[str, dict]:
    return {c["name"]: c for c in summary["categories"]}


def _check_totals(s: dict) -> None:
    assert s["busy_ms"] > 0 and s["span_ms"] > 0 and s["events"] > 0 and s["devices"] >= 1
    assert sum(c["ms"] for c in s["categories"]) == pytest.approx(s["busy_ms"], abs=1e-3 * len(s["categories"]))
    assert sum(c["pct"] for c in s["categories"]) == pytest.approx(100, abs=0.01 * len(s["categories"]))
    assert sum(c["count"] for c in s["categories"]) == s["events"]
    assert 0 < s["busy_fraction"] <= 1
    ms = [r["ms"] for r in s["ops"]]
    assert ms == sorted(ms, reverse=True)
    cats = _categories(s)
    for r in s["ops"]:  # an op's time is part of its category's
        assert r["ms"] <= cats[r["category"]]["ms"] + 1e-9


def test_matmul_heavy_program_is_mostly_matmul(traces):
    s = profile_summary.summarize(traces["matmul"], top=50, steps=STEPS)
    _check_totals(s)
    assert s["source"] == "cpu" and s["devices"] == 1
    cats = _categories(s)
    assert cats["matmul"]["pct"] > 60, s["categories"]
    assert s["categories"][0]["name"] == "matmul"
    dots = [r for r in s["ops"] if r["name"] == "dot_general"]  # dot_general.4, .5, ... counted as one
    assert len(dots) == 1 and dots[0]["category"] == "matmul"
    assert dots[0]["count"] == cats["matmul"]["count"] == DOTS_PER_STEP * STEPS
    assert s["busy_ms_per_step"] == pytest.approx(s["busy_ms"] / STEPS, abs=1e-3)
    assert s["span_ms_per_step"] == pytest.approx(s["span_ms"] / STEPS, abs=1e-3)
    assert s["trace"].endswith(".trace.json.gz")  # preferred over the perfetto_trace.json.gz copy


def test_elementwise_heavy_program_is_mostly_fusions(traces):
    s = profile_summary.summarize(traces["elementwise"])
    _check_totals(s)
    cats = _categories(s)
    assert cats["matmul"]["count"] == STEPS and cats["matmul"]["pct"] < 20, s["categories"]
    assert s["categories"][0]["name"] == "fusion"
    assert s["steps"] is None and "busy_ms_per_step" not in s


def test_default_cpu_fusions_are_summarized(traces):
    s = profile_summary.summarize(traces["default"])
    _check_totals(s)
    cats = _categories(s)
    # Whether XLA hands the dots to YNNPACK depends on its version: either way they dominate.
    assert cats.get("matmul", {}).get("pct", 0) + cats.get("cpu library", {}).get("pct", 0) > 50, s["categories"]


def test_top_limits_op_rows(traces):
    full = profile_summary.summarize(traces["elementwise"], top=100)
    two = profile_summary.summarize(traces["elementwise"], top=2)
    assert len(full["ops"]) > 2 and two["ops"] == full["ops"][:2]
    assert two["categories"] == full["categories"]
    table = profile_summary.format_table(two)
    assert full["ops"][0]["name"][:40] in table and full["ops"][2]["name"] not in table


def test_xplane_only_run_gives_the_same_summary(traces, tmp_path):
    """A run holding only the .xplane.pb (e.g. a TensorBoard capture) is read via ProfileData."""
    from_json = profile_summary.summarize(traces["matmul"])
    run = os.path.dirname(from_json["trace"])
    xplane = [f for f in os.listdir(run) if f.endswith(".xplane.pb")]
    assert len(xplane) == 1
    os.makedirs(tmp_path / "plugins" / "profile" / "run")
    shutil.copy(os.path.join(run, xplane[0]), tmp_path / "plugins" / "profile" / "run")
    from_pb = profile_summary.summarize(str(tmp_path))
    assert from_pb["trace"].endswith(".xplane.pb")
    for key in ("source", "devices", "events", "busy_ms", "span_ms", "categories"):
        assert from_pb[key] == from_json[key], key


def test_cli_prints_table_then_json(traces):
    out = subprocess.run([sys.executable, "-m", "simvlm_jax.profile_summary", traces["matmul"], "--top", "2",
                          "--steps", str(STEPS)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["source"] == "cpu" and len(result["ops"]) == 2 and result["steps"] == STEPS
    assert result["busy_ms"] == profile_summary.summarize(traces["matmul"])["busy_ms"]
    assert any(line.startswith("matmul ") for line in lines[:-1])


def test_missing_trace_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*create_perfetto_trace=True") as e:
        profile_summary.summarize(str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(e.value)
    with pytest.raises(FileNotFoundError, match="has no profiler trace"):
        profile_summary.summarize(str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "simvlm_jax.profile_summary", str(tmp_path / "nowhere")],
                         cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode != 0 and "create_perfetto_trace=True" in out.stderr


# ----------------------------------------------------------------------------- GPU-like trace

GEMM = ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off"
        "_kernel__5x_cublas")
SDPA = "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0"
CONV = "sm80_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x32x32_execute_kernel__5x_cudnn"


def _gpu_trace() -> list[dict]:
    """Two GPUs (pids 1, 2) + the host; times in us. Expected numbers are worked out by hand."""
    def meta(pid, name, tid=None):
        e = {"ph": "M", "pid": pid, "name": "process_name" if tid is None else "thread_name", "args": {"name": name}}
        return e if tid is None else {**e, "tid": tid}

    def kernel(pid, tid, name, ts, dur, hlo_op="command_buffer_3"):
        return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur,
                "args": {"hlo_op": hlo_op, "hlo_module": "jit_train_step", "correlation_id": "7"}}

    return [
        meta(1, "/device:GPU:0"), meta(1, "Stream #14(Compute,Memset)", 14), meta(1, "Stream #15(MemcpyH2D)", 15),
        meta(1, "XLA Ops", 99), meta(2, "/device:GPU:1"), meta(2, "Stream #14(Compute)", 14),
        meta(701, "/host:CPU"), meta(701, "python3", 5),
        kernel(1, 14, GEMM, 0, 40, "custom-call.3"),
        kernel(1, 14, "nvjet_sm90_tst_128x128_64x6_2x1_v_bz_NNT", 40, 20),
        kernel(1, 14, SDPA, 60, 15),
        kernel(1, 14, "loop_add_fusion_3", 75, 5), kernel(1, 14, "loop_add_fusion_4", 80, 5),
        kernel(1, 14, "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 100, 10),
        kernel(1, 14, "input_transpose_fusion", 110, 3),
        kernel(1, 14, CONV, 120, 2, "cudnn-conv.1"),
        {"ph": "X", "pid": 1, "tid": 15, "name": "MemcpyH2D", "ts": 50, "dur": 10, "args": {}},  # overlaps compute
        kernel(1, 99, "fusion.1", 0, 85, "fusion.1"),  # derived line: repeats the stream's kernels, not counted
        kernel(2, 14, GEMM, 0, 40), kernel(2, 14, "nccl AllReduce", 100, 10),
        kernel(701, 5, "dot.1", 0, 1000, "dot.1"),  # host XLA op: ignored when GPU events exist
        {"ph": "X", "pid": 701, "tid": 5, "name": "PjitFunction(train_step)", "ts": 0, "dur": 2000},
    ]


def test_gpu_streams_are_selected_and_categorized(tmp_path):
    run = tmp_path / "plugins" / "profile" / "2026_01_01_00_00_00"
    os.makedirs(run)
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": _gpu_trace()}, f)
    s = profile_summary.summarize(str(tmp_path), top=3, steps=2)
    _check_totals(s)
    assert (s["source"], s["devices"], s["events"]) == ("gpu", 2, 11)
    assert s["busy_ms"] == pytest.approx(0.160)  # 110 us on GPU:0 + 50 us on GPU:1
    assert s["span_ms"] == pytest.approx(0.122)
    assert s["busy_fraction"] == pytest.approx((100 + 50) / 2 / 122, abs=1e-4)  # overlapping memcpy counted once
    assert s["busy_ms_per_step"] == pytest.approx(0.080)
    cats = {c["name"]: (c["ms"], c["count"]) for c in s["categories"]}
    assert cats == {"matmul": (0.1, 3), "collective": (0.02, 2), "attention": (0.015, 1),
                    "copy/transpose": (0.013, 2), "fusion": (0.01, 2), "conv": (0.002, 1)}
    assert [(r["name"], r["count"], r["category"]) for r in s["ops"]] == [
        (GEMM, 2, "matmul"), ("nvjet_sm90_tst_128x128_64x6_2x1_v_bz_NNT", 1, "matmul"),
        (SDPA[:-2], 1, "attention")]
    assert "source gpu (2 device(s)" in profile_summary.format_table(s)


def test_newest_run_is_summarized(tmp_path):
    for run, events in (("old", _gpu_trace()), ("new", [e for e in _gpu_trace() if e["pid"] != 2])):
        os.makedirs(tmp_path / run)
        with gzip.open(tmp_path / run / "host.trace.json.gz", "wt") as f:
            json.dump({"traceEvents": events}, f)
    os.utime(tmp_path / "old", (1, 1))
    assert profile_summary.summarize(str(tmp_path))["devices"] == 1


@pytest.mark.parametrize("name, hlo_op, category", [
    ("ncclDevKernel_AllGather_RING_LL", "", "collective"), ("all-reduce.3", "", "collective"),
    ("reduce-scatter", "", "collective"), ("input_reduce_fusion", "", "fusion"),
    ("small_reduce_fusion", "", "fusion"),
    ("cudnn::fusion::compute_dot_do_o_specialized<true, 128>", "", "attention"),
    ("fmha_v2_flash_attention_bf16_64_128_S_64_sm90_kernel", "", "attention"),
    ("_ZN17cutlass__5x_cudnn6KernelINS_4conv6kernel23ImplicitGemmConvolution", "", "conv"),
    ("gemm_fusion_dot_25", "command_buffer_6", "matmul"), ("nvjet_sm90_tss_128x128", "", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu>", "", "matmul"),
    ("dot_general.4", "dot_general.4", "matmul"), ("triton_softmax_1", "", "fusion"),
    ("loop_convert_fusion", "", "fusion"), ("wrapped_convert", "", "fusion"),
    ("Memset", "cudnn-conv.1", "copy/transpose"), ("copy.3", "", "copy/transpose"),
    ("ynn_fusion", "ynn_fusion", "cpu library"), ("mystery_kernel", "custom-call.1", "other"),
    ("mystery_kernel", "cudnn-conv-bw-filter.1", "conv"),  # by its HLO op when the name says nothing
])
def test_categorize(name, hlo_op, category):
    assert profile_summary.categorize(name, hlo_op) == category


@pytest.mark.parametrize("raw, name", [
    ("fusion.12", "fusion"), ("loop_add_fusion_3", "loop_add_fusion"), ("Memset 3", "Memset"),
    ("wrapped_reduce-window", "wrapped_reduce-window"),
    ("void cudnn::fusion::f<true, 128>(void const*, unsigned int)", "cudnn::fusion::f<true, 128>"),
])
def test_op_name(raw, name):
    assert profile_summary.op_name(raw) == name
