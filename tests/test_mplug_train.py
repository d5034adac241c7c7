"""mPLUG through the trainer and the CLI: its aux state (momentum params + queues) is
checkpointed, restores onto another mesh, and a kill -9 resume is bitwise identical; the
tiny model's losses fall on the built-in data."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import compile_cache_env
from simvlm_jax import checkpointing, partitioning, train
from simvlm_jax.models import mplug

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = mplug.MPLUGConfig(vocab_size=257, image_size=32, patch_size=16, vision_width=32, vision_layers=1,
                        vision_heads=2, vision_mlp_dim=64, text_width=32, text_heads=2, text_mlp_dim=64,
                        text_layers=1, fusion_layers=2, fusion_stride=1, decoder_layers=1, embed_dim=16,
                        max_text_len=8, max_target_len=8, max_prefix_len=4, mask_id=256, queue_size=24)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_aux_state_checkpoints_and_restores_onto_another_mesh(tmp_path):
    """Saved on data=8, restored onto data=2 x fsdp=2 x tensor=2: the momentum params and queues
    come back with the same values and the new mesh's shardings (the Trainer's steps on
    them: tests/test_mplug_objectives.py; a kill -9 resume: the CLI test below)."""
    fam = mplug.MPLUGFamily(CFG)
    opt = lambda: train.make_optimizer(10, warmup_steps=1)
    a = train.Trainer(fam, partitioning.make_mesh(data=8), opt())
    state = a.init_state()
    # A state as after some steps: the EMA moved off the params, the queues and pointer too.
    aux = jax.tree_util.tree_map(lambda x: x * 0.5 + 0.25 if x.dtype == np.float32 else x + 5, state.aux_state)
    state = state.replace(aux_state=aux)
    manager = checkpointing.make_manager(str(tmp_path), save_every=1, async_save=False)
    assert checkpointing.save(manager, 2, state, None)
    manager.wait_until_finished()
    b = train.Trainer(fam, partitioning.make_mesh(data=2, fsdp=2, tensor=2), opt())
    restored, step = checkpointing.restore(checkpointing.make_manager(str(tmp_path)), b.abstract_state, None)
    assert step == 2 and int(restored.aux_state["queue_ptr"]) == 5
    for x, y in zip(_leaves(state.aux_state), _leaves(restored.aux_state)):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(_leaves(state.aux_state["ema"]), _leaves({k: state.params[k] for k in mplug.MOMENTUM_PARAMS})):
        assert not np.array_equal(x, y)  # the EMA was saved as its own copy, not the params
    queue = restored.aux_state["image_queue"]
    assert queue.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    assert queue.addressable_shards[0].data.shape == (CFG.queue_size // 4, CFG.embed_dim)
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, restored.aux_state["ema"])
    assert shardings == jax.tree_util.tree_map(lambda x: x.sharding,
                                               {k: restored.params[k] for k in mplug.MOMENTUM_PARAMS})


# ----------------------------------------------------------------------------- the CLI

def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    env.update(compile_cache_env())
    return env


def _cli(data_dir: str, work_dir: str, steps: int, mode: str = "train", save_every: int = 1) -> list[str]:
    return [sys.executable, "-m", "simvlm_jax.main", "--gin_file=gin/mplug_demo.gin", f"--mode={mode}",
            f"--gin.DATA_DIR='{data_dir}'", f"--gin.WORK_DIR='{work_dir}'", f"--gin.NUM_STEPS={steps}",
            "--gin.BATCH_SIZE=16", "--gin.train.log_every=1", f"--gin.make_manager.save_every={save_every}",
            "--gin.make_optimizer.warmup_steps=2", "--gin.make_optimizer.learning_rate=2e-3",
            "--gin.MPLUGConfig.queue_size=64", "--gin.make_train_iterator.num_threads=1",
            # Fewer layers than mplug_tiny (1 co-attention + 1 connected fusion layer): a faster compile.
            "--gin.MPLUGConfig.vision_layers=1", "--gin.MPLUGConfig.fusion_layers=2",
            "--gin.MPLUGConfig.fusion_stride=1",
            "--gin.prepare_builtin.num_train=300", "--gin.prepare_builtin.num_heldout=16",
            "--gin.prepare_builtin.num_text=100"]


def _metrics(work_dir: str) -> dict[int, dict]:
    out = {}
    with open(os.path.join(work_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec
    return out


@pytest.mark.slow
def test_mplug_trains_from_the_cli_and_resumes_bitwise_after_kill9(tmp_path):
    data, ref = str(tmp_path / "data"), str(tmp_path / "ref")
    steps = 8
    # The uninterrupted reference saves only where the manager must (first and last step): a
    # checkpoint a step costs ~1 s here, and only the run that is killed needs one.
    subprocess.run(_cli(data, ref, steps, "prepare,train", save_every=steps), cwd=ROOT, env=_env(), check=True,
                   capture_output=True, timeout=900)
    reference = _metrics(ref)
    assert sorted(reference) == list(range(1, steps + 1))
    first, last = reference[1], reference[steps]
    for term in ("loss", "mlm_loss", "prefix_lm_loss"):
        assert last[term] < first[term] - 0.5, (term, first[term], last[term])
    assert all(np.isfinite(r[k]) for r in reference.values() for k in ("itc_loss", "itm_loss"))

    work = str(tmp_path / "killed")
    proc = subprocess.Popen(_cli(data, work, steps), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:
        if os.path.exists(os.path.join(work, "metrics.jsonl")) and len(_metrics(work)) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_metrics(work), default=0)
    assert killed_at < steps, "the run finished before it could be killed"
    subprocess.run(_cli(data, work, steps), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=900)
    resumed = _metrics(work)
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in range(1, steps + 1):  # bitwise: momentum params and queues resumed exactly
        for k in ("loss", "itc_loss", "itm_loss", "mlm_loss", "prefix_lm_loss"):
            assert resumed[step][k] == reference[step][k], (step, k, killed_at)
