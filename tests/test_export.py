"""Inference bundles for SimVLM and CoCa: round trips, format-1 bundles, bf16 exports, open_clip
files written from the bundle, and `load_params_for_training` (full / partial restores)."""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import struct
import sys

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import load_file

from conftest import tiny_config
from simvlm_jax import convert_open_clip, export
from simvlm_jax.data import tokenizer
from simvlm_jax.models import coca, registry, simvlm

SENTENCES = ["a red square on a blue background", "a green circle next to a yellow triangle",
             "two dogs playing in the park", "a small cat sleeping on a wooden chair"]
# conftest's tiny CoCa with 16 patches, 2 ViT layers and a 4 x width decoder MLP (as open_clip's).
COCA_TINY = dict(patch_size=8, encoder_layers=2, decoder_mlp_dim=128, embed_dim=32)
# The same sizes in open_clip's layout (exact GELU, eps 1e-5, decoder MLP = 4 x width).
COCA_OPEN_CLIP = dict(COCA_TINY, open_clip_compatible=True, activation="gelu_exact", layer_norm_eps=1e-5,
                      image_mean=coca.OPENAI_MEAN, image_std=coca.OPENAI_STD)
# bf16 keeps 8 significant bits (relative rounding <= 2^-9 per weight); on these tiny models
# the outputs move by 0.2-1% of their largest magnitude (measured: SimVLM logits 0.21%,
# CoCa image/text embedding 0.97%/0.61%, logits 0.47%).
BF16_OUTPUT_RTOL = 2e-2


@functools.lru_cache(maxsize=None)
def _init_fn(cfg):
    """Jitted init per config (compiled once, reused across seeds and tests)."""
    fam = registry.family_of(cfg)
    model, dummy = fam.module, fam.dummy_batch()
    return jax.jit(lambda key: nn.meta.unbox(model.init(key, dummy))["params"])


def _init(cfg, seed: int) -> dict:
    """Random init moved off its trivial values (zero biases, unit norms) so that every leaf
    is distinguishable and bf16 rounding touches all of them."""
    params = _init_fn(cfg)(jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32), params)


def _batch(cfg, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (2, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    if isinstance(cfg, coca.CoCaConfig):
        return {"image": image, "target_tokens": rng.integers(1, cfg.vocab_size, (2, cfg.max_text_len))}
    shapes = simvlm.dummy_batch(cfg, 2)
    return {"image": image, "has_image": np.ones((2,), np.int32),
            "prefix_tokens": rng.integers(1, cfg.vocab_size, shapes["prefix_tokens"].shape),
            "target_tokens": rng.integers(1, cfg.vocab_size, shapes["target_tokens"].shape)}


def _forward(model):
    """Jitted forward pass -> dict of outputs (SimVLM returns bare logits)."""
    def fn(params, batch):
        out = model.apply({"params": params}, batch)
        return out if isinstance(out, dict) else {"logits": out}
    return jax.jit(fn)


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_vocab")
    return tokenizer.train_sentencepiece(SENTENCES * 8, str(root / "spm.model"), vocab_size=48)


MODELS = {"simvlm": lambda: tiny_config(vocab_size=64), "coca": lambda: tiny_config("coca", **COCA_TINY)}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_and_params(request):
    cfg = MODELS[request.param]()
    return request.param, cfg, _init(cfg, seed=0)


def test_round_trip_records_model_type(model_and_params, vocab_path, tmp_path, clean_gin):
    name, cfg, params = model_and_params
    out = export.export(params, cfg, vocab_path, str(tmp_path / "export"), metrics={"cider": 0.5}, step=7)
    model, loaded, vocab = export.load_export(out)
    assert type(model) is (coca.CoCa if name == "coca" else simvlm.SimVLM)
    assert model.config == cfg
    _assert_trees_equal(loaded, params)
    assert vocab.vocab_size == 48
    info = json.loads((tmp_path / "export" / "export_info.json").read_text())
    want_type = "CoCa" if name == "coca" else "SimVLM"
    assert (info["format_version"], info["model_type"], info["config_class"], info["dtype"], info["step"]) == (
        2, want_type, type(cfg).__name__, "float32", 7)
    assert info["tokenizer"] == {"type": "sentencepiece", "file": "tokenizer.model"}
    with safe_open(os.path.join(out, "params.safetensors"), framework="numpy") as f:
        assert f.metadata()["model_type"] == want_type
    # model.gin binds only this config class and is valid gin that rebuilds the same config.
    gin_text = (tmp_path / "export" / "model.gin").read_text()
    bindings = [l for l in gin_text.splitlines() if not l.startswith("#")]
    assert bindings and all(l.startswith(type(cfg).__name__ + ".") for l in bindings)
    gin.parse_config(gin_text)
    assert type(cfg)() == cfg
    card = (tmp_path / "export" / "MODEL_CARD.md").read_text()
    assert card.startswith(f"# {want_type} export") and "| cider | 0.50 |" in card and "float32" in card


def test_format1_simvlm_bundle_still_loads(vocab_path, tmp_path):
    """A bundle as written before model types existed: format_version 1, no model_type/tokenizer."""
    cfg = tiny_config(vocab_size=64)
    params = _init(cfg, seed=3)
    out = export.export(params, cfg, vocab_path, str(tmp_path / "v1"))
    flat = load_file(os.path.join(out, "params.safetensors"))
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file(flat, os.path.join(out, "params.safetensors"), metadata={"format": "simvlm_jax", "version": "1"})
    v1_info = {"format_version": 1, "model": "SimVLM", "num_params": 1, "dtype": "float32", "step": None,
               "created": "2024-01-01T00:00:00+00:00", "metrics": {}}
    (tmp_path / "v1" / "export_info.json").write_text(json.dumps(v1_info))
    gin_lines = [f"SimVLMConfig.{f.name} = {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)]
    (tmp_path / "v1" / "model.gin").write_text("# SimVLM model config written by simvlm_jax.export\n"
                                               + "\n".join(gin_lines) + "\n")
    model, loaded, vocab = export.load_export(out)
    assert isinstance(model, simvlm.SimVLM) and model.config == cfg and vocab is not None
    _assert_trees_equal(loaded, params)
    # v1 bundles need their tokenizer; a newer format than this code knows is refused.
    os.remove(tmp_path / "v1" / "tokenizer.model")
    with pytest.raises(FileNotFoundError, match="missing tokenizer.model"):
        export.load_export(out)
    (tmp_path / "v1" / "export_info.json").write_text(json.dumps({**v1_info, "format_version": 99}))
    with pytest.raises(ValueError, match="newer"):
        export.load_export(out)


def test_model_gin_must_name_one_config_class(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        export.gin_to_config("SimVLMConfig.width = 32\nCoCaConfig.decoder_width = 32\n")
    with pytest.raises(ValueError, match="found none"):
        export.gin_to_config("# nothing\n")


def test_coca_bundle_without_tokenizer_file(tmp_path):
    """An open_clip CoCa exported without a vocabulary records CLIP BPE (its family's external
    tokenizer) with no file; load_export gives CLIP BPE from open_clip_torch when installed,
    else None. A CoCa exported without any tokenizer loads with vocab None."""
    has_open_clip = importlib.util.find_spec("open_clip") is not None
    for overrides, want in ((COCA_OPEN_CLIP, "clip_bpe"), (COCA_TINY, None)):
        cfg = tiny_config("coca", **overrides)
        out = export.export(_init(cfg, seed=1), cfg, None, str(tmp_path / str(want)))
        model, _, vocab = export.load_export(out)
        assert isinstance(model, coca.CoCa) and model.config == cfg
        if want == "clip_bpe" and has_open_clip:
            assert vocab.eos_id == 49407 and vocab.vocab_size == 49408
        else:
            assert vocab is None
        assert not os.path.exists(os.path.join(out, "tokenizer.model"))
        info = json.loads(open(os.path.join(out, "export_info.json")).read())
        assert info["tokenizer"]["type"] == want
    assert "CLIP BPE" in open(os.path.join(tmp_path, "clip_bpe", "MODEL_CARD.md")).read()
    # Bundles written before CLIP BPE was stored recorded its type as 'open_clip'.
    path = os.path.join(tmp_path, "clip_bpe", "export_info.json")
    info = json.loads(open(path).read())
    info["tokenizer"]["type"] = "open_clip"
    open(path, "w").write(json.dumps(info))
    assert export.read_export_info(str(tmp_path / "clip_bpe"))["tokenizer"] == {"type": "clip_bpe", "file": None}


def _clip_vocabulary():
    clip_tokenizer = pytest.importorskip("simvlm_jax.data.clip_tokenizer")
    try:
        return clip_tokenizer.ClipBpeVocabulary()
    except FileNotFoundError:
        pytest.skip("needs the CLIP BPE merges file open_clip_torch ships")


def test_bundle_records_and_ships_its_tokenizer(vocab_path, tmp_path):
    """export(vocabulary=...) stores the tokenizer get_vocabulary gave (SentencePiece model or CLIP
    BPE merges) and records its type; load_export returns that vocabulary, read from the bundle."""
    cfg = tiny_config("coca", **COCA_OPEN_CLIP)
    params = _init(cfg, seed=4)
    clip = _clip_vocabulary()
    out = export.export(params, cfg, clip, str(tmp_path / "clip"))
    info = json.loads(open(os.path.join(out, "export_info.json")).read())
    assert info["tokenizer"] == {"type": "clip_bpe", "file": "bpe_simple_vocab_16e6.txt.gz"}
    with open(clip.merges_path, "rb") as a, open(os.path.join(out, info["tokenizer"]["file"]), "rb") as b:
        assert a.read() == b.read()
    _, _, vocab = export.load_export(out)
    assert vocab.kind == "clip_bpe" and vocab.merges_path.startswith(out)
    assert list(vocab.encode("a dog")) == list(clip.encode("a dog"))
    os.remove(os.path.join(out, info["tokenizer"]["file"]))
    with pytest.raises(FileNotFoundError, match="missing bpe_simple_vocab_16e6.txt.gz"):
        export.load_export(out)

    spm = tokenizer.get_vocabulary(vocab_path)  # a seqio vocabulary, as experiment.run passes it
    out = export.export(params, cfg, spm, str(tmp_path / "spm"))
    assert export.read_export_info(out)["tokenizer"] == {"type": "sentencepiece", "file": "tokenizer.model"}
    assert export.load_export(out)[2].encode("a red square") == spm.encode("a red square")
    with pytest.raises(ValueError, match="cannot store a dict tokenizer"):
        export.export(params, cfg, {}, str(tmp_path / "bad"))


def test_open_clip_files_refused_for_another_tokenizer(vocab_path, tmp_path, clean_gin, capsys):
    """open_clip tokenizes with CLIP BPE: open_clip files of a model trained with SentencePiece are
    refused (one line naming the tokenizer, the reason and the override) before anything is
    written, by the writer and by the convert CLI; the override writes them."""
    cfg = tiny_config("coca", **COCA_OPEN_CLIP)
    params = _init(cfg, seed=5)
    want = (r"^export_open_clip refused: the model was trained with the sentencepiece tokenizer, but open_clip "
            r"always tokenizes with CLIP BPE, .*OpenClipWriter.allow_other_tokenizer = True to write it anyway$")
    with pytest.raises(ValueError, match=want):
        export.export(params, cfg, vocab_path, str(tmp_path / "refused"),
                      writers=[convert_open_clip.OpenClipWriter(cfg)])
    assert not os.path.exists(tmp_path / "refused") and not os.path.exists(tmp_path / "refused.tmp")
    gin.parse_config("OpenClipWriter.allow_other_tokenizer = True")  # the override, as run() reads it
    out = export.export(params, cfg, vocab_path, str(tmp_path / "allowed"),
                        writers=[convert_open_clip.OpenClipWriter(cfg)])
    assert os.path.exists(os.path.join(out, "open_clip", "open_clip_model.safetensors"))

    with pytest.raises(SystemExit, match=r"^error: .*trained with the sentencepiece tokenizer.*"
                                         r"--allow_other_tokenizer to write it anyway$"):
        convert_open_clip.main(["--export_dir", out, "--output", str(tmp_path / "oc")])
    assert not os.path.exists(tmp_path / "oc")
    convert_open_clip.main(["--export_dir", out, "--output", str(tmp_path / "oc"), "--allow_other_tokenizer"])
    assert "open_clip_model.safetensors" in os.listdir(tmp_path / "oc")


def _data_bytes(path: str) -> int:
    """Tensor bytes of a safetensors file (the file minus its 8-byte length and JSON header)."""
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
    return os.path.getsize(path) - 8 - header_len


def test_bf16_export(model_and_params, vocab_path, tmp_path):
    name, cfg, params = model_and_params
    f32 = export.export(params, cfg, vocab_path, str(tmp_path / "f32"))
    bf16 = export.export(params, cfg, vocab_path, str(tmp_path / "bf16"), dtype="bfloat16")
    f32_file, bf16_file = (os.path.join(d, "params.safetensors") for d in (f32, bf16))
    assert _data_bytes(bf16_file) * 2 == _data_bytes(f32_file)
    assert 0.45 < os.path.getsize(bf16_file) / os.path.getsize(f32_file) < 0.56
    with safe_open(bf16_file, framework="numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads(open(os.path.join(bf16, "export_info.json")).read())["dtype"] == "bfloat16"
    assert "weights stored as bfloat16" in open(os.path.join(bf16, "MODEL_CARD.md")).read()

    model, loaded, _ = export.load_export(bf16)
    rounded = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32), params)
    _assert_trees_equal(loaded, rounded)  # upcast to the config's float32, values exactly bf16-rounded
    fn, batch = _forward(model), _batch(cfg)
    want, got = fn(params, batch), fn(loaded, batch)
    err = _rel_err(got["logits"], want["logits"])
    assert 1e-6 < err < BF16_OUTPUT_RTOL, err  # changed (really bf16), but close
    if name == "coca":
        for k in ("image_embed", "text_embed"):
            assert _rel_err(got[k], want[k]) < BF16_OUTPUT_RTOL, k
    with pytest.raises(ValueError, match="bfloat16"):
        export.export(params, cfg, vocab_path, str(tmp_path / "bad"), dtype="int8")


def test_open_clip_files_in_bundle(tmp_path, clean_gin):
    """`writers=[convert_open_clip.OpenClipWriter(cfg)]` adds open_clip's files; a config open_clip
    cannot represent fails before anything is written."""
    cfg = tiny_config("coca", **COCA_OPEN_CLIP)
    params = _init(cfg, seed=2)
    out = export.export(params, cfg, None, str(tmp_path / "oc"), dtype="bfloat16",
                        writers=[convert_open_clip.OpenClipWriter(cfg)])
    oc_dir = os.path.join(out, convert_open_clip.OpenClipWriter.name)
    config = json.loads(open(os.path.join(oc_dir, "open_clip_config.json")).read())
    assert config["model_cfg"] == convert_open_clip.config_to_open_clip(cfg)
    np.testing.assert_allclose(config["preprocess_cfg"]["mean"], [0.48145466, 0.4578275, 0.40821073])
    state_dict = load_file(os.path.join(oc_dir, "open_clip_model.safetensors"))
    want = convert_open_clip.to_open_clip(params, cfg)
    assert set(state_dict) == set(want)
    for k, v in want.items():
        assert state_dict[k].dtype == jnp.bfloat16, k
        np.testing.assert_array_equal(state_dict[k], v.astype(jnp.bfloat16), err_msg=k)
    assert json.loads(open(os.path.join(out, "export_info.json")).read())["open_clip"] is True
    assert "local-dir:" in open(os.path.join(out, "MODEL_CARD.md")).read()

    paper = tiny_config("coca", **COCA_TINY)
    with pytest.raises(ValueError, match="no open_clip equivalent"):
        export.export(_init(paper, seed=2), paper, None, str(tmp_path / "paper"),
                      writers=[convert_open_clip.OpenClipWriter(paper)])
    assert not os.path.exists(tmp_path / "paper") and not os.path.exists(tmp_path / "paper.tmp")


def test_export_open_clip_bin_needs_torch(tmp_path, monkeypatch):
    cfg = tiny_config("coca", **COCA_OPEN_CLIP)
    params = _init(cfg, seed=0)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match="needs PyTorch"):
        convert_open_clip.export_open_clip(params, cfg, str(tmp_path / "oc"), formats=("bin",))
    with pytest.raises(ValueError, match="formats"):
        convert_open_clip.export_open_clip(params, cfg, str(tmp_path / "oc"), formats=("onnx",))


# ----------------------------------------------------------------------------- load_params_for_training

def _sharded(params, mesh):
    """Params laid out on `mesh`: leading dim split over 'data' where it divides, else replicated."""
    def put(x):
        spec = P("data") if x.ndim and x.shape[0] % mesh.shape["data"] == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))
    return jax.tree_util.tree_map(put, params)


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_load_params_for_training_full(model_and_params, vocab_path, tmp_path, dtype):
    _, cfg, params = model_and_params
    out = export.export(params, cfg, vocab_path, str(tmp_path / "e"), dtype=dtype)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))  # Auto axes, as partitioning.make_mesh
    fresh = _sharded(_init(cfg, seed=5), mesh)
    want = params if dtype is None else jax.tree_util.tree_map(
        lambda x: x.astype(jnp.bfloat16).astype(np.float32), params)
    for target in (fresh, jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                                sharding=x.sharding), fresh)):
        loaded = export.load_params_for_training(out, target)
        _assert_trees_equal(jax.tree_util.tree_map(np.asarray, loaded), want)  # float32 (bf16 upcast)
        for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(fresh)):
            assert a.sharding == b.sharding
    assert any(l.sharding.spec == P("data") for l in jax.tree_util.tree_leaves(loaded))


def test_load_params_for_training_partial_coca(vocab_path, tmp_path):
    """A new CoCa (another decoder) starts from an exported image encoder; the rest stays at init."""
    cfg = tiny_config("coca", **COCA_TINY)
    params = _init(cfg, seed=0)
    out = export.export(params, cfg, vocab_path, str(tmp_path / "e"), dtype="bfloat16")
    new_cfg = dataclasses.replace(cfg, multimodal_layers=2, vocab_size=80, freeze_encoder=True)
    fresh = _init(new_cfg, seed=9)
    with pytest.raises(ValueError, match="not in the export"):  # the decoders differ
        export.load_params_for_training(out, fresh)
    loaded = export.load_params_for_training(out, fresh, include=("visual/.*",))
    got, init, exported = (export.flatten_params(t) for t in (loaded, fresh, params))
    visual = [k for k in got if k.startswith("visual/")]
    assert visual and len(visual) < len(got)
    for k, v in got.items():
        v = np.asarray(v)
        assert v.dtype == np.float32, k
        if k in visual:
            np.testing.assert_array_equal(v, exported[k].astype(jnp.bfloat16).astype(np.float32), err_msg=k)
        else:
            np.testing.assert_array_equal(v, init[k], err_msg=k)
    assert not np.array_equal(got[visual[0]], init[visual[0]])


def test_load_params_for_training_across_scanned_and_unrolled_layers(vocab_path, tmp_path):
    """An export of unrolled layers loads into a scanned model (rows stacked in layer order) and
    back; a stacked tensor is never loaded in part (a model with fewer layers is refused)."""
    unrolled = tiny_config("coca", **{**COCA_TINY, "encoder_layers": 3})
    scanned = dataclasses.replace(unrolled, scan_layers=True)
    params = _init(unrolled, seed=0)
    out = export.export(params, unrolled, vocab_path, str(tmp_path / "unrolled"))
    stacked = export.load_params_for_training(out, _init(scanned, seed=4))
    flat = export.flatten_params(stacked)
    exported = export.flatten_params(params)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(flat["visual/layers/mlp/wi/kernel"][i]),
                                      exported[f"visual/layers_{i}/mlp/wi/kernel"])
    back = export.export(stacked, scanned, vocab_path, str(tmp_path / "scanned"))
    _assert_trees_equal(jax.tree_util.tree_map(np.asarray, export.load_params_for_training(back, _init(unrolled, seed=7))),
                        params)
    fewer = dataclasses.replace(unrolled, encoder_layers=2)
    with pytest.raises(ValueError, match="not in the export"):
        export.load_params_for_training(back, _init(fewer, seed=0))


def test_load_params_for_training_errors(vocab_path, tmp_path):
    cfg = tiny_config("coca", **COCA_TINY)
    out = export.export(_init(cfg, seed=0), cfg, vocab_path, str(tmp_path / "coca"))
    # Another model type: keys missing on both sides are named.
    simvlm_tree = _init(tiny_config(vocab_size=64), seed=0)
    with pytest.raises(ValueError) as e:
        export.load_params_for_training(out, simvlm_tree)
    msg = str(e.value)
    assert "params of the model are not in the export" in msg and "exported params are not in the model" in msg
    assert "logit_scale" in msg and next(iter(export.flatten_params(simvlm_tree))) in msg
    # Same keys, another shape: the key and both shapes are named.
    wider = tiny_config("coca", **{**COCA_TINY, "encoder_mlp_dim": 96})
    with pytest.raises(ValueError, match="shape mismatches") as e:
        export.load_params_for_training(out, _init(wider, seed=0))
    assert "visual/layers_0/mlp/wi/kernel: export (32, 64) vs model (32, 96)" in str(e.value)
    # An include pattern that selects nothing; abstract leaves that would stay uninitialized.
    tree = _init(cfg, seed=1)
    with pytest.raises(ValueError, match=r"include patterns matching no param: \['vision/.\*'\]"):
        export.load_params_for_training(out, tree, include=("vision/.*", "visual/.*"))
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    with pytest.raises(ValueError, match="abstract"):
        export.load_params_for_training(out, abstract, include=("visual/.*",))
    with pytest.raises(FileNotFoundError, match="not a simvlm_jax export"):
        export.load_params_for_training(str(tmp_path), tree)
