"""`python -m simvlm_jax.benchmark gpu-suite` and `train-compare`: the suite's bookkeeping (halving
an out-of-memory batch, the table, skipping what the budget cannot fit) and, in the slow tier,
its --smoke run end to end and our CoCa train step timed against open_clip's."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from simvlm_jax import gpu_suite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as a user runs it


def _step_result(**kw):
    r = {"model": "simvlm", "dtype": "bfloat16", "remat_policy": "none", "scan_layers": True,
         "global_batch_size": 256, "step_time_ms_median": 200.0, "examples_per_sec": 1280.0, "mfu": 0.3012,
         "compile_sec": 31.5}
    r.update(kw)
    return r


def test_out_of_memory_halves_the_batch_once_and_only_the_batch():
    part = gpu_suite.Part("p", ("step", "--batch_size=256", "--steps=10"), 100, 10)
    assert gpu_suite.halved(part).argv == ("step", "--batch_size=128", "--steps=10")
    assert gpu_suite.halved(gpu_suite.Part("p", ("step", "--batch_size=1"), 100, 10)) is None
    assert gpu_suite.halved(gpu_suite.Part("p", ("decode",), 100, 10)) is None
    assert gpu_suite._out_of_memory({"log_tail": "jaxlib.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory"})
    assert gpu_suite._out_of_memory({"log_tail": "torch.OutOfMemoryError: CUDA out of memory."})
    assert not gpu_suite._out_of_memory({"log_tail": "ValueError: bad config"})


def test_table_has_a_row_per_measurement_and_the_errors():
    results = {"parts": {
        "simvlm_base": {"result": _step_result()},
        "coca_b32_vs_open_clip": {"result": {
            "dtype": "bfloat16", "batch_size": 256, "speedup_vs_open_clip": 1.5,
            "ours": _step_result(model="coca", examples_per_sec=3000.0),
            "open_clip": {"step_time_ms_median": 128.0, "examples_per_sec": 2000.0, "warmup_sec": 4.2}}},
        "decode_coca_b32": {"result": {"batch": 64, "beam": {
            "ours_captions_per_sec": 900.0, "open_clip_captions_per_sec": 100.0, "speedup": 9.0,
            "token_agreement": 0.5}}},
        "simvlm_large": {"error": "timed out after 180 s"},
    }}
    text = gpu_suite.table(results)
    lines = text.splitlines()
    assert len(lines) == 2 + 1 + 2 + 1 + 1
    assert "| simvlm_base | simvlm bfloat16, remat none, scan True | 256 | 200.0 | 1,280.0 | 30.1% |" in text
    assert "| coca_b32_vs_open_clip | open_clip bfloat16 | 256 | 128.0 | 2,000.0 | - | 1.50 | warm-up 4.2 s |" in text
    assert "beam captions/s: ours 900.0, open_clip 100.0 | 64 |" in text and "identical 50%" in text
    assert "| simvlm_large | | | | | | | timed out after 180 s |" in text


def _args(tmp_path, **kw):
    args = dict(out_dir=str(tmp_path), smoke=True, budget_s=0.0, only="", profile_root="")
    args.update(kw)
    return argparse.Namespace(**args)


def test_parts_that_do_not_fit_the_budget_are_skipped_and_recorded(tmp_path):
    results = gpu_suite.run(_args(tmp_path))
    assert set(results["parts"]) == {p.name for p in gpu_suite.parts(True, "")}
    assert all(e["error"].startswith("skipped:") for e in results["parts"].values())
    with open(tmp_path / "gpu_suite.json") as f:
        assert json.load(f)["parts"].keys() == results["parts"].keys()
    assert (tmp_path / "gpu_suite.md").read_text().count("skipped:") == len(results["parts"])


def test_unknown_part_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="simvlm_huge.*parts:"):
        gpu_suite.run(_args(tmp_path, only="simvlm_huge"))


@pytest.mark.parametrize("smoke", [False, True])
def test_suite_parts_are_commands_the_benchmark_accepts(smoke):
    """A misspelt option or gin binding would fail on the GPU, minutes into a lease: catch it here."""
    import gin  # pylint: disable=g-import-not-at-top
    from simvlm_jax import benchmark, cli  # pylint: disable=g-import-not-at-top
    from simvlm_jax.models import registry  # pylint: disable=g-import-not-at-top
    for part in gpu_suite.parts(smoke, "/tmp/p"):
        args, rest = benchmark.make_parser().parse_known_args(part.argv)
        bindings, unknown = cli.split_gin_args(rest)
        assert not unknown, (part.name, unknown)
        if args.what == "step":
            gin.clear_config()
            try:
                cli.load_gin(args.gin_file, bindings, args.gin_search_path, skip_unknown=True)
                fam = registry.model_family()  # the config's checks run here (__post_init__)
                assert part.name.startswith(fam.name), part.name
            finally:
                gin.clear_config()
    args, rest = benchmark.make_parser().parse_known_args(["step", "--no_such_option=1"])
    assert cli.split_gin_args(rest)[1] == ["--no_such_option=1"]  # the check above can fail


@pytest.mark.slow
def test_smoke_suite_compares_with_open_clip_and_profiles_ours(tmp_path):
    pytest.importorskip("open_clip")
    out = subprocess.run(
        [sys.executable, "-m", "simvlm_jax.benchmark", "gpu-suite", "--smoke", f"--out_dir={tmp_path}",
         "--only=coca_b32_vs_open_clip"],
        cwd=REPO, env=ONE_DEVICE, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    compare = results["parts"]["coca_b32_vs_open_clip"]
    assert "result" in compare, compare.get("log_tail")
    r = compare["result"]
    assert r["ours"]["examples_per_sec"] > 0 and r["open_clip"]["examples_per_sec"] > 0
    assert r["speedup_vs_open_clip"] == pytest.approx(r["ours"]["examples_per_sec"] / r["open_clip"]["examples_per_sec"])
    assert r["ours"]["profile"]["source"] == "cpu" and r["ours"]["profile"]["ops"]
    assert r["ours"]["profile"]["busy_ms"] > 0 and r["ours"]["profile"]["steps"] == 3
    table = (tmp_path / "gpu_suite.md").read_text()
    assert "| coca_b32_vs_open_clip | open_clip float32 |" in table and "| coca_b32_vs_open_clip | ours float32 |" in table
    assert "=====" in (tmp_path / "gpu_suite.log").read_text()  # every part's log is kept
