"""open_clip CoCa <-> our open_clip-compatible CoCa: numerical parity and checkpoint round trips.

Randomly initialized (and then randomly perturbed, so no bias/LayerNorm is at its
trivial init) small open_clip CoCa models built through open_clip's own config
classes, converted with `convert_open_clip`, must give the same image embedding,
text embedding and caption logits (float32, relative error <= 1e-4).
"""
from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simvlm_jax import convert_open_clip as conv
from simvlm_jax.data import tokenizer  # noqa: F401  (registers get_vocabulary, bound by the gin files)
from simvlm_jax.models import coca, family, mplug, registry

torch = pytest.importorskip("torch")


def _import_open_clip():
    """open_clip imports torchvision; the only torchvision wheel for torch 2.13 here is a CUDA
    build whose C ops cannot load with CPU torch, and its meta registrations for nms/qnms then
    fail. Declaring those two op schemas (never called) lets the pure-Python parts import."""
    import sys  # pylint: disable=g-import-not-at-top
    try:
        import torchvision  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[mod]
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            try:
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:  # already defined
                pass
        _import_open_clip.lib = lib  # keep the registration alive
    return pytest.importorskip("open_clip")


open_clip = _import_open_clip()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 3
CTX = 12  # text context length (with <start>), so max_text_len = 11
BOS, EOT, VOCAB = 98, 99, 100


def small_model_cfg(vision_width: int, quick_gelu: bool) -> dict:
    """A shrunk open_clip CoCa config (same code paths as coca_ViT-B-32)."""
    return {
        "embed_dim": 32,
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": vision_width, "patch_size": 8,
                       "head_width": 16, "attentional_pool": True, "attn_pooler_heads": 4,
                       "attn_pooler_queries": 9, "output_tokens": True},
        "text_cfg": {"context_length": CTX, "vocab_size": VOCAB, "width": 32, "heads": 4, "layers": 2,
                     "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": CTX, "vocab_size": VOCAB, "width": 32, "heads": 4, "layers": 2,
                           "attn_pooler_heads": 4},
    }


def build_torch(model_cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = open_clip.CoCa(**model_cfg).eval()
    with torch.no_grad():
        # open_clip leaves text_decoder.text_projection as torch.empty (its init_parameters is
        # never called): initialize it. Then move every param off its init (zero biases, unit
        # LayerNorms, ...) so that a mis-mapped bias or norm cannot go unnoticed.
        torch.nn.init.normal_(model.text_decoder.text_projection, std=model.text_decoder.width ** -0.5)
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(0.05 * torch.randn_like(p))
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return model


def make_text(rng) -> np.ndarray:
    """[BOS, tokens..., EOT, 0...]: a full row (no pad), a short one, a medium one."""
    text = np.zeros((B, CTX), np.int64)
    for row, n in enumerate([CTX - 2, 3, 6]):
        text[row, 0] = BOS
        text[row, 1:n + 1] = rng.integers(1, BOS, n)
        text[row, n + 1] = EOT
    return text


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("vision_width,quick_gelu", [(48, False), (32, True)],
                         ids=["kdim!=dim-gelu", "kdim==dim-quickgelu"])
def test_open_clip_coca_parity(vision_width, quick_gelu):
    model_cfg = small_model_cfg(vision_width, quick_gelu)
    tmodel = build_torch(model_cfg)
    cfg = conv.config_from_open_clip(model_cfg, bos_id=BOS)
    assert cfg.activation == ("quick_gelu" if quick_gelu else "gelu_exact")
    params = conv.from_open_clip(tmodel.state_dict(), cfg)

    rng = np.random.default_rng(0)
    images = rng.standard_normal((B, 3, 32, 32)).astype(np.float32)  # already normalized
    text = make_text(rng)
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(images), torch.from_numpy(text))
        ref_text = tmodel.encode_text(torch.from_numpy(text)).numpy()
    model = coca.CoCa(cfg)
    batch = {"image": jnp.asarray(images.transpose(0, 2, 3, 1)), "target_tokens": jnp.asarray(text[:, 1:])}
    out = jax.jit(lambda p, b: model.apply({"params": p}, b))(params, batch)
    enc_text = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.encode_text))(
        params, jnp.asarray(text))

    assert out["logits"].shape == tuple(ref["logits"].shape) == (B, CTX - 1, VOCAB)
    for ours, theirs, what in [(out["image_embed"], ref["image_features"], "image embedding"),
                               (out["text_embed"], ref["text_features"], "text embedding"),
                               (enc_text, ref_text, "encode_text"),
                               (out["logits"], ref["logits"], "caption logits")]:
        err = rel_err(ours, theirs.numpy() if hasattr(theirs, "numpy") else theirs)
        assert err < 1e-4, (what, err)
    np.testing.assert_allclose(float(out["logit_scale"]), float(ref["logit_scale"]), rtol=1e-6)


def test_state_dict_round_trips_and_loads_strictly(tmp_path):
    model_cfg = small_model_cfg(48, False)
    tmodel = build_torch(model_cfg, seed=1)
    sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    for scan in (False, True):
        cfg = conv.config_from_open_clip(model_cfg, bos_id=BOS, scan_layers=scan)
        params = conv.from_open_clip(sd, cfg)
        if scan:  # stacked on a leading 'layers' axis
            assert params["visual"]["transformer"]["ln_1"]["scale"].shape == (2, 48)
        back = conv.to_open_clip(params, cfg)
        assert set(back) == set(sd)
        for k in sd:
            np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
        # ours -> open_clip -> ours is the identity.
        again = conv.from_open_clip(back, cfg)
        jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)
    # The exported state_dict loads strictly into a fresh open_clip model.
    fresh = open_clip.CoCa(**model_cfg)
    fresh.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in back.items()}, strict=True)
    # Files: torch .bin (weights_only) and .safetensors.
    torch.save(tmodel.state_dict(), tmp_path / "m.bin")
    loaded = conv.load_state_dict(str(tmp_path / "m.bin"))
    assert set(loaded) == set(sd) and all(np.array_equal(loaded[k], sd[k]) for k in sd)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file({k: v.contiguous() for k, v in tmodel.state_dict().items()},
                                str(tmp_path / "m.safetensors"))
    loaded = conv.load_state_dict(str(tmp_path / "m.safetensors"))
    assert set(loaded) == set(sd) and all(np.array_equal(loaded[k], sd[k]) for k in sd)
    # A checkpoint for a different config is rejected with a clear message.
    with pytest.raises(ValueError, match="does not match"):
        conv.from_open_clip(sd, conv.config_from_open_clip(small_model_cfg(48, False), bos_id=BOS,
                                                           n_queries=5))


@pytest.mark.parametrize("name", ["coca_ViT-B-32", "coca_ViT-L-14"])
def test_gin_configs_match_open_clip(name, clean_gin):
    """The gin config equals the converted open_clip config, has open_clip's param count and
    selects open_clip's tokenizer (CLIP BPE). Its layers are scanned (less host memory; exports
    load into either layout)."""
    model_cfg = open_clip.get_model_config(name)
    expected = conv.config_from_open_clip(model_cfg, scan_layers=True)
    gin.parse_config_file(os.path.join(REPO, "gin", "models", f"{name}.gin"))
    assert registry.model_family().config == expected
    assert gin.query_parameter("get_vocabulary.kind") == "clip_bpe"
    with torch.device("meta"):
        tmodel = open_clip.CoCa(**{k: v for k, v in model_cfg.items() if k != "custom_text"})
    n_torch = sum(p.numel() for p in tmodel.parameters())
    n_ours = family.count_params(nn.meta.unbox(coca.CoCaFamily(expected).abstract_params()))
    assert n_ours == n_torch, (n_ours, n_torch)


# ----------------------------------------------------------------------------- ours -> open_clip files

def _open_clip_cfgs(model_cfg: dict) -> tuple:
    """open_clip's own dataclasses for a model config (so that defaults compare equal to explicit values)."""
    from open_clip.coca_model import MultimodalCfg  # pylint: disable=g-import-not-at-top
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg  # pylint: disable=g-import-not-at-top
    return (model_cfg["embed_dim"], model_cfg.get("quick_gelu", False), model_cfg.get("custom_text", False),
            CLIPVisionCfg(**model_cfg["vision_cfg"]), CLIPTextCfg(**model_cfg["text_cfg"]),
            MultimodalCfg(**model_cfg["multimodal_cfg"]))


@pytest.mark.parametrize("name", ["coca_ViT-B-32", "coca_ViT-L-14"])
def test_config_to_open_clip_matches_builtin(name):
    theirs = open_clip.get_model_config(name)
    ours = conv.config_to_open_clip(conv.config_from_open_clip(theirs))
    assert _open_clip_cfgs(ours) == _open_clip_cfgs(theirs)


@pytest.mark.parametrize("vision_width,quick_gelu", [(48, False), (32, True)])
def test_config_to_open_clip_inverts_config_from_open_clip(vision_width, quick_gelu):
    cfg = conv.config_from_open_clip(small_model_cfg(vision_width, quick_gelu), bos_id=BOS)
    model_cfg = conv.config_to_open_clip(cfg)
    assert conv.config_from_open_clip(model_cfg, bos_id=BOS) == cfg
    assert _open_clip_cfgs(model_cfg)[1:] == _open_clip_cfgs({**small_model_cfg(vision_width, quick_gelu),
                                                             "custom_text": True})[1:]
    for bad in ({"open_clip_compatible": False, "activation": "gelu"}, {"layer_norm_eps": 1e-6},
                {"decoder_mlp_dim": 64}):
        with pytest.raises(ValueError, match="no open_clip equivalent"):
            conv.config_to_open_clip(coca.CoCaConfig(**{**dataclasses.asdict(cfg), **bad}))


def _ours_random(cfg: coca.CoCaConfig, seed: int = 0) -> dict:
    """Our random init, perturbed off its trivial values (as build_torch does for open_clip's)."""
    init = jax.jit(lambda key: nn.meta.unbox(coca.CoCa(cfg).init(key, coca.dummy_batch(cfg)))["params"])
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                                  init(jax.random.key(seed)))


def _inputs(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, 3, 32, 32)).astype(np.float32), make_text(rng)  # NCHW, normalized


def _ours_outputs(model: coca.CoCa, params: dict, images: np.ndarray, text: np.ndarray) -> dict:
    def run(p, nhwc, text):
        mdl = model.bind({"params": p})
        logits = mdl({"image": nhwc, "target_tokens": text[:, 1:]})["logits"]
        return {"encode_image": mdl.encode_image(nhwc), "encode_text": mdl.encode_text(text), "logits": logits}
    return jax.jit(run)(params, jnp.asarray(images.transpose(0, 2, 3, 1)), jnp.asarray(text))


def _compare_with_open_clip(tmodel, ours: dict, images: np.ndarray, text: np.ndarray, rtol: float) -> None:
    """encode_image, encode_text and caption logits of an open_clip model vs ours (relative error)."""
    with torch.no_grad():
        theirs = {"encode_image": tmodel.encode_image(torch.from_numpy(images)),
                  "encode_text": tmodel.encode_text(torch.from_numpy(text)),
                  "logits": tmodel(torch.from_numpy(images), torch.from_numpy(text))["logits"]}
    for what, ref in theirs.items():
        assert rel_err(ours[what], ref.numpy()) < rtol, (what, rel_err(ours[what], ref.numpy()))


def test_export_loads_in_open_clip(tmp_path, monkeypatch):
    """Our params -> export bundle with open_clip files (safetensors) and the convert CLI (.bin):
    open_clip's create_model loads both strictly and computes our embeddings and logits."""
    from simvlm_jax import export  # pylint: disable=g-import-not-at-top
    model_cfg = small_model_cfg(48, False)
    cfg = conv.config_from_open_clip(model_cfg, bos_id=BOS)
    params = _ours_random(cfg)
    images, text = _inputs()
    ours = _ours_outputs(coca.CoCa(cfg), params, images, text)
    bundle = export.export(params, cfg, None, str(tmp_path / "bundle"), writers=[conv.OpenClipWriter(cfg)])

    # 1. The bundle's open_clip/ dir: config + safetensors, via open_clip's local-dir schema.
    tmodel = open_clip.create_model(f"local-dir:{bundle}/{conv.OpenClipWriter.name}").eval()
    assert isinstance(tmodel, open_clip.CoCa)
    _compare_with_open_clip(tmodel, ours, images, text, rtol=1e-4)

    # 2. A torch .bin from the CLI, loaded as `pretrained=` for a registered model name.
    out = str(tmp_path / "bin")
    conv.main(["--export_dir", bundle, "--output", out, "--format", "bin"])
    assert sorted(os.listdir(out)) == ["open_clip_config.json", "open_clip_pytorch_model.bin"]
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "test-coca-small", {**model_cfg, "custom_text": True})
    tmodel = open_clip.create_model("test-coca-small", pretrained=os.path.join(out, "open_clip_pytorch_model.bin"))
    state_dict = torch.load(os.path.join(out, "open_clip_pytorch_model.bin"), weights_only=True)
    open_clip.CoCa(**model_cfg).load_state_dict(state_dict, strict=True)
    for k, v in conv.to_open_clip(params, cfg).items():
        np.testing.assert_array_equal(tmodel.state_dict()[k].numpy(), v, err_msg=k)
    _compare_with_open_clip(tmodel.eval(), ours, images, text, rtol=1e-4)

    # 3. bf16 weights load into open_clip's float32 model; outputs move by bf16 rounding only
    # (measured: 0.4% image, 1.3% text embedding, 0.9% logits).
    bf16_dir = conv.export_open_clip(params, cfg, str(tmp_path / "bf16"), dtype="bfloat16")
    tmodel = open_clip.create_model(f"local-dir:{bf16_dir}").eval()
    _compare_with_open_clip(tmodel, ours, images, text, rtol=3e-2)


# ----------------------------------------------------------------------------- mPLUG's image tower
# CLIP ViT weights -> mPLUG's image tower (`mplug.import_open_clip_vision`): a small random
# open_clip CLIP vision tower, converted, gives the same tokens as open_clip's own forward.
MPLUG_CFG = mplug.MPLUGConfig(vocab_size=64, image_size=32, patch_size=8, vision_width=48, vision_layers=2,
                        vision_heads=3, vision_mlp_dim=96, text_width=48, text_heads=3, text_mlp_dim=96,
                        text_layers=1, fusion_layers=2, fusion_stride=1, decoder_layers=1, embed_dim=16,
                        max_text_len=6, max_target_len=5, max_prefix_len=3, mask_id=63)


def _open_clip_vit(width=48, layers=2, patch=8):
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=24, vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=layers, width=width, head_width=16, mlp_ratio=2.0, patch_size=patch, image_size=32,
            output_tokens=True),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
        quick_gelu=True)
    with torch.no_grad():  # move every LayerNorm / bias off its trivial init
        for p in model.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_clip_vision_tower_matches_open_clip():
    model = _open_clip_vit()
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    fam = mplug.MPLUGFamily(MPLUG_CFG)
    params = nn.meta.unbox(fam.init_params(jax.random.key(0)))
    params = mplug.import_open_clip_vision(params, sd, MPLUG_CFG)
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)  # already normalized
    ours = np.asarray(fam.module.apply({"params": params}, images, method=mplug.MPLUG.encode_image))
    with torch.no_grad():
        pooled, tokens = model.visual(torch.from_numpy(images).permute(0, 3, 1, 2))
    np.testing.assert_allclose(ours[:, 1:], tokens.numpy(), rtol=1e-4, atol=1e-4)
    proj = sd["visual.proj"]
    np.testing.assert_allclose(ours[:, 0] @ proj, pooled.numpy(), rtol=1e-4, atol=1e-4)


def test_a_mismatched_vision_config_is_named():
    sd = {k: v.detach().numpy() for k, v in _open_clip_vit(width=64, layers=2).state_dict().items()}
    params = nn.meta.unbox(mplug.MPLUGFamily(MPLUG_CFG).init_params(jax.random.key(0)))
    with pytest.raises((ValueError, KeyError), match="vision"):
        mplug.import_open_clip_vision(params, sd, MPLUG_CFG)
