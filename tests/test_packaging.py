"""The gin configs ship with the package: a plain (non-editable) `pip install .` finds them.

The slow test builds the wheel the way `pip install .` does (pip, isolated build with the
current setuptools) from a copy of the sources, installs it with --no-deps into a fresh
venv whose dependencies come from this interpreter's site-packages (a .pth file: installing
tensorflow/jax/... again would take minutes), and then, from a directory outside the repo,
checks that simvlm_jax comes from that venv and that its built-in gin files are found and
parse, includes and all.
"""
from __future__ import annotations

import glob
import os
import shutil
import site
import subprocess
import sys
import zipfile

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_GIN = os.path.join(REPO_ROOT, "gin")


def _repo_gin_files() -> list[str]:
    """Every .gin file under the repo's gin/, relative to it, with '/' separators."""
    paths = glob.glob(os.path.join(REPO_GIN, "**", "*.gin"), recursive=True)
    return sorted(os.path.relpath(p, REPO_GIN).replace(os.sep, "/") for p in paths)


def test_gin_dir_in_checkout(tmp_path, monkeypatch):
    from simvlm_jax import gin_files
    d = gin_files.gin_dir()
    assert os.path.isfile(os.path.join(d, "demo.gin"))
    assert os.path.isfile(os.path.join(d, "models", "simvlm_tiny.gin"))
    if os.path.abspath(gin_files.__file__).startswith(REPO_ROOT + os.sep):  # checkout / editable
        assert os.path.samefile(d, REPO_GIN)
    monkeypatch.chdir(tmp_path)  # resolves from any directory
    assert os.path.samefile(gin_files.resolve("demo.gin"), os.path.join(d, "demo.gin"))
    assert os.path.samefile(gin_files.resolve("gin/demo.gin"), os.path.join(d, "demo.gin"))
    assert os.path.samefile(gin_files.resolve("models/coca_tiny.gin"),
                            os.path.join(d, "models", "coca_tiny.gin"))
    assert gin_files.resolve("no_such_config.gin") is None
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x.gin").write_text("A = 1\n")
    assert gin_files.resolve("mine/x.gin") == "mine/x.gin"  # the path as given comes first
    assert gin_files.resolve("x.gin", [str(tmp_path / "mine")]) == str(tmp_path / "mine" / "x.gin")


_CHECK = r"""
import os, sys
import simvlm_jax
from simvlm_jax import gin_files, main
venv_site = sys.argv[1]
here = os.path.dirname(os.path.abspath(simvlm_jax.__file__))
assert here == os.path.join(venv_site, "simvlm_jax"), ("not the installed copy", here)
d = gin_files.gin_dir()
assert os.path.commonpath([d, here]) == here, ("gin_dir() is not inside the package", d)
for rel in sys.argv[2:]:
    assert os.path.isfile(os.path.join(d, rel)), ("missing", os.path.join(d, rel))
assert gin_files.resolve("demo.gin") == os.path.join(d, "demo.gin"), gin_files.resolve("demo.gin")
assert gin_files.resolve("gin/demo.gin") == os.path.join(d, "demo.gin")
import gin
main.load_gin([gin_files.resolve("demo.gin")], [], search_paths=[d])  # includes models/, data/, runs/
assert gin.query_parameter("SimVLMConfig.width") == 128  # from models/simvlm_tiny.gin
assert gin.query_parameter("%IMAGE_SIZE") == 64
assert gin.query_parameter("%NUM_STEPS") == 1200
# `python -m simvlm_jax.main --gin_file=demo.gin ...` from here: demo.gin is found (the error is
# about the bad binding, not a missing file).
import contextlib, io
gin.clear_config()
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = main.main(["--gin_file=demo.gin", "--gin.NoSuch.x=1"])
assert code == 2 and "NoSuch" in err.getvalue() and "not found" not in err.getvalue(), err.getvalue()
print("OK", d)
"""


@pytest.mark.slow
def test_non_editable_install_ships_gin_files(tmp_path):
    # 1. Build the wheel as `pip install .` does, from a copy (keeps build/ out of the repo).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "setup.cfg", "MANIFEST.in", "README.md"):
        if os.path.exists(os.path.join(REPO_ROOT, name)):
            shutil.copy2(os.path.join(REPO_ROOT, name), src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("simvlm_jax", "gin"):
        shutil.copytree(os.path.join(REPO_ROOT, name), src / name, ignore=ignore)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(src)],
                   check=True, timeout=300)
    (wheel,) = glob.glob(str(wheels / "simvlm_jax-*.whl"))
    expected = _repo_gin_files()
    assert "demo.gin" in expected and "models/simvlm_tiny.gin" in expected
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [rel for rel in expected if f"simvlm_jax/configs/{rel}" not in names]
    assert not missing, f"gin files missing from the wheel {os.path.basename(wheel)}: {missing}"

    # 2. A fresh venv; the dependencies come from this interpreter's site-packages.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    venv_site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip()
    deps = [p for p in dict.fromkeys([*site.getsitepackages(), site.getusersitepackages()])
            if os.path.isdir(p) and not os.path.samefile(p, venv_site)]
    with open(os.path.join(venv_site, "_simvlm_test_deps.pth"), "w") as f:
        f.write("".join(p + "\n" for p in deps))  # appended to sys.path, after venv_site
    subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", wheel],
                   check=True, timeout=300)

    # 3. From outside the repo: the installed package finds and parses its gin files.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    proc = subprocess.run([py, "-c", _CHECK, venv_site, *expected], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "OK " + os.path.join(venv_site, "simvlm_jax", "configs")
