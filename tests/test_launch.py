"""simvlm_jax.launch: `--dry_run` output of every target against tests/golden/launch/*.txt, the
one-line argument errors, and real (non-dry) execution against fake gcloud / xpk / docker /
kubectl / sbatch / tar executables that record their arguments.

Regenerate the golden files after an intended change (then review the diff):
    SIMVLM_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_launch.py
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from simvlm_jax.launch import __main__ as launch
from simvlm_jax.launch import tpus

GOLDEN_DIR = os.path.join(REPO_ROOT, "tests", "golden", "launch")
COMMON = ["--gin_file=gin/models/simvlm_base.gin", "--gin_file=gin/runs/pretrain.gin",
          "--gin.BATCH_SIZE=1024", "--gin.make_mesh.fsdp=-1"]

CASES = {
    "local": ["local", "--name=demo", "--gin_file=gin/demo.gin", "--gin.NUM_STEPS=20", "--python=python"],
    "tpu-vm": ["tpu-vm", "--name=simvlm-base", "--work_dir=gs://my-bucket/simvlm-base", "--tpu_type=v5p-16",
               "--zone=us-east5-a", "--project=my-project", "--queued", "--spot", "--delete_after", *COMMON],
    "tpu-vm-image": ["tpu-vm", "--name=simvlm-base", "--work_dir=gs://my-bucket/simvlm-base", "--tpu_type=v6e-16",
                     "--zone=us-east5-b", "--image=us-docker.pkg.dev/my-project/simvlm/simvlm:v1", *COMMON],
    "xpk": ["xpk", "--name=simvlm-base", "--work_dir=gs://my-bucket/simvlm-base", "--cluster=my-cluster",
            "--tpu_type=v5p-128", "--num_slices=2", "--image=us-docker.pkg.dev/my-project/simvlm/simvlm:v1",
            "--max_restarts=5", "--spot", "--project=my-project", "--zone=us-east5-a", *COMMON,
            "--gin.make_mesh.dcn_data=2"],
    "xpk-gpu": ["xpk", "--name=simvlm-base", "--work_dir=gs://my-bucket/simvlm-base", "--cluster=my-gpu-cluster",
                "--device_type=h100-80gb-8", "--num_nodes=4", "--image=us-docker.pkg.dev/my-project/simvlm/simvlm-gpu:v1",
                "--reservation=my-reservation", *COMMON],
    "xpk-jobset": ["xpk", "--jobset_only", "--name=simvlm-base", "--work_dir=gs://my-bucket/simvlm-base",
                   "--tpu_type=v5p-16", "--num_slices=2", "--image=us-docker.pkg.dev/my-project/simvlm/simvlm:v1",
                   "--skip_build", *COMMON, "--gin.make_mesh.dcn_data=2"],
    "slurm-container": ["slurm", "--name=simvlm-base", "--work_dir=/shared/runs/simvlm-base", "--nodes=4",
                        "--per_gpu", "--container_image=docker://ghcr.io#my-org/simvlm-gpu:v1",
                        "--container_mounts=/shared/data:/data", "--partition=gpu", "--account=my-account",
                        "--time=2-00:00:00", *COMMON],
    "slurm-venv": ["slurm", "--name=simvlm-base", "--work_dir=gs://my-bucket/simvlm-base", "--nodes=2",
                   "--venv=/shared/venvs/simvlm", *COMMON],
}


def _dry_run(argv, capsys) -> str:
    rc = launch.main([*argv, "--dry_run"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_dry_run_matches_golden(case, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # rendered paths are relative to the working directory
    out = _dry_run(CASES[case], capsys)
    path = os.path.join(GOLDEN_DIR, f"{case}.txt")
    if os.environ.get("SIMVLM_UPDATE_GOLDEN"):
        os.makedirs(GOLDEN_DIR, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(out)
    with open(path, encoding="utf-8") as f:
        assert out == f.read(), (f"{case}: --dry_run output changed; if intended, regenerate with "
                                 f"SIMVLM_UPDATE_GOLDEN=1 (see this file's docstring) and review the diff")


def test_dry_run_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for case in ("tpu-vm", "xpk-jobset", "slurm-venv", "local"):
        _dry_run(CASES[case], capsys)
    assert os.listdir(tmp_path) == []


def test_dry_run_through_python_m(tmp_path):
    """The documented entry point, in a fresh interpreter."""
    res = subprocess.run([sys.executable, "-m", "simvlm_jax.launch", *CASES["slurm-venv"], "--dry_run"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    with open(os.path.join(GOLDEN_DIR, "slurm-venv.txt"), encoding="utf-8") as f:
        assert res.stdout == f.read()


def _bash_blocks(text: str) -> list[str]:
    """The files a dry run shows (cat > ... <<'EOF' ... EOF)."""
    blocks, lines = [], iter(text.splitlines())
    for line in lines:
        if line.startswith("cat > ") and line.endswith("<<'EOF'"):
            body = []
            for inner in lines:
                if inner == "EOF":
                    break
                body.append(inner)
            blocks.append((line.split()[2], "\n".join(body) + "\n"))
    return blocks


def test_rendered_files_are_valid(capsys):
    """Scripts parse as bash (shellcheck, when installed, checks them in test_shellcheck.py), the
    JobSet manifest parses as YAML with the counts JobSet needs."""
    yaml = pytest.importorskip("yaml")
    seen = 0
    for case in CASES:
        for path, body in _bash_blocks(_dry_run(CASES[case], capsys)):
            if path.endswith((".sh", ".sbatch")):
                res = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True)
                assert res.returncode == 0, (case, path, res.stderr)
            else:
                doc = yaml.safe_load(body)
                job = doc["spec"]["replicatedJobs"][0]
                assert doc["kind"] == "JobSet" and job["replicas"] == 2
                assert job["template"]["spec"]["parallelism"] == 2  # v5p-16: 2 hosts per slice
                env = {e["name"]: e.get("value") for e in job["template"]["spec"]["template"]["spec"]["containers"][0]["env"]}
                assert env["SIMVLM_NUM_PROCESSES"] == "4" and env["SIMVLM_PROCESSES_PER_JOB"] == "2"
            seen += 1
    assert seen == 7


def test_commands_round_trip_through_the_shell(capsys):
    """Every rendered command line is valid shell that splits back into the planned argv."""
    from simvlm_jax.launch import common
    for case, argv in CASES.items():
        args, bindings = common.parse(argv, launch.TARGETS)
        plan = launch.TARGETS[args.target].plan(args, bindings)
        for step in plan.steps:
            if isinstance(step, common.Command):
                text = common.shell_join(step.argv, step.env)
                words = shlex.split(text.replace("\\\n", " "))
                assert words == [f"{k}={v}" for k, v in step.env.items()] + step.argv, (case, step.title)


def test_local_processes_keep_the_callers_other_xla_flags():
    """`local` sets each process's device count; the caller's other XLA flags are passed on."""
    from simvlm_jax.launch import local
    step_env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env = local.process_env(step_env, {"PATH": "/bin", "XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                                                                    "--xla_backend_optimization_level=0"})
    assert env == {"PATH": "/bin", "JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=4"}
    assert local.process_env(step_env, {"PATH": "/bin"}) == {"PATH": "/bin", **step_env}


@pytest.mark.parametrize("argv, message", [
    ([], "the first argument is the target, one of tpu-vm, xpk, slurm, local"),
    (["gke", "--name=a"], "the first argument is the target"),
    (["local", "--name=A_b", "--gin_file=gin/demo.gin"], "--name='A_b': use 1-40 lower case letters"),
    (["local", "--name=a"], "no --gin_file given"),
    (["local", "--name=a", "--gin_file=x.gin", "--gin.WORK_DIR='/x'"], "set the run's WORK_DIR with --work_dir"),
    (["local", "--name=a", "--gin_file=x.gin", "--bogus=1"], "unknown argument(s) for local: --bogus=1"),
    (["local", "--name=a", "--gin_file=x.gin", "--mode=fit"], "--mode='fit': choose from"),
    (["tpu-vm", "--name=a", "--gin_file=x.gin", "--work_dir=gs://b", "--tpu_type=v5p-12", "--zone=z"],
     "--tpu_type='v5p-12': not a slice size this launcher knows; choose from v5p-8, v5p-16"),
    (["tpu-vm", "--name=a", "--gin_file=x.gin", "--work_dir=gs://b", "--tpu_type=v9-8", "--zone=z"],
     "expected <generation>-<size>"),
    (["tpu-vm", "--name=a", "--gin_file=x.gin", "--work_dir=gs://b", "--tpu_type=v5p-8", "--zone=z", "--reserved"],
     "--reserved needs --queued"),
    (["tpu-vm", "--name=a", "--gin_file=x.gin", "--work_dir=gs://b", "--tpu_type=v5p-8", "--zone=z", "--queued",
      "--reserved", "--spot"], "--spot and --reserved exclude each other"),
    (["tpu-vm", "--name=a", "--gin_file=x.gin", "--work_dir=runs/a", "--tpu_type=v5p-8", "--zone=z"],
     "every worker must see it: use gs://bucket/path"),
    (["xpk", "--name=a", "--gin_file=x.gin", "--work_dir=gs://b", "--tpu_type=v5p-8", "--image=i"],
     "--cluster is required"),
    (["xpk", "--name=a", "--gin_file=x.gin", "--work_dir=/shared", "--tpu_type=v5p-8", "--image=i", "--cluster=c"],
     "pods share no filesystem: use gs://"),
    (["xpk", "--name=a", "--gin_file=x.gin", "--work_dir=gs://b", "--device_type=tpu7-8", "--image=i",
      "--cluster=c"], "expected a GPU node type like h100-80gb-8"),
    (["xpk", "--name=a", "--gin_file=x.gin", "--work_dir=gs://b", "--device_type=h100-80gb-8", "--image=i",
      "--cluster=c", "--num_slices=2"], "--num_slices is for --tpu_type"),
    (["slurm", "--name=a", "--gin_file=x.gin", "--work_dir=gs://b", "--nodes=2", "--venv=venv"],
     "--venv='venv': give the absolute path"),
    (["slurm", "--name=a", "--gin_file=x.gin", "--work_dir=gs://b", "--nodes=2", "--venv=/v", "--time=1 day"],
     "--time='1 day': use HH:MM:SS"),
    (["slurm", "--name=a", "--gin_file=x.gin", "--work_dir=run", "--nodes=2", "--venv=/v"],
     "every node must see it"),
    (["local", "--name=a", "--gin_file=x.gin", "--num_processes=0"], "--num_processes and --devices_per_process"),
    (["local", "--name=a", "--gin_file=gin/no_such.gin"], "gin file not found: gin/no_such.gin"),
])
def test_argument_errors_are_one_line_and_name_the_fix(argv, message, capsys):
    rc = launch.main([*argv, "--dry_run"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        launch.main(["slurm", "--name=a", "--gin_file=x.gin", "--work_dir=/w", "--nodes=2", "--dry_run"])
    assert e.value.code == 2
    assert "one of the arguments --container_image --venv is required" in capsys.readouterr().err


@pytest.mark.parametrize("accel, chips, hosts, topology", [
    ("v5p-8", 4, 1, "2x2x1"), ("v5p-16", 8, 2, "2x2x2"), ("v5p-128", 64, 16, "4x4x4"), ("v4-32", 16, 4, "2x2x4"),
    ("v5litepod-8", 8, 1, "2x4"), ("v5litepod-16", 16, 4, "4x4"), ("v6e-256", 256, 64, "16x16"), ("v6e-1", 1, 1, "1x1"),
])
def test_slice_shapes(accel, chips, hosts, topology):
    sl = tpus.parse_slice(accel)
    assert (sl.chips, sl.hosts, sl.topology) == (chips, hosts, topology)
    assert sl.hosts * sl.chips_per_host == sl.chips


FAKE = """#!/bin/bash
echo "$(basename "$0") $*" >> "$FAKE_LOG"
case "$(basename "$0") $*" in
  *"$FAKE_FAIL"*) exit 3;;
  *"queued-resources describe"*) echo ACTIVE;;
esac
exit 0
"""


@pytest.fixture
def fake_tools(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "xpk", "docker", "kubectl", "sbatch", "tar"):
        (bin_dir / tool).write_text(FAKE)
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_FAIL", "no-such-call")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return lambda: log.read_text().splitlines() if log.exists() else []


def test_tpu_vm_runs_every_step_in_order(fake_tools, capsys):
    assert launch.main(CASES["tpu-vm"]) == 0
    calls = fake_tools()
    assert [c.split()[:5] for c in calls] == [
        ["gcloud", "compute", "tpus", "queued-resources", "create"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe"],
        ["tar", "-czf", "launch_out/simvlm-base/simvlm-simvlm-base.tar.gz", "--exclude=./.git", "--exclude=./.venv"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
        ["gcloud", "compute", "tpus", "queued-resources", "delete"],
    ]
    assert calls[-2].endswith("--worker=all --command=bash simvlm-simvlm-base-run.sh")
    # The rendered worker scripts were written, executable.
    run_sh = os.path.join("launch_out", "simvlm-base", "simvlm-simvlm-base-run.sh")
    assert os.access(run_sh, os.X_OK) and "rm -f /tmp/libtpu_lockfile" in open(run_sh).read()


def test_a_failed_step_stops_the_run_but_the_slice_is_deleted(fake_tools, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "--command=bash simvlm-simvlm-base-run.sh")  # the run on the workers fails
    assert launch.main(CASES["tpu-vm"]) == 1
    err = capsys.readouterr().err
    assert "error: step 8 (Run on all workers at once" in err and "exit code 3" in err
    calls = fake_tools()
    assert calls[-2].endswith("--command=bash simvlm-simvlm-base-run.sh")
    assert calls[-1].startswith("gcloud compute tpus queued-resources delete simvlm-base")


def test_a_missing_tool_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bin").mkdir()
    os.symlink(shutil.which("mkdir"), tmp_path / "bin" / "mkdir")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # mkdir, but no sbatch
    assert launch.main(CASES["slurm-venv"]) == 1
    err = capsys.readouterr().err
    assert "sbatch is not installed or not on PATH" in err
    assert os.path.exists(os.path.join("launch_out", "simvlm-base", "simvlm-base.sbatch"))


def test_xpk_and_slurm_submit(fake_tools, capsys):
    assert launch.main(CASES["xpk"]) == 0
    assert launch.main(CASES["xpk-jobset"]) == 0
    assert launch.main(CASES["slurm-container"]) == 0
    calls = fake_tools()
    assert [c.split()[:2] for c in calls] == [["docker", "build"], ["docker", "push"], ["xpk", "workload"],
                                             ["kubectl", "apply"], ["sbatch", "launch_out/simvlm-base/simvlm-base.sbatch"]]
    assert "--max-restarts=5 --spot" in calls[2]
    assert os.path.isdir(os.path.join("launch_out", "simvlm-base", "logs"))
    assert shutil.which("sbatch")  # the fake one: nothing real was submitted
