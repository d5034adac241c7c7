"""mPLUG model: shapes, logical axes, the skip-connected fusion plan, decoder causality and
KV cache, scan/unrolled parity, sharded == unsharded, gin configs, and the mplug_base /
mplug_large parameter counts against the AliceMind reference's."""
from __future__ import annotations

import dataclasses
import math
import os
import re

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simvlm_jax import partitioning
from simvlm_jax.models import family, layers, mplug

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 4
# ViT 1 x width 32 on 4 patches (+ class token); text side width 32; fusion 3 layers with
# stride 2 = [co, co, connected].
TINY = dict(vocab_size=64, image_size=32, patch_size=16, vision_width=32, vision_layers=1, vision_heads=2,
            vision_mlp_dim=64, text_width=32, text_heads=2, text_mlp_dim=64, text_layers=1, fusion_layers=3,
            fusion_stride=2, decoder_layers=1, embed_dim=16, max_text_len=6, max_target_len=5, max_prefix_len=4,
            mask_id=63)
TEXT_LENGTHS = [3, 6, 1, 4]    # real tokens per row (row 1 has no padding)
TARGET_LENGTHS = [5, 2, 4, 1]


def tiny(**overrides) -> mplug.MPLUGConfig:
    return mplug.MPLUGConfig(**{**TINY, **overrides})


def _padded(rng, lengths, width, vocab):
    out = np.zeros((len(lengths), width), np.int32)
    for row, n in enumerate(lengths):
        out[row, :n] = rng.integers(2, vocab, n)
    return out


def make_batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.integers(0, 256, (B, cfg.image_size, cfg.image_size, 3)), jnp.uint8),
            "text_tokens": jnp.asarray(_padded(rng, TEXT_LENGTHS, cfg.max_text_len, cfg.vocab_size)),
            "target_tokens": jnp.asarray(_padded(rng, TARGET_LENGTHS, cfg.max_target_len, cfg.vocab_size))}


def abstract_params(cfg):
    """Boxed abstract params (jax.eval_shape: nothing allocated or compiled)."""
    model = mplug.MPLUG(cfg)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), mplug.dummy_batch(cfg)))["params"]


def random_params(cfg, seed=0):
    """Random params of the right tree/shapes without compiling `init`."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = getattr(path[-1], "key", "")
        if name == "temperature":
            return jnp.asarray(0.07, jnp.float32)
        base = 1.0 if name == "scale" else 0.0
        return jnp.asarray(base + 0.1 * rng.standard_normal(x.shape), jnp.float32)
    return jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(abstract_params(cfg)))


@pytest.fixture(scope="module")
def tiny_model():
    cfg = tiny()
    model = mplug.MPLUG(cfg)
    return cfg, model, random_params(cfg)


# ----------------------------------------------------------------------------- structure

def test_fusion_plan_follows_the_reference_rule():
    # Reference (FusionLayer): layer j is co-attention iff j == 0 or j % stride != 0.
    assert mplug.fusion_plan(6, 3) == [(False, 0, 3), (True, 3, 1), (False, 4, 2)]
    assert mplug.fusion_plan(7, 3) == [(False, 0, 3), (True, 3, 1), (False, 4, 2), (True, 6, 1)]
    assert mplug.fusion_plan(6, 6) == [(False, 0, 6)]
    assert mplug.fusion_plan(4, 1) == [(False, 0, 1), (True, 1, 1), (True, 2, 1), (True, 3, 1)]
    assert mplug.fusion_plan(0, 3) == []
    for n, s in [(6, 3), (7, 2), (9, 4), (5, 10)]:
        plan = mplug.fusion_plan(n, s)
        assert sum(c for _, _, c in plan) == n
        connected = [j for is_conn, first, c in plan for j in range(first, first + c) if is_conn]
        assert connected == [j for j in range(n) if j > 0 and j % s == 0]
        assert tuple(connected) == tiny(fusion_layers=n, fusion_stride=s).connected_layers


@pytest.mark.parametrize("overrides", [{}, dict(scan_layers=True), dict(vision_width=48, vision_heads=3),
                                       dict(scan_layers=True, fusion_layers=5, fusion_stride=2)],
                         ids=["unrolled", "scan", "visn_fc", "scan-5-fusion"])
def test_every_param_has_logical_axes(overrides):
    boxed = abstract_params(tiny(**overrides))
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    assert len(leaves) > 40
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), jax.tree_util.keystr(path)
        assert len(leaf.names) == leaf.value.ndim, (jax.tree_util.keystr(path), leaf.names, leaf.value.shape)
    if overrides.get("scan_layers"):
        assert any("layers" in leaf.names for _, leaf in leaves)
    # Every name resolves on a data x fsdp x tensor mesh (no mesh axis used twice in a param).
    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = partitioning.logical_to_sharding(partitioning.logical_specs(boxed), mesh)
    assert len(jax.tree_util.tree_leaves(shardings)) == len(leaves)
    params = nn.meta.unbox(boxed)
    assert ("visn_fc" in params["visual"]) == ("vision_width" in overrides)
    fusion = set(params["fusion"])
    if overrides.get("fusion_layers") == 5:  # [co, co, connected, co, connected], runs scanned
        assert fusion == {"co_attention_0", "connected_2", "co_attention_3", "connected_4", "text_norm"}
        assert params["fusion"]["co_attention_0"]["mlp"]["wi"]["kernel"].shape[0] == 2
    elif not overrides.get("scan_layers"):
        assert fusion == {"co_attention_0_0", "co_attention_0_1", "connected_2", "text_norm"}
        # co-attention layers cross-attend; the connected layer attends over [image; text] only
        assert "cross_attention" in params["fusion"]["co_attention_0_1"]
        assert "cross_attention" not in params["fusion"]["connected_2"]


def test_forward_shapes(tiny_model):
    cfg, model, params = tiny_model
    out = jax.jit(model.apply)({"params": params}, make_batch(cfg))
    assert out["image_feat"].shape == out["text_feat"].shape == (B, cfg.embed_dim)
    assert out["itm_logits"].shape == (B, 2)
    assert out["mlm_logits"].shape == (B, cfg.max_text_len, cfg.vocab_size)  # [CLS] dropped
    assert out["logits"].shape == (B, cfg.max_target_len, cfg.vocab_size)
    for k, v in out.items():
        assert v.dtype == jnp.float32, k
        assert bool(jnp.all(jnp.isfinite(v))), k
    np.testing.assert_allclose(np.linalg.norm(out["image_feat"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text_feat"], axis=-1), 1.0, rtol=1e-5)
    assert float(out["temperature"]) == pytest.approx(0.07)
    # The pieces, called one by one.
    b = make_batch(cfg)
    image = model.apply({"params": params}, b["image"], method=mplug.MPLUG.encode_image)
    assert image.shape == (B, cfg.num_image_tokens, cfg.text_width)
    text = model.apply({"params": params}, b["text_tokens"], method=mplug.MPLUG.encode_text)
    assert text.shape == (B, cfg.max_text_len + 1, cfg.text_width)
    mask = mplug.with_cls(b["text_tokens"] != 0)
    fi, ft = model.apply({"params": params}, image, text, mask, method=mplug.MPLUG.fuse)
    assert fi.shape == image.shape and ft.shape == text.shape
    memory, mmask = model.apply({"params": params}, fi, ft, mask, method=mplug.MPLUG.fused_sequence)
    assert memory.shape == (B, cfg.num_image_tokens + cfg.max_text_len + 1, cfg.text_width)
    np.testing.assert_array_equal(np.asarray(mmask[:, cfg.num_image_tokens:]), np.asarray(mask))
    assert bool(jnp.all(mmask[:, :cfg.num_image_tokens]))


def test_temperature_is_a_clipped_param(tiny_model):
    cfg, model, params = tiny_model
    b = make_batch(cfg)
    assert float(params["temperature"]) == pytest.approx(0.07)
    fresh = jax.eval_shape(lambda: model.init(jax.random.key(0), mplug.dummy_batch(cfg)))
    assert fresh["params"]["temperature"].value.shape == ()
    for value, expected in ((10.0, 0.5), (1e-6, 0.001), (0.2, 0.2)):
        p = {**params, "temperature": jnp.float32(value)}
        out = model.apply({"params": p}, b["image"][:1] * 0 + 1, b["text_tokens"][:1], method=_itc_temp)
        assert float(out) == pytest.approx(expected)


def _itc_temp(model, images, tokens):
    return model.itc_features(model.encode_image(images), model.encode_text(tokens))[2]


def test_padding_does_not_leak(tiny_model):
    """Pad tokens (masked as keys) change neither the text encoder's real tokens nor the fused ones."""
    cfg, model, params = tiny_model
    b = make_batch(cfg)
    run = jax.jit(lambda p, im, ids, mask: model.apply({"params": p}, im, ids, mask, method=_encode_and_fuse))
    ids = b["text_tokens"]
    mask = ids != 0
    ref = run(params, b["image"], ids, mask)
    other = jnp.where(mask, ids, 7)  # different ids at the padded positions, same mask
    out = run(params, b["image"], other, mask)
    valid = np.asarray(mplug.with_cls(mask))
    for r, o in zip(ref, out):
        r, o = np.asarray(r), np.asarray(o)
        if r.shape[1] == valid.shape[1]:  # text outputs: compare the real tokens
            np.testing.assert_allclose(o[valid], r[valid], atol=1e-6)
            assert np.abs(o[~valid] - r[~valid]).max() > 1e-3  # the pad positions did change
        else:  # fused image tokens
            np.testing.assert_allclose(o, r, atol=1e-6)


def _encode_and_fuse(model, images, ids, mask):
    image = model.encode_image(images)
    text = model.encode_text(ids, mask)
    fused_image, fused_text = model.fuse(image, text, mplug.with_cls(mask))
    return text, fused_image, fused_text


# ----------------------------------------------------------------------------- fusion

def _layer_params(fusion_params: dict, j: int) -> dict:
    """Params of fusion layer j in the unrolled layout ('connected_j' or 'co_attention_s_{j-s}')."""
    if f"connected_{j}" in fusion_params:
        return fusion_params[f"connected_{j}"]
    for key in fusion_params:
        m = re.fullmatch(r"co_attention_(\d+)_(\d+)", key)
        if m and int(m[1]) + int(m[2]) == j:
            return fusion_params[key]
    raise KeyError(j)


def brute_force_fusion(cfg, fusion_params, image, text, text_mask):
    """The reference's FusionEncoder loop, layer by layer: layer j is a co-attention layer
    iff j == 0 or j % stride != 0 (image tokens only as keys/values), else a connected layer
    over [image; text] whose output is written back to both."""
    kw = dict(num_heads=cfg.text_heads, head_dim=cfg.text_width // cfg.text_heads, mlp_dim=cfg.text_mlp_dim,
              eps=cfg.layer_norm_eps)
    n = image.shape[1]
    for j in range(cfg.fusion_layers):
        p = {"params": _layer_params(fusion_params, j)}
        if j == 0 or j % cfg.fusion_stride != 0:
            text, _ = layers.TransformerLayer(cross_attention=True, **kw).apply(
                p, text, text_mask[:, None, None, :], image, None)
        else:
            joint = jnp.concatenate([jnp.ones(image.shape[:2], bool), text_mask], 1)
            x, _ = layers.TransformerLayer(**kw).apply(p, jnp.concatenate([image, text], 1), joint[:, None, None, :])
            image, text = x[:, :n], x[:, n:]
    text = nn.LayerNorm(epsilon=cfg.layer_norm_eps).apply({"params": fusion_params["text_norm"]}, text)
    return image, text


def _fusion_inputs(cfg, seed=1):
    rng = np.random.default_rng(seed)
    n, t = cfg.num_image_tokens, cfg.max_text_len + 1
    image = jnp.asarray(rng.standard_normal((B, n, cfg.text_width)), jnp.float32)
    text = jnp.asarray(rng.standard_normal((B, t, cfg.text_width)), jnp.float32)
    mask = mplug.with_cls(jnp.asarray(_padded(rng, TEXT_LENGTHS, cfg.max_text_len, cfg.vocab_size)) != 0)
    return image, text, mask


@pytest.mark.parametrize("layers_, stride", [(3, 2), (5, 2), (3, 4), (4, 1)])
def test_fusion_matches_the_layer_by_layer_reference(layers_, stride):
    cfg = tiny(fusion_layers=layers_, fusion_stride=stride)
    params = random_params(cfg)
    image, text, mask = _fusion_inputs(cfg)
    fused_image, fused_text = jax.jit(lambda p, *a: mplug.MPLUG(cfg).apply({"params": p}, *a,
                                                                          method=mplug.MPLUG.fuse))(
        params, image, text, mask)
    ref_image, ref_text = brute_force_fusion(cfg, params["fusion"], image, text, mask)
    np.testing.assert_allclose(np.asarray(fused_text), np.asarray(ref_text), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(fused_image), np.asarray(ref_image), atol=1e-5, rtol=1e-5)
    if cfg.connected_layers:
        # A connected layer updates every image token.
        assert np.abs(np.asarray(fused_image) - np.asarray(image)).max(axis=-1).min() > 1e-3
    else:
        # Only co-attention layers: the image tokens come out exactly as they went in.
        np.testing.assert_array_equal(np.asarray(fused_image), np.asarray(image))


def test_connected_layer_is_what_changes_the_image_tokens():
    """Same params for the first two (co-attention) layers: with stride 4 > 3 layers the image
    tokens are untouched; with stride 2 layer 2 is connected and changes them. Text outputs
    then differ too (the connected layer has its own params and attends over [image; text])."""
    image, text, mask = _fusion_inputs(tiny())
    outs = {}
    for stride in (4, 2):
        cfg = tiny(fusion_stride=stride)
        outs[stride] = mplug.MPLUG(cfg).apply({"params": random_params(cfg)}, image, text, mask,
                                              method=mplug.MPLUG.fuse)
    np.testing.assert_array_equal(np.asarray(outs[4][0]), np.asarray(image))
    assert np.abs(np.asarray(outs[2][0]) - np.asarray(image)).min() > 0
    assert np.abs(np.asarray(outs[2][1]) - np.asarray(outs[4][1])).max() > 1e-3


# ----------------------------------------------------------------------------- decoder

def _memory(cfg, seed=2):
    rng = np.random.default_rng(seed)
    n = cfg.num_image_tokens + cfg.max_text_len + 1
    memory = jnp.asarray(rng.standard_normal((B, n, cfg.text_width)), jnp.float32)
    mask = jnp.asarray(np.arange(n)[None] < np.array([[n], [n - 2], [n - 4], [cfg.num_image_tokens + 1]]))
    return memory, mask


def test_decoder_is_causal_and_respects_the_memory_mask(tiny_model):
    cfg, model, params = tiny_model
    decode = jax.jit(lambda p, tok, mem, m: model.apply({"params": p}, tok, mem, m, method=mplug.MPLUG.decode))
    memory, mask = _memory(cfg)
    tokens = make_batch(cfg)["target_tokens"].at[:, 0].set(cfg.bos_id)
    ref = np.asarray(decode(params, tokens, memory, mask))
    for k in range(1, cfg.max_target_len):
        changed = tokens.at[:, k].set((tokens[:, k] + 5) % cfg.vocab_size)
        out = np.asarray(decode(params, changed, memory, mask))
        np.testing.assert_allclose(out[:, :k], ref[:, :k], atol=1e-6, err_msg=f"token {k} leaked backwards")
        assert np.abs(out[:, k:] - ref[:, k:]).max() > 1e-4  # ... but does reach position k onwards
    # Masked memory positions are never read; unmasked ones are.
    noise = jnp.asarray(np.random.default_rng(3).standard_normal(memory.shape), jnp.float32)
    np.testing.assert_allclose(np.asarray(decode(params, tokens, jnp.where(mask[..., None], memory, noise), mask)),
                               ref, atol=1e-6)
    assert np.abs(np.asarray(decode(params, tokens, memory + noise, mask)) - ref).max() > 1e-3


def test_cached_decoding_matches_teacher_forcing(tiny_model):
    cfg, model, params = tiny_model
    memory, mask = _memory(cfg)
    tokens = make_batch(cfg)["target_tokens"].at[:, 0].set(cfg.bos_id)
    full = np.asarray(model.apply({"params": params}, tokens, memory, mask, method=mplug.MPLUG.decode))
    step = jax.jit(lambda p, c, tok, t: model.apply({"params": p, "cache": c}, tok, None, mask, decode=True,
                                                    positions=t, method=mplug.MPLUG.decode, mutable=["cache"]))
    logits, cache = model.apply({"params": params}, tokens[:, :1], memory, mask, decode=True,
                                positions=jnp.int32(0), method=mplug.MPLUG.decode, mutable=["cache"])
    got = [np.asarray(logits[:, 0])]
    cache = cache["cache"]
    for t in range(1, cfg.max_target_len):
        logits, mutated = step(params, cache, tokens[:, t:t + 1], jnp.int32(t))
        cache = mutated["cache"]
        got.append(np.asarray(logits[:, 0]))
    np.testing.assert_allclose(np.stack(got, 1), full, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- scan / remat / sharding

def _stack_runs(tree: dict) -> dict:
    """Unrolled params -> the scanned layout: 'layers_i' / 'transformer_i' / 'co_attention_j_i'
    become one 'layers' / 'transformer' / 'co_attention_j' with a leading layers axis."""
    out, groups = {}, {}
    for k, v in tree.items():
        base, _, idx = k.rpartition("_")
        if idx.isdigit() and (base in ("layers", "transformer") or re.fullmatch(r"co_attention_\d+", base)):
            groups.setdefault(base, []).append((int(idx), v))
        else:
            out[k] = _stack_runs(v) if isinstance(v, dict) else v
    for base, items in groups.items():
        out[base] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[v for _, v in sorted(items)])
    return out


def test_scan_and_remat_match_unrolled():
    cfg = tiny(vision_layers=2, text_layers=2, decoder_layers=2, fusion_layers=5, fusion_stride=2)
    params, batch = random_params(cfg), make_batch(cfg)
    ref = jax.jit(mplug.MPLUG(cfg).apply)({"params": params}, batch)
    scan_cfg = dataclasses.replace(cfg, scan_layers=True, remat_policy="full")
    scan_params = _stack_runs(params)
    expected = jax.tree_util.tree_map(lambda x: x.shape, nn.meta.unbox(abstract_params(scan_cfg)))
    assert jax.tree_util.tree_map(lambda x: x.shape, scan_params) == expected
    out = jax.jit(mplug.MPLUG(scan_cfg).apply)({"params": scan_params}, batch)
    assert set(out) == set(ref)
    for k in ref:
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]), atol=2e-5, rtol=2e-5, err_msg=k)


def test_sharded_forward_matches_unsharded(tiny_model):
    """data=2 x fsdp=2 x tensor=2, params and batch placed by the logical axis rules."""
    cfg, model, params = tiny_model
    batch = make_batch(cfg)
    ref = jax.jit(model.apply)({"params": params}, batch)
    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = partitioning.logical_to_sharding(partitioning.logical_specs(abstract_params(cfg)), mesh)
    placed = jax.device_put(params, shardings)
    assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
               for x in jax.tree_util.tree_leaves(placed))
    batch = {k: jax.device_put(v, partitioning.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    with partitioning.activate(mesh):
        out = jax.jit(model.apply)({"params": placed}, batch)
    for k in ref:
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]), atol=2e-5, rtol=2e-5, err_msg=k)


# ----------------------------------------------------------------------------- configs and sizes

def _gin_config(name: str) -> mplug.MPLUGConfig:
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([os.path.join(REPO, "gin", "models", f"{name}.gin")], [],
                                            skip_unknown=True)
        return mplug.MPLUGConfig()
    finally:
        gin.clear_config()


def reference_param_count(vocab: int, image_res: int, patch: int, vision_width: int, vision_layers: int,
                          stride: int, text_width: int = 768, mlp: int = 3072, text_layers: int = 6,
                          fusion_layers: int = 6, decoder_layers: int = 12, embed_dim: int = 256,
                          max_positions: int = 512, type_vocab: int = 2) -> dict[str, int]:
    """Parameters the AliceMind mPLUG pretraining model uses in its forward pass (momentum
    copies excluded), module by module as the reference builds them:

      * visual: CLIP VisualTransformer, `skip_last_layer=True` (ln_post, no `proj`): conv1
        (no bias), class embedding, (res/patch)^2 + 1 positions, ln_pre, resblocks
        (in_proj 3d^2+3d, out_proj d^2+d, ln_1, ln_2, c_fc d*4d+4d, c_proj 4d*d+d), ln_post;
        + visn_fc (Linear) + visn_layer_norm when vision width != text width (ViT-L);
      * BertEmbeddings (text encoder and decoder each): word, 512 positions, 2 token types,
        LayerNorm;
      * BERT layer: attention (q, k, v, output dense, LayerNorm) [+ crossattention, same
        shapes, encoder_width = 768] + intermediate + output (+ LayerNorm);
      * text encoder: BertModel(6 layers, no pooler);
      * fusion: the 6 FusionLayers of FusionEncoder that run (layers 6..11 of 12); a
        connected layer (j > 0, j % stride == 0) holds a crossattention it never calls;
      * decoder: BertLMHeadModel(12 layers with crossattention; no pooler; cls head =
        transform dense + LayerNorm, tied word embeddings, vocab bias);
      * vision_proj, text_proj (d -> 256), itm_head (d -> 2), temp; the MLM head
        (BertOnlyMLMHead as in FusionForMaskedLM / ALBEF, tied to the word embeddings).
    """
    d, vd = text_width, vision_width
    n = (image_res // patch) ** 2
    visual = (3 * patch * patch * vd + vd + (n + 1) * vd + 2 * vd
              + vision_layers * (4 * vd * vd + 4 * vd + 2 * vd * 4 * vd + 4 * vd + vd + 4 * vd) + 2 * vd)
    if vd != d:
        visual += vd * d + d + 2 * d
    embeddings = vocab * d + max_positions * d + type_vocab * d + 2 * d
    attention = 4 * d * d + 4 * d + 2 * d
    ffn = 2 * d * mlp + mlp + d + 2 * d
    lm_head = d * d + d + 2 * d + vocab
    connected = sum(1 for j in range(fusion_layers) if j > 0 and j % stride == 0)
    return {"visual": visual,
            "text_encoder": embeddings + text_layers * (attention + ffn),
            "fusion": fusion_layers * (2 * attention + ffn) - connected * attention,
            "decoder": embeddings + decoder_layers * (2 * attention + ffn) + lm_head,
            "heads": 2 * (d * embed_dim + embed_dim) + (2 * d + 2) + 1 + lm_head}


def expected_difference(cfg: mplug.MPLUGConfig, max_positions: int = 512, type_vocab: int = 2) -> int:
    """Ours - reference's used params, term by term (see mplug.py's module docstring)."""
    d = cfg.text_width
    return (-2 * type_vocab * d                                # no token-type embeddings (text encoder, decoder)
            - (max_positions - (cfg.max_text_len + 1)) * d     # text positions: [CLS] + max_text_len, not 512
            - (max_positions - cfg.max_target_len) * d         # decoder positions: max_target_len, not 512
            + d                                                # the learned [CLS] embedding
            + 2 * d + 2 * d)                                   # fusion 'text_norm' + 'fused_image_norm' (pre-LN)


@pytest.mark.parametrize("name, ref_kwargs", [
    ("mplug_base", dict(vocab=30522, image_res=256, patch=16, vision_width=768, vision_layers=12, stride=3)),
    ("mplug_large", dict(vocab=30522, image_res=224, patch=14, vision_width=1024, vision_layers=24, stride=6)),
])
def test_param_count_matches_the_reference(name, ref_kwargs):
    cfg = _gin_config(name)
    params = nn.meta.unbox(abstract_params(cfg))
    ours = family.count_params(params)
    ref = reference_param_count(**ref_kwargs)
    diff = expected_difference(cfg)
    print(f"\n{name}: ours {ours:,}; AliceMind reference (used in forward) {sum(ref.values()):,} "
          f"({', '.join(f'{k} {v:,}' for k, v in ref.items())}); expected difference {diff:+,}")
    # Part by part, so a wrong term points at its tower.
    assert family.count_params(params["visual"]) == ref["visual"]
    fusion = family.count_params(params["fusion"]) + family.count_params(params["fused_image_norm"])
    assert fusion == ref["fusion"] + 4 * cfg.text_width
    heads = sum(family.count_params(params[k]) for k in ("vision_proj", "text_proj", "itm_head", "mlm_head",
                                                          "temperature"))
    assert heads == ref["heads"]
    assert ours == sum(ref.values()) + diff


def test_gin_configs():
    tiny_cfg, base, large = (_gin_config(n) for n in ("mplug_tiny", "mplug_base", "mplug_large"))
    assert tiny_cfg.connected_layers == (2,)
    assert base.connected_layers == (3,) and base.fusion_layers == 6 and base.text_layers == 6
    assert (base.vision_width, base.vision_layers, base.patch_size, base.image_size) == (768, 12, 16, 256)
    assert (base.decoder_layers, base.vocab_size, base.embed_dim, base.text_width) == (12, 30522, 256, 768)
    assert large.connected_layers == ()  # stride 6, as the reference's config_bert.json
    assert (large.vision_width, large.vision_layers, large.patch_size, large.image_size) == (1024, 24, 14, 224)
    # The tiny model is CPU-sized.
    assert family.count_params(nn.meta.unbox(abstract_params(tiny_cfg))) < 2e6
    assert math.isclose(base.temperature_init, 0.07)


def test_config_is_validated():
    with pytest.raises(ValueError, match="fusion_stride"):
        tiny(fusion_stride=0)
    with pytest.raises(ValueError, match="text_heads"):
        tiny(text_heads=5)
    with pytest.raises(ValueError, match="remat_policy"):
        tiny(remat_policy="some")
    with pytest.raises(ValueError, match="max_text_len"):
        mplug.MPLUG(tiny()).init(jax.random.key(0), {**mplug.dummy_batch(tiny()),
                                                     "text_tokens": jnp.zeros((1, 7), jnp.int32)})


def test_conv_stem_image_tower_gives_the_same_token_grid():
    """stem_stages > 0: the ViT patchifies the BiT stem's features (patch_size in input pixels),
    so the image tokens keep their count; the stem's convs live under 'visual'."""
    cfg = tiny(image_size=64, patch_size=16, stem_stages=1, stem_width=32, stem_units=(1,))
    fam = mplug.MPLUGFamily(cfg)
    params = random_params(cfg)  # host-drawn: no init to compile
    assert {"root_conv", "stage1_unit1", "vit"} <= set(params["visual"])
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    tokens = fam.module.apply({"params": params}, images, method=mplug.MPLUG.encode_image)
    assert tokens.shape == (2, cfg.num_image_tokens, cfg.text_width) == (2, 17, cfg.text_width)
    assert "ResNet stage 1" in fam.table_cells()[5]
    with pytest.raises(ValueError, match="patch_size=2: must be a multiple of the conv stem stride 4"):
        tiny(stem_stages=1, patch_size=2)  # the stem's stride 4 does not divide the patch
    with pytest.raises(ValueError, match="stem_stages=0"):
        mplug.import_open_clip_vision(params, {}, cfg)


def test_zero_shot_retrieval_reports_itc_and_itm_reranked_metrics(tiny_model):
    """Through the generic zero-shot code: ITC ranks, ITM (log P(match)) re-ranks the top k, and
    the re-ranked scores of the top-k candidates are the model's own ITM scores."""
    from simvlm_jax import zero_shot  # pylint: disable=g-import-not-at-top
    cfg, _, params = tiny_model
    fam = mplug.MPLUGFamily(cfg)

    class Vocab:  # texts "3 4 5" -> ids [3, 4, 5]
        vocab_size, eos_id = cfg.vocab_size, 1

        def encode(self, text):
            return [int(t) for t in text.split()]

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    texts = [" ".join(map(str, rng.integers(3, cfg.vocab_size, 3))) for _ in range(4)]
    out = zero_shot.zero_shot_retrieval(fam, params, Vocab(), images, texts, np.array([0, 1, 2, 2]),
                                        zero_shot.ZeroShotOptions(rerank_k=2, batch_size=4))
    assert out["rerank_k"] == 2 and {"image_to_text_R@1", "rerank/image_to_text_R@1",
                                     "rerank/text_to_image_R@1", "rerank/mean_recall"} <= set(out)
    targets, _ = zero_shot.tokenize_captions(Vocab(), texts, *fam.target_layout())
    sim = np.asarray(fam.embed_images(params, images)) @ np.asarray(fam.embed_texts(params, targets)).T
    i2t, _ = zero_shot.rerank_top_k(fam, params, images, targets, sim, 2, batch_size=4)
    best = int(np.argmax(sim[0]))
    itm = fam.match_scores(params, fam.match_context(params, images[:1]), targets[best:best + 1])
    np.testing.assert_allclose(i2t[0, best], float(itm[0]), rtol=1e-4, atol=1e-5)


def test_vocabulary_check_counts_the_mask_id_past_the_tokenizer():
    class Vocab:
        vocab_size, eos_id = 256, 1
    fam = lambda **kw: mplug.MPLUGFamily(tiny(**kw))
    fam(vocab_size=257, mask_id=256).check_vocabulary(Vocab())  # [MASK] appended at the tokenizer's size
    with pytest.raises(ValueError, match="MPLUGConfig.vocab_size=600"):
        fam(vocab_size=600, mask_id=256).check_vocabulary(Vocab())
    with pytest.raises(ValueError, match="mask_id=1 is the pad/EOS id"):
        fam(vocab_size=256, mask_id=1).check_vocabulary(Vocab())
