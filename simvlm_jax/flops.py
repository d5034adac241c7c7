"""Analytic FLOP counts (for MFU) and per-device peak throughput.

Counts multiply-adds as 2 FLOPs, matmuls and convolutions only (norms,
softmax and elementwise ops are ignored, as in MaxText/PaLM MFU accounting).
Training = 3 x forward (backward is twice the forward); remat recomputation
is *not* counted, so MFU stays comparable across remat policies.
"""
from __future__ import annotations

import jax

from simvlm_jax.models.simvlm import SimVLMConfig

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity).
PEAK_FLOPS = (
    ("h200", 989e12), ("h100", 989e12), ("gh200", 989e12), ("a100", 312e12), ("l4", 121e12),
    ("b200", 2250e12), ("tpu v6", 918e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12), ("tpu v4", 275e12), ("tpu v3", 123e12),
)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Peak bf16 FLOP/s of `device` (default: the first device); None if unknown (e.g. CPU)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name, peak in PEAK_FLOPS:
        if name in kind:
            return peak
    return None


def _conv_stem_flops(cfg: SimVLMConfig) -> float:
    flops = 0.0
    size, ch = cfg.image_size, 3
    if cfg.stem_stages > 0:
        size //= 2
        flops += 2 * size * size * 7 * 7 * ch * cfg.stem_width
        ch = cfg.stem_width
        size //= 2  # max-pool
        for s in range(cfg.stem_stages):
            width = cfg.stem_width * 2 ** s
            for u in range(cfg.stem_units[s]):
                stride = 2 if (s > 0 and u == 0) else 1
                out_size = size // stride
                flops += 2 * size * size * ch * width                 # 1x1 reduce
                flops += 2 * out_size * out_size * 9 * width * width  # 3x3
                flops += 2 * out_size * out_size * width * 4 * width  # 1x1 expand
                if ch != 4 * width or stride != 1:
                    flops += 2 * out_size * out_size * ch * 4 * width  # projection
                size, ch = out_size, 4 * width
    patch = cfg.patch_size // cfg.stem_stride
    tokens = (size // patch) ** 2
    flops += 2 * tokens * patch * patch * ch * cfg.width
    return flops


def simvlm_forward_flops(cfg: SimVLMConfig, has_image: bool = True) -> float:
    """Forward FLOPs of one example at the configured sequence lengths."""
    d, m, v = cfg.width, cfg.mlp_dim, cfg.vocab_size
    n_img = cfg.num_image_tokens if has_image else 0
    t_enc = n_img + cfg.max_prefix_len
    t_dec = cfg.max_target_len
    flops = _conv_stem_flops(cfg) if has_image else 0.0
    per_enc_token = 2 * (4 * d * d + 2 * d * m) + 2 * 2 * t_enc * d  # projections+MLP, QK^T+AV
    flops += cfg.encoder_layers * t_enc * per_enc_token
    per_dec_token = (2 * (4 * d * d + 2 * d * d + 2 * d * m)          # self-attn, cross q/o, MLP
                     + 2 * 2 * t_dec * d / 2                            # causal self-attention
                     + 2 * 2 * t_enc * d)                               # cross-attention
    flops += cfg.decoder_layers * (t_dec * per_dec_token + 2 * t_enc * 2 * d * d)  # + cross k/v
    flops += t_dec * 2 * d * v                                         # output logits
    return float(flops)


def simvlm_train_flops_per_example(cfg: SimVLMConfig, text_only_fraction: float = 0.0) -> float:
    """Training FLOPs per example (forward + backward = 3 x forward)."""
    fwd = ((1 - text_only_fraction) * simvlm_forward_flops(cfg, True)
           + text_only_fraction * simvlm_forward_flops(cfg, False))
    return 3.0 * fwd
