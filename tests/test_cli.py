"""The command line (`python -m simvlm_jax.main`): one-line errors with exit code 2 (in process),
internal errors with their traceback, and a tiny prepare -> train -> eval -> export run end to end
(a subprocess)."""
from __future__ import annotations

import json
import os
import subprocess

import jax
import numpy as np
import pytest

from conftest import PYTHON, REPO_ROOT, compile_cache_env
from simvlm_jax import cli, main, partitioning


def run_cli(*args, timeout=300):
    """`python -m simvlm_jax.main ARGS` as a subprocess (end-to-end tests)."""
    env = dict(os.environ, **compile_cache_env())  # conftest already put the 8-device XLA_FLAGS here
    env.setdefault("PYTHONHASHSEED", "0")
    return subprocess.run([PYTHON, "-m", "simvlm_jax.main", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_main(capsys, *args) -> tuple[int, str]:
    """`python -m simvlm_jax.main ARGS` in this process: (exit code, stderr)."""
    code = main.main(list(args))
    return code, capsys.readouterr().err


def _assert_one_line_error(code, err, *needles):
    assert code == 2, (code, err[-3000:])
    lines = [l for l in err.splitlines() if l.strip()]
    error_lines = [l for l in lines if l.startswith("error:")]
    assert len(error_lines) == 1, err[-3000:]
    last = lines[-1]
    assert last.startswith("error:"), f"last stderr line is not the error: {last!r}\n{err[-3000:]}"
    for needle in needles:
        assert needle in last, (needle, last)
    assert "Traceback" not in err


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for word in ("--mode", "--gin_file", "--print_json", "prepare", "export"):
        assert word in out


def test_unknown_gin_binding(capsys, clean_gin):
    _assert_one_line_error(*run_main(capsys, "--gin_file=gin/demo.gin", "--gin.NoSuch.thing=1"), "NoSuch")


def test_missing_gin_file(capsys, clean_gin):
    _assert_one_line_error(*run_main(capsys, "--gin_file=gin/does_not_exist.gin"), "does_not_exist.gin")


def test_unknown_mode(capsys, clean_gin):
    _assert_one_line_error(*run_main(capsys, "--gin_file=gin/demo.gin", "--mode=train,fly"), "fly")


def test_bad_config_value(capsys, clean_gin):
    """A value our own validation rejects (width not divisible by num_heads=4 of simvlm_tiny.gin)."""
    code, err = run_main(capsys, "--gin_file=gin/demo.gin", "--gin.SimVLMConfig.width=130", "--mode=train")
    _assert_one_line_error(code, err, "width=130", "num_heads")


def test_binding_another_familys_config_is_one_line(capsys, clean_gin):
    """demo.gin selects SimVLM: a CoCaConfig binding would be ignored silently, so it is an error
    naming both config classes and the switch."""
    code, err = run_main(capsys, "--gin_file=gin/demo.gin", "--gin.CoCaConfig.encoder_width=64", "--mode=train")
    _assert_one_line_error(code, err, "CoCaConfig.encoder_width", "SimVLMConfig", "model_family.name")


def test_typod_macro_override_is_an_error(capsys, clean_gin):
    """gin would define a new macro NUM_STEP and train the full NUM_STEPS: an error instead."""
    code, err = run_main(capsys, "--gin_file=gin/demo.gin", "--gin.NUM_STEP=5", "--mode=train")
    _assert_one_line_error(code, err, "NUM_STEP", "did you mean --gin.NUM_STEPS")


def test_unquoted_string_override_shows_the_quoting(capsys, clean_gin):
    code, err = run_main(capsys, "--gin_file=gin/demo.gin", "--gin.WORK_DIR=/tmp/x", "--mode=train")
    _assert_one_line_error(code, err, "--gin.WORK_DIR", """--gin.WORK_DIR="'/tmp/x'\"""")
    code, err = run_main(capsys, "--gin_file=gin/demo.gin", "--gin.make_optimizer.schedule=cosine")
    _assert_one_line_error(code, err, """--gin.make_optimizer.schedule="'cosine'\"""")


def test_required_settings_are_named(capsys, clean_gin):
    """runs/pretrain.gin leaves WORK_DIR, NUM_STEPS and BATCH_SIZE to the user's run file."""
    code, err = run_main(capsys, "--gin_file=models/simvlm_tiny.gin", "--gin_file=data/builtin.gin",
                         "--gin_file=runs/pretrain.gin", "--gin.DATA_DIR='/nonexistent'", "--mode=train")
    _assert_one_line_error(code, err, "BATCH_SIZE, NUM_STEPS, WORK_DIR")


def test_prepare_with_your_own_data_names_the_tokenizer_command(capsys, clean_gin, tmp_path):
    code, err = run_main(capsys, "--gin_file=models/simvlm_tiny.gin", "--gin_file=runs/pretrain.gin",
                         f"--gin.WORK_DIR='{tmp_path}'", "--gin.NUM_STEPS=1", "--gin.BATCH_SIZE=8",
                         "--mode=prepare,train")
    _assert_one_line_error(code, err, "data/builtin.gin", "python -m simvlm_jax.data.tokenizer")


def test_gin_includes_work_with_a_runs_folder_in_the_working_directory(clean_gin, tmp_path, monkeypatch):
    """The README's fine-tune example writes `runs/ft`; gin then took `runs` for a Python
    package while resolving `include 'runs/pretrain.gin'` and crashed (TypeError)."""
    (tmp_path / "runs" / "ft").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from simvlm_jax.cli import load_gin
    load_gin(["gin/demo.gin"], [])


def test_long_error_messages_are_cut(capsys, clean_gin, monkeypatch):
    def huge(modes):  # e.g. orbax's tree dump inside a message
        raise main.UserError("x" * 90_000)
    monkeypatch.setattr(main.experiment, "run", huge)
    code, err = run_main(capsys, "--gin_file=gin/demo.gin", "--mode=train")
    _assert_one_line_error(code, err, "SIMVLM_DEBUG=1")
    assert len(err.strip().splitlines()[-1]) <= cli.MAX_ERROR_CHARS + len("error: ")


def test_mesh_mismatch_suggests_a_complete_override():
    devices = jax.devices()[:2]
    with pytest.raises(ValueError) as info:
        partitioning.make_mesh(data=4, fsdp=2, devices=devices)
    suggestion = str(info.value).split("e.g. ")[-1]
    assert suggestion.startswith("--gin.make_mesh.data=-1 --gin.make_mesh.fsdp=2 --gin.make_mesh.tensor=1")
    mesh = partitioning.make_mesh(data=-1, fsdp=2, tensor=1, devices=devices)  # the suggestion works
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="fsdp=1 --gin.make_mesh.tensor=1"):
        partitioning.make_mesh(data=-1, fsdp=2, devices=jax.devices()[:1])


def test_params_of_another_config_name_the_fix(capsys, clean_gin, monkeypatch):
    """Flax's ScopeParamShapeError (params built for another config) becomes one line naming
    where the mismatch comes from and what to do."""
    import flax

    def mismatch(modes):
        raise flax.errors.ScopeParamShapeError("kernel", "/decoder/dense", (64, 32), (128, 32))
    monkeypatch.setattr(main.experiment, "run", mismatch)
    code, err = run_main(capsys, "--gin_file=gin/demo.gin", "--mode=train")
    _assert_one_line_error(code, err, "kernel", "model_family.name", "WORK_DIR/config.gin", "new WORK_DIR")


def test_internal_errors_keep_their_traceback(capsys, clean_gin, monkeypatch):
    """A ValueError raised inside a library (here numpy, as a JAX shape error would be) is a bug,
    not a config mistake: it propagates with its traceback instead of becoming one line."""
    def broken(modes):
        return np.zeros(3).reshape(2)
    monkeypatch.setattr(main.experiment, "run", broken)
    with pytest.raises(ValueError, match="reshape"):
        main.main(["--gin_file=gin/demo.gin", "--mode=train"])

    def user_mistake(modes):
        return partitioning.make_mesh(data=3, fsdp=5)  # our own check: names the setting
    monkeypatch.setattr(main.experiment, "run", user_mistake)
    _assert_one_line_error(*run_main(capsys, "--gin_file=gin/demo.gin", "--mode=train"), "make_mesh")


@pytest.mark.slow
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
    assert summary["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}  # demo.gin: data=-1
    assert 0 <= summary["cider"] and 0 <= summary["bleu4"] <= 100
    assert os.path.exists(summary["report"])
    assert os.path.exists(data_dir / "spm.model") and os.path.exists(data_dir / "manifest.json")
    assert os.path.exists(work_dir / "metrics.jsonl")
    # Each eval has its own directory, named by data and checkpoint step, and its metrics
    # reach metrics.jsonl at that step.
    assert summary["eval_dir"] == str(work_dir / "eval" / "heldout_step3_first16")
    with open(work_dir / "eval" / "heldout_step3_first16" / "captions.json", encoding="utf-8") as f:
        assert len(json.load(f)) == 16
    with open(work_dir / "metrics.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert any(r.get("step") == 3 and "eval/cider" in r for r in rows), rows[-3:]

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
