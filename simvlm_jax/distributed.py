"""Multi-process start-up that never hangs silently.

`resolve(...)` finds the coordinator address, the process count and this process's id, in
this order, from
  flags    --coordinator_address/--num_processes/--process_id (all three)
  slurm    SLURM_JOB_ID, SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST), SLURM_NTASKS, SLURM_PROCID
           (one process per srun task; one per GPU when a node runs several tasks)
  jobset   a JobSet pod (GKE, rendered by `python -m simvlm_jax.launch xpk --jobset_only`):
           hostname <jobset>-<replicatedjob>-<job>-<pod>, JOB_COMPLETION_INDEX and
           SIMVLM_PROCESSES_PER_JOB / SIMVLM_NUM_PROCESSES from the manifest
  tpu      a TPU VM or GKE TPU pod: JAX's own detection (metadata server or TPU_WORKER_HOSTNAMES)
and otherwise fails with one line naming the missing variable. Before calling
`jax.distributed.initialize` it refuses a coordinator that resolves to loopback on a host
that is not the coordinator (processes elsewhere could never reach it: the classic silent
hang), and it passes an initialization timeout longer than JAX's 300 s default (cold starts
of big slices, image pulls) and a heartbeat timeout: when a peer dies, the others exit
non-zero within about that many seconds instead of waiting forever.
"""
from __future__ import annotations

import dataclasses
import glob
import ipaddress
import logging
import os
import re
import socket
from typing import Callable, Mapping, Sequence

DEFAULT_INIT_TIMEOUT_S = 900  # JAX's default is 300 s
DEFAULT_HEARTBEAT_TIMEOUT_S = 100
JOBSET_PORT = 1234


class DistributedError(ValueError):
    """A start-up setting that cannot work; printed as one line."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `jax.distributed.initialize` receives. `coordinator_address=None` (source `tpu`)
    lets JAX detect the TPU cluster itself."""
    source: str
    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None = None

    def kwargs(self) -> dict:
        out = dict(coordinator_address=self.coordinator_address, num_processes=self.num_processes,
                   process_id=self.process_id)
        if self.local_device_ids is not None:
            out["local_device_ids"] = list(self.local_device_ids)
        return out


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: 'gpu[003-007,012],cpu1' -> 'gpu003'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m or not m.group(1):
        raise DistributedError(f"cannot parse the SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + re.split(r"[,-]", ranges)[0]


def slurm_port(job_id: str) -> int:
    """The port JAX's own SLURM detection uses (so both agree): 61440 + job id mod 4096."""
    return int(job_id) % 4096 + 65535 - 4096 + 1


def _int_env(env: Mapping[str, str], name: str, source: str) -> int:
    if name not in env:
        raise DistributedError(_missing(name, source))
    try:
        return int(env[name])
    except ValueError:
        raise DistributedError(f"{name}={env[name]!r} is not an integer ({source})") from None


def _missing(name: str, source: str) -> str:
    hints = {
        "slurm": "run one process per task with srun inside the allocation (the sbatch script itself "
                 "runs once, on the first node): see `python -m simvlm_jax.launch slurm --dry_run`",
        "jobset": "set it in the pod spec (the manifest from `python -m simvlm_jax.launch xpk "
                  "--jobset_only` does)",
    }
    return f"{name} is not set, needed to start the {source} job: {hints[source]}"


def _from_flags(coordinator_address, num_processes, process_id) -> Plan:
    given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
             "--process_id": process_id}
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise DistributedError(f"{', '.join(missing)} not given: pass all of --coordinator_address=HOST:PORT, "
                               f"--num_processes=N and --process_id=I, or none (auto-detection)")
    if ":" not in coordinator_address.rsplit("]", 1)[-1]:
        raise DistributedError(f"--coordinator_address={coordinator_address!r} has no port: use HOST:PORT")
    return Plan("flags", coordinator_address, num_processes, process_id)


def _from_slurm(env: Mapping[str, str]) -> Plan:
    job_id = env["SLURM_JOB_ID"]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise DistributedError(_missing("SLURM_STEP_NODELIST", "slurm"))
    num = _int_env(env, "SLURM_NTASKS", "slurm")
    pid = _int_env(env, "SLURM_PROCID", "slurm")
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    local_ids = None
    if num > nodes:  # several tasks per node: one process per GPU, each on its own GPU
        local_ids = (_int_env(env, "SLURM_LOCALID", "slurm"),)
        if len(env.get("CUDA_VISIBLE_DEVICES", "").split(",")) == 1 and env.get("CUDA_VISIBLE_DEVICES"):
            local_ids = None  # srun --gpus-per-task already bound one GPU to this task
    return Plan("slurm", f"{first_slurm_host(nodelist)}:{slurm_port(job_id)}", num, pid, local_ids)


JOBSET_HOST = re.compile(r"^(?P<jobset>[a-z0-9]([-a-z0-9]*[a-z0-9])?)-(?P<rjob>[a-z0-9]+)-(?P<job>\d+)-(?P<pod>\d+)$")


def _from_jobset(env: Mapping[str, str], hostname: str) -> Plan:
    short = hostname.split(".")[0]
    m = JOBSET_HOST.match(short)
    if not m:
        raise DistributedError(f"JOB_COMPLETION_INDEX is set but the hostname {short!r} is not a JobSet pod's "
                               f"(<jobset>-<replicated job>-<job index>-<pod index>): set "
                               f"spec.network.enableDNSHostnames (JobSet's default) or pass the flags")
    per_job = _int_env(env, "SIMVLM_PROCESSES_PER_JOB", "jobset")
    num = _int_env(env, "SIMVLM_NUM_PROCESSES", "jobset")
    pod = _int_env(env, "JOB_COMPLETION_INDEX", "jobset")
    pid = int(m.group("job")) * per_job + pod
    if pid >= num:
        raise DistributedError(f"process id {pid} (job {m.group('job')} x {per_job} + pod {pod}) is not below "
                               f"SIMVLM_NUM_PROCESSES={num}: the manifest's counts disagree")
    jobset = m.group("jobset")
    coordinator = f"{jobset}-{m.group('rjob')}-0-0.{jobset}:{env.get('SIMVLM_COORDINATOR_PORT', JOBSET_PORT)}"
    return Plan("jobset", coordinator, num, pid)


def _on_tpu_vm(env: Mapping[str, str]) -> bool:
    if env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES"):
        return True
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, env: Mapping[str, str] | None = None,
            hostname: str | None = None) -> Plan:
    """Where this process's peers are; raises DistributedError naming what is missing."""
    env = os.environ if env is None else env
    hostname = socket.gethostname() if hostname is None else hostname
    if any(v is not None for v in (coordinator_address, num_processes, process_id)):
        plan = _from_flags(coordinator_address, num_processes, process_id)
    elif "SLURM_JOB_ID" in env:
        plan = _from_slurm(env)
    elif "JOB_COMPLETION_INDEX" in env and ("SIMVLM_NUM_PROCESSES" in env or JOBSET_HOST.match(hostname.split(".")[0])):
        plan = _from_jobset(env, hostname)
    elif _on_tpu_vm(env):
        return Plan("tpu", None, None, None)
    else:
        raise DistributedError(
            "--multihost: no cluster found: pass --coordinator_address=HOST:PORT --num_processes=N "
            "--process_id=I, or run under SLURM srun (SLURM_JOB_ID is not set), a JobSet "
            "(JOB_COMPLETION_INDEX is not set) or on a TPU VM (no /dev/accel* or /dev/vfio/*, "
            "TPU_WORKER_HOSTNAMES is not set)")
    if plan.num_processes < 1 or not 0 <= plan.process_id < plan.num_processes:
        raise DistributedError(f"process id {plan.process_id} is not in [0, {plan.num_processes}) "
                               f"({plan.source}); check --process_id / --num_processes")
    return plan


def _split_host(address: str) -> str:
    host = address.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip.split("%")[0]).is_loopback
    except ValueError:
        return False


def _resolve_ips(host: str) -> list[str]:
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
    except socket.gaierror as e:
        raise DistributedError(f"the coordinator host {host!r} does not resolve on this host "
                               f"({socket.gethostname()}): {e.strerror}") from None


LOCAL_NAMES = ("localhost", "ip6-localhost", "ip6-loopback")


def check_coordinator(plan: Plan, hostname: str | None = None,
                      resolve_ips: Callable[[str], Sequence[str]] = _resolve_ips) -> None:
    """Refuses a multi-process coordinator that resolves to loopback on a host that is not the
    coordinator: that process would wait for a coordinator that is not there.

    `localhost`/127.0.0.1 written explicitly on the command line means "all processes on this
    machine" (the `local` launcher) and is accepted; a coordinator found in the SLURM/JobSet
    environment (other hosts by construction) never may be loopback."""
    if plan.coordinator_address is None or plan.num_processes is None or plan.num_processes <= 1:
        return
    hostname = socket.gethostname() if hostname is None else hostname
    host = _split_host(plan.coordinator_address)
    literal_local = host.lower() in LOCAL_NAMES or _is_loopback(host)
    if plan.source == "flags" and literal_local:
        return
    if literal_local:
        raise DistributedError(f"the coordinator {plan.coordinator_address} found from {plan.source} is a loopback "
                               f"address, but the {plan.num_processes} processes run on several hosts")
    short = host.split(".")[0].lower()
    if short == hostname.split(".")[0].lower():
        return  # this host is the coordinator: its service listens on every interface
    ips = resolve_ips(host)
    if ips and all(_is_loopback(ip) for ip in ips):
        raise DistributedError(
            f"the coordinator {plan.coordinator_address} ({plan.source}) resolves to loopback {', '.join(ips)} on "
            f"this host ({hostname}), which is not the coordinator: this process would wait for nothing. Fix the "
            f"name resolution (an /etc/hosts line mapping {host} to 127.x) or pass --coordinator_address="
            f"<routable IP>:<port>")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, init_timeout_s: int = DEFAULT_INIT_TIMEOUT_S,
               heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S) -> Plan:
    """Resolves, checks, calls `jax.distributed.initialize` and logs who this process is."""
    import jax  # pylint: disable=g-import-not-at-top

    if init_timeout_s <= 0 or heartbeat_timeout_s <= 0:
        raise DistributedError("--init_timeout and --heartbeat_timeout must be positive (seconds)")
    plan = resolve(coordinator_address, num_processes, process_id)
    check_coordinator(plan)
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or "force_host_platform" in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk through gloo
    logging.info("jax.distributed.initialize from %s: coordinator %s, process %s of %s (waits up to %d s for "
                 "all processes; a peer silent for %d s ends the run)", plan.source,
                 plan.coordinator_address or "auto", plan.process_id if plan.process_id is not None else "auto",
                 plan.num_processes or "auto", init_timeout_s, heartbeat_timeout_s)
    try:
        jax.distributed.initialize(**plan.kwargs(), initialization_timeout=init_timeout_s,
                                   heartbeat_timeout_seconds=heartbeat_timeout_s)
    except Exception as e:  # JAX's deadline error is a long C++ status; say what it means
        if "DEADLINE_EXCEEDED" in str(e) or "timed out" in str(e).lower():
            raise DistributedError(
                f"not all {plan.num_processes or ''} processes reached the coordinator "
                f"{plan.coordinator_address or '(auto)'} within {init_timeout_s} s (--init_timeout): a process did "
                f"not start, or the port is blocked; this is process {plan.process_id} on "
                f"{socket.gethostname()}") from e
        raise
    devices = jax.local_devices()
    logging.info("process %d of %d on host %s: %d local devices (%s), %d global", jax.process_index(),
                 jax.process_count(), socket.gethostname(), len(devices),
                 ", ".join(sorted({d.device_kind for d in devices})), jax.device_count())
    return plan
