"""The command line (`python -m simvlm_jax.main`): one-line errors with exit code 2, and a tiny
prepare -> train -> eval -> export run end to end."""
from __future__ import annotations

import json
import os
import subprocess

import jax
import numpy as np
import pytest

from conftest import PYTHON, REPO_ROOT


def run_cli(*args, timeout=300):
    env = dict(os.environ)  # conftest already put the 8-device XLA_FLAGS here
    env.setdefault("PYTHONHASHSEED", "0")
    return subprocess.run([PYTHON, "-m", "simvlm_jax.main", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines, proc.stderr
    error_lines = [l for l in lines if l.startswith("error:")]
    assert len(error_lines) == 1, proc.stderr[-3000:]
    last = lines[-1]
    assert last.startswith("error:"), f"last stderr line is not the error: {last!r}\n{proc.stderr[-3000:]}"
    for needle in needles:
        assert needle in last, (needle, last)
    assert "Traceback" not in proc.stderr


def test_help():
    proc = run_cli("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    for word in ("--mode", "--gin_file", "--print_json", "prepare", "export"):
        assert word in proc.stdout


def test_unknown_gin_binding():
    _assert_one_line_error(run_cli("--gin_file=gin/demo.gin", "--gin.NoSuch.thing=1"), "NoSuch")


def test_missing_gin_file():
    _assert_one_line_error(run_cli("--gin_file=gin/does_not_exist.gin"), "does_not_exist.gin")


def test_unknown_mode():
    _assert_one_line_error(run_cli("--gin_file=gin/demo.gin", "--mode=train,fly"), "fly")


def test_bad_config_value():
    """A value our own validation rejects (width not divisible by num_heads=4 of simvlm_tiny.gin)."""
    proc = run_cli("--gin_file=gin/demo.gin", "--gin.SimVLMConfig.width=130", "--mode=train")
    _assert_one_line_error(proc, "width=130", "num_heads")


def test_end_to_end_prepare_train_eval_export(tmp_path):
    from simvlm_jax import checkpointing, export, partitioning, train

    data_dir, work_dir = tmp_path / "data", tmp_path / "run"
    proc = run_cli(
        "--gin_file=gin/demo.gin", "--mode=prepare,train,eval,export", "--print_json",
        f"--gin.DATA_DIR='{data_dir}'", f"--gin.WORK_DIR='{work_dir}'",
        "--gin.NUM_STEPS=3", "--gin.BATCH_SIZE=8",
        "--gin.prepare_builtin.num_train=200", "--gin.prepare_builtin.num_heldout=16",
        "--gin.prepare_builtin.num_text=200",
        "--gin.evaluate_captioning.max_examples=16", "--gin.evaluate_captioning.batch_size=16",
        "--gin.evaluate_captioning.with_constant_baseline=False",
        "--gin.make_manager.save_every=3", timeout=540)
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("cider", "bleu4", "checkpoint_dir", "export_dir", "report"):
        assert key in summary, (key, summary)
    assert summary["step"] == 3
    assert summary["num_images"] == 16
    assert summary["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}
    assert 0 <= summary["cider"] and 0 <= summary["bleu4"] <= 100
    assert os.path.exists(summary["report"])
    assert os.path.exists(data_dir / "spm.model") and os.path.exists(data_dir / "manifest.json")
    assert os.path.exists(work_dir / "metrics.jsonl")
    with open(work_dir / "eval" / "captions.json", encoding="utf-8") as f:
        assert len(json.load(f)) == 16

    # The export rebuilds the model and holds exactly the checkpoint's params.
    model, params, vocab = export.load_export(summary["export_dir"])
    cfg = model.config
    assert (cfg.width, cfg.num_heads, cfg.image_size, cfg.max_target_len) == (128, 4, 64, 20)
    assert vocab.vocab_size <= cfg.vocab_size
    mesh = partitioning.make_mesh(data=4, fsdp=2)
    trainer = train.Trainer(cfg, mesh, train.make_optimizer(1))
    manager = checkpointing.make_manager(str(work_dir), async_save=False)
    restored, step = checkpointing.restore(manager, trainer.abstract_state, None)
    assert step == 3 and summary["checkpoint_dir"] == str(manager.directory)
    ckpt = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), restored.params)
    assert jax.tree_util.tree_structure(ckpt) == jax.tree_util.tree_structure(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ckpt), jax.tree_util.tree_leaves(params)):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    with open(os.path.join(summary["export_dir"], "export_info.json"), encoding="utf-8") as f:
        info = json.load(f)
    assert info["step"] == 3 and info["num_params"] == sum(x.size for x in jax.tree_util.tree_leaves(ckpt))
    manager.close()
