"""CoCa model: logical axes, text/CLS masks, pooler layouts, loss, sharded contrastive memory, configs."""
from __future__ import annotations

import dataclasses
import math
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import tiny_config
from simvlm_jax import losses, partitioning
from simvlm_jax.models import coca, family, registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 4
OPEN_CLIP = dict(open_clip_compatible=True, activation="gelu_exact", layer_norm_eps=1e-5, embed_dim=32, n_queries=5)
LENGTHS = [3, 8, 5, 1]  # caption lengths per row (row 1 fills max_text_len: no pad)


def make_batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    targets = np.zeros((B, cfg.max_text_len), np.int32)
    for row, n in enumerate(LENGTHS):
        targets[row, :n] = rng.integers(2, cfg.vocab_size, n)
    return {"image": jnp.asarray(rng.integers(0, 256, (B, cfg.image_size, cfg.image_size, 3)), jnp.uint8),
            "target_tokens": jnp.asarray(targets)}


def init(cfg):
    model = coca.CoCa(cfg)
    params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.key(0), coca.dummy_batch(cfg))["params"]))()
    return model, params


def random_params(cfg, seed=0):
    """Random params of the right tree/shapes without compiling `init` (compiles dominate here)."""
    rng = np.random.default_rng(seed)
    def leaf(path, x):
        name = getattr(path[-1], "key", "")
        if name == "logit_scale":
            return jnp.asarray(math.log(1 / 0.07), jnp.float32)
        base = 1.0 if name == "scale" else 0.0
        return jnp.asarray(base + 0.1 * rng.standard_normal(x.shape), jnp.float32)
    return jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(coca.CoCaFamily(cfg).abstract_params()))


def batch8(cfg):
    b = make_batch(cfg)
    return jax.tree_util.tree_map(lambda x: jnp.concatenate([x, x[::-1]], 0), b)


PAPER_WEIGHTS = {"contrastive": 1.0, "caption": 2.0}  # the paper's lambda_con, lambda_cap


def loss_fn(model, params, batch, mesh=None):
    batch_axes = partitioning.batch_mesh_axes(mesh) if mesh is not None else ()
    return losses.contrastive_caption_objective(model.apply({"params": params}, batch), batch["target_tokens"],
                                                weights=PAPER_WEIGHTS, mesh=mesh, batch_axes=batch_axes).value


@pytest.fixture(scope="module")
def paper():
    cfg = tiny_config("coca")
    model, params = init(cfg)
    return cfg, model, params, jax.jit(lambda p, b: model.apply({"params": p}, b))


@pytest.fixture(scope="module")
def paper_grads(paper):
    """(loss, grads) of the paper-mode model on an 8-example batch (single device)."""
    cfg, model, params, _ = paper
    return jax.jit(jax.value_and_grad(lambda p, b: loss_fn(model, p, b)))(params, batch8(cfg))


def _diff(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))


def _set(params, path, fn):
    """Copy of `params` with the leaf at `path` (tuple of keys) replaced by fn(leaf)."""
    if len(path) == 1:
        return {**params, path[0]: fn(params[path[0]])}
    return {**params, path[0]: _set(params[path[0]], path[1:], fn)}


# ----------------------------------------------------------------------------- structure

@pytest.mark.parametrize("overrides", [{}, dict(scan_layers=True), OPEN_CLIP, dict(OPEN_CLIP, scan_layers=True)],
                         ids=["paper", "paper-scan", "open_clip", "open_clip-scan"])
def test_every_param_has_logical_axes(overrides):
    boxed = coca.CoCaFamily(tiny_config("coca", **overrides)).abstract_params()
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    assert len(leaves) > 20
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), jax.tree_util.keystr(path)
        assert len(leaf.names) == leaf.value.ndim, (jax.tree_util.keystr(path), leaf.names, leaf.value.shape)
    if overrides.get("scan_layers"):
        assert any("layers" in leaf.names for _, leaf in leaves)
    # The logical names resolve on a mesh (FSDP over 'embed', tensor over heads/mlp/vocab).
    specs = partitioning.logical_specs(boxed)
    assert jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))


def test_forward_outputs(paper):
    cfg, _, params, apply = paper
    out = apply(params, make_batch(cfg))
    assert out["image_embed"].shape == out["text_embed"].shape == (B, cfg.embed_dim)
    assert out["logits"].shape == (B, cfg.max_text_len, cfg.vocab_size) and out["logits"].dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(out["image_embed"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["text_embed"], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(out["logit_scale"]), 1 / 0.07, rtol=1e-5)
    assert float(params["logit_scale"]) == pytest.approx(math.log(1 / 0.07))
    # The decoder cross-attends to the n_queries generative pooler tokens.
    _, tokens = jax.eval_shape(lambda p, im: coca.CoCa(cfg).apply({"params": p}, im,
                                                                  method=coca.CoCa.image_features),
                               params, make_batch(cfg)["image"])
    assert tokens.shape == (B, cfg.n_queries, cfg.decoder_width)


# ----------------------------------------------------------------------------- text masks

def test_captioning_is_causal_and_cls_sees_the_whole_caption(paper):
    cfg, _, params, apply = paper
    batch = make_batch(cfg)
    out = apply(params, batch)
    row, j = 1, 4  # row 1 is full length
    t2 = batch["target_tokens"].at[row, j].set((batch["target_tokens"][row, j] + 7) % cfg.vocab_size)
    out2 = apply(params, dict(batch, target_tokens=t2))
    # logits[:, i] predicts target i from [BOS, t_0 .. t_{i-1}].
    assert _diff(out["logits"][row, :j + 1], out2["logits"][row, :j + 1]) < 1e-5
    assert _diff(out["logits"][row, j + 1], out2["logits"][row, j + 1]) > 1e-4
    assert _diff(out["text_embed"][row], out2["text_embed"][row]) > 1e-4
    # Other rows unaffected.
    np.testing.assert_allclose(np.delete(np.asarray(out["logits"]), row, 0),
                               np.delete(np.asarray(out2["logits"]), row, 0), atol=1e-5)
    # The CLS (appended after the text) sees the LAST token of a full-length caption too.
    last = cfg.max_text_len - 1
    t3 = batch["target_tokens"].at[row, last].set((batch["target_tokens"][row, last] + 7) % cfg.vocab_size)
    assert _diff(out["text_embed"][row], apply(params, dict(batch, target_tokens=t3))["text_embed"][row]) > 1e-4


def test_cls_ignores_padding(paper):
    """Pad positions' inputs (their position embeddings) never reach the text embedding or the
    logits of real tokens; the same perturbation at a real position does."""
    cfg, _, params, apply = paper
    batch = make_batch(cfg)
    out = apply(params, batch)
    row = 0  # 3 real tokens: text positions 0 (BOS) .. 3 are real, 4 .. 8 pad, 9 = CLS
    def perturb(rows):
        noise = 5.0 * jax.random.normal(jax.random.key(1), (len(rows), cfg.decoder_width))
        return _set(params, ("text", "positional_embedding"), lambda t: t.at[jnp.asarray(rows)].add(noise))
    pad_rows = list(range(LENGTHS[row] + 1, cfg.max_text_len + 1))
    out_pad = apply(perturb(pad_rows), batch)
    assert _diff(out_pad["text_embed"][row], out["text_embed"][row]) < 1e-5
    assert _diff(out_pad["logits"][row, :LENGTHS[row]], out["logits"][row, :LENGTHS[row]]) < 1e-5
    out_real = apply(perturb([LENGTHS[row]]), batch)
    assert _diff(out_real["text_embed"][row], out["text_embed"][row]) > 1e-4
    # Masks: paper mode = non-pad tokens + BOS + CLS; open_clip mode = legacy off-by-one.
    text = coca.with_bos(batch["target_tokens"][:1], 0)
    np.testing.assert_array_equal(np.asarray(coca.text_key_mask(text, cfg))[0],
                                  [True] * 4 + [False] * 5 + [True])
    np.testing.assert_array_equal(np.asarray(coca.text_key_mask(text, tiny_config("coca", **OPEN_CLIP)))[0],
                                  [True, False] + [True] * 3 + [False] * 5)


# ----------------------------------------------------------------------------- poolers

@pytest.mark.parametrize("layout", ["cascade", "parallel"])
def test_pooler_layouts(layout, paper):
    cfg, _, params, apply = paper  # 'cascade'; 'parallel' has the same params
    if layout == "parallel":
        cfg = dataclasses.replace(cfg, pooler_layout=layout)
        model = coca.CoCa(cfg)
        apply = jax.jit(lambda p, b: model.apply({"params": p}, b))
    batch = make_batch(cfg)
    out = apply(params, batch)
    assert params["pooler"]["generative_pooler"]["query"].shape == (cfg.n_queries, cfg.decoder_width)
    assert params["pooler"]["contrastive_pooler"]["query"].shape == (1, cfg.decoder_width)
    # Perturb the generative pooler's queries: captions always change; the contrastive
    # embedding changes only in 'cascade' (where it pools the generative pooler's output).
    p2 = _set(params, ("pooler", "generative_pooler", "query"), lambda q: q + 1.0)
    out2 = apply(p2, batch)
    assert _diff(out["logits"], out2["logits"]) > 1e-4
    changed = _diff(out["image_embed"], out2["image_embed"])
    assert (changed > 1e-4) if layout == "cascade" else (changed < 1e-6), changed


def test_open_clip_mode_pools_with_one_pooler():
    cfg = tiny_config("coca", **OPEN_CLIP)
    model = coca.CoCa(cfg)
    params = random_params(cfg)
    _, tokens = jax.eval_shape(lambda p, im: model.apply({"params": p}, im, method=coca.CoCa.image_features),
                               params, make_batch(cfg)["image"])
    assert tokens.shape == (B, cfg.n_queries - 1, cfg.decoder_width)  # query 0 is the contrastive one
    assert set(params["pooler"]) == {"attn_pool", "ln_post", "proj"}
    assert "class_embedding" in params["visual"] and "ln_pre" in params["visual"]
    assert set(params["decoder"]["layers_0"]) == {"resblock", "cross_attn"}
    assert "ln_1_kv" in params["decoder"]["layers_0"]["cross_attn"]
    out = jax.jit(model.apply)({"params": params}, make_batch(cfg))
    assert out["logits"].shape == (B, cfg.max_text_len, cfg.vocab_size)
    assert bool(jnp.all(jnp.isfinite(out["logits"])))


@pytest.mark.parametrize("overrides", [{}, OPEN_CLIP], ids=["paper", "open_clip"])
def test_scan_and_remat_match_unrolled(overrides):
    cfg = tiny_config("coca", unimodal_layers=2, multimodal_layers=2, encoder_layers=2, **overrides)
    model, params = coca.CoCa(cfg), random_params(cfg)
    batch = make_batch(cfg)
    ref = jax.jit(model.apply)({"params": params}, batch)
    scan_cfg = dataclasses.replace(cfg, scan_layers=True, remat_policy="full")

    def stack(tree):
        out, groups = {}, {}
        for k, v in tree.items():
            base, _, idx = k.rpartition("_")
            if idx.isdigit() and base in ("layers", "transformer"):
                groups.setdefault(base, []).append((int(idx), v))
            else:
                out[k] = stack(v) if isinstance(v, dict) else v
        for base, items in groups.items():
            out[base] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[v for _, v in sorted(items)])
        return out
    scan_params = stack(params)
    expected = jax.tree_util.tree_map(lambda x: x.shape, nn.meta.unbox(coca.CoCaFamily(scan_cfg).abstract_params()))
    assert jax.tree_util.tree_map(lambda x: x.shape, scan_params) == expected
    out = jax.jit(coca.CoCa(scan_cfg).apply)({"params": scan_params}, batch)
    for k in ("image_embed", "text_embed", "logits"):
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]), atol=2e-5, rtol=2e-5)


def test_frozen_encoder_gets_no_gradient(paper, paper_grads):
    cfg, _, params, _ = paper
    model = coca.CoCa(dataclasses.replace(cfg, freeze_encoder=True))
    loss, grads = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(model, p, b)))(params, batch8(cfg))
    norm = lambda t: float(sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(t)))
    assert norm(grads["visual"]) == 0.0
    assert norm(grads["pooler"]) > 0 and norm(grads["text"]) > 0 and norm(grads["decoder"]) > 0
    # Same loss; without freezing the encoder does get gradients.
    ref_loss, ref_grads = paper_grads
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    assert norm(ref_grads["visual"]) > 0


# ----------------------------------------------------------------------------- loss

def _reference_loss(img, txt, scale, logits, targets, lam_con, lam_cap):
    img, txt, logits = (np.asarray(x, np.float64) for x in (img, txt, logits))
    sim = scale * img @ txt.T
    def ce(m):  # rows vs diagonal labels
        m = m - m.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(m).sum(1)) - np.diag(m)))
    con = 0.5 * (ce(sim) + ce(sim.T))
    lp = logits - logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    t = np.asarray(targets)
    w = t > 0
    nll = -np.take_along_axis(lp, t[..., None], -1)[..., 0]
    cap = float((nll * w).sum() / w.sum())
    return lam_con * con + lam_cap * cap, con, cap


def test_coca_loss_matches_reference_and_clips_temperature(paper):
    cfg, _, params, apply = paper
    batch = make_batch(cfg)
    out = apply(params, batch)
    obj = losses.contrastive_caption_objective(out, batch["target_tokens"],
                                               weights={"contrastive": 1.0, "caption": 2.0})
    loss, m = obj.value, obj.sums
    ref, con, cap = _reference_loss(out["image_embed"], out["text_embed"], float(out["logit_scale"]),
                                    out["logits"], batch["target_tokens"], 1.0, 2.0)
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    assert float(m["contrastive_loss"]) == pytest.approx(con, rel=1e-5)
    assert float(m["caption_loss"]) == pytest.approx(cap, rel=1e-5)
    assert float(m["num_target_tokens"]) == sum(LENGTHS)
    loss2 = losses.contrastive_caption_objective(out, batch["target_tokens"],
                                                 weights={"contrastive": 0.5, "caption": 3.0}).value
    assert float(loss2) == pytest.approx(0.5 * con + 3.0 * cap, rel=1e-5)
    # The temperature is learnable and clipped at logit scale 100.
    big = apply(dict(params, logit_scale=jnp.asarray(math.log(1000.0))), batch)
    assert float(big["logit_scale"]) == pytest.approx(100.0)


def test_temperature_is_learnable(paper_grads):
    _, grads = paper_grads
    assert float(jnp.abs(grads["logit_scale"])) > 0


def _mesh(shape, names):
    return Mesh(np.asarray(jax.devices()[: math.prod(shape)]).reshape(shape), names)


def test_sharded_loss_and_grads_equal_unsharded(paper, paper_grads):
    """Full model + the CoCa objective on a data=4 x fsdp=2 mesh (params sharded by their logical axes,
    contrastive loss by shard_map) == the single-device computation, values and gradients."""
    cfg, model, params, _ = paper
    ref_loss, ref_grads = paper_grads

    mesh = _mesh((4, 2, 1), partitioning.MESH_AXES)
    with partitioning.activate(mesh):
        specs = partitioning.logical_specs(coca.CoCaFamily(cfg).abstract_params())
        shardings = partitioning.fit_to_shapes(partitioning.logical_to_sharding(specs, mesh), params)
        p_sh = jax.device_put(params, shardings)
        b_sh = {k: jax.device_put(v, partitioning.batch_sharding(mesh, v.ndim)) for k, v in batch8(cfg).items()}
        loss, grads = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(model, p, b, mesh)))(p_sh, b_sh)
    assert partitioning.batch_mesh_axes(mesh) == ("data", "fsdp")
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                                   rtol=1e-3, atol=2e-5), grads, ref_grads)


def _naive_all_gather_loss(mesh):
    """What open_clip does (gather_with_grad + full logits): every device computes the whole
    global [B, B] logits matrix."""
    def local(img, txt, s):
        ia = jax.lax.all_gather(img, "data", tiled=True)
        ta = jax.lax.all_gather(txt, "data", tiled=True)
        return losses._local_contrastive_sum(ia, ta, s, None) / (2 * ia.shape[0])  # pylint: disable=protected-access
    return jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P()), out_specs=P(), check_vma=False)


def test_contrastive_loss_memory_is_linear_in_device_count():
    """Fixed per-device batch b: the compiled loss+grad's temp memory per device grows ~linearly
    with the device count n (local rows [b, n*b]) for ours, ~quadratically ([n*b, n*b]) for the
    naive all-gather version."""
    b, e = 128, 32
    temp = {"ours": {}, "naive": {}}
    for n in (2, 4, 8):
        mesh = _mesh((n,), ("data",))
        emb = jax.ShapeDtypeStruct((n * b, e), jnp.float32, sharding=NamedSharding(mesh, P("data")))
        scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
        fns = {"ours": lambda i, t, s, mesh=mesh: losses.contrastive_loss(i, t, s, mesh=mesh, batch_axes=("data",)),
               "naive": _naive_all_gather_loss(mesh)}
        for name, fn in fns.items():
            compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2))).lower(emb, emb, scale).compile()
            temp[name][n] = compiled.memory_analysis().temp_size_in_bytes
    ours, naive = temp["ours"], temp["naive"]
    # Doubling n: ours ~2x (linear), naive ~4x (quadratic).
    assert ours[8] / ours[2] < 4 * 1.3, temp
    assert naive[8] / naive[2] > 16 * 0.7, temp
    assert ours[8] * 4 < naive[8], temp
    # And the [b, B] row-block of logits is what ours holds: ~ a few b*B*4-byte matrices.
    assert ours[8] < 8 * b * 8 * b * 4, temp


def test_sharded_contrastive_loss_equals_dense_formula():
    rng = np.random.default_rng(0)
    img = rng.standard_normal((16, 8)).astype(np.float32)
    txt = rng.standard_normal((16, 8)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    mesh = _mesh((8,), ("data",))
    f = lambda i, t, s: losses.contrastive_loss(i, t, s, mesh=mesh, batch_axes=("data",))
    val, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(img, txt, jnp.float32(10.0))
    ref_val, ref_grads = jax.value_and_grad(lambda i, t, s: losses.contrastive_loss(i, t, s), argnums=(0, 1, 2))(
        img, txt, jnp.float32(10.0))
    ref, _, _ = _reference_loss(img, txt, 10.0, np.zeros((1, 1, 2)), np.ones((1, 1), np.int32), 1.0, 0.0)
    assert float(val) == pytest.approx(ref, rel=1e-5) and float(ref_val) == pytest.approx(ref, rel=1e-5)
    for g, rg in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(rg), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("name,expected", [("coca_base", 383e6), ("coca_large", 787e6)])
def test_paper_config_param_counts(name, expected, clean_gin):
    """Paper Table 1 sizes (which count encoder + decoder; the poolers add ~1%)."""
    gin.parse_config_file(os.path.join(REPO, "gin", "models", f"{name}.gin"))
    params = nn.meta.unbox(registry.model_family().abstract_params())
    total = family.count_params(params)
    assert abs(total - expected) / expected < 0.02, total
    without_poolers = total - family.count_params(params["pooler"])
    assert abs(without_poolers - expected) / expected < 0.005, without_poolers


def test_2b_and_tiny_configs_build(clean_gin):
    gin.parse_config_file(os.path.join(REPO, "gin", "models", "coca_2b.gin"))
    total = family.count_params(nn.meta.unbox(registry.model_family().abstract_params()))
    assert 2.0e9 < total < 2.3e9, total
    gin.clear_config()
    gin.parse_config_file(os.path.join(REPO, "gin", "models", "coca_tiny.gin"))
    cfg = coca.CoCaConfig()
    model = coca.CoCa(cfg)
    out = jax.eval_shape(lambda b: model.init_with_output(jax.random.key(0), b)[0], coca.dummy_batch(cfg, 2))
    assert out["logits"].shape == (2, cfg.max_text_len, cfg.vocab_size)


@pytest.mark.parametrize("overrides,field", [
    (dict(encoder_width=30, encoder_heads=4), "encoder_heads"),
    (dict(decoder_width=30, decoder_heads=4), "decoder_heads"),
    (dict(image_size=40), "image_size"),
    (dict(pooler_layout="serial"), "pooler_layout"),
    (dict(activation="relu"), "activation"),
    (dict(activation="quick_gelu"), "activation"),  # paper mode uses the shared tanh-GELU layers
    (dict(dtype="float64"), "dtype"),
    (dict(remat_policy="sometimes"), "remat_policy"),
    (dict(OPEN_CLIP, embed_dim=16), "embed_dim"),
    (dict(OPEN_CLIP, n_queries=1), "n_queries"),
])
def test_invalid_config_raises_value_error_naming_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config("coca", **overrides)
