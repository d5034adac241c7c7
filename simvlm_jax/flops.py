"""Analytic FLOP counts (for MFU) and per-device peak throughput.

Counts multiply-adds as 2 FLOPs, matmuls and convolutions only (norms,
softmax and elementwise ops are ignored, as in MaxText/PaLM MFU accounting).
Causal self-attention counts half of its QK^T / AV matmuls (the useful,
unmasked part); pass `count_masked=True` to count the full matrices as XLA
executes them. Training = 3 x forward (backward is twice the forward); remat
recomputation is *not* counted, so MFU stays comparable across remat policies.

The formulas take a config (duck-typed: this module imports no model, so each
family's module can use these counters); `python -m simvlm_jax.model_table` prints
the docs/models.md tables from them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import jax

from simvlm_jax.models.layers import stem_stride

if TYPE_CHECKING:
    from simvlm_jax.models.coca import CoCaConfig
    from simvlm_jax.models.simvlm import SimVLMConfig

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity).
PEAK_FLOPS = (
    ("h200", 989e12), ("h100", 989e12), ("gh200", 989e12), ("a100", 312e12), ("l4", 121e12),
    ("b200", 2250e12), ("tpu v6", 918e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12), ("tpu v5", 459e12),  # a v5p reports "TPU v5"
    ("tpu v4", 275e12), ("tpu v3", 123e12),
)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Peak bf16 FLOP/s of `device` (default: the first device); None if unknown (e.g. CPU)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name, peak in PEAK_FLOPS:
        if name in kind:
            return peak
    return None


# ----------------------------------------------------------------------------- building blocks

def _dense(tokens: float, d_in: float, d_out: float) -> float:
    """A [tokens, d_in] x [d_in, d_out] matmul."""
    return 2.0 * tokens * d_in * d_out


def _attention_core(q_len: int, kv_len: int, width: int, causal: bool = False,
                    count_masked: bool = False) -> float:
    """QK^T and AV over all heads (inner width = heads * head_dim)."""
    flops = 2 * _dense(q_len, width, kv_len)
    return flops / 2 if causal and not count_masked else flops


def _self_attention(tokens: int, width: int, causal: bool = False, count_masked: bool = False) -> float:
    """q/k/v/out projections + attention over the same `tokens`."""
    return 4 * _dense(tokens, width, width) + _attention_core(tokens, tokens, width, causal, count_masked)


def _cross_attention(tokens: int, kv_tokens: int, width: int, kv_width: int | None = None) -> float:
    """q/out projections of `tokens`, k/v projections of `kv_tokens`, attention."""
    kv_width = width if kv_width is None else kv_width
    return (2 * _dense(tokens, width, width) + 2 * _dense(kv_tokens, kv_width, width)
            + _attention_core(tokens, kv_tokens, width))


def _mlp(tokens: int, width: int, mlp_dim: int) -> float:
    return 2 * _dense(tokens, width, mlp_dim)


# ----------------------------------------------------------------------------- SimVLM

def _image_embedding_flops(image_size: int, patch_size: int, width: int, stem_stages: int = 0,
                           stem_width: int = 64, stem_units: tuple[int, ...] = ()) -> float:
    """The first `stem_stages` BiT ResNet stages (if any), then the patch projection to `width`."""
    flops = 0.0
    size, ch = image_size, 3
    if stem_stages > 0:
        size //= 2
        flops += 2 * size * size * 7 * 7 * ch * stem_width
        ch = stem_width
        size //= 2  # max-pool
        for s in range(stem_stages):
            width_s = stem_width * 2 ** s
            for u in range(stem_units[s]):
                stride = 2 if (s > 0 and u == 0) else 1
                out_size = size // stride
                flops += 2 * size * size * ch * width_s                   # 1x1 reduce
                flops += 2 * out_size * out_size * 9 * width_s * width_s  # 3x3
                flops += 2 * out_size * out_size * width_s * 4 * width_s  # 1x1 expand
                if ch != 4 * width_s or stride != 1:
                    flops += 2 * out_size * out_size * ch * 4 * width_s    # projection
                size, ch = out_size, 4 * width_s
    patch = patch_size // stem_stride(stem_stages)
    tokens = (size // patch) ** 2
    return flops + _dense(tokens, patch * patch * ch, width)


def _conv_stem_flops(cfg: SimVLMConfig) -> float:
    return _image_embedding_flops(cfg.image_size, cfg.patch_size, cfg.width, cfg.stem_stages,
                                  cfg.stem_width, cfg.stem_units)


def simvlm_forward_flops(cfg: SimVLMConfig, has_image: bool = True, count_masked: bool = False) -> float:
    """Forward FLOPs of one example at the configured sequence lengths."""
    d, m, v = cfg.width, cfg.mlp_dim, cfg.vocab_size
    n_img = cfg.num_image_tokens if has_image else 0
    t_enc = n_img + cfg.max_prefix_len
    t_dec = cfg.max_target_len
    flops = _conv_stem_flops(cfg) if has_image else 0.0
    flops += cfg.encoder_layers * (_self_attention(t_enc, d) + _mlp(t_enc, d, m))
    flops += cfg.decoder_layers * (_self_attention(t_dec, d, causal=True, count_masked=count_masked)
                                   + _cross_attention(t_dec, t_enc, d) + _mlp(t_dec, d, m))
    flops += _dense(t_dec, d, v)                                       # output logits
    return float(flops)


def simvlm_train_flops_per_example(cfg: SimVLMConfig, text_only_fraction: float = 0.0,
                                   count_masked: bool = False) -> float:
    """Training FLOPs per example (forward + backward = 3 x forward)."""
    fwd = ((1 - text_only_fraction) * simvlm_forward_flops(cfg, True, count_masked)
           + text_only_fraction * simvlm_forward_flops(cfg, False, count_masked))
    return 3.0 * fwd


# ----------------------------------------------------------------------------- CoCa

def _coca_image_flops(cfg: CoCaConfig) -> float:
    """[Conv stem +] patch embedding + ViT encoder (open_clip mode: + the class token)."""
    n = cfg.num_patches + (1 if cfg.open_clip_compatible else 0)
    w = cfg.encoder_width
    flops = _image_embedding_flops(cfg.image_size, cfg.patch_size, w, cfg.stem_stages, cfg.stem_width,
                                   cfg.stem_units)
    flops += cfg.encoder_layers * (_self_attention(n, w) + _mlp(n, w, cfg.encoder_mlp_dim))
    return flops


def _coca_pooler_flops(cfg: CoCaConfig) -> float:
    """Attentional pooler(s) over the encoder tokens + the image embedding projection.

    The learned queries are projected per example (they are broadcast over the batch first).
    """
    d, w = cfg.decoder_width, cfg.encoder_width
    n = cfg.num_patches + (1 if cfg.open_clip_compatible else 0)
    flops = _cross_attention(cfg.n_queries, n, d, w)                   # generative (open_clip: the one) pooler
    if not cfg.open_clip_compatible:
        if cfg.pooler_layout == "cascade":
            flops += _cross_attention(1, cfg.n_queries, d)               # over the generative pooler output
        else:
            flops += _cross_attention(1, n, d, w)                        # over the encoder tokens
    return flops + _dense(1, d, cfg.embed_dim)


def _coca_text_flops(cfg: CoCaConfig, count_masked: bool = False) -> float:
    """Unimodal text layers over [BOS] + targets + [CLS], + the text embedding projection."""
    t, d = cfg.num_text_positions, cfg.decoder_width
    per_layer = _self_attention(t, d, causal=True, count_masked=count_masked) + _mlp(t, d, cfg.decoder_mlp_dim)
    return cfg.unimodal_layers * per_layer + _dense(1, d, cfg.embed_dim)


def _coca_decoder_flops(cfg: CoCaConfig, count_masked: bool = False) -> float:
    """Multimodal layers (causal self-attention + cross-attention to the image tokens) + vocab projection.

    open_clip mode: each layer is a self-attention block and a cross-attention block, each with its MLP.
    """
    t, d, m = cfg.max_text_len, cfg.decoder_width, cfg.decoder_mlp_dim
    mlps = 2 if cfg.open_clip_compatible else 1
    per_layer = (_self_attention(t, d, causal=True, count_masked=count_masked)
                 + _cross_attention(t, cfg.num_image_tokens, d) + mlps * _mlp(t, d, m))
    return cfg.multimodal_layers * per_layer + _dense(t, d, cfg.vocab_size)


def coca_forward_flops(cfg: CoCaConfig, batch_size: int = 0, count_masked: bool = False) -> float:
    """Forward FLOPs of one example (caption of `max_text_len` tokens).

    `batch_size` > 0 adds this example's share of the contrastive logits over a
    global batch of that size (one row of [B, B] in each direction); 0 leaves them out.
    """
    flops = (_coca_image_flops(cfg) + _coca_pooler_flops(cfg) + _coca_text_flops(cfg, count_masked)
             + _coca_decoder_flops(cfg, count_masked))
    flops += 2 * _dense(1, cfg.embed_dim, batch_size)
    return float(flops)


def coca_train_flops_per_example(cfg: CoCaConfig, batch_size: int = 0, count_masked: bool = False) -> float:
    """Training FLOPs per example (forward + backward = 3 x forward)."""
    return 3.0 * coca_forward_flops(cfg, batch_size, count_masked)
