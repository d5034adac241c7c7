"""CoCa from the command line: prepare -> train -> eval -> export with gin/coca_demo.gin, then a
second run that starts from that export's image encoder (frozen) and trains a new head, and
the caption CLI on the export."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image

from test_cli import run_cli
from test_docs import documented_command

pytestmark = pytest.mark.slow  # CoCa's end-to-end CLI run

COMMON = ("--gin.NUM_STEPS=3", "--gin.BATCH_SIZE=8", "--gin.prepare_builtin.num_train=200",
          "--gin.prepare_builtin.num_heldout=16", "--gin.prepare_builtin.num_text=200",
          "--gin.evaluate_captioning.max_examples=16", "--gin.evaluate_captioning.batch_size=16",
          "--gin.evaluate_captioning.with_constant_baseline=False", "--gin.make_manager.save_every=3")


def test_coca_train_eval_export_then_finetune_on_the_frozen_encoder(tmp_path, capsys):
    from simvlm_jax import caption, export  # pylint: disable=g-import-not-at-top
    from simvlm_jax.models import coca  # pylint: disable=g-import-not-at-top

    # The README's two CoCa commands as documented (the docs test leaves them to this test), with
    # this test's paths and tiny settings appended (the last binding wins).
    pretrain = documented_command(r"^python -m simvlm_jax\.main --gin_file=gin/coca_demo\.gin --mode=prepare")[3:]
    finetune = documented_command(r"^python -m simvlm_jax\.main --gin_file=gin/coca_demo\.gin --mode=train ")[3:]
    assert "--gin.make_optimizer.frozen=['visual/.*']" in finetune
    data_dir = tmp_path / "data"
    proc = run_cli(*pretrain, "--print_json",
                   f"--gin.DATA_DIR='{data_dir}'", f"--gin.WORK_DIR='{tmp_path / 'pre'}'", *COMMON, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 3 and summary["num_images"] == 16 and 0 <= summary["cider"]
    metrics = [json.loads(line) for line in open(tmp_path / "pre" / "metrics.jsonl")]
    logged = {k for m in metrics for k in m}
    assert {"contrastive_loss", "caption_loss", "logit_scale"} <= logged
    model, params, vocab = export.load_export(summary["export_dir"])
    assert isinstance(model, coca.CoCa) and vocab is not None

    # Fine-tune: a new CoCa initialized from the export's image encoder only, encoder frozen.
    proc = run_cli(*finetune, "--mode=train,export", "--print_json",
                   f"--gin.DATA_DIR='{data_dir}'", f"--gin.WORK_DIR='{tmp_path / 'ft'}'", *COMMON,
                   f"--gin.train.init_from='{summary['export_dir']}'", "--gin.train.seed=7", timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "Initialized params from the export" in proc.stderr
    _, tuned, _ = export.load_export(json.loads(proc.stdout.strip().splitlines()[-1])["export_dir"])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params["visual"]),
                            jax.tree_util.tree_leaves(tuned["visual"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))

    # The caption CLI reads CoCa exports.
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3)).astype(np.uint8)).save(image)
    capsys.readouterr()
    assert caption.main(["--export_dir", summary["export_dir"], "--prompt", "", str(image)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{image}\t")
