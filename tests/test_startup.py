"""Start-up noise: TensorFlow stays on the CPU without probing CUDA, and the model's activation
sharding constraints are live, so the 8-device FSDP train step compiles without XLA's
"Involuntary full rematerialization" (the token-embedding gradient was resharded by
replicating it)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from conftest import PYTHON, REPO_ROOT
from simvlm_jax import partitioning
from simvlm_jax.data import tf_env
from simvlm_jax.models import layers


def test_importing_the_data_package_keeps_tensorflow_on_cpu(monkeypatch):
    import simvlm_jax.data  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    assert "simvlm_jax.data.tf_env" in sys.modules  # run by the package, before any TF import
    from simvlm_jax.data import tf_env  # pylint: disable=import-outside-toplevel
    monkeypatch.delenv("TF_ENABLED_DEVICE_TYPES", raising=False)
    tf_env.keep_tensorflow_on_cpu()
    assert os.environ["TF_ENABLED_DEVICE_TYPES"] == "CPU"
    monkeypatch.setenv("TF_ENABLED_DEVICE_TYPES", "CPU,GPU")  # a user's own choice is kept
    tf_env.keep_tensorflow_on_cpu()
    assert os.environ["TF_ENABLED_DEVICE_TYPES"] == "CPU,GPU"


def test_activation_constraints_are_live_inside_activate():
    """flax's logical constraints see only jax's abstract mesh, which `activate` does not set:
    `layers.constrain` must pass the mesh itself, or every activation constraint is a no-op."""
    mesh = partitioning.make_mesh(data=4, fsdp=2, tensor=1)
    fn = jax.jit(lambda x: layers.constrain(x * 2, layers.BATCH_LENGTH_EMBED))
    with partitioning.activate(mesh):
        lowered = fn.lower(jnp.ones((8, 4, 16))).as_text()
    assert "sharding_constraint" in lowered or "@Sharding" in lowered
    assert partitioning.active_mesh() is None
    assert "sharding_constraint" not in fn.lower(jnp.ones((8, 4, 16))).as_text()  # no mesh: a no-op


def _run(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLED_DEVICE_TYPES"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "0"  # conftest quiets XLA's C++ warnings too: show them all here
    return subprocess.run([PYTHON, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_tensorflow_never_probes_cuda():
    proc = _run("""
        import simvlm_jax.data.pipeline
        import tensorflow as tf
        assert tf.config.list_physical_devices("GPU") == []
        print(int(tf.reduce_sum(tf.constant([1, 2]))))
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "3"
    assert "cuInit" not in proc.stderr
    # Library-loading notices printed before any log level applies are filtered out.
    assert "Could not find cuda drivers" not in proc.stderr and "cpu_feature_guard" not in proc.stderr, proc.stderr
    assert "oneDNN custom operations" not in proc.stderr, proc.stderr


def test_native_stderr_filter_keeps_other_lines(capfd):
    with tf_env.native_stderr_without(("noise",)):
        os.write(2, b"some noise here\nkeep me\nmore noise\n")
    assert capfd.readouterr().err == "keep me\n"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["simvlm", "coca"])
def test_fsdp_train_step_compiles_without_involuntary_remat(family):
    proc = _run(f"""
        import sys
        sys.path.insert(0, "tests")
        import conftest  # 8 CPU devices
        import jax
        from conftest import tiny_config
        from simvlm_jax import partitioning, train
        from simvlm_jax.models import registry
        fam = registry.family_of(tiny_config({family!r}))
        mesh = partitioning.make_mesh(data=4, fsdp=2, tensor=1)
        trainer = train.Trainer(fam, mesh, train.make_optimizer(10))
        batch = {{k: jax.ShapeDtypeStruct((16,) + v.shape[1:], v.dtype, sharding=trainer.batch_shardings[k])
                 for k, v in fam.dummy_batch().items()}}
        with trainer.activate():
            trainer._step.lower(trainer.abstract_state, batch).compile()
        print("compiled")
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "compiled" in proc.stdout
    assert "Involuntary full rematerialization" not in proc.stderr, proc.stderr[-2000:]


def test_a_machine_without_tpu_chips_does_not_start_libtpu():
    """With libtpu installed (the test/aot extras) but no TPU chips, importing simvlm_jax keeps JAX
    off the TPU runtime: no TPU_ACCELERATOR_TYPE/TPU_WORKER_HOSTNAMES screens, ~2 s less start-up.
    An explicit JAX_PLATFORMS is never overridden."""
    import simvlm_jax  # pylint: disable=import-outside-toplevel
    if not simvlm_jax._cpu_only_machine_with_libtpu():  # pylint: disable=protected-access
        pytest.skip("libtpu is not installed here, or this machine has an accelerator")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = ("import simvlm_jax, jax, os; "
            "print(jax.config.jax_platforms, jax.devices()[0].platform, os.environ.get('JAX_PLATFORMS'))")
    proc = subprocess.run([PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True)
    assert proc.stdout.split() == ["cpu", "cpu", "None"]  # launched processes do not inherit it
    assert "TPU" not in proc.stderr, proc.stderr[-2000:]
    # jax imported first (as by a notebook) is covered too; an explicit choice is kept.
    code = "import jax, simvlm_jax; print(jax.config.jax_platforms)"
    out = subprocess.run([PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "cpu" and "TPU" not in out.stderr, out.stderr[-2000:]
    code = "import simvlm_jax, jax; print(jax.config.jax_platforms)"
    kept = subprocess.run([PYTHON, "-c", code], env=dict(env, JAX_PLATFORMS="cpu,tpu"), capture_output=True,
                          text=True, timeout=300, check=True)
    assert kept.stdout.strip() == "cpu,tpu"
