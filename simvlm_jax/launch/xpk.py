"""xpk: GKE through xpk (PyPI `xpk`): build and push the image, `xpk workload create` on an
existing xpk cluster; with --jobset_only, a plain JobSet manifest and `kubectl apply` instead.

The image comes from launch/docker/Dockerfile.tpu (TPU) or Dockerfile.gpu (--device_type). In a
JobSet pod, simvlm_jax.distributed takes process ids from the pod's hostname and
JOB_COMPLETION_INDEX and the counts from SIMVLM_NUM_PROCESSES / SIMVLM_PROCESSES_PER_JOB, which
the manifest sets. Logs: `kubectl logs` / Cloud Logging per pod; checkpoints and TensorBoard in
WORK_DIR (gs://). A failed pod restarts the whole JobSet up to --max_restarts times, and each
restart resumes from WORK_DIR's latest checkpoint.
"""
from __future__ import annotations

import argparse
import os
import re

from simvlm_jax.cli import UserError
from simvlm_jax.launch import common, tpus
from simvlm_jax.launch.common import Command, File, Plan

COORDINATOR_PORT = 1234


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", default=None, help="the xpk cluster (not needed with --jobset_only)")
    dev = p.add_mutually_exclusive_group(required=True)
    dev.add_argument("--tpu_type", default=None, help="e.g. v5p-16 (one slice)")
    dev.add_argument("--device_type", default=None, help="GPU nodes, e.g. h100-80gb-8 (xpk's device type)")
    p.add_argument("--num_slices", type=int, default=1, help="TPU slices (multislice over DCN)")
    p.add_argument("--num_nodes", type=int, default=1, help="GPU nodes")
    p.add_argument("--image", required=True, help="image to build and push, e.g. us-docker.pkg.dev/PROJECT/REPO/simvlm:TAG")
    p.add_argument("--skip_build", action="store_true", help="the image is pushed already")
    p.add_argument("--max_restarts", type=int, default=3,
                   help="restarts of the whole workload after a failure or preemption (each resumes from the "
                        "latest checkpoint)")
    cap = p.add_mutually_exclusive_group()
    cap.add_argument("--spot", action="store_true", help="spot capacity")
    cap.add_argument("--reservation", default=None, help="a reservation's name")
    cap.add_argument("--on_demand", action="store_true", help="on-demand capacity")
    p.add_argument("--project", default=None)
    p.add_argument("--zone", default=None)
    p.add_argument("--jobset_only", action="store_true",
                   help="plain GKE: write a JobSet manifest and `kubectl apply` it instead of using xpk")


def _gpu(device_type: str) -> tuple[str, int]:
    m = re.fullmatch(r"([a-z0-9]+(?:-[a-z0-9]+)*?)-(\d+)", device_type)
    if not m or not re.match(r"^(h100|h200|a100|b200|l4)", device_type):
        raise UserError(f"--device_type={device_type!r}: expected a GPU node type like h100-80gb-8 "
                        f"(<gpu>-<gpus per node>)")
    return f"nvidia-{m.group(1)}", int(m.group(2))


def _container_command(args: argparse.Namespace, bindings) -> str:
    main = common.quote_join(["python3", *common.main_args(args, bindings, ["--multihost"])])
    return f"source launch/gpu_env.sh && {main}" if args.device_type else main


def manifest(args: argparse.Namespace, bindings) -> str:
    """A JobSet: one replicated job `slice` of --num_slices jobs (TPU) or one job of --num_nodes
    pods (GPU), one pod per host."""
    if args.tpu_type:
        sl = tpus.parse_slice(args.tpu_type)
        jobs, per_job = args.num_slices, sl.hosts
        selector = {"cloud.google.com/gke-tpu-accelerator": sl.gke_accelerator,
                    "cloud.google.com/gke-tpu-topology": sl.topology}
        limits = {"google.com/tpu": sl.chips_per_host}
    else:
        accel, gpus = _gpu(args.device_type)
        jobs, per_job = 1, args.num_nodes
        selector = {"cloud.google.com/gke-accelerator": accel}
        limits = {"nvidia.com/gpu": gpus}
    if args.spot:
        selector["cloud.google.com/gke-spot"] = "true"
    if args.reservation:
        selector["cloud.google.com/reservation-name"] = args.reservation
    env = {"SIMVLM_NUM_PROCESSES": str(jobs * per_job), "SIMVLM_PROCESSES_PER_JOB": str(per_job),
           "SIMVLM_COORDINATOR_PORT": str(COORDINATOR_PORT)}
    if args.tpu_type and jobs > 1:
        env.update({"MEGASCALE_COORDINATOR_ADDRESS": f"{args.name}-slice-0-0.{args.name}",
                    "MEGASCALE_NUM_SLICES": str(jobs)})
    q = lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'  # noqa: E731  YAML double-quoted
    lines = [
        "apiVersion: jobset.x-k8s.io/v1alpha2",
        "kind: JobSet",
        "metadata:",
        f"  name: {args.name}",
        "  annotations:",
        "    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool",
        "spec:",
        "  failurePolicy:",
        f"    maxRestarts: {args.max_restarts}",
        "  network:",
        "    enableDNSHostnames: true",
        "  replicatedJobs:",
        "  - name: slice",
        f"    replicas: {jobs}",
        "    template:",
        "      spec:",
        f"        parallelism: {per_job}",
        f"        completions: {per_job}",
        "        completionMode: Indexed",
        "        backoffLimit: 0",
        "        template:",
        "          spec:",
        "            restartPolicy: Never",
        "            nodeSelector:",
        *[f"              {k}: {q(v)}" for k, v in selector.items()],
        "            containers:",
        "            - name: simvlm",
        f"              image: {args.image}",
        "              workingDir: /workspace",
        "              command: [\"bash\", \"-c\"]",
        f"              args: [{q(_container_command(args, bindings))}]",
        "              ports:",
        f"              - containerPort: {COORDINATOR_PORT}",
        "              env:",
        *[f"              - {{name: {k}, value: {q(v)}}}" for k, v in env.items()],
    ]
    if args.tpu_type and jobs > 1:
        lines.append("              - name: MEGASCALE_SLICE_ID\n"
                     "                valueFrom:\n"
                     "                  fieldRef:\n"
                     "                    fieldPath: metadata.annotations['jobset.sigs.k8s.io/job-index']")
    lines += ["              resources:", "                limits:", *[f"                  {k}: {v}" for k, v in limits.items()]]
    return "\n".join(lines) + "\n"


def plan(args: argparse.Namespace, bindings) -> Plan:
    if not args.work_dir.startswith("gs://"):
        raise UserError(f"--work_dir={args.work_dir!r}: pods share no filesystem: use gs://bucket/path")
    if not args.jobset_only and not args.cluster:
        raise UserError("--cluster is required (the xpk cluster's name), or --jobset_only for plain GKE")
    if args.max_restarts < 0:
        raise UserError("--max_restarts must be >= 0")
    if args.tpu_type:
        sl = tpus.parse_slice(args.tpu_type)
        if args.num_nodes != 1:
            raise UserError("--num_nodes is for --device_type (GPU); TPU slices: --num_slices")
        note = (f"{args.num_slices} x {sl.accelerator_type}: {sl.hosts} hosts x {sl.chips_per_host} chips per slice, "
                f"topology {sl.topology}")
        dockerfile = "launch/docker/Dockerfile.tpu"
    else:
        accel, gpus = _gpu(args.device_type)
        if args.num_slices != 1:
            raise UserError("--num_slices is for --tpu_type; GPU nodes: --num_nodes")
        note = f"{args.num_nodes} x {args.device_type}: {args.num_nodes * gpus} GPUs ({accel})"
        dockerfile = "launch/docker/Dockerfile.gpu"
    plan = Plan("xpk", notes=[note])
    if not args.skip_build:
        repo = os.path.relpath(common.REPO_ROOT)
        plan.steps.append(Command("Build the image", ["docker", "build", "-f", os.path.join(repo, dockerfile),
                                                     "-t", args.image, repo]))
        plan.steps.append(Command("Push it", ["docker", "push", args.image]))
    if args.jobset_only:
        path = os.path.join(common.out_dir(args), "jobset.yaml")
        plan.steps.append(File("JobSet manifest", path, manifest(args, bindings)))
        plan.steps.append(Command("Submit it", ["kubectl", "apply", "-f", path]))
        plan.notes.append(f"follow: kubectl logs -f -l jobset.sigs.k8s.io/jobset-name={args.name} --prefix")
        return plan
    create = ["xpk", "workload", "create", f"--cluster={args.cluster}", f"--workload={args.name}",
              f"--docker-image={args.image}"]
    if args.tpu_type:
        create += [f"--tpu-type={args.tpu_type}", f"--num-slices={args.num_slices}"]
    else:
        create += [f"--device-type={args.device_type}", f"--num-nodes={args.num_nodes}"]
    create += [f"--max-restarts={args.max_restarts}"]
    create += ["--spot"] if args.spot else [f"--reservation={args.reservation}"] if args.reservation else (
        ["--on-demand"] if args.on_demand else [])
    create += [f"--project={args.project}"] if args.project else []
    create += [f"--zone={args.zone}"] if args.zone else []
    create += [f"--command={_container_command(args, bindings)}"]
    plan.steps.append(Command("Create the workload", create))
    return plan
