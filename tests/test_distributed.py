"""simvlm_jax.distributed: environment -> jax.distributed.initialize arguments, with fake SLURM,
JobSet and TPU VM environments, the error cases (each names what is missing), and the loopback
refusal. Fast: nothing here starts a second process."""
from __future__ import annotations

import pytest

from simvlm_jax import distributed
from simvlm_jax.distributed import DistributedError, Plan, check_coordinator, first_slurm_host, resolve

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[007-009,012]", "SLURM_NTASKS": "4",
         "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "4"}


@pytest.fixture(autouse=True)
def no_tpu_devices(monkeypatch):
    """This machine's /dev must not decide the TPU branch."""
    monkeypatch.setattr(distributed.glob, "glob", lambda pattern: [])


def test_flags_win_and_pass_through():
    plan = resolve("10.0.0.2:1234", 2, 1, env=SLURM, hostname="h")
    assert plan == Plan("flags", "10.0.0.2:1234", 2, 1)
    assert plan.kwargs() == dict(coordinator_address="10.0.0.2:1234", num_processes=2, process_id=1)


@pytest.mark.parametrize("args, missing", [
    (("h:1", None, 0), "--num_processes"),
    ((None, 2, 0), "--coordinator_address"),
    (("h:1", 2, None), "--process_id"),
])
def test_partial_flags_name_the_missing_one(args, missing):
    with pytest.raises(DistributedError, match=f"^{missing} not given"):
        resolve(*args, env={}, hostname="h")


def test_flags_errors():
    with pytest.raises(DistributedError, match="has no port: use HOST:PORT"):
        resolve("node0", 2, 0, env={}, hostname="h")
    with pytest.raises(DistributedError, match=r"process id 2 is not in \[0, 2\)"):
        resolve("node0:1", 2, 2, env={}, hostname="h")


@pytest.mark.parametrize("nodelist, first", [
    ("node001", "node001"), ("node001,host2", "node001"), ("node[001-015],host2", "node001"),
    ("node[007,009-015]", "node007"), ("a-b[3]", "a-b3"), ("gpu-a1,gpu-a2", "gpu-a1"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_slurm_one_process_per_node():
    plan = resolve(env=SLURM, hostname="gpu009")
    # The port JAX's own SLURM detection picks for this job id: 4242 % 4096 + 61440.
    assert plan == Plan("slurm", "gpu007:61586", 4, 2, None)


def test_slurm_one_process_per_gpu_binds_its_gpu():
    env = dict(SLURM, SLURM_NTASKS="16", SLURM_PROCID="13", SLURM_LOCALID="1", SLURM_STEP_NUM_NODES="2",
               SLURM_STEP_NODELIST="n[1-2]")
    plan = resolve(env=env, hostname="n2")
    assert plan == Plan("slurm", "n1:61586", 16, 13, (1,))
    assert plan.kwargs()["local_device_ids"] == [1]
    # srun --gpus-per-task=1 already restricted the task to one GPU: JAX must not re-bind.
    assert resolve(env=dict(env, CUDA_VISIBLE_DEVICES="5"), hostname="n2").local_device_ids is None


def test_slurm_job_nodelist_fallback():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
    assert resolve(env=dict(env, SLURM_JOB_NODELIST="a[3-4]"), hostname="a4").coordinator_address == "a3:61586"


@pytest.mark.parametrize("drop", ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NODELIST"])
def test_slurm_missing_variable_is_named(drop):
    env = {k: v for k, v in SLURM.items() if k != drop}
    with pytest.raises(DistributedError, match=f"^{drop} is not set.*srun"):
        resolve(env=env, hostname="gpu007")


def test_slurm_bad_integer():
    with pytest.raises(DistributedError, match="SLURM_NTASKS='four' is not an integer"):
        resolve(env=dict(SLURM, SLURM_NTASKS="four"), hostname="gpu007")


JOBSET = {"JOB_COMPLETION_INDEX": "1", "SIMVLM_NUM_PROCESSES": "4", "SIMVLM_PROCESSES_PER_JOB": "2"}


def test_jobset_pod():
    plan = resolve(env=JOBSET, hostname="myrun-slice-1-1.myrun")
    assert plan == Plan("jobset", "myrun-slice-0-0.myrun:1234", 4, 3)
    assert resolve(env=dict(JOBSET, JOB_COMPLETION_INDEX="0"), hostname="my-run-2-slice-0-0").process_id == 0
    assert resolve(env=dict(JOBSET, SIMVLM_COORDINATOR_PORT="8476"),
                   hostname="r-w-0-1").coordinator_address == "r-w-0-0.r:8476"


@pytest.mark.parametrize("drop", ["SIMVLM_PROCESSES_PER_JOB", "SIMVLM_NUM_PROCESSES"])
def test_jobset_missing_variable_is_named(drop):
    env = {k: v for k, v in JOBSET.items() if k != drop}
    with pytest.raises(DistributedError, match=f"^{drop} is not set.*--jobset_only"):
        resolve(env=env, hostname="myrun-slice-0-1")


def test_jobset_errors():
    with pytest.raises(DistributedError, match="hostname 'worker7' is not a JobSet pod's"):
        resolve(env=JOBSET, hostname="worker7")
    with pytest.raises(DistributedError, match="process id 5 .* is not below SIMVLM_NUM_PROCESSES=4"):
        resolve(env=JOBSET, hostname="myrun-slice-2-1")


def test_tpu_defers_to_jax_detection(monkeypatch):
    assert resolve(env={"TPU_WORKER_HOSTNAMES": "t0,t1"}, hostname="t1") == Plan("tpu", None, None, None)
    monkeypatch.setattr(distributed.glob, "glob", lambda pattern: ["/dev/vfio/0"] if "vfio" in pattern else [])
    plan = resolve(env={}, hostname="t-w-0")
    assert plan.source == "tpu" and plan.kwargs() == dict(coordinator_address=None, num_processes=None,
                                                          process_id=None)


def test_nothing_detected_names_every_variable():
    with pytest.raises(DistributedError) as e:
        resolve(env={"HOME": "/root"}, hostname="laptop")
    msg = str(e.value)
    for name in ("--coordinator_address", "SLURM_JOB_ID", "JOB_COMPLETION_INDEX", "TPU_WORKER_HOSTNAMES"):
        assert name in msg
    assert "\n" not in msg


def _no_dns(host):
    raise AssertionError(f"resolved {host}")


def test_loopback_literal_from_flags_means_one_machine():
    # The local launcher and the tests: every process on this machine.
    check_coordinator(Plan("flags", "localhost:1234", 2, 1), hostname="box", resolve_ips=_no_dns)
    check_coordinator(Plan("flags", "127.0.0.1:1234", 2, 1), hostname="box", resolve_ips=_no_dns)


def test_loopback_from_environment_is_refused():
    with pytest.raises(DistributedError, match="loopback address, but the 4 processes run on several hosts"):
        check_coordinator(Plan("slurm", "localhost:61586", 4, 1), hostname="n2", resolve_ips=_no_dns)


def test_name_resolving_to_loopback_on_another_host_is_refused():
    """The /etc/hosts trap: 'node0 -> 127.0.1.1' on node3 makes node3 wait for itself."""
    with pytest.raises(DistributedError, match=r"resolves to loopback 127\.0\.1\.1 on this host \(node3\).*"
                                               r"/etc/hosts"):
        check_coordinator(Plan("slurm", "node0:61586", 4, 3), hostname="node3",
                          resolve_ips=lambda h: ["127.0.1.1"])
    with pytest.raises(DistributedError, match="resolves to loopback ::1"):
        check_coordinator(Plan("flags", "head:1", 2, 1), hostname="w1", resolve_ips=lambda h: ["::1"])


def test_coordinator_host_itself_and_routable_names_pass():
    # On the coordinator's own host a loopback entry is harmless (the service listens everywhere).
    check_coordinator(Plan("slurm", "node0:61586", 8, 1), hostname="node0.cluster", resolve_ips=_no_dns)
    check_coordinator(Plan("slurm", "node0:61586", 8, 5), hostname="node1", resolve_ips=lambda h: ["10.1.0.7"])
    # One process: nothing to wait for.
    check_coordinator(Plan("slurm", "localhost:1", 1, 0), hostname="x", resolve_ips=_no_dns)
    check_coordinator(Plan("tpu", None, None, None), hostname="x", resolve_ips=_no_dns)


def test_unresolvable_coordinator_is_named():
    with pytest.raises(DistributedError, match="the coordinator host 'no-such-host.invalid' does not resolve"):
        check_coordinator(Plan("jobset", "no-such-host.invalid:1234", 2, 1), hostname="x")


def test_initialize_passes_timeouts_and_logs(monkeypatch, caplog):
    calls = []
    import jax
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with caplog.at_level("INFO"):
        plan = distributed.initialize("localhost:5555", 1, 0, init_timeout_s=1200, heartbeat_timeout_s=20)
    assert plan.source == "flags"
    assert calls == [dict(coordinator_address="localhost:5555", num_processes=1, process_id=0,
                          initialization_timeout=1200, heartbeat_timeout_seconds=20)]
    assert "waits up to 1200 s" in caplog.text and "local devices (cpu)" in caplog.text
    with pytest.raises(DistributedError, match="must be positive"):
        distributed.initialize("localhost:5555", 1, 0, init_timeout_s=0)


def test_initialize_explains_a_deadline(monkeypatch):
    import jax

    def timeout(**kw):
        raise RuntimeError("DEADLINE_EXCEEDED: Barrier timed out. Id: PjRT_Client_Connect")
    monkeypatch.setattr(jax.distributed, "initialize", timeout)
    with pytest.raises(DistributedError, match=r"not all 2 processes reached the coordinator localhost:1 within "
                                               r"7 s \(--init_timeout\).*process 1"):
        distributed.initialize("localhost:1", 2, 1, init_timeout_s=7)


def test_main_reports_a_start_up_error_in_one_line(capsys, monkeypatch):
    from simvlm_jax import main
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    rc = main.main(["--gin_file=gin/demo.gin", "--coordinator_address=node0:1", "--num_processes=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: --process_id not given")
