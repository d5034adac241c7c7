"""Analytic FLOP counts (for MFU) and per-device peak throughput.

Counts multiply-adds as 2 FLOPs, matmuls and convolutions only (norms,
softmax and elementwise ops are ignored, as in MaxText/PaLM MFU accounting).
Causal self-attention counts half of its QK^T / AV matmuls (the useful,
unmasked part); pass `count_masked=True` to count the full matrices as XLA
executes them. Training = 3 x forward (backward is twice the forward); remat
recomputation is *not* counted, so MFU stays comparable across remat policies.

`python -m simvlm_jax.flops --table` prints the markdown tables of every config in
gin/models/ (sizes, exact parameter counts, training FLOPs per example) that
docs/models.md shows.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import math
import os
import sys
from typing import Any

import jax

from simvlm_jax.models.coca import CoCaConfig
from simvlm_jax.models.simvlm import SimVLMConfig, stem_stride

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


# ----------------------------------------------------------------------------- model table

GIN_MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin", "models")

# What each config follows: config -> (published parameter count or None, source).
REFERENCE_COUNTS: dict[str, tuple[float | None, str]] = {
    "simvlm_tiny": (None, "ours (CPU demo)"),
    "simvlm_base": (None, "SimVLM-Base, arXiv 2108.10904 (ViT-B sizes)"),
    "simvlm_large": (None, "SimVLM-Large, arXiv 2108.10904 (ViT-L sizes)"),
    "simvlm_huge": (None, "SimVLM-Huge, arXiv 2108.10904 (ViT-H sizes)"),
    "coca_tiny": (None, "ours (CPU demo)"),
    "coca_base": (383e6, "CoCa-Base, arXiv 2205.01917 Table 1"),
    "coca_large": (787e6, "CoCa-Large, arXiv 2205.01917 Table 1"),
    "coca_2b": (2.1e9, "CoCa, arXiv 2205.01917 Table 1"),
    "coca_ViT-B-32": (253_560_065, "open_clip coca_ViT-B-32 (open_clip_torch 3.3.0)"),
    "coca_ViT-L-14": (638_450_177, "open_clip coca_ViT-L-14 (open_clip_torch 3.3.0)"),
}


@dataclasses.dataclass(frozen=True)
class ModelRow:
    """One gin/models config: its parsed config, exact parameter counts and training FLOPs."""
    name: str
    config: SimVLMConfig | CoCaConfig
    num_params: int
    pooler_params: int  # CoCa's attentional poolers + image projection (0 for SimVLM)
    train_flops_per_example: float


def load_model_config(path: str) -> SimVLMConfig | CoCaConfig:
    """The SimVLMConfig / CoCaConfig a model gin file binds (gin is cleared before and after)."""
    import gin  # pylint: disable=g-import-not-at-top
    gin.clear_config()
    try:
        gin.parse_config_file(path)
        return CoCaConfig() if os.path.basename(path).startswith("coca") else SimVLMConfig()
    finally:
        gin.clear_config()


def abstract_params(cfg: SimVLMConfig | CoCaConfig) -> dict:
    """Unboxed parameter ShapeDtypeStructs (jax.eval_shape: nothing is allocated)."""
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    from simvlm_jax import train  # pylint: disable=g-import-not-at-top  (train imports flops)
    model = train.build_model(cfg)
    return nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), train.dummy_batch(cfg)))["params"])


def _count(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def train_flops_per_example(cfg: SimVLMConfig | CoCaConfig) -> float:
    """Training FLOPs of one (image-text) example of either model."""
    if isinstance(cfg, CoCaConfig):
        return coca_train_flops_per_example(cfg)
    return simvlm_train_flops_per_example(cfg)


def model_row(path: str) -> ModelRow:
    cfg = load_model_config(path)
    params = abstract_params(cfg)
    return ModelRow(os.path.splitext(os.path.basename(path))[0], cfg, _count(params),
                    _count(params.get("pooler", {})), train_flops_per_example(cfg))


def model_rows(gin_dir: str = GIN_MODELS_DIR) -> list[ModelRow]:
    """Every gin/models/*.gin config: SimVLM first, then CoCa, each by size."""
    rows = [model_row(p) for p in glob.glob(os.path.join(gin_dir, "*.gin"))]
    return sorted(rows, key=lambda r: (isinstance(r.config, CoCaConfig), r.num_params))


def _fmt_count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _pair(a: int, b: int) -> str:
    return f"{a}" if a == b else f"{a} / {b}"


def _stem_cell(stages: int, units: tuple[int, ...], width: int) -> str:
    if not stages:
        return "linear"
    which = "stage 1" if stages == 1 else f"stages 1-{stages}"
    n = "+".join(map(str, units[:stages]))
    return f"ResNet {which} ({n} unit{'s' if n != '1' else ''}, root width {width})"


def _architecture_cells(cfg: SimVLMConfig | CoCaConfig) -> list[str]:
    if isinstance(cfg, SimVLMConfig):
        return [f"{cfg.width}", f"{cfg.encoder_layers} / {cfg.decoder_layers}", f"{cfg.num_heads}",
                f"{cfg.mlp_dim}", f"{cfg.image_size} / {cfg.patch_size}",
                _stem_cell(cfg.stem_stages, cfg.stem_units, cfg.stem_width),
                f"{cfg.num_image_tokens} image + {cfg.max_prefix_len} prefix", f"{cfg.max_target_len} target"]
    mode = "open_clip" if cfg.open_clip_compatible else cfg.pooler_layout
    return [_pair(cfg.encoder_width, cfg.decoder_width),
            f"{cfg.encoder_layers} / {cfg.unimodal_layers}+{cfg.multimodal_layers}",
            _pair(cfg.encoder_heads, cfg.decoder_heads), _pair(cfg.encoder_mlp_dim, cfg.decoder_mlp_dim),
            f"{cfg.image_size} / {cfg.patch_size}", _stem_cell(cfg.stem_stages, cfg.stem_units, cfg.stem_width),
            f"{cfg.num_patches} image -> {cfg.n_queries} queries ({mode})",
            f"{cfg.max_text_len} text (+BOS, CLS)"]


def _size_cells(row: ModelRow) -> list[str]:
    count, source = REFERENCE_COUNTS.get(row.name, (None, "?"))
    no_pool = row.num_params - row.pooler_params
    gflops = row.train_flops_per_example / 1e9
    cells = [f"{row.num_params:,}", f"{no_pool:,}" if row.pooler_params else "—",
             f"{gflops:,.1f}" if gflops >= 10 else f"{gflops:.3f}", source]
    if count is None:
        return cells + ["not stated" if "arXiv" in source else "—", "—"]
    exact = count % 1_000_000 != 0
    dev = f"{100 * (row.num_params - count) / count:+.1f}%"
    if row.pooler_params and not exact:
        dev += f" ({100 * (no_pool - count) / count:+.1f}% w/o poolers)"
    return cells + [f"{int(count):,}" if exact else _fmt_count(count), dev]


def markdown_tables(rows: list[ModelRow]) -> str:
    """The two docs/models.md tables: architecture, then sizes and FLOPs."""
    arch = ["config", "width (enc / dec)", "layers (enc / dec)", "heads", "MLP", "image px / patch",
            "conv stem", "encoder-side tokens", "decoder tokens", "vocab"]
    size = ["config", "params (exact)", "params w/o poolers", "train GFLOPs / example", "follows",
            "reference params", "ours vs reference"]
    out = []
    for head, cells in ((arch, lambda r: _architecture_cells(r.config) + [f"{r.config.vocab_size:,}"]),
                        (size, _size_cells)):
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join([f"`{r.name}`", *cells(r)]) + " |" for r in rows]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simvlm_jax.flops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print the gin/models table (markdown)")
    parser.add_argument("--gin_dir", default=GIN_MODELS_DIR)
    args = parser.parse_args(argv)
    if not args.table:
        parser.print_help()
        return 2
    print(markdown_tables(model_rows(args.gin_dir)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
