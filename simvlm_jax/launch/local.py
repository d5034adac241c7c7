"""local: N processes on this machine, each with its own simulated CPU devices, talking through
jax.distributed on localhost: the same multi-process code path as a cluster (this is how the
tests rehearse multi-host).

Each process gets JAX_PLATFORMS=cpu and its device count in XLA_FLAGS; the caller's other XLA
flags (e.g. --xla_dump_to, --xla_backend_optimization_level) are passed on.

Process i writes <out_dir>/logs/process-<i>.log. When a process fails, the others get
--grace seconds to exit on their own (their heartbeat to the coordinator stops after
simvlm_jax.main's --heartbeat_timeout), then they are killed; the launcher names the failed
process, prints the end of its log and exits 1.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import zlib

from simvlm_jax.cli import UserError
from simvlm_jax.launch import common
from simvlm_jax.launch.common import Command, Plan


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num_processes", type=int, default=2)
    p.add_argument("--devices_per_process", type=int, default=4, help="simulated CPU devices per process")
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: fixed per --name)")
    p.add_argument("--python", default=sys.executable, help="the Python that runs simvlm_jax.main")
    p.add_argument("--grace", type=float, default=60.0,
                   help="seconds the other processes get to exit after one failed, before they are killed")
    p.add_argument("--heartbeat_timeout", type=int, default=30,
                   help="simvlm_jax.main --heartbeat_timeout: a process whose peer is silent this long exits")


def default_port(name: str) -> int:
    return 20000 + zlib.crc32(name.encode()) % 20000


def log_path(args: argparse.Namespace, i: int) -> str:
    return os.path.join(common.out_dir(args), "logs", f"process-{i}.log")


def plan(args: argparse.Namespace, bindings) -> Plan:
    if args.num_processes < 1 or args.devices_per_process < 1:
        raise UserError("--num_processes and --devices_per_process must be >= 1")
    if args.work_dir is None:
        args.work_dir = os.path.join(common.out_dir(args), "run")
    if args.work_dir.startswith("gs://"):
        pass  # fine: every process reaches it the same way
    port = args.port if args.port is not None else default_port(args.name)
    n = args.num_processes
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices_per_process}"}
    plan = Plan("local", notes=[f"{n} processes x {args.devices_per_process} CPU devices, coordinator localhost:{port}"])
    for i in range(n):
        dist = ([f"--coordinator_address=localhost:{port}", f"--num_processes={n}", f"--process_id={i}",
                 f"--heartbeat_timeout={args.heartbeat_timeout}"] if n > 1 else [])
        plan.steps.append(Command(f"Process {i} (log: {log_path(args, i)})",
                                  [args.python, *common.main_args(args, bindings, dist)], env=env))
    plan.runner = lambda p: supervise(p, args, port)
    return plan


def _tail(path: str, n: int = 20) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("localhost", port))
            return True
        except OSError:
            return False


def process_env(step_env: dict[str, str], environ=None) -> dict[str, str]:
    """A process's environment: the caller's, with the plan's settings on top; the caller's
    XLA_FLAGS are kept (but for its device count, which the plan sets) before the plan's."""
    environ = os.environ if environ is None else environ
    env = {**environ, **step_env}
    if "XLA_FLAGS" in step_env:
        kept = [f for f in environ.get("XLA_FLAGS", "").split()
                if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join([*kept, step_env["XLA_FLAGS"]])
    return env


def supervise(plan: Plan, args: argparse.Namespace, port: int) -> int:
    if args.num_processes > 1 and not _port_free(port):
        raise UserError(f"port {port} on localhost is in use (another run?): pass --port=<free port>")
    os.makedirs(os.path.dirname(log_path(args, 0)), exist_ok=True)
    procs = []
    for i, step in enumerate(plan.steps):
        with open(log_path(args, i), "w", encoding="utf-8") as log:
            procs.append(subprocess.Popen(step.argv, env=process_env(step.env), stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        print(f"[launch] process {i}: pid {procs[-1].pid}, log {log_path(args, i)}", flush=True)
    first_failure, failed_at = None, None
    try:
        while [p.poll() for p in procs].count(None):  # poll every process (no short-circuit)
            for i, p in enumerate(procs):
                if first_failure is None and p.returncode not in (None, 0):
                    first_failure, failed_at = i, time.time()
                    print(f"[launch] process {i} exited with code {p.returncode}; the others get {args.grace:.0f} s "
                          f"to exit", flush=True)
            if failed_at is not None and time.time() - failed_at > args.grace:
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        print(f"[launch] process {i} still running {args.grace:.0f} s after process {first_failure} "
                              f"failed: killing it", flush=True)
                        os.killpg(p.pid, signal.SIGKILL)
                        p.wait()
            time.sleep(0.2)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)  # the run saves a checkpoint and exits
        for p in procs:
            p.wait()
        raise
    codes = [p.returncode for p in procs]
    for i, code in enumerate(codes):
        if first_failure is None and code != 0:
            first_failure = i
        print(f"[launch] process {i}: exit code {code}", flush=True)
    if first_failure is None:
        print(_tail(log_path(args, 0), 5), end="", flush=True)
        return 0
    print(f"error: process {first_failure} failed with exit code {codes[first_failure]}; the end of "
          f"{log_path(args, first_failure)}:\n{_tail(log_path(args, first_failure))}", file=sys.stderr, flush=True)
    return 1
