"""`benchmark aot`: the train step compiled for a TPU slice on this CPU machine (libtpu's compiler)."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from simvlm_jax import aot
from simvlm_jax.cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(not aot.libtpu_installed(), reason="libtpu (the aot extra) is not installed")


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the compile targets the topology's devices, not simulated CPUs
    return env


def test_topology_names_are_checked_with_the_fix():
    with pytest.raises(UserError, match=r"v5p:4x4x4"):
        aot.topology_devices("v5p-128")  # gcloud's accelerator type, not a topology
    with pytest.raises(UserError, match=r"chip v5p, v6e or v5e"):
        aot.topology_devices("v4:2x2x2")


def test_missing_libtpu_names_the_extra(monkeypatch):
    monkeypatch.setattr(aot, "libtpu_installed", lambda: False)
    with pytest.raises(UserError, match=r"pip install -e '\.\[aot\]'"):
        aot.topology_devices("v5p:2x2x2")


def test_benchmark_aot_without_topology_is_one_line():
    res = subprocess.run([sys.executable, "-m", "simvlm_jax.benchmark", "aot", "--gin_file=gin/runs/bench_step.gin",
                          "--gin_file=gin/models/simvlm_tiny.gin"], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: benchmark aot needs --topology"), res.stderr


def _documented_command() -> list[str]:
    """docs/cluster.md's `benchmark aot` command, with the tiny model on an 8-chip slice."""
    with open(os.path.join(ROOT, "docs", "cluster.md"), encoding="utf-8") as f:
        text = re.sub(r"\\\n\s*", " ", f.read())
    line = next(l for l in text.splitlines() if l.startswith("python -m simvlm_jax.benchmark aot "))
    line = (line.replace("--topology=v5p:4x4x4", "--topology=v5p:2x2x2").replace("simvlm_base.gin", "simvlm_tiny.gin")
            .replace("--batch_size=4608", "--batch_size=64"))
    return [sys.executable, *shlex.split(line)[1:]]


@pytest.mark.slow
@needs_libtpu
def test_documented_aot_command_compiles_the_train_step_for_a_tpu_slice():
    """The command of docs/cluster.md (tests/test_docs.py leaves it to this test), tiny model."""
    cmd = _documented_command()
    assert "--topology=v5p:2x2x2" in cmd and "--gin.make_mesh.fsdp=-1" in cmd, cmd
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["chip"] == "v5p" and out["chips"] == 8 and out["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert out["fits"] and 0 < out["peak_bytes"] < out["hbm_bytes"] == 95 * 2 ** 30
    # FSDP over 8 chips: each holds about an eighth of the params (fp32) and of Adam's two moments.
    assert out["params_bytes"] < out["num_params"] * 4 / 4
    assert out["opt_state_bytes"] < out["num_params"] * 8 / 4
    assert out["estimated_step_sec"] > 0 and 0 < out["estimated_mfu"] < 1
    assert "fits" in res.stderr and "WARNING" not in res.stderr  # libtpu's start-up noise is silenced


def test_every_chip_has_hbm_and_peak_figures():
    class Device:  # what a topology's device reports
        def __init__(self, kind):
            self.device_kind = kind
    assert aot.chip_info(Device("TPU v5")) == ("v5p", 95 * 2 ** 30, 459e12)
    assert aot.chip_info(Device("TPU v6 lite")) == ("v6e", 32 * 2 ** 30, 918e12)
    assert aot.chip_info(Device("TPU v5 lite")) == ("v5e", 16 * 2 ** 30, 197e12)
    with pytest.raises(UserError, match="TPU v4"):
        aot.chip_info(Device("TPU v4"))
