"""slurm: an sbatch script for a SLURM GPU cluster, then `sbatch`: one process per node (all its
GPUs) or, with --per_gpu, one per GPU; in a pyxis/enroot container (--container_image) or from a
virtualenv on shared storage (--venv).

Each task writes its own log, <log_dir>/<name>-<job id>-task<N>.log (the batch script's own log:
<name>-<job id>.out). `srun --kill-on-bad-exit=1` ends every task as soon as one fails.
`--signal=TERM@120` makes the run save a checkpoint before the time limit; `--requeue` lets
SLURM restart a preempted job, which resumes from WORK_DIR's latest checkpoint. The XLA/NCCL
flags come from launch/gpu_env.sh (sourced in the script).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex

from simvlm_jax.cli import UserError
from simvlm_jax.launch import common
from simvlm_jax.launch.common import Command, File, Plan


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--per_gpu", action="store_true", help="one process per GPU instead of one per node")
    env = p.add_mutually_exclusive_group(required=True)
    env.add_argument("--container_image", default=None,
                     help="pyxis/enroot image (built from launch/docker/Dockerfile.gpu), e.g. "
                          "docker://ghcr.io#org/simvlm:tag or /shared/simvlm.sqsh")
    env.add_argument("--venv", default=None, help="a virtualenv with simvlm_jax[gcs] and jax[cuda12], on shared storage")
    p.add_argument("--container_mounts", default=None, help="extra pyxis mounts, SRC:DST[,SRC:DST]")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", default="24:00:00", help="time limit, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--log_dir", default=None, help="task logs (default <out_dir>/logs, on shared storage)")


def script(args: argparse.Namespace, bindings) -> str:
    tasks_per_node = args.gpus_per_node if args.per_gpu else 1
    log_dir = args.log_dir or os.path.join(common.out_dir(args), "logs")
    repo = os.path.relpath(common.REPO_ROOT)
    header = [f"--job-name={args.name}", f"--nodes={args.nodes}", f"--ntasks-per-node={tasks_per_node}",
              f"--gpus-per-node={args.gpus_per_node}", "--exclusive", f"--time={args.time}",
              f"--output={log_dir}/%x-%j.out", "--requeue", "--signal=TERM@120"]
    header += [f"--partition={args.partition}"] if args.partition else []
    header += [f"--account={args.account}"] if args.account else []
    srun = ["srun", "--kill-on-bad-exit=1", f"--output={log_dir}/%x-%j-task%t.log"]
    if args.container_image:
        mounts = [m for m in (args.container_mounts or "").split(",") if m]
        if args.work_dir.startswith("/"):
            mounts.append(f"{args.work_dir}:{args.work_dir}")
        srun += [f"--container-image={args.container_image}", "--container-workdir=/workspace"]
        srun += [f"--container-mounts={','.join(mounts)}"] if mounts else []
        run = srun + ["bash", "-c", "source launch/gpu_env.sh && exec python3 \"$@\"", "python3"]
        env_line = "# the container sources its launch/gpu_env.sh (XLA/NCCL flags) itself"
    else:
        run = srun + [os.path.join(args.venv, "bin", "python")]
        env_line = f"source {shlex.quote(os.path.join(repo, 'launch', 'gpu_env.sh'))}  # XLA/NCCL flags"
    run += common.main_args(args, bindings, ["--multihost"])
    lines = ["#!/bin/bash", *(f"#SBATCH {h}" for h in header),
             f"# {args.nodes} nodes x {args.gpus_per_node} GPUs, {args.nodes * tasks_per_node} processes "
             f"({'one per GPU' if args.per_gpu else 'one per node'})",
             "set -euo pipefail", env_line,
             'echo "job $SLURM_JOB_ID on $SLURM_JOB_NODELIST: task logs in ' + log_dir + '/"',
             common.shell_join(run)]
    return "\n".join(lines) + "\n"


def plan(args: argparse.Namespace, bindings) -> Plan:
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise UserError("--nodes and --gpus_per_node must be >= 1")
    if not re.fullmatch(r"(\d+-)?\d{1,3}(:\d{2}){0,2}", args.time):
        raise UserError(f"--time={args.time!r}: use HH:MM:SS or D-HH:MM:SS (SLURM's format)")
    if not (args.work_dir.startswith("gs://") or args.work_dir.startswith("/")):
        raise UserError(f"--work_dir={args.work_dir!r}: every node must see it: an absolute path on shared "
                        f"storage or gs://bucket/path")
    if args.venv and not args.venv.startswith("/"):
        raise UserError(f"--venv={args.venv!r}: give the absolute path of the virtualenv on shared storage")
    path = os.path.join(common.out_dir(args), f"{args.name}.sbatch")
    log_dir = args.log_dir or os.path.join(common.out_dir(args), "logs")
    tasks = args.nodes * (args.gpus_per_node if args.per_gpu else 1)
    plan = Plan("slurm", notes=[f"{tasks} processes on {args.nodes} nodes; follow: tail -f {log_dir}/{args.name}-*-task0.log"])
    plan.steps.append(File("The batch script", path, script(args, bindings), mode=0o755))
    plan.steps.append(Command("Create the log directory (sbatch does not)", ["mkdir", "-p", log_dir]))
    plan.steps.append(Command("Submit it", ["sbatch", path]))
    return plan
