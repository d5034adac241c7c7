"""What a new user meets on day one: the tokenizer command, tokenizer/model checks, a checkpoint
of another model in WORK_DIR, eval directories that never overwrite each other, dataset-size
warnings."""
from __future__ import annotations

import io
import json
import os

import gin
import numpy as np
import pytest
import sentencepiece as spm

from conftest import tiny_config
from simvlm_jax import checkpointing, experiment, partitioning, train
from simvlm_jax.cli import UserError, load_gin
from simvlm_jax.data import pipeline, tokenizer
from simvlm_jax.models import registry

SENTENCES = ["a red circle above a blue square", "two green triangles", "the large yellow star",
             "a small purple circle left of a red star", "three blue squares"]


def _spm_with_library_defaults(path: str) -> str:
    """A SentencePiece model as `spm.SentencePieceTrainer.train` makes it by default:
    unk=0, bos=1, eos=2, no pad."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 20), model_writer=model,
                                   vocab_size=40, hard_vocab_limit=False, minloglevel=2)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def test_tokenizer_command_makes_the_ids_the_framework_needs(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES * 20) + "\n", encoding="utf-8")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": s}) for s in SENTENCES) + "\n", encoding="utf-8")
    out = tmp_path / "spm.model"
    assert tokenizer.main(["--input", str(corpus), "--input", str(jsonl), "--jsonl_field", "body",
                           "--vocab_size", "48", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    vocab = tokenizer.get_vocabulary(str(out))
    assert f"vocab_size = {vocab.vocab_size}" in printed and str(out) in printed
    sp = vocab.tokenizer
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    registry.get("simvlm")(tiny_config(vocab_size=vocab.vocab_size)).check_vocabulary(vocab)  # accepted
    # Never overwrites without --force; a too-small vocabulary is one line.
    assert tokenizer.main(["--input", str(corpus), "--vocab_size", "48", "--output", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert tokenizer.main(["--input", str(corpus), "--vocab_size", "5", "--output", str(tmp_path / "x.model")]) == 2
    assert "Vocabulary size is smaller" in capsys.readouterr().err


def test_tokenizer_texts_from_tar_shards_and_coco_json(dataset, tmp_path):
    tars = os.path.join(dataset.data_dir, "train", "*.tar")
    assert list(tokenizer.iter_texts([tars])) == list(dataset.captions)
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": [{"sentences": [{"raw": "a dog"}, {"raw": " a  cat "}]}]}))
    coco = tmp_path / "captions_val.json"
    coco.write_text(json.dumps({"annotations": [{"caption": "a bird"}]}))
    assert list(tokenizer.iter_texts([str(karpathy), str(coco)])) == ["a dog", "a cat", "a bird"]
    assert len(list(tokenizer.iter_texts([tars], max_texts=3))) == 3


def test_tokenizer_with_library_default_ids_is_refused(dataset, tmp_path):
    """unk=0/bos=1/eos=2 made captions that never stop (CIDEr 21.7 instead of 69.8)."""
    vocab = tokenizer.get_vocabulary(_spm_with_library_defaults(str(tmp_path / "default.model")))
    family = registry.get("simvlm")(tiny_config(vocab_size=vocab.vocab_size))
    with pytest.raises(ValueError, match="EOS id is 2.*never stop.*python -m simvlm_jax.data.tokenizer"):
        family.check_vocabulary(vocab)


def test_model_and_tokenizer_sizes_are_checked_both_ways(dataset):
    vocab = dataset.vocab()
    size = vocab.vocab_size
    check = lambda n: registry.get("simvlm")(tiny_config(vocab_size=n)).check_vocabulary(vocab)  # noqa: E731
    check(size)
    check(-(-size // 128) * 128)  # padding up to a multiple of 128 is fine
    with pytest.raises(ValueError, match=f"smaller than the tokenizer's {size}"):
        check(size - 1)
    with pytest.raises(ValueError, match="never trained and decode to"):
        check(-(-size // 128) * 128 + 1)


def test_checkpoint_of_another_model_is_one_short_line(tmp_path):
    mesh = partitioning.make_mesh(data=-1)
    saved = train.Trainer(tiny_config(), mesh, train.make_optimizer(1))
    manager = checkpointing.make_manager(str(tmp_path), async_save=False)
    assert checkpointing.save(manager, 1, saved.init_state(), None, force=True)
    manager.wait_until_finished()
    # Same config: restores.
    assert checkpointing.restore(manager, train.Trainer(tiny_config(), mesh, train.make_optimizer(1)).abstract_state,
                                 None)[1] == 1
    other = train.Trainer(tiny_config(width=64, mlp_dim=128), mesh, train.make_optimizer(1))
    with pytest.raises(UserError) as info:
        checkpointing.restore(manager, other.abstract_state, None)
    msg = str(info.value)
    assert len(msg) < 600 and "\n" not in msg, msg
    assert str(tmp_path) in msg and "new WORK_DIR" in msg
    assert "(32,) saved" not in msg and "with other shapes" in msg and "params/" in msg
    coca = train.Trainer(tiny_config("coca"), mesh, train.make_optimizer(1))
    with pytest.raises(UserError, match="not in the checkpoint"):
        checkpointing.restore(manager, coca.abstract_state, None)
    manager.close()


def test_shape_differences():
    assert checkpointing.shape_differences({"a": (1,)}, {"a": (1,)}) is None
    text = checkpointing.shape_differences({"a": (1,), "b": (2,)}, {"a": (3,), "c": (2,)})
    assert "1 with other shapes (e.g. a: saved (1,), this config (3,))" in text
    assert "1 not in the checkpoint (e.g. c)" in text and "1 only in the checkpoint (e.g. b)" in text


def test_eval_directories_are_named_by_data_step_and_decoding(clean_gin, tmp_path):
    gin.parse_config("""
        from simvlm_jax import experiment
        evaluate_captioning.shards = '/data/coco_karpathy_test/*.tar'
    """)
    assert experiment.eval_name(1200) == "coco_karpathy_test_step1200"
    assert experiment.eval_name(5, max_examples=256) == "coco_karpathy_test_step5_first256"
    gin.bind_parameter("evaluate_captioning.annotations_json", "/data/coco/dataset_coco.json")
    gin.bind_parameter("evaluate_captioning.split", "test")
    gin.bind_parameter("evaluate_captioning.num_beams", 3)
    assert experiment.eval_name(7) == "dataset_coco-test_beam3_step7"
    gin.bind_parameter("evaluate_captioning.max_examples", 100)
    assert experiment.eval_name(7) == "dataset_coco-test_beam3_step7_first100"
    first = tmp_path / "x_step1"
    assert experiment.unused_dir(str(first)) == str(first)
    first.mkdir()
    assert experiment.unused_dir(str(first)) == str(first) + "-2"


def test_builtin_eval_is_named_by_its_gin_scope(clean_gin):
    load_gin(["gin/demo.gin"], [])
    assert experiment.eval_name(1200) == "heldout_step1200"


def test_export_finds_the_latest_full_eval_of_its_step(tmp_path):
    def write(name, step, num_images=10, cider=1.0):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "metrics.json", "w", encoding="utf-8") as f:
            json.dump({"step": step, "metrics": {"cider": cider, "num_images": num_images}}, f)
    assert experiment.latest_eval_metrics(str(tmp_path / "none"), 3) is None
    write("heldout_step3", 3, cider=50.0)
    write("heldout_step3_first256", 3, cider=9.0)   # a partial in-training eval: not for the card
    write("heldout_step2", 2, cider=70.0)           # another checkpoint
    found = experiment.latest_eval_metrics(str(tmp_path), 3)
    assert found["cider"] == 50.0 and found["eval_dir"] == str(tmp_path / "heldout_step3")


def test_dataset_size_warnings():
    lines = pipeline.dataset_size_warnings({"tiny": (40, 32.0), "big": (10_000, 1.5), "small": (500, 80.0)},
                                           global_batch_size=64, warn_epochs=10)
    assert len(lines) == 2
    assert "'tiny' has 40 examples, fewer than the global batch of 64" in lines[0]
    assert "'small' has 500 examples and this run reads it 80.0 times" in lines[1]


def test_epochs_per_run_of_a_mixture(dataset):
    from conftest import register_builtin
    name = register_builtin(dataset, text_only_rate=0.25)
    sizes = pipeline.epochs_per_run(name, "train", global_batch_size=16, num_steps=100)
    (image_task, (n_img, e_img)), (text_task, (n_txt, e_txt)) = sorted(sizes.items())
    assert (n_img, n_txt) == (len(dataset.captions), len(dataset.text_lines))
    np.testing.assert_allclose(e_img, 100 * 16 * 0.75 / n_img)
    np.testing.assert_allclose(e_txt, 100 * 16 * 0.25 / n_txt)
