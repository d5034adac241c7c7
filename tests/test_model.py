"""SimVLM model: PrefixLM attention masks, parameter logical axes, scan/unrolled parity, configs."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from conftest import tiny_config
from simvlm_jax.models import simvlm

B = 4


def make_batch(cfg, seed=0):
    """Mixed batch: rows 0,1 image-text, rows 2,3 text-only; prefixes of different lengths."""
    rng = np.random.default_rng(seed)
    prefix = np.zeros((B, cfg.max_prefix_len), np.int32)
    for row, n in enumerate([3, 0, 5, 2]):
        prefix[row, :n] = rng.integers(3, cfg.vocab_size, n)
    targets = np.zeros((B, cfg.max_target_len), np.int32)
    for row, n in enumerate([6, 8, 4, 10]):
        targets[row, :n] = rng.integers(3, cfg.vocab_size, n)
        if n < cfg.max_target_len:
            targets[row, n - 1] = 1  # EOS
    return {
        "image": jnp.asarray(rng.integers(0, 256, (B, cfg.image_size, cfg.image_size, 3)), jnp.uint8),
        "has_image": jnp.asarray([1, 1, 0, 0], jnp.int32),
        "prefix_tokens": jnp.asarray(prefix),
        "target_tokens": jnp.asarray(targets),
    }


@pytest.fixture(scope="module")
def model_and_params():
    cfg = tiny_config(encoder_layers=2, decoder_layers=2)
    model = simvlm.SimVLM(cfg)
    params = init_params(model)
    apply = jax.jit(lambda p, b: model.apply({"params": p}, b))
    encode = jax.jit(lambda p, b: model.apply({"params": p}, b["image"], b["prefix_tokens"], b["has_image"],
                                              method=model.encode))
    return cfg, model, params, apply, encode


def init_params(model):
    cfg = model.config
    return jax.jit(lambda: nn.meta.unbox(model.init(jax.random.key(0), simvlm.dummy_batch(cfg))["params"]))()


def _max_abs_diff(a, b):
    return float(jnp.max(jnp.abs(a - b)))


# ----------------------------------------------------------------------------- masks

def test_encoder_is_bidirectional_over_image_and_prefix(model_and_params):
    cfg, _, params, _, encode = model_and_params
    batch = make_batch(cfg)
    ni = cfg.num_image_tokens
    row, later = 2, 4  # text-only row with a 5-token prefix: perturb its last prefix token
    enc, valid = encode(params, batch)
    assert enc.shape == (B, ni + cfg.max_prefix_len, cfg.width)
    np.testing.assert_array_equal(
        np.asarray(valid[row]), [False] * ni + [True] * 5 + [False] * (cfg.max_prefix_len - 5))
    b2 = dict(batch, prefix_tokens=batch["prefix_tokens"].at[row, later].set(
        (batch["prefix_tokens"][row, later] + 7) % cfg.vocab_size))
    enc2, _ = encode(params, b2)
    for pos in range(later):  # every earlier prefix position sees the later token
        assert _max_abs_diff(enc[row, ni + pos], enc2[row, ni + pos]) > 1e-4, pos
    # Other examples are unaffected.
    np.testing.assert_allclose(np.delete(np.asarray(enc), row, 0), np.delete(np.asarray(enc2), row, 0),
                               atol=1e-6)
    # Image tokens of an image-text example attend to the text prefix too.
    b3 = dict(batch, prefix_tokens=batch["prefix_tokens"].at[0, 2].set(
        (batch["prefix_tokens"][0, 2] + 7) % cfg.vocab_size))
    enc3, _ = encode(params, b3)
    assert _max_abs_diff(enc[0, :ni], enc3[0, :ni]) > 1e-4
    assert _max_abs_diff(enc[0, ni], enc3[0, ni]) > 1e-4


def _perturb_prefix_pos_rows(params, rows, scale=5.0):
    table = params["encoder"]["prefix_pos_embedding"]
    noise = scale * jax.random.normal(jax.random.key(7), table[jnp.asarray(rows)].shape)
    new = table.at[jnp.asarray(rows)].add(noise)
    return {**params, "encoder": {**params["encoder"], "prefix_pos_embedding": new}}


def test_prefix_padding_does_not_influence_outputs(model_and_params):
    """Perturbing the inputs of the pad positions (their position embeddings) changes nothing."""
    cfg, _, params, apply, encode = model_and_params
    batch = make_batch(cfg)
    max_len = 5  # longest prefix in the batch: positions >= 5 are padding in every row
    logits = apply(params, batch)
    enc, valid = encode(params, batch)
    p_pad = _perturb_prefix_pos_rows(params, list(range(max_len, cfg.max_prefix_len)))
    np.testing.assert_allclose(np.asarray(apply(p_pad, batch)), np.asarray(logits), atol=1e-5)
    enc2, _ = encode(p_pad, batch)
    np.testing.assert_allclose(np.asarray(enc2)[np.asarray(valid)], np.asarray(enc)[np.asarray(valid)],
                               atol=1e-5)
    # Control: the same perturbation on a real prefix position does change the logits.
    p_real = _perturb_prefix_pos_rows(params, [max_len - 1])
    assert _max_abs_diff(apply(p_real, batch)[2], logits[2]) > 1e-3


def test_prefix_padding_per_example(model_and_params):
    """Appending padding (a longer padded prefix length) to one example changes nothing."""
    cfg, model, params, _, _ = model_and_params
    batch = make_batch(cfg)
    apply = jax.jit(lambda b: model.apply({"params": params}, b))
    logits = apply(batch)
    # Same content, prefix truncated to 5 columns (all rows have <= 5 real tokens).
    short = dict(batch, prefix_tokens=batch["prefix_tokens"][:, :5])
    np.testing.assert_allclose(np.asarray(apply(short)), np.asarray(logits), atol=1e-5)


def test_image_of_text_only_example_is_ignored(model_and_params):
    cfg, _, params, apply, _ = model_and_params
    batch = make_batch(cfg)
    logits = apply(params, batch)
    new_images = jnp.asarray(np.random.default_rng(1).integers(0, 256, batch["image"].shape), jnp.uint8)
    logits2 = apply(params, dict(batch, image=new_images))
    has_image = np.asarray(batch["has_image"]) > 0
    np.testing.assert_allclose(np.asarray(logits2)[~has_image], np.asarray(logits)[~has_image], atol=1e-5)
    # Control: the image-text rows do look at their pixels.
    for row in np.flatnonzero(has_image):
        assert _max_abs_diff(logits2[row], logits[row]) > 1e-3, row


def test_decoder_is_causal(model_and_params):
    cfg, _, params, apply, _ = model_and_params
    batch = make_batch(cfg)
    logits = apply(params, batch)
    row = 3  # 10 real target tokens
    for t in (0, 4, cfg.max_target_len - 2):
        tgt = batch["target_tokens"].at[row, t].set((batch["target_tokens"][row, t] + 11) % cfg.vocab_size)
        logits2 = apply(params, dict(batch, target_tokens=tgt))
        # decoder input = shift_right(targets): token t is seen from position t+1 on.
        np.testing.assert_allclose(np.asarray(logits2[row, : t + 1]), np.asarray(logits[row, : t + 1]),
                                   atol=1e-5, err_msg=f"t={t}")
        for pos in range(t + 1, cfg.max_target_len):
            assert _max_abs_diff(logits2[row, pos], logits[row, pos]) > 1e-4, (t, pos)
        others = [r for r in range(B) if r != row]
        np.testing.assert_allclose(np.asarray(logits2)[others], np.asarray(logits)[others], atol=1e-6)


def test_shift_right():
    x = jnp.asarray([[5, 6, 7, 1], [9, 1, 0, 0]])
    np.testing.assert_array_equal(np.asarray(simvlm.shift_right(x)), [[0, 5, 6, 7], [0, 9, 1, 0]])


# ----------------------------------------------------------------------------- params / axes

def test_every_param_has_logical_axes():
    cfg = tiny_config(stem_stages=2, stem_units=(1, 1), patch_size=8, scan_layers=True,
                      tie_embeddings=False, encoder_layers=2, decoder_layers=2)
    model = simvlm.SimVLM(cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), simvlm.dummy_batch(cfg)))["params"]
    specs = nn.get_partition_spec(boxed)
    shapes = nn.meta.unbox(boxed)
    spec_leaves = jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    shape_leaves = jax.tree_util.tree_leaves(shapes)
    assert len(spec_leaves) == len(shape_leaves) > 40
    for (path, spec), arr in zip(spec_leaves, shape_leaves):
        name = jax.tree_util.keystr(path)
        assert isinstance(spec, PartitionSpec), name
        assert len(spec) == arr.ndim, (name, spec, arr.shape)
        assert any(n is not None for n in spec), (name, spec)
        if "/layers/" in "/".join(str(getattr(k, "key", k)) for k in path) + "/":
            assert spec[0] == "layers", (name, spec)
    # A few spot checks of the naming convention.
    enc = specs["encoder"]
    assert enc["layers"]["mlp"]["wi"]["kernel"] == PartitionSpec("layers", "embed", "mlp")
    assert specs["token_embed"]["embedding"] == PartitionSpec("vocab", "embed")
    assert specs["decoder"]["logits_dense"]["kernel"] == PartitionSpec("embed", "vocab")
    assert enc["image_embedder"]["stage2_unit1"]["conv2"]["kernel"] == PartitionSpec(
        None, None, "conv_in", "conv_out")


def _stack_unrolled(params, num_enc, num_dec):
    """Unrolled params (layers_0, layers_1, ...) -> scanned layout (layers: leading axis)."""
    out = jax.tree_util.tree_map(lambda x: x, params)
    for part, n in (("encoder", num_enc), ("decoder", num_dec)):
        sub = dict(out[part])
        per_layer = [sub.pop(f"layers_{i}") for i in range(n)]
        sub["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_layer)
        out[part] = sub
    return out


def test_scan_layers_matches_unrolled(model_and_params):
    cfg, _, params, apply, _ = model_and_params
    batch = make_batch(cfg)
    cfg_scan = tiny_config(encoder_layers=2, decoder_layers=2, scan_layers=True)
    scan_model = simvlm.SimVLM(cfg_scan)
    scan_params = _stack_unrolled(params, 2, 2)
    expected = jax.tree_util.tree_map(
        lambda x: x.shape,
        nn.meta.unbox(jax.eval_shape(lambda: scan_model.init(jax.random.key(0),
                                                             simvlm.dummy_batch(cfg_scan)))["params"]))
    assert jax.tree_util.tree_map(lambda x: x.shape, scan_params) == expected
    logits = apply(params, batch)
    scan_logits = jax.jit(scan_model.apply)({"params": scan_params}, batch)
    np.testing.assert_allclose(np.asarray(scan_logits), np.asarray(logits), atol=1e-5, rtol=1e-5)
    # Remat (any policy) changes memory, not values.
    remat_model = simvlm.SimVLM(tiny_config(encoder_layers=2, decoder_layers=2, scan_layers=True,
                                            remat_policy="full"))
    np.testing.assert_allclose(np.asarray(jax.jit(remat_model.apply)({"params": scan_params}, batch)),
                               np.asarray(logits), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [
    dict(stem_stages=0, patch_size=16),
    dict(stem_stages=1, stem_units=(1,), patch_size=8),
    dict(stem_stages=2, stem_units=(1, 1), patch_size=8, pos_embedding="sincos2d"),
    dict(stem_stages=0, patch_size=8, pos_embedding="sincos2d"),
], ids=["stem0", "stem1", "stem2-sincos", "stem0-sincos"])
def test_stem_and_pos_embedding_variants_build_and_run(overrides):
    cfg = tiny_config(**overrides)
    model = simvlm.SimVLM(cfg)
    batch = make_batch(cfg)
    params = init_params(model)
    enc, valid = jax.eval_shape(lambda p, b: model.apply({"params": p}, b["image"], b["prefix_tokens"],
                                                         b["has_image"], method=model.encode), params, batch)
    n_img = (cfg.image_size // cfg.patch_size) ** 2
    assert cfg.num_image_tokens == n_img
    assert enc.shape == (B, n_img + cfg.max_prefix_len, cfg.width)
    logits = jax.jit(model.apply)({"params": params}, batch)
    assert logits.shape == (B, cfg.max_target_len, cfg.vocab_size)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    img = params["encoder"]["image_embedder"]
    assert ("pos_embedding" in img) == (cfg.pos_embedding == "learned")
    assert sum(k.startswith("stage") for k in img) == sum(cfg.stem_units[:cfg.stem_stages])
    assert ("root_conv" in img) == (cfg.stem_stages > 0)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = tiny_config(dtype="bfloat16")
    model = simvlm.SimVLM(cfg)
    params = init_params(model)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype("float32")}
    logits = jax.jit(model.apply)({"params": params}, make_batch(cfg))
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("overrides,field", [
    (dict(width=30, num_heads=4), "num_heads"),
    (dict(stem_stages=2, stem_units=(1,)), "stem_stages"),
    (dict(stem_stages=1, patch_size=6, image_size=36), "patch_size"),
    (dict(image_size=40, patch_size=16), "image_size"),
    (dict(dtype="float64"), "dtype"),
    (dict(param_dtype="int8"), "param_dtype"),
    (dict(pos_embedding="rope"), "pos_embedding"),
    (dict(remat_policy="sometimes"), "remat_policy"),
])
def test_invalid_config_raises_value_error_naming_field(overrides, field):
    def build():
        cfg = tiny_config(**overrides)
        model = simvlm.SimVLM(cfg)
        jax.eval_shape(lambda: model.init(jax.random.key(0), simvlm.dummy_batch(cfg)))
    with pytest.raises(ValueError, match=field):
        build()
