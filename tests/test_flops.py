"""Analytic FLOP counts (simvlm_jax.flops) against XLA's own count of the compiled program.

Two references, on unscanned tiny configs:
  * the matmuls/convolutions of the compiled HLO, each counted as 2 * out elements *
    contraction size: must equal the analytic count exactly (`count_masked=True`, since
    XLA computes the full masked causal attention matrices);
  * `compiled.cost_analysis()['flops']`, which also counts elementwise ops (norms,
    softmax, GELU, masks): a few % above the matmul count.
"""
from __future__ import annotations

import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from conftest import tiny_config
from simvlm_jax import flops, losses, model_table
from simvlm_jax.models import coca, mplug, simvlm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 2
COCA = dict(vocab_size=512, image_size=64, patch_size=16, encoder_width=128, encoder_layers=2, encoder_heads=4,
            encoder_mlp_dim=512, decoder_width=128, unimodal_layers=2, multimodal_layers=2, decoder_heads=4,
            decoder_mlp_dim=512, embed_dim=64, n_queries=8, max_text_len=12)
# mPLUG: ViT 1 layer, text encoder 1, fusion 3 with stride 2 = [co-attention, co-attention,
# connected], decoder 1; a queue of 8 momentum features.
MPLUG = dict(vocab_size=512, image_size=64, patch_size=16, vision_width=128, vision_layers=1, vision_heads=4,
             vision_mlp_dim=512, text_width=128, text_heads=4, text_mlp_dim=512, text_layers=1, fusion_layers=3,
             fusion_stride=2, decoder_layers=1, embed_dim=64, max_text_len=12, max_target_len=10,
             max_prefix_len=6, mask_id=511, queue_size=8)
VISN_FC = dict(vision_width=64, vision_heads=2, vision_mlp_dim=256)  # vision width != text width: visn_fc
OPEN_CLIP = dict(open_clip_compatible=True, activation="gelu_exact", embed_dim=128)

_DEF = re.compile(r"%([\w.\-]+) = \w+\[([\d,]*)\]")
_MATMUL = re.compile(r"= \w+\[([\d,]*)\]\S* (dot|convolution)\(%([\w.\-]+), %([\w.\-]+)\)(.*)")


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",")] if text else []


def hlo_matmul_flops(hlo: str) -> float:
    """2 * output elements * contraction size, summed over every dot and convolution of an HLO
    module (convolutions with input dilation, i.e. strided-conv gradients, would be overcounted)."""
    shapes = {m.group(1): _dims(m.group(2)) for m in _DEF.finditer(hlo)}
    total = 0.0
    for m in _MATMUL.finditer(hlo):
        out, kind, lhs, rhs, attrs = _dims(m.group(1)), m.group(2), m.group(3), m.group(4), m.group(5)
        if kind == "dot":
            dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs).group(1)
            k = math.prod(shapes[lhs][d] for d in _dims(dims))
        else:
            assert "lhs_dilate" not in attrs, "input-dilated convolution: count not exact"
            kernel_labels = re.search(r"dim_labels=\w+_(\w+)->", attrs).group(1)
            k = math.prod(shapes[rhs]) // shapes[rhs][kernel_labels.index("o")]
        total += 2.0 * math.prod(out) * k
    return total


def xla_flops(fn, *args) -> tuple[float, float]:
    """(matmul FLOPs from the compiled HLO, cost_analysis FLOPs) of jit(fn)(*args), per example."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return hlo_matmul_flops(compiled.as_text()) / B, cost["flops"] / B


def _coca(overrides: dict):
    cfg = coca.CoCaConfig(**{**COCA, **overrides})
    params = nn.meta.unbox(coca.CoCaFamily(cfg).abstract_params())
    return cfg, coca.CoCa(cfg), params, jax.eval_shape(lambda: coca.dummy_batch(cfg, B))


def _simvlm(overrides: dict):
    cfg = tiny_config(width=128, num_heads=4, mlp_dim=512, encoder_layers=2, decoder_layers=2, **overrides)
    model = simvlm.SimVLM(cfg)
    params = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), simvlm.dummy_batch(cfg)))["params"])
    return cfg, model, params, jax.eval_shape(lambda: simvlm.dummy_batch(cfg, B))


# XLA's elementwise work on top of the matmuls: ~2% with tanh-GELU; open_clip's exact (erf)
# GELU costs ~75 FLOPs per element in XLA's count, ~8% here.
@pytest.mark.parametrize("overrides,max_elementwise", [
    ({}, 0.03), (dict(pooler_layout="parallel"), 0.03), (OPEN_CLIP, 0.10),
    (dict(stem_stages=2, stem_width=32, stem_units=(1, 1)), 0.03),
], ids=["cascade", "parallel", "open_clip", "conv_stem"])
def test_coca_forward_flops_equal_compiled_matmuls(overrides, max_elementwise):
    cfg, model, params, batch = _coca(overrides)
    matmuls, total = xla_flops(lambda p, b: model.apply({"params": p}, b), params, batch)
    analytic = flops.coca_forward_flops(cfg, count_masked=True)
    assert matmuls == pytest.approx(analytic, rel=1e-9)
    assert 1.0 <= total / analytic < 1.0 + max_elementwise, total / analytic


def test_coca_train_flops_match_xla():
    """Backward = 2 x forward, except that no gradient flows into the pixels: the patch
    embedding's input-gradient matmul (1 x its forward) is not executed."""
    cfg, model, params, batch = _coca({})
    loss = lambda p, b: losses.contrastive_caption_objective(
        model.apply({"params": p}, b), b["target_tokens"], weights={"contrastive": 1.0, "caption": 2.0}).value
    matmuls, total = xla_flops(jax.value_and_grad(loss), params, batch)
    analytic = flops.coca_train_flops_per_example(cfg, batch_size=B, count_masked=True)
    patch_embed = 2 * cfg.num_patches * cfg.patch_size ** 2 * 3 * cfg.encoder_width
    assert matmuls == pytest.approx(analytic - patch_embed, rel=1e-4)
    assert total == pytest.approx(analytic, rel=0.03)


def test_causal_attention_counts_half_by_default():
    cfg = coca.CoCaConfig(**COCA)
    t, d = cfg.num_text_positions, cfg.decoder_width
    masked_half = (cfg.unimodal_layers * 2 * t * t * d
                   + cfg.multimodal_layers * 2 * cfg.max_text_len ** 2 * d)
    full = flops.coca_forward_flops(cfg, count_masked=True)
    assert flops.coca_forward_flops(cfg) == pytest.approx(full - masked_half, rel=1e-12)
    # The contrastive logits: one row of the [B, B] matrix per example and direction.
    assert flops.coca_forward_flops(cfg, batch_size=64) - flops.coca_forward_flops(cfg) == 4 * 64 * cfg.embed_dim
    assert flops.coca_train_flops_per_example(cfg) == 3 * flops.coca_forward_flops(cfg)


@pytest.mark.parametrize("overrides", [
    dict(stem_stages=0, patch_size=16), dict(stem_stages=1, stem_units=(1,), patch_size=8),
], ids=["linear_stem", "conv_stem"])
def test_simvlm_forward_flops_equal_compiled_matmuls(overrides):
    cfg, model, params, batch = _simvlm(overrides)
    matmuls, total = xla_flops(lambda p, b: model.apply({"params": p}, b), params, batch)
    analytic = flops.simvlm_forward_flops(cfg, count_masked=True)
    assert matmuls == pytest.approx(analytic, rel=1e-9)
    assert 1.0 <= total / analytic < 1.03, total / analytic


def test_simvlm_train_flops_match_xla():
    cfg, model, params, batch = _simvlm(dict(stem_stages=0, patch_size=16))
    def loss(p, b):
        obj = losses.prefix_lm_objective(model.apply({"params": p}, b), b["target_tokens"])
        return obj.value / jnp.maximum(obj.weight, 1)
    matmuls, total = xla_flops(jax.value_and_grad(loss), params, batch)
    analytic = flops.simvlm_train_flops_per_example(cfg, count_masked=True)
    patch_embed = 2 * cfg.num_image_tokens * cfg.patch_size ** 2 * 3 * cfg.width
    assert matmuls == pytest.approx(analytic - patch_embed, rel=1e-4)
    assert total == pytest.approx(analytic, rel=0.03)


def _mplug(overrides: dict):
    """(config, the objective's loss as fn(params, batch, aux_state, rng), abstract args)."""
    cfg = mplug.MPLUGConfig(**{**MPLUG, **overrides})
    fam = mplug.MPLUGFamily(cfg)
    params = nn.meta.unbox(fam.abstract_params())
    aux = nn.meta.unbox(jax.eval_shape(lambda p: fam.init_aux_state(p, jax.random.key(0)), params))
    args = (params, jax.eval_shape(lambda: mplug.dummy_batch(cfg, B)), aux, jax.eval_shape(lambda: jax.random.key(1)))
    loss = lambda p, b, a, r: fam.objective(p, b, r, loss_weights=fam.loss_weights, aux_state=a).value
    return cfg, loss, args


def _mplug_shared_image_kv(cfg) -> float:
    """Per example, what XLA's CSE saves in an unscanned mPLUG: the MLM and the PrefixLM fusion
    run the same co-attention layers on the same image tokens up to the first connected layer,
    so the image key/value projections of those layers are computed once for both. (Compiled
    with `compiler_options={'xla_disable_hlo_passes': 'cse'}`, the matmul count equals the
    analytic one exactly.)"""
    first_run = min(cfg.fusion_stride, cfg.fusion_layers)
    return first_run * 2 * flops._dense(cfg.num_image_tokens, cfg.text_width, cfg.text_width)


@pytest.mark.parametrize("overrides", [{}, VISN_FC], ids=["connected", "visn_fc"])
def test_mplug_objective_forward_flops_equal_compiled_matmuls(overrides):
    """The whole pretraining objective, forward only: the online model (image once, text
    encoder 3x, fusion on ITM's 3B rows + MLM + PrefixLM, heads, decoder, the [B, B+Q] ITC
    similarities in both directions) + the momentum encoders and their similarities."""
    cfg, loss, args = _mplug(overrides)
    matmuls, total = xla_flops(loss, *args)
    analytic = (mplug.forward_flops(cfg, batch_size=B, count_masked=True)
                + mplug.momentum_flops(cfg, batch_size=B))
    assert matmuls == pytest.approx(analytic - _mplug_shared_image_kv(cfg), rel=1e-9)
    assert 1.0 <= total / analytic < 1.03, total / analytic


def test_mplug_train_flops_match_xla():
    """Loss + grads. Beyond the forward's shared image K/V: no gradient into the pixels (the
    patch embedding's input gradient) nor into the ITC keys (momentum features + queue,
    stop_gradient: the online similarities' backward is 1x, not 2x, their forward)."""
    cfg, loss, args = _mplug(VISN_FC)
    matmuls, total = xla_flops(jax.value_and_grad(loss), *args)
    analytic = mplug.train_flops_per_example(cfg, batch_size=B, count_masked=True)
    patch_embed = 2 * cfg.num_patches * cfg.patch_size ** 2 * 3 * cfg.vision_width
    itc_key_grads = 2 * flops._dense(1, cfg.embed_dim, B + cfg.queue_size)
    assert matmuls == pytest.approx(analytic - patch_embed - _mplug_shared_image_kv(cfg) - itc_key_grads, rel=1e-9)
    assert total == pytest.approx(analytic, rel=0.03)


def test_docs_models_table_is_current(monkeypatch, capsys):
    """docs/models.md holds the output of `python -m simvlm_jax.model_table` for every gin/models
    config (its `main` runs here: the docs test leaves the command to this test)."""
    computed = []
    model_rows = model_table.model_rows
    monkeypatch.setattr(model_table, "model_rows", lambda *a: computed.extend(model_rows(*a)) or computed)
    assert model_table.main([]) == 0
    printed = capsys.readouterr().out
    rows = computed
    gin_files = {os.path.splitext(f)[0] for f in os.listdir(os.path.join(REPO, "gin", "models"))}
    assert {r.name for r in rows} == gin_files
    by_name = {r.name: r for r in rows}
    assert by_name["simvlm_tiny"].num_params == 1_251_488  # README
    for name, reference in (("coca_ViT-B-32", 253_560_065), ("coca_ViT-L-14", 638_450_177)):
        assert by_name[name].num_params == reference  # open_clip's own counts
    base = by_name["coca_base"]
    assert abs(base.num_params - base.pooler_params - 383e6) / 383e6 < 0.005
    with open(os.path.join(REPO, "docs", "models.md"), encoding="utf-8") as f:
        doc = f.read()
    tables = printed.strip().split("\n\n")
    assert len(tables) == 2
    for table in tables:
        assert table in doc, "docs/models.md is stale; regenerate: python -m simvlm_jax.model_table"
