"""HF LLaMA-style causal LMs -> the LM of `models.flamingo.Flamingo` ('lm' params).

    from simvlm_jax import convert_hf_lm as conv
    config_json, state_dict = conv.load_hf_dir('path/to/llama')   # config.json + *.safetensors
    cfg = FlamingoConfig(**conv.config_overrides_from_hf(config_json), media_id=..., eoc_id=...)
    lm = conv.lm_from_hf(state_dict, cfg)          # {'embed', 'blocks'|'blocks_g', 'final_norm', 'lm_head'}
    params = conv.merge_lm(params, lm)            # into an initialized Flamingo's (unboxed) params

Weights map without permutation: our rotary embedding uses HF's rotate_half layout. HF
Linear weights [out, in] become DenseGeneral kernels [in, heads, head_dim] / [heads,
head_dim, out]. The gated cross-attention blocks are not part of a plain LM: `lm_from_hf`
leaves them out (merge_lm keeps the ones in `params`).

Command line (writes the 'lm' params as msgpack):
    python -m simvlm_jax.convert_hf_lm --hf_dir path/to/llama --out lm.msgpack [--scan_layers]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Any, Mapping

import numpy as np
from flax import serialization
from safetensors import safe_open

from simvlm_jax.models import flamingo

ARCHITECTURES = ("LlamaForCausalLM",)
LAYER_KEY = "model.layers.{i}."


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def load_hf_dir(hf_dir: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json as a dict, state_dict of numpy arrays) of a HF model directory with
    *.safetensors weights (bfloat16 tensors are read through safetensors' flax API)."""
    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        config_json = json.load(f)
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"{hf_dir}: no *.safetensors files (save the HF model with safe_serialization=True)")
    state_dict: dict[str, np.ndarray] = {}
    for path in files:
        unreadable = []
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                try:
                    state_dict[name] = f.get_tensor(name)
                except TypeError:  # numpy has no bfloat16
                    unreadable.append(name)
        if unreadable:  # read through jax, kept as float32
            with safe_open(path, framework="flax") as f:
                state_dict.update({name: np.asarray(f.get_tensor(name), np.float32) for name in unreadable})
    return config_json, state_dict


def config_overrides_from_hf(config_json: Mapping[str, Any] | str) -> dict[str, Any]:
    """FlamingoConfig LM fields of a HF LLaMA config (a dict, or the path of its config.json).

    Also sets bos_id / eos_id / pad_id where the config has them as single ids. Raises on
    what the LM cannot reproduce (another architecture, rope_scaling, biases, non-SiLU MLP)."""
    if isinstance(config_json, str):
        with open(config_json, encoding="utf-8") as f:
            config_json = json.load(f)
    c = dict(config_json)
    archs = c.get("architectures") or []
    if not any(a in ARCHITECTURES for a in archs):
        raise ValueError(f"HF config architectures={archs} (model_type={c.get('model_type')!r}): only "
                         f"{ARCHITECTURES} are supported")
    unsupported = {k: c.get(k) for k in ("rope_scaling", "attention_bias", "mlp_bias") if c.get(k)}
    if c.get("hidden_act", "silu") != "silu":
        unsupported["hidden_act"] = c["hidden_act"]
    if unsupported:
        raise ValueError(f"HF config options the Flamingo LM does not implement: {unsupported}")
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    out = dict(vocab_size=c["vocab_size"], lm_width=c["hidden_size"], lm_layers=c["num_hidden_layers"],
               lm_heads=heads, lm_kv_heads=c.get("num_key_value_heads") or heads,
               lm_head_dim=0 if head_dim * heads == c["hidden_size"] else head_dim,
               lm_mlp_dim=c["intermediate_size"], lm_max_len=c.get("max_position_embeddings", 2048),
               rope_theta=float(c.get("rope_theta", 10_000.0)), rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
               tie_embeddings=bool(c.get("tie_word_embeddings", False)))
    for ours, theirs in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "pad_token_id")):
        if isinstance(c.get(theirs), int):
            out[ours] = c[theirs]
    return out


class TensorReader:
    """Reads tensors by name, naming what is missing or has the wrong shape for the config."""

    def __init__(self, state_dict: Mapping[str, Any], cfg: flamingo.FlamingoConfig, what: str):
        self.sd, self.cfg, self.what = state_dict, cfg, what

    def __call__(self, key: str, shape: tuple[int, ...], fields: str) -> np.ndarray:
        if key not in self.sd:
            raise KeyError(f"{self.what}: missing tensor {key!r}")
        x = _np(self.sd[key])
        if tuple(x.shape) != tuple(shape):
            vals = ", ".join(f"{f}={getattr(self.cfg, f)}" for f in fields.split())
            raise ValueError(f"{self.what}: tensor {key!r} has shape {tuple(x.shape)}, the FlamingoConfig "
                             f"expects {tuple(shape)} ({vals})")
        return x.astype(self.cfg.params_dtype)


def lm_layer_from_hf(read: TensorReader, cfg: flamingo.FlamingoConfig, p: str) -> dict:
    """One HF LlamaDecoderLayer (keys under prefix `p`) -> our DecoderLayer params."""
    d, h, n, k, m = cfg.lm_width, cfg.head_dim, cfg.lm_heads, cfg.lm_kv_heads, cfg.lm_mlp_dim
    dims = "lm_width lm_heads lm_kv_heads lm_head_dim"
    q = read(f"{p}self_attn.q_proj.weight", (n * h, d), dims)
    kk = read(f"{p}self_attn.k_proj.weight", (k * h, d), dims)
    v = read(f"{p}self_attn.v_proj.weight", (k * h, d), dims)
    o = read(f"{p}self_attn.o_proj.weight", (d, n * h), dims)
    mlp = "lm_width lm_mlp_dim"
    return {
        "input_norm": {"scale": read(f"{p}input_layernorm.weight", (d,), "lm_width")},
        "self_attn": {"q_proj": {"kernel": q.T.reshape(d, n, h)}, "k_proj": {"kernel": kk.T.reshape(d, k, h)},
                      "v_proj": {"kernel": v.T.reshape(d, k, h)}, "o_proj": {"kernel": o.T.reshape(n, h, d)}},
        "mlp_norm": {"scale": read(f"{p}post_attention_layernorm.weight", (d,), "lm_width")},
        "mlp": {"gate_proj": {"kernel": read(f"{p}mlp.gate_proj.weight", (m, d), mlp).T},
                "up_proj": {"kernel": read(f"{p}mlp.up_proj.weight", (m, d), mlp).T},
                "down_proj": {"kernel": read(f"{p}mlp.down_proj.weight", (d, m), mlp).T}},
    }


def stack_trees(trees: list) -> Any:
    """Same-structure trees -> one tree of arrays stacked on a new leading axis."""
    if isinstance(trees[0], dict):
        return {key: stack_trees([t[key] for t in trees]) for key in trees[0]}
    return np.stack(trees)


def group_blocks(decoders: list[dict], xattns: list[dict] | None, cfg: flamingo.FlamingoConfig) -> dict:
    """Per-LM-layer params (and per-group gated cross-attention params, or None) -> the
    'blocks' (scan: stacked on a leading axis) or 'blocks_g' subtrees of `FlamingoLM`."""
    n = cfg.cross_attn_every
    groups = []
    for g in range(cfg.num_groups):
        group = {f"decoder_{j}": decoders[g * n + j] for j in range(n)}
        if xattns is not None:
            group["gated_xattn"] = xattns[g]
        groups.append(group)
    if cfg.scan_layers:
        return {"blocks": stack_trees(groups)}
    return {f"blocks_{g}": group for g, group in enumerate(groups)}


def lm_from_hf(state_dict: Mapping[str, Any], cfg: flamingo.FlamingoConfig, prefix: str = "",
               layer_key: str = LAYER_KEY, what: str = "HF LM checkpoint") -> dict:
    """HF LlamaForCausalLM state dict (numpy arrays or torch tensors) -> our 'lm' params
    without the gated cross-attention blocks: {'embed', ['extra_embed'], 'blocks'|'blocks_g'
    {'decoder_j'}, 'final_norm', ['lm_head']} (numpy, unboxed, in cfg.param_dtype).

    `prefix` precedes every key ('lang_encoder.' in an open_flamingo state dict); `layer_key`
    names layer i's prefix (open_flamingo wraps them: 'model.layers.{i}.decoder_layer.').
    With num_extra_tokens > 0, 'extra_embed' starts as the table's last rows."""
    read = TensorReader(state_dict, cfg, what)
    v, d = cfg.vocab_size, cfg.lm_width
    embed = read(f"{prefix}model.embed_tokens.weight", (v, d), "vocab_size lm_width")
    lm: dict[str, Any] = {"embed": {"embedding": embed}}
    if cfg.num_extra_tokens:
        lm["extra_embed"] = {"embedding": embed[v - cfg.num_extra_tokens:].copy()}
    decoders = [lm_layer_from_hf(read, cfg, prefix + layer_key.format(i=i)) for i in range(cfg.lm_layers)]
    extra = [k for k in state_dict if k.startswith(prefix + layer_key.format(i=cfg.lm_layers))]
    if extra:
        raise ValueError(f"{what}: has more than FlamingoConfig.lm_layers={cfg.lm_layers} layers ({extra[0]!r})")
    lm.update(group_blocks(decoders, None, cfg))
    lm["final_norm"] = {"scale": read(f"{prefix}model.norm.weight", (d,), "lm_width")}
    if not cfg.tie_embeddings:
        lm["lm_head"] = {"kernel": read(f"{prefix}lm_head.weight", (v, d), "vocab_size lm_width").T}
    return lm


def merge_lm(params: Mapping[str, Any], lm: Mapping[str, Any]) -> dict:
    """Unboxed Flamingo `params` with the LM weights of `lm` (from lm_from_hf) replacing
    theirs; the vision tower, resampler and cross-attention blocks are kept."""
    def merge(ours, theirs, path):
        if not isinstance(theirs, Mapping):
            if np.shape(ours) != np.shape(theirs):
                raise ValueError(f"merge_lm: {path} has shape {np.shape(theirs)}, the params {np.shape(ours)}")
            return theirs
        missing = set(theirs) - set(ours)
        if missing:
            raise ValueError(f"merge_lm: {path}/{sorted(missing)[0]} is not in the params")
        return {k: merge(v, theirs[k], f"{path}/{k}") if k in theirs else v for k, v in ours.items()}
    return {**params, "lm": merge(params["lm"], lm, "lm")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf_dir", required=True, help="HF model directory (config.json + *.safetensors)")
    ap.add_argument("--out", required=True, help="msgpack file of the 'lm' params")
    ap.add_argument("--scan_layers", action="store_true", help="stack the layer groups (FlamingoConfig.scan_layers)")
    ap.add_argument("--cross_attn_every", type=int, default=1)
    ap.add_argument("--media_id", type=int, default=None, help="default: vocab_size - 2 (<image>)")
    ap.add_argument("--eoc_id", type=int, default=None, help="default: vocab_size - 1 (<|endofchunk|>)")
    args = ap.parse_args(argv)
    config_json, state_dict = load_hf_dir(args.hf_dir)
    over = config_overrides_from_hf(config_json)
    v = over["vocab_size"]
    cfg = flamingo.FlamingoConfig(**over, scan_layers=args.scan_layers, cross_attn_every=args.cross_attn_every,
                                  media_id=v - 2 if args.media_id is None else args.media_id,
                                  eoc_id=v - 1 if args.eoc_id is None else args.eoc_id)
    lm = lm_from_hf(state_dict, cfg)
    with open(args.out, "wb") as f:
        f.write(serialization.msgpack_serialize(lm))
    print(f"wrote {args.out}: FlamingoConfig LM fields {over}")


if __name__ == "__main__":
    main()
