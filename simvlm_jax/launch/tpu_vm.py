"""tpu-vm: a Cloud TPU VM slice through gcloud: create it (on demand, spot, or a queued resource),
ship the code (or pull an image) to every worker, start the run on all workers at once.

Every worker first kills the processes still holding the TPU (`fuser -k` on /dev/accel* and
/dev/vfio/*) and removes /tmp/libtpu_lockfile (a crashed run leaves both, and the next one then
fails with "TPU in use"). Each worker writes its own log, ~/simvlm_logs/<name>-worker<N>.log,
copies it to WORK_DIR/logs/ at the end, prefixes its streamed lines with `[worker N]` and prints
`[worker N] FAILED ...` when it fails.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import shlex

from simvlm_jax.cli import UserError
from simvlm_jax.launch import common, tpus
from simvlm_jax.launch.common import Command, File, Plan

METADATA_WORKER = ("http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
                   "agent-worker-number")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tpu_type", required=True, help="accelerator type, e.g. v5p-16, v5litepod-16, v6e-16")
    p.add_argument("--zone", required=True, help="e.g. us-east5-a")
    p.add_argument("--project", default=None, help="GCP project (default: gcloud's configured one)")
    p.add_argument("--runtime_version", default=None, help="TPU VM image (default: the generation's)")
    p.add_argument("--spot", action="store_true", help="spot capacity (preemptible; resume from the checkpoint)")
    p.add_argument("--queued", action="store_true",
                   help="request the slice as a queued resource and wait until it is ACTIVE")
    p.add_argument("--reserved", action="store_true", help="use the project's reservation (needs --queued)")
    p.add_argument("--skip_create", action="store_true", help="the slice exists already: only ship and run")
    p.add_argument("--delete_after", action="store_true",
                   help="delete the slice when the run ends, also when it failed")
    p.add_argument("--image", default=None,
                   help="container image to run (built from launch/docker/Dockerfile.tpu); default: copy this "
                        "checkout to every worker and pip install it there")


def _gcloud(*words: str, args: argparse.Namespace) -> list[str]:
    argv = ["gcloud", "compute", "tpus", *words, f"--zone={args.zone}"]
    return argv + ([f"--project={args.project}"] if args.project else [])


def _ssh(args: argparse.Namespace, command: str) -> list[str]:
    return _gcloud("tpu-vm", "ssh", args.name, args=args) + ["--worker=all", f"--command={command}"]


def _setup_script(args: argparse.Namespace, jax_version: str) -> str:
    if args.image:
        registry = args.image.split("/")[0]
        body = [f"sudo gcloud auth configure-docker {shlex.quote(registry)} --quiet",
                f"sudo docker pull {shlex.quote(args.image)}"]
    else:
        body = ['rm -rf "$HOME/simvlm_jax" && mkdir -p "$HOME/simvlm_jax"',
                f'tar -xzf "$HOME/simvlm-{args.name}.tar.gz" -C "$HOME/simvlm_jax"',
                'python3 -m venv "$HOME/simvlm_venv"',
                f'"$HOME/simvlm_venv/bin/pip" install -q -e "$HOME/simvlm_jax[gcs]" "jax[tpu]=={jax_version}"']
    return "\n".join(["#!/bin/bash", f"# simvlm_jax.launch tpu-vm: set up one worker of {args.name}",
                      "set -euo pipefail", *body]) + "\n"


def _run_script(args: argparse.Namespace, bindings) -> str:
    main = common.main_args(args, bindings, ["--multihost"])
    if args.image:
        container = f"simvlm-{args.name}"
        run = [f"sudo docker rm -f {container} >/dev/null 2>&1",
               f"sudo docker run --rm --name {container} --privileged --net=host -v /tmp:/tmp "
               f"{shlex.quote(args.image)} \\\n    " + common.shell_join(["python3", *main])]
    else:
        run = ['cd "$HOME/simvlm_jax" || return', common.shell_join(["PYTHON", *main]).replace(
            "PYTHON", '"$HOME/simvlm_venv/bin/python"', 1)]
    logs = args.work_dir.rstrip("/") + "/logs/"
    copy = (f'gcloud storage cp "$LOG" {shlex.quote(logs)}' if args.work_dir.startswith("gs://")
            else f'mkdir -p {shlex.quote(logs)} && cp "$LOG" {shlex.quote(logs)}')
    return "\n".join([
        "#!/bin/bash",
        f"# simvlm_jax.launch tpu-vm: run {args.name} on one worker (every worker runs this at once)",
        "set -uo pipefail",
        f"W=$(curl -s -H Metadata-Flavor:Google {METADATA_WORKER})",
        "# A crashed run leaves processes holding the TPU and its lock file: clear both.",
        "sudo fuser -k -9 /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1",
        "sudo rm -f /tmp/libtpu_lockfile",
        'mkdir -p "$HOME/simvlm_logs"',
        f'LOG="$HOME/simvlm_logs/{args.name}-worker$W.log"',
        "run() {",
        *(f"  {line}" for line in run),
        "}",
        'run 2>&1 | tee "$LOG" | sed -u "s/^/[worker $W] /"',
        "rc=${PIPESTATUS[0]}",
        f'{copy} >/dev/null 2>&1 || echo "[worker $W] could not copy $LOG to {logs}"',
        'if [ "$rc" -ne 0 ]; then',
        f'  echo "[worker $W] FAILED with exit code $rc; full log: $LOG on worker $W and {logs}"',
        "fi",
        'exit "$rc"',
    ]) + "\n"


def plan(args: argparse.Namespace, bindings) -> Plan:
    if args.reserved and not args.queued:
        raise UserError("--reserved needs --queued (reservations are used through queued resources)")
    if args.reserved and args.spot:
        raise UserError("--spot and --reserved exclude each other: choose one capacity type")
    if args.skip_create and (args.queued or args.spot or args.reserved):
        raise UserError("--skip_create uses the existing slice: drop --queued/--spot/--reserved")
    if not (args.work_dir.startswith("gs://") or args.work_dir.startswith("/")):
        raise UserError(f"--work_dir={args.work_dir!r}: every worker must see it: use gs://bucket/path "
                        f"(or an absolute path on a filesystem mounted on all workers)")
    sl = tpus.parse_slice(args.tpu_type)
    version = args.runtime_version or sl.runtime_version
    jax_version = importlib.metadata.version("jax")
    plan = Plan("tpu-vm", notes=[f"{sl.accelerator_type}: {sl.chips} chips, {sl.hosts} workers x "
                                 f"{sl.chips_per_host} chips, topology {sl.topology}",
                                 f"worker logs: ~/simvlm_logs/{args.name}-worker<N>.log on each worker, copied to "
                                 f"{args.work_dir.rstrip('/')}/logs/"])
    steps = plan.steps
    if not args.skip_create:
        if args.queued:
            create = _gcloud("queued-resources", "create", args.name, args=args) + [
                f"--node-id={args.name}", f"--accelerator-type={sl.accelerator_type}",
                f"--runtime-version={version}"]
            create += ["--spot"] if args.spot else ["--reserved"] if args.reserved else []
            steps.append(Command("Request the slice (queued resource)", create))
            describe = shlex.join(_gcloud("queued-resources", "describe", args.name, args=args)
                                  + ["--format=value(state.state)"])
            wait = (f"while true; do s=$({describe}); echo \"queued resource {args.name}: $s\"; "
                    f"case \"$s\" in ACTIVE) exit 0;; FAILED|SUSPENDED) exit 1;; esac; sleep 60; done")
            steps.append(Command("Wait until the queued resource is ACTIVE", ["bash", "-c", wait]))
        else:
            create = _gcloud("tpu-vm", "create", args.name, args=args) + [
                f"--accelerator-type={sl.accelerator_type}", f"--version={version}"]
            steps.append(Command("Create the slice", create + (["--spot"] if args.spot else [])))
    files = [os.path.join(common.out_dir(args), f"simvlm-{args.name}-{kind}.sh") for kind in ("setup", "run")]
    steps.append(File("Worker set-up script", files[0], _setup_script(args, jax_version), mode=0o755))
    steps.append(File("Worker run script", files[1], _run_script(args, bindings), mode=0o755))
    if not args.image:
        archive = os.path.join(common.out_dir(args), f"simvlm-{args.name}.tar.gz")
        repo = os.path.relpath(common.REPO_ROOT)
        excludes = [f"--exclude=./{d}" for d in (".git", ".venv", "launch_out", "demo_out")]
        excludes += ["--exclude=__pycache__", "--exclude=*.egg-info"]
        steps.append(Command("Pack this checkout", ["tar", "-czf", archive, *excludes, "-C", repo, "."]))
        files.append(archive)
    steps.append(Command("Copy to every worker's home directory",
                         _gcloud("tpu-vm", "scp", *files, f"{args.name}:", args=args) + ["--worker=all"]))
    steps.append(Command("Set up every worker" + (" (pull the image)" if args.image else " (install)"),
                         _ssh(args, f"bash simvlm-{args.name}-setup.sh")))
    steps.append(Command("Run on all workers at once (stale TPU processes and lock file cleared first)",
                         _ssh(args, f"bash simvlm-{args.name}-run.sh")))
    if args.delete_after:
        delete = (_gcloud("queued-resources", "delete", args.name, args=args) + ["--force", "--quiet"]
                  if args.queued else _gcloud("tpu-vm", "delete", args.name, args=args) + ["--quiet"])
        steps.append(Command("Delete the slice", delete, always=True))
    return plan
