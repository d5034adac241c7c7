"""open_flamingo Flamingo checkpoints (open_clip ViT + LLaMA lang encoder) -> our Flamingo params.

    from simvlm_jax import convert_open_flamingo as conv
    cfg = FlamingoConfig(**flamingo.OPEN_FLAMINGO_FIXED, **convert_hf_lm.config_overrides_from_hf(llama_cfg),
                         vision_width=..., media_id=..., eoc_id=..., cross_attn_every=...)
    params = conv.from_open_flamingo(torch_model.state_dict(), cfg)

The ViT goes through `convert_open_clip.vision_from_open_clip` (+ its ln_post; the CLIP
projection is unused), the LM through `convert_hf_lm.lm_from_hf` (open_flamingo wraps each
decoder layer: 'lang_encoder.model.layers.{i}.decoder_layer.'), the resampler and the gated
cross-attention blocks here. Video frame embeddings (max_num_frames) are not supported.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from simvlm_jax import convert_hf_lm, convert_open_clip
from simvlm_jax.models import flamingo

WHAT = "open_flamingo checkpoint"


def abstract_params(cfg: flamingo.FlamingoConfig) -> Any:
    """Unboxed ShapeDtypeStructs of Flamingo(cfg)'s params (nothing allocated or compiled)."""
    model = flamingo.Flamingo(cfg)
    batch = flamingo.dummy_batch(cfg, 1, 1, 2)
    return nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), batch))["params"])


def _ln(read, p: str, dim: int, field: str) -> dict:
    return {"scale": read(f"{p}.weight", (dim,), field), "bias": read(f"{p}.bias", (dim,), field)}


def _ff(read, p: str, dim: int, mult: int, fields: str) -> dict:
    """open_flamingo FeedForward (Sequential: 0 LayerNorm, 1 Linear, 2 GELU, 3 Linear)."""
    inner = dim * mult
    return {"norm": _ln(read, f"{p}.0", dim, fields.split()[0]),
            "wi": {"kernel": read(f"{p}.1.weight", (inner, dim), fields).T},
            "wo": {"kernel": read(f"{p}.3.weight", (dim, inner), fields).T}}


def _heads_in(w: np.ndarray, heads: int) -> np.ndarray:
    """torch Linear weight [heads * head_dim, D] -> DenseGeneral kernel [D, heads, head_dim]."""
    return w.T.reshape(w.shape[1], heads, -1)


def _heads_out(w: np.ndarray, heads: int) -> np.ndarray:
    """torch Linear weight [D, heads * head_dim] -> DenseGeneral kernel [heads, head_dim, D]."""
    return w.T.reshape(heads, -1, w.shape[0])


def resampler_from_open_flamingo(read, sd: Mapping[str, Any], cfg: flamingo.FlamingoConfig) -> dict:
    d, n, h = cfg.vision_width, cfg.resampler_heads, cfg.resampler_head_dim
    if "perceiver.frame_embs" in sd:
        raise ValueError(f"{WHAT}: perceiver.frame_embs (video frames) is not supported")
    if ("perceiver.media_time_embs" in sd) != bool(cfg.max_num_media):
        raise ValueError(f"{WHAT}: perceiver.media_time_embs is {'' if 'perceiver.media_time_embs' in sd else 'not '}"
                         f"in the checkpoint but FlamingoConfig.max_num_media={cfg.max_num_media}")
    dims = "vision_width resampler_heads resampler_head_dim"
    layers = []
    for i in range(cfg.resampler_depth):
        p = f"perceiver.layers.{i}"
        kv = read(f"{p}.0.to_kv.weight", (2 * n * h, d), dims)
        attn = {"query": {"kernel": _heads_in(read(f"{p}.0.to_q.weight", (n * h, d), dims), n)},
                "key": {"kernel": _heads_in(kv[: n * h], n)}, "value": {"kernel": _heads_in(kv[n * h:], n)},
                "out": {"kernel": _heads_out(read(f"{p}.0.to_out.weight", (d, n * h), dims), n)}}
        layers.append({"norm_media": _ln(read, f"{p}.0.norm_media", d, "vision_width"),
                       "norm_latents": _ln(read, f"{p}.0.norm_latents", d, "vision_width"), "attn": attn,
                       "ff": _ff(read, f"{p}.1", d, cfg.resampler_ff_mult, "vision_width resampler_ff_mult")})
    if f"perceiver.layers.{cfg.resampler_depth}.0.to_q.weight" in sd:
        raise ValueError(f"{WHAT}: more resampler layers than FlamingoConfig.resampler_depth={cfg.resampler_depth}")
    out = {"latents": read("perceiver.latents", (cfg.resampler_latents, d), "resampler_latents vision_width"),
           "norm": _ln(read, "perceiver.norm", d, "vision_width")}
    if cfg.max_num_media:
        out["media_time_embs"] = read("perceiver.media_time_embs", (cfg.max_num_media, 1, d),
                                      "max_num_media vision_width")
    if cfg.scan_layers:
        out["layers"] = convert_hf_lm.stack_trees(layers)
    else:
        out.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
    return out


def xattn_from_open_flamingo(read, p: str, cfg: flamingo.FlamingoConfig) -> dict:
    """One open_flamingo GatedCrossAttentionBlock (keys under `p`) -> our params."""
    d, dv, n, h = cfg.lm_width, cfg.vision_width, cfg.xattn_heads, cfg.xattn_head_dim
    dims = "lm_width vision_width xattn_heads xattn_head_dim"
    kv = read(f"{p}.attn.to_kv.weight", (2 * n * h, dv), dims)
    attn = {"norm": _ln(read, f"{p}.attn.norm", d, "lm_width"),
            "to_q": {"kernel": _heads_in(read(f"{p}.attn.to_q.weight", (n * h, d), dims), n)},
            "to_k": {"kernel": _heads_in(kv[: n * h], n)}, "to_v": {"kernel": _heads_in(kv[n * h:], n)},
            "to_out": {"kernel": _heads_out(read(f"{p}.attn.to_out.weight", (d, n * h), dims), n)}}
    return {"attn": attn, "attn_gate": read(f"{p}.attn_gate", (1,), "").reshape(()),
            "ff": _ff(read, f"{p}.ff", d, cfg.xattn_ff_mult, "lm_width xattn_ff_mult"),
            "ff_gate": read(f"{p}.ff_gate", (1,), "").reshape(())}


def from_open_flamingo(state_dict: Mapping[str, Any], cfg: flamingo.FlamingoConfig) -> dict:
    """open_flamingo `Flamingo.state_dict()` (LLaMA lang encoder; torch tensors or arrays) ->
    our params (numpy, unboxed, in cfg.param_dtype)."""
    sd = dict(state_dict)
    read = convert_hf_lm.TensorReader(sd, cfg, WHAT)
    try:
        vit = convert_open_clip.vision_from_open_clip(sd, flamingo.vision_config(cfg), prefix="vision_encoder.")
    except KeyError as e:
        raise KeyError(f"{WHAT}: missing vision tensor {e}") from e
    vision = {"vit": vit, "ln_post": _ln(read, "vision_encoder.ln_post", cfg.vision_width, "vision_width")}
    lm = convert_hf_lm.lm_from_hf(sd, cfg, prefix="lang_encoder.", layer_key="model.layers.{i}.decoder_layer.",
                                  what=WHAT)
    n = cfg.cross_attn_every
    for i in range(cfg.lm_layers):  # open_flamingo's placement must be ours
        has = f"lang_encoder.gated_cross_attn_layers.{i}.attn_gate" in sd
        if has != ((i + 1) % n == 0):
            raise ValueError(f"{WHAT}: gated cross-attention {'at' if has else 'missing before'} LM layer {i} "
                             f"does not fit FlamingoConfig.cross_attn_every={n} (blocks before layers i with "
                             f"(i + 1) % cross_attn_every == 0)")
    xattns = [xattn_from_open_flamingo(read, f"lang_encoder.gated_cross_attn_layers.{g * n + n - 1}", cfg)
              for g in range(cfg.num_groups)]
    if cfg.scan_layers:
        lm["blocks"]["gated_xattn"] = convert_hf_lm.stack_trees(xattns)
    else:
        for g, xattn in enumerate(xattns):
            lm[f"blocks_{g}"]["gated_xattn"] = xattn
    params = {"vision": vision, "resampler": resampler_from_open_flamingo(read, sd, cfg), "lm": lm}
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, cfg.params_dtype), params)
    _check_shapes(params, cfg)
    return params


def _check_shapes(params: dict, cfg: flamingo.FlamingoConfig) -> None:
    expected = abstract_params(cfg)
    exp = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    if exp != got:
        missing, extra = sorted(set(exp) - set(got)), sorted(set(got) - set(exp))
        wrong = [(k, got[k], exp[k]) for k in sorted(set(exp) & set(got)) if got[k] != exp[k]]
        raise ValueError(f"{WHAT} does not match the FlamingoConfig: missing {missing[:5]}, unexpected "
                         f"{extra[:5]}, shape mismatches (name, checkpoint, config) {wrong[:5]}")
