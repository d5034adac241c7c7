"""open_clip end to end: CLIP BPE selected through gin (tasks, eval, export), an open_clip
checkpoint imported as a complete export directory that `caption`, `zero_shot` and
`train.init_from` read, and a CoCa trained by the CLI on an open_clip config that open_clip
loads (slow)."""
from __future__ import annotations

import json
import os

import gin
import jax
import numpy as np
import pytest
from PIL import Image

from conftest import register_builtin
from simvlm_jax import convert_open_clip as conv
from simvlm_jax import export
from simvlm_jax.data import tokenizer

torch = pytest.importorskip("torch")
from test_open_clip_parity import _import_open_clip, build_torch  # noqa: E402  (needs torch)

open_clip = _import_open_clip()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CTX = 12  # open_clip context (with <start_of_text>): max_text_len 11
# A shrunk coca_ViT-B-32 with CLIP BPE's real 49,408-token vocabulary, so that real text
# tokenizes into it (bos 49406, eos 49407 as in the open_clip configs).
TINY_OPEN_CLIP = {
    "embed_dim": 32, "quick_gelu": False,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 16,
                   "attentional_pool": True, "attn_pooler_heads": 4, "attn_pooler_queries": 9,
                   "output_tokens": True},
    "text_cfg": {"context_length": CTX, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": CTX, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2,
                       "attn_pooler_heads": 4},
}
# The same model as gin bindings on top of gin/models/coca_ViT-B-32.gin.
TINY_GIN = ["IMAGE_SIZE=32", "CoCaConfig.patch_size=8", "CoCaConfig.encoder_width=48",
            "CoCaConfig.encoder_layers=2", "CoCaConfig.encoder_heads=3", "CoCaConfig.encoder_mlp_dim=192",
            "CoCaConfig.decoder_width=32", "CoCaConfig.unimodal_layers=2", "CoCaConfig.multimodal_layers=2",
            "CoCaConfig.decoder_heads=4", "CoCaConfig.decoder_mlp_dim=128", "CoCaConfig.embed_dim=32",
            "CoCaConfig.n_queries=9", "CoCaConfig.pooler_heads=4", f"MAX_TARGET_LEN={CTX - 1}"]
BUNDLE_FILES = {"params.safetensors", "model.gin", "bpe_simple_vocab_16e6.txt.gz", "export_info.json",
                "MODEL_CARD.md"}


@pytest.fixture(scope="module")
def open_clip_checkpoint(tmp_path_factory):
    """(open_clip model, its open_clip_config.json, its .bin checkpoint)."""
    root = tmp_path_factory.mktemp("open_clip_ckpt")
    tmodel = build_torch(TINY_OPEN_CLIP, seed=3)
    config_json = root / "open_clip_config.json"
    config_json.write_text(json.dumps({"model_cfg": {**TINY_OPEN_CLIP, "custom_text": True}}))
    torch.save(tmodel.state_dict(), root / "open_clip_pytorch_model.bin")
    return tmodel, str(config_json), str(root / "open_clip_pytorch_model.bin")


@pytest.fixture(scope="module")
def imported(open_clip_checkpoint, tmp_path_factory):
    """The export directory `python -m simvlm_jax.convert_open_clip --model --checkpoint` writes."""
    _, config_json, ckpt = open_clip_checkpoint
    out = str(tmp_path_factory.mktemp("imported") / "export")
    conv.main(["--model", config_json, "--checkpoint", ckpt, "--output", out])
    return out


# ----------------------------------------------------------------------------- gin selection

def test_get_vocabulary_kind_from_gin(clean_gin):
    """The open_clip model gin files select CLIP BPE; a data gin file's SentencePiece path does not
    override that; an unknown kind is a one-line error naming the choices."""
    gin.parse_config_files_and_bindings([os.path.join(REPO, "gin", "models", "coca_ViT-B-32.gin")],
                                        ["get_vocabulary.path = '/nonexistent/spm.model'"], finalize_config=False)
    vocab = tokenizer.get_vocabulary()
    assert vocab.kind == "clip_bpe" and vocab.eos_id == 49407 and vocab.vocab_size == 49408
    assert list(vocab.encode("a photo of a dog")) == [320, 1125, 539, 320, 1929]  # open_clip's ids
    gin.clear_config()
    gin.parse_config("get_vocabulary.kind = 'wordpiece'")
    with pytest.raises(ValueError, match=r"get_vocabulary.kind='wordpiece'; choose one of \['sentencepiece', "
                                         r"'clip_bpe'\]"):
        tokenizer.get_vocabulary()


def test_tasks_tokenize_with_the_gin_selected_vocabulary(dataset, clean_gin):
    """seqio tasks registered without an explicit vocabulary take get_vocabulary's: CLIP BPE ids."""
    from simvlm_jax.data import preprocessors  # pylint: disable=g-import-not-at-top
    import seqio  # pylint: disable=g-import-not-at-top
    from simvlm_jax.data import tasks  # pylint: disable=g-import-not-at-top
    gin.parse_config("get_vocabulary.kind = 'clip_bpe'")
    try:
        tasks.register_builtin(dataset.data_dir, image_size=32, max_prefix_len=0, max_target_len=40,
                               text_prefix_prob=0.0)
        task = seqio.get_mixture_or_task("builtin_image_text")
        assert task.output_features["target_tokens"].vocabulary.kind == "clip_bpe"
        tokenize = next(p for p in task.preprocessors if isinstance(p, preprocessors.Tokenize))
    finally:
        register_builtin(dataset)  # the SentencePiece tasks again, for other tests
    caption = dataset.captions[0]
    ids = tokenize.map({"text": caption})["tokens"]
    theirs = open_clip.get_tokenizer("coca_ViT-B-32")([caption])[0].numpy()
    assert len(ids) < 40 and list(ids) == list(theirs[1:len(ids) + 1]) and ids[-1] == 49407


# ----------------------------------------------------------------------------- import

def test_import_writes_a_complete_export(imported, open_clip_checkpoint):
    """open_clip -> an export directory with export.export's layout; it loads with CLIP BPE and
    computes open_clip's embeddings for open_clip's own tokenization of real text."""
    tmodel, _, _ = open_clip_checkpoint
    assert set(os.listdir(imported)) == BUNDLE_FILES
    info = export.read_export_info(imported)
    assert info["tokenizer"] == {"type": "clip_bpe", "file": "bpe_simple_vocab_16e6.txt.gz"}
    assert info["model_type"] == "CoCa" and info["step"] is None and "open_clip_pytorch_model.bin" in info["origin"]
    card = open(os.path.join(imported, "MODEL_CARD.md")).read()
    assert "Imported from the open_clip checkpoint" in card and "CLIP BPE" in card
    model, params, vocab = export.load_export(imported)
    assert vocab.kind == "clip_bpe" and vocab.merges_path == os.path.join(imported, "bpe_simple_vocab_16e6.txt.gz")

    texts = ["a photo of a dog", "two cats on a sofa"]
    text = open_clip.get_tokenizer("coca_ViT-B-32", context_length=CTX)(texts).numpy()
    ours_ids = [[49406] + list(vocab.encode(t)) + [49407] for t in texts]
    assert [list(row[:len(ids)]) for row, ids in zip(text, ours_ids)] == ours_ids
    images = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want_img = tmodel.encode_image(torch.from_numpy(images)).numpy()
        want_txt = tmodel.encode_text(torch.from_numpy(text)).numpy()
    got_img = model.apply({"params": params}, images.transpose(0, 2, 3, 1), method=model.encode_image)
    got_txt = model.apply({"params": params}, text, method=model.encode_text)
    np.testing.assert_allclose(got_img, want_img, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_txt, want_txt, rtol=1e-4, atol=1e-5)


def test_imported_export_feeds_caption_zero_shot_and_init_from(imported, tmp_path, capsys):
    from simvlm_jax import caption, zero_shot  # pylint: disable=g-import-not-at-top
    from simvlm_jax.models import registry  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        os.makedirs(tmp_path / "images" / name)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3)).astype(np.uint8)).save(tmp_path / "images" / name / "1.png")
    image = str(tmp_path / "images" / "cat" / "1.png")
    capsys.readouterr()
    assert caption.main(["--export_dir", imported, "--max_len", "4", image]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{image}\t"), lines
    assert zero_shot.main(["--export_dir", imported, "--mode", "classify", "--image_dir",
                           str(tmp_path / "images")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["mode"] == "classify" and result["num_images"] == 2, result

    # train.init_from: the export's params go into a freshly initialized model of its config.
    fam = registry.family_of(export.load_config(imported))
    fresh = jax.tree_util.tree_map(np.asarray, fam.init_params(jax.random.key(0)))
    loaded = export.load_params_for_training(imported, fresh)
    _, want, _ = export.load_export(imported)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, loaded), want)


def test_import_errors_are_one_line(open_clip_checkpoint, tmp_path):
    _, config_json, ckpt = open_clip_checkpoint
    with pytest.raises(SystemExit, match=r"^error: unknown open_clip model 'coca_nope'.*open_clip_config.json$"):
        conv.main(["--model", "coca_nope", "--checkpoint", ckpt, "--output", str(tmp_path / "e")])
    with pytest.raises(SystemExit, match=r"^error: CLIP BPE merges file not found"):
        conv.main(["--model", config_json, "--checkpoint", ckpt, "--output", str(tmp_path / "e"),
                   "--merges_path", str(tmp_path / "missing.txt.gz")])
    assert not os.path.exists(tmp_path / "e")


# ----------------------------------------------------------------------------- CLI training

@pytest.mark.slow
def test_cli_training_on_the_open_clip_config_gives_an_open_clip_model(imported, tmp_path):
    """`python -m simvlm_jax.main` on gin/models/coca_ViT-B-32.gin (shrunk), started from the
    imported export: tasks tokenize with CLIP BPE, the export records it, and its open_clip
    files load in open_clip with our embeddings."""
    from test_cli import run_cli  # pylint: disable=g-import-not-at-top
    run_gin = tmp_path / "open_clip_run.gin"
    run_gin.write_text("include 'models/coca_ViT-B-32.gin'\ninclude 'data/builtin.gin'\n"
                       "include 'runs/pretrain.gin'\nMAX_PREFIX_LEN = 0  # CoCa: the whole caption is the target\n")
    args = [f"--gin_file={run_gin}", "--mode=prepare,train,export", "--print_json",
            f"--gin.DATA_DIR='{tmp_path / 'data'}'", f"--gin.WORK_DIR='{tmp_path / 'run'}'",
            "--gin.NUM_STEPS=2", "--gin.BATCH_SIZE=8",
            "--gin.prepare_builtin.num_train=100", "--gin.prepare_builtin.num_heldout=8",
            "--gin.prepare_builtin.num_text=100", "--gin.register_builtin.text_prefix_prob=0.0",
            "--gin.make_train_iterator.mixture_or_task_name='builtin_image_text'",
            "--gin.make_mesh.data=8", "--gin.make_mesh.fsdp=1", "--gin.make_optimizer.warmup_steps=1",
            f"--gin.train.init_from='{imported}'", "--gin.run.export_open_clip=True",
            *[f"--gin.{b}" for b in TINY_GIN]]
    proc = run_cli(*args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])["export_dir"]
    info = export.read_export_info(out)
    assert info["tokenizer"]["type"] == "clip_bpe" and info["open_clip"] is True
    model, params, vocab = export.load_export(out)
    tmodel = open_clip.create_model(f"local-dir:{out}/open_clip").eval()
    text = open_clip.get_tokenizer("coca_ViT-B-32", context_length=CTX)(["a red square"]).numpy()
    assert [49406] + list(vocab.encode("a red square")) + [49407] == list(text[0][:5])
    with torch.no_grad():
        want = tmodel.encode_text(torch.from_numpy(text)).numpy()
    np.testing.assert_allclose(model.apply({"params": params}, text, method=model.encode_text), want,
                               rtol=1e-4, atol=1e-5)
