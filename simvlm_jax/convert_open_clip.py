"""open_clip CoCa checkpoints <-> simvlm_jax CoCa params (`CoCaConfig.open_clip_compatible=True`).

    from simvlm_jax import convert_open_clip as conv
    cfg = conv.config_from_open_clip(open_clip.get_model_config('coca_ViT-B-32'))
    params = conv.from_open_clip(conv.load_state_dict('open_clip_pytorch_model.bin'), cfg)
    state_dict = conv.to_open_clip(params, cfg)      # numpy arrays, open_clip key names
    model_cfg = conv.config_to_open_clip(cfg)        # open_clip's model config dict

Command line, open_clip -> ours (writes an export directory, as `export.export` does: for
`caption`, `zero_shot`, `train.init_from`), and an export bundle -> open_clip's files
(open_clip_config.json + weights, for `create_model('local-dir:OUT')`):
    python -m simvlm_jax.convert_open_clip --model coca_ViT-B-32 \
        --checkpoint open_clip_pytorch_model.bin --output coca_b32_export
    python -m simvlm_jax.convert_open_clip --export_dir EXPORT --output OUT [--format bin]

Token ids and images: open_clip's tokenizer output `text` [B, 76] (starting with
<start_of_text> = 49406) is our `encode_text` input; for training/captioning pass
`target_tokens = text[:, 1:]` (the model prepends `bos_id` = 49406). Images: float
arrays already normalized with the OpenAI mean/std (NHWC), or uint8 (normalized with
`CoCaConfig.image_mean/std`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from flax import serialization
from safetensors.numpy import load_file, save_file

from simvlm_jax import export
from simvlm_jax.models import coca
from simvlm_jax.models.family import count_params

# ----------------------------------------------------------------------------- config


def config_from_open_clip(model_cfg: Mapping[str, Any], **overrides) -> coca.CoCaConfig:
    """CoCaConfig for an open_clip CoCa model config dict (`open_clip.get_model_config(name)`)."""
    v, t, m = model_cfg["vision_cfg"], model_cfg["text_cfg"], model_cfg["multimodal_cfg"]
    embed_dim = model_cfg["embed_dim"]
    head_width = v.get("head_width", 64)
    text_mlp = int(t.get("width", 512) * t.get("mlp_ratio", 4.0))
    # open_clip's MultimodalTransformer is built without multimodal_cfg.mlp_ratio: always 4x.
    mm_mlp = int(m.get("width", 512) * 4)
    unsupported = {k: v.get(k) for k in ("ls_init_value", "patch_dropout", "no_ln_pre", "pos_embed_type")
                   if v.get(k) not in (None, 0.0, False, "learnable")}
    if isinstance(v.get("attentional_pool"), str):
        unsupported["vision_cfg.attentional_pool"] = v["attentional_pool"]
    if not v.get("attentional_pool"):
        unsupported["vision_cfg.attentional_pool"] = v.get("attentional_pool")
    if not t.get("embed_cls"):
        unsupported["text_cfg.embed_cls"] = t.get("embed_cls")
    if t.get("width", 512) != m.get("width", 512) or t.get("heads", 8) != m.get("heads", 8) or text_mlp != mm_mlp:
        unsupported["text/multimodal width, heads, mlp"] = (t.get("width"), m.get("width"))
    if unsupported:
        raise ValueError(f"config_from_open_clip: unsupported open_clip CoCa options {unsupported}")
    kw = dict(
        vocab_size=t.get("vocab_size", 49408),
        image_size=v["image_size"], patch_size=v["patch_size"],
        encoder_width=v["width"], encoder_layers=v["layers"], encoder_heads=v["width"] // head_width,
        encoder_mlp_dim=int(v["width"] * v.get("mlp_ratio", 4.0)),
        decoder_width=t.get("width", 512), unimodal_layers=t.get("layers", 12),
        multimodal_layers=m.get("layers", 12), decoder_heads=t.get("heads", 8), decoder_mlp_dim=text_mlp,
        embed_dim=embed_dim, n_queries=v.get("attn_pooler_queries", 256),
        pooler_heads=v.get("attn_pooler_heads", 8),
        max_text_len=t.get("context_length", 77) - 1, bos_id=49406, eos_id=49407, pad_id=t.get("pad_id", 0),
        open_clip_compatible=True,
        activation="quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu_exact",
        layer_norm_eps=1e-5, image_mean=coca.OPENAI_MEAN, image_std=coca.OPENAI_STD)
    kw.update(overrides)
    return coca.CoCaConfig(**kw)


def config_to_open_clip(cfg: coca.CoCaConfig) -> dict[str, Any]:
    """open_clip model config dict (`model_cfg` in open_clip_config.json) for an
    open_clip-compatible CoCaConfig: the inverse of `config_from_open_clip`.

    Token ids (bos/eos), dtypes, scan/remat and image mean/std are not part of it
    (mean/std go to open_clip's preprocess config, see `preprocess_to_open_clip`).
    """
    problems = {}
    if not cfg.open_clip_compatible:
        problems["open_clip_compatible"] = False
    if cfg.activation not in ("gelu_exact", "quick_gelu"):
        problems["activation"] = cfg.activation
    if cfg.layer_norm_eps != 1e-5:  # open_clip's LayerNorms use torch's default eps
        problems["layer_norm_eps"] = cfg.layer_norm_eps
    if cfg.decoder_mlp_dim != 4 * cfg.decoder_width:  # the multimodal decoder's MLP is always 4x
        problems["decoder_mlp_dim"] = cfg.decoder_mlp_dim
    if int(cfg.encoder_width * (cfg.encoder_mlp_dim / cfg.encoder_width)) != cfg.encoder_mlp_dim:  # open_clip's rounding
        problems["encoder_mlp_dim"] = cfg.encoder_mlp_dim
    if problems:
        raise ValueError(f"config_to_open_clip: this CoCaConfig has no open_clip equivalent: {problems}")
    text = {"context_length": cfg.max_text_len + 1, "vocab_size": cfg.vocab_size, "width": cfg.decoder_width,
            "heads": cfg.decoder_heads}
    return {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": cfg.activation == "quick_gelu",
        "vision_cfg": {"image_size": cfg.image_size, "layers": cfg.encoder_layers, "width": cfg.encoder_width,
                       "patch_size": cfg.patch_size, "head_width": cfg.encoder_width // cfg.encoder_heads,
                       "mlp_ratio": cfg.encoder_mlp_dim / cfg.encoder_width, "attentional_pool": True,
                       "attn_pooler_heads": cfg.num_pooler_heads, "attn_pooler_queries": cfg.n_queries,
                       "output_tokens": True},
        "text_cfg": {**text, "layers": cfg.unimodal_layers, "mlp_ratio": cfg.decoder_mlp_dim / cfg.decoder_width,
                     "embed_cls": True, "pad_id": cfg.pad_id, "output_tokens": True},
        # open_clip never reads multimodal_cfg.attn_pooler_heads; its configs set it to the heads.
        "multimodal_cfg": {**text, "layers": cfg.multimodal_layers, "attn_pooler_heads": cfg.decoder_heads},
        "custom_text": True,  # open_clip.create_model builds a CoCa only with this flag
    }


def preprocess_to_open_clip(cfg: coca.CoCaConfig) -> dict[str, Any]:
    """open_clip's preprocess config (image size, mean/std in [0, 1] units) for our uint8 normalization."""
    return {"size": cfg.image_size, "mean": [m / 255 for m in cfg.image_mean],
            "std": [s / 255 for s in cfg.image_std]}


# ----------------------------------------------------------------------------- helpers

def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _ln_in(sd, p):
    return {"scale": _np(sd[f"{p}.weight"]), "bias": _np(sd[f"{p}.bias"])}


def _ln_out(tree, p):
    return {f"{p}.weight": tree["scale"], f"{p}.bias": tree["bias"]}


def _mha_in(sd, p, heads):
    """torch nn.MultiheadAttention -> layers.Attention {query,key,value,out}."""
    out_w, out_b = _np(sd[f"{p}.out_proj.weight"]), _np(sd[f"{p}.out_proj.bias"])
    d = out_w.shape[0]
    if f"{p}.in_proj_weight" in sd:
        wq, wk, wv = np.split(_np(sd[f"{p}.in_proj_weight"]), 3, axis=0)
    else:  # kdim/vdim != embed_dim
        wq, wk, wv = (_np(sd[f"{p}.{n}_proj_weight"]) for n in "qkv")
    bq, bk, bv = np.split(_np(sd[f"{p}.in_proj_bias"]), 3)
    hd = d // heads

    def proj(w, b):  # w [D_out, D_in]
        return {"kernel": w.T.reshape(w.shape[1], heads, hd), "bias": b.reshape(heads, hd)}
    return {"query": proj(wq, bq), "key": proj(wk, bk), "value": proj(wv, bv),
            "out": {"kernel": out_w.T.reshape(heads, hd, d), "bias": out_b}}


def _mha_out(tree, p):
    def w(name):
        k = np.asarray(tree[name]["kernel"])
        return k.reshape(k.shape[0], -1).T, np.asarray(tree[name]["bias"]).reshape(-1)
    (wq, bq), (wk, bk), (wv, bv) = w("query"), w("key"), w("value")
    out_k = np.asarray(tree["out"]["kernel"])
    sd = {f"{p}.in_proj_bias": np.concatenate([bq, bk, bv]),
          f"{p}.out_proj.weight": out_k.reshape(-1, out_k.shape[-1]).T,
          f"{p}.out_proj.bias": np.asarray(tree["out"]["bias"])}
    if wq.shape == wk.shape == wv.shape and wq.shape[0] == wq.shape[1]:
        sd[f"{p}.in_proj_weight"] = np.concatenate([wq, wk, wv], axis=0)
    else:
        sd.update({f"{p}.q_proj_weight": wq, f"{p}.k_proj_weight": wk, f"{p}.v_proj_weight": wv})
    return sd


def _linear_in(sd, p):
    return {"kernel": _np(sd[f"{p}.weight"]).T, "bias": _np(sd[f"{p}.bias"])}


def _linear_out(tree, p):
    return {f"{p}.weight": np.asarray(tree["kernel"]).T, f"{p}.bias": np.asarray(tree["bias"])}


def _block_in(sd, p, heads, cross=False):
    t = {"ln_1": _ln_in(sd, f"{p}.ln_1"), "attn": _mha_in(sd, f"{p}.attn", heads), "ln_2": _ln_in(sd, f"{p}.ln_2"),
         "mlp": {"c_fc": _linear_in(sd, f"{p}.mlp.c_fc"), "c_proj": _linear_in(sd, f"{p}.mlp.c_proj")}}
    if cross:
        t["ln_1_kv"] = _ln_in(sd, f"{p}.ln_1_kv")
    return t


def _block_out(tree, p):
    sd = {**_ln_out(tree["ln_1"], f"{p}.ln_1"), **_mha_out(tree["attn"], f"{p}.attn"),
          **_ln_out(tree["ln_2"], f"{p}.ln_2"), **_linear_out(tree["mlp"]["c_fc"], f"{p}.mlp.c_fc"),
          **_linear_out(tree["mlp"]["c_proj"], f"{p}.mlp.c_proj")}
    if "ln_1_kv" in tree:
        sd.update(_ln_out(tree["ln_1_kv"], f"{p}.ln_1_kv"))
    return sd


def _tree_map(fn, *trees):
    if isinstance(trees[0], dict):
        return {k: _tree_map(fn, *(t[k] for t in trees)) for k in trees[0]}
    return fn(*trees)


def _layers_in(blocks: list[dict], name: str, scan: bool) -> dict:
    if scan:
        return {name: _tree_map(lambda *xs: np.stack(xs), *blocks)} if blocks else {}
    return {f"{name}_{i}": b for i, b in enumerate(blocks)}


def _layers_out(tree: dict, name: str, n: int, scan: bool) -> list[dict]:
    if scan:
        return [_tree_map(lambda x, i=i: np.asarray(x)[i], tree[name]) for i in range(n)] if n else []
    return [tree[f"{name}_{i}"] for i in range(n)]


# ----------------------------------------------------------------------------- conversion

def vision_from_open_clip(state_dict: Mapping[str, Any], cfg: coca.CoCaConfig, prefix: str = "visual.") -> dict:
    """The ViT of an open_clip (CLIP or CoCa) state dict -> our `coca.VisionEncoder` params
    (patch conv, class token, positions, ln_pre, blocks; not ln_post / the projection).
    mPLUG's image tower is this encoder (`mplug.import_open_clip_vision`)."""
    sd = state_dict
    conv = _np(sd[f"{prefix}conv1.weight"])  # [W, 3, p, p]
    return {"conv1": {"kernel": conv.transpose(2, 3, 1, 0)},
            "class_embedding": _np(sd[f"{prefix}class_embedding"]),
            "positional_embedding": _np(sd[f"{prefix}positional_embedding"]),
            "ln_pre": _ln_in(sd, f"{prefix}ln_pre"),
            **_layers_in([_block_in(sd, f"{prefix}transformer.resblocks.{i}", cfg.encoder_heads)
                          for i in range(cfg.encoder_layers)], "transformer", cfg.scan_layers)}


def from_open_clip(state_dict: Mapping[str, Any], cfg: coca.CoCaConfig) -> dict:
    """open_clip CoCa state_dict (torch tensors or arrays) -> our params (numpy, unboxed)."""
    if not cfg.open_clip_compatible:
        raise ValueError("from_open_clip needs CoCaConfig.open_clip_compatible=True")
    sd = dict(state_dict)
    if "logit_bias" in sd:
        raise ValueError("open_clip CoCa checkpoints with a logit_bias are not supported")
    dh, ph = cfg.decoder_heads, cfg.num_pooler_heads
    visual = vision_from_open_clip(sd, cfg)
    pooler = {"attn_pool": {"query": _np(sd["visual.attn_pool.query"]),
                            "ln_q": _ln_in(sd, "visual.attn_pool.ln_q"),
                            "ln_k": _ln_in(sd, "visual.attn_pool.ln_k"),
                            "attn": _mha_in(sd, "visual.attn_pool.attn", ph)},
              "ln_post": _ln_in(sd, "visual.ln_post"), "proj": _np(sd["visual.proj"])}
    text = {"token_embedding": {"embedding": _np(sd["text.token_embedding.weight"])},
            "cls_emb": _np(sd["text.cls_emb"]),
            "positional_embedding": _np(sd["text.positional_embedding"]),
            **_layers_in([_block_in(sd, f"text.transformer.resblocks.{i}", dh)
                          for i in range(cfg.unimodal_layers)], "transformer", cfg.scan_layers),
            "ln_final": _ln_in(sd, "text.ln_final"), "text_projection": _np(sd["text.text_projection"])}
    decoder = {**_layers_in([{"resblock": _block_in(sd, f"text_decoder.resblocks.{i}", dh),
                              "cross_attn": _block_in(sd, f"text_decoder.cross_attn.{i}", dh, cross=True)}
                             for i in range(cfg.multimodal_layers)], "layers", cfg.scan_layers),
               "ln_final": _ln_in(sd, "text_decoder.ln_final"),
               "text_projection": _np(sd["text_decoder.text_projection"])}
    params = {"visual": visual, "pooler": pooler, "text": text, "decoder": decoder,
              "logit_scale": _np(sd["logit_scale"]).reshape(())}
    _check_shapes(params, cfg)
    return params


def to_open_clip(params: Mapping[str, Any], cfg: coca.CoCaConfig) -> dict[str, np.ndarray]:
    """Our params (open_clip-compatible CoCa) -> open_clip CoCa state_dict (numpy float32 arrays)."""
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), nn.meta.unbox(dict(params)))
    v, pool, t, d = p["visual"], p["pooler"], p["text"], p["decoder"]
    sd = {"visual.conv1.weight": v["conv1"]["kernel"].transpose(3, 2, 0, 1),
          "visual.class_embedding": v["class_embedding"],
          "visual.positional_embedding": v["positional_embedding"],
          **_ln_out(v["ln_pre"], "visual.ln_pre")}
    for i, blk in enumerate(_layers_out(v, "transformer", cfg.encoder_layers, cfg.scan_layers)):
        sd.update(_block_out(blk, f"visual.transformer.resblocks.{i}"))
    ap = pool["attn_pool"]
    sd.update({"visual.attn_pool.query": ap["query"], **_ln_out(ap["ln_q"], "visual.attn_pool.ln_q"),
               **_ln_out(ap["ln_k"], "visual.attn_pool.ln_k"), **_mha_out(ap["attn"], "visual.attn_pool.attn"),
               **_ln_out(pool["ln_post"], "visual.ln_post"), "visual.proj": pool["proj"]})
    sd.update({"text.token_embedding.weight": t["token_embedding"]["embedding"], "text.cls_emb": t["cls_emb"],
               "text.positional_embedding": t["positional_embedding"],
               **_ln_out(t["ln_final"], "text.ln_final"), "text.text_projection": t["text_projection"]})
    for i, blk in enumerate(_layers_out(t, "transformer", cfg.unimodal_layers, cfg.scan_layers)):
        sd.update(_block_out(blk, f"text.transformer.resblocks.{i}"))
    for i, layer in enumerate(_layers_out(d, "layers", cfg.multimodal_layers, cfg.scan_layers)):
        sd.update(_block_out(layer["resblock"], f"text_decoder.resblocks.{i}"))
        sd.update(_block_out(layer["cross_attn"], f"text_decoder.cross_attn.{i}"))
    sd.update({**_ln_out(d["ln_final"], "text_decoder.ln_final"),
               "text_decoder.text_projection": d["text_projection"], "logit_scale": p["logit_scale"].reshape(())})
    return sd


def _check_shapes(params: dict, cfg: coca.CoCaConfig) -> None:
    expected = nn.meta.unbox(coca.CoCaFamily(cfg).abstract_params())
    exp = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    if exp != got:
        missing, extra = sorted(set(exp) - set(got)), sorted(set(got) - set(exp))
        wrong = [(k, got[k], exp[k]) for k in sorted(set(exp) & set(got)) if got[k] != exp[k]]
        raise ValueError(f"open_clip checkpoint does not match the CoCaConfig: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}, shape mismatches (name, checkpoint, config) {wrong[:5]}")


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """An open_clip checkpoint (.safetensors, or torch .bin/.pt loaded with weights_only=True)."""
    if path.endswith(".safetensors"):
        return dict(load_file(path))
    torch = _import_torch("reading a .bin/.pt open_clip checkpoint")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:  # open_clip training checkpoints
        sd = sd["state_dict"]
    return {k.removeprefix("module."): _np(v) for k, v in sd.items()}


def export_open_clip(params: Any, config: coca.CoCaConfig, out_dir: str,
                     formats: Sequence[str] = ("safetensors",), dtype: str = "float32") -> str:
    """Writes an open_clip-compatible CoCa as open_clip's own files; returns `out_dir`.

    out_dir/open_clip_config.json       {'model_cfg', 'preprocess_cfg'}
    out_dir/open_clip_model.safetensors  ('safetensors' in `formats`)
    out_dir/open_clip_pytorch_model.bin  ('bin': torch.save of the state_dict; needs torch)
    open_clip reads it with `open_clip.create_model('local-dir:' + out_dir)` (strict load);
    the tokenizer it then uses is its CLIP BPE (SimpleTokenizer).
    """
    unknown = set(formats) - {"safetensors", "bin"}
    if unknown or not formats:
        raise ValueError(f"export_open_clip formats {list(formats)}; use 'safetensors' and/or 'bin'")
    model_cfg = config_to_open_clip(config)
    torch = _import_torch("export_open_clip(formats=('bin',))") if "bin" in formats else None
    state_dict = {k: np.ascontiguousarray(v) for k, v in to_open_clip(params, config).items()}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "open_clip_config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_to_open_clip(config)}, f, indent=1)
    if "safetensors" in formats:
        save_file(export.cast_floats(state_dict, dtype), os.path.join(out_dir, "open_clip_model.safetensors"))
    if torch is not None:
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        torch.save({k: torch.from_numpy(v).to(torch_dtype) for k, v in state_dict.items()},
                   os.path.join(out_dir, "open_clip_pytorch_model.bin"))
    return out_dir


def tokenizer_mismatch(tokenizer: Mapping[str, Any], override: str) -> str | None:
    """Why open_clip's files would be wrong for a model trained with `tokenizer` (an
    export_info.json `tokenizer` entry), or None when it is CLIP BPE, open_clip's own."""
    if tokenizer.get("type") == "clip_bpe":
        return None
    return (f"the model was trained with the {tokenizer.get('type') or 'unknown'} tokenizer, but open_clip "
            "always tokenizes with CLIP BPE, so its token ids would mean other words (wrong captions and "
            f"text embeddings); train with get_vocabulary.kind = 'clip_bpe', or set {override} to write it anyway")


@gin.configurable
class OpenClipWriter:
    """`export.export(..., writers=[OpenClipWriter(config)])`: adds open_clip's files to a bundle
    (in `open_clip/`). Fails at construction for a config open_clip cannot represent, and in
    `export.export` for a model not trained with CLIP BPE unless `allow_other_tokenizer`
    (gin: `OpenClipWriter.allow_other_tokenizer = True`)."""
    name = "open_clip"

    def __init__(self, config: coca.CoCaConfig, allow_other_tokenizer: bool = False):
        config_to_open_clip(config)  # raises before anything is written
        self.config = config
        self.allow_other_tokenizer = allow_other_tokenizer

    def check_tokenizer(self, tokenizer: Mapping[str, Any]) -> None:
        why = tokenizer_mismatch(tokenizer, "OpenClipWriter.allow_other_tokenizer = True")
        if why and not self.allow_other_tokenizer:
            raise ValueError(f"export_open_clip refused: {why}")

    def __call__(self, host_params: Any, out_dir: str, dtype: str) -> str:
        export_open_clip(host_params, self.config, out_dir, dtype=dtype)
        return (f"open_clip weights: `open_clip.create_model('local-dir:THIS_DIR/{self.name}')` "
                "(float32 unless exported with a dtype).")


def _import_torch(what: str):
    try:
        import torch  # pylint: disable=g-import-not-at-top  (optional: PyTorch)
    except ImportError as e:
        raise ImportError(f"{what} needs PyTorch (torch.save/torch.load); install torch or use "
                          "safetensors, which open_clip also loads") from e
    return torch


def _export_to_open_clip(export_dir: str, output: str, formats: list[str], allow_other_tokenizer: bool) -> None:
    """An export bundle (open_clip-compatible CoCa) -> open_clip's files in `output`."""
    info, config = export.read_export_info(export_dir), export.load_config(export_dir)
    if not getattr(config, "open_clip_compatible", False):
        raise SystemExit(f"error: {export_dir} holds a {type(config).__name__} model that is not an "
                         "open_clip-compatible CoCa (CoCaConfig.open_clip_compatible=True)")
    why = tokenizer_mismatch(info["tokenizer"], "--allow_other_tokenizer")
    if why and not allow_other_tokenizer:
        raise SystemExit(f"error: {export_dir}: {why}")
    model, params, _ = export.load_export(export_dir)
    dtype = info["dtype"]
    export_open_clip(params, model.config, output, formats=formats,
                     dtype=dtype if dtype in export.EXPORT_DTYPES else "float32")
    print(f"wrote open_clip files to {output}; load with open_clip.create_model('local-dir:{output}')")


def open_clip_model_config(model: str) -> dict[str, Any]:
    """open_clip's model config: `model` is a model name (needs open_clip_torch) or a JSON file,
    either an `open_clip_config.json` (as on the Hugging Face hub) or a bare model config."""
    if model.endswith(".json") or os.path.isfile(model):
        with open(model, encoding="utf-8") as f:
            data = json.load(f)
        return data.get("model_cfg", data)
    try:
        import open_clip  # pylint: disable=g-import-not-at-top  (optional: PyTorch)
    except ImportError as e:
        raise ValueError(f"--model {model}: open_clip model names need open_clip_torch installed; "
                         "or give the model's open_clip_config.json") from e
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model!r}; give an open_clip model name (e.g. coca_ViT-B-32) "
                         "or the path of its open_clip_config.json")
    return cfg


def load_open_clip(model: str, checkpoint: str, scan_layers: bool = False) -> tuple[coca.CoCaConfig, dict]:
    """(config, params) of an open_clip CoCa checkpoint; `model` as in `open_clip_model_config`."""
    cfg = config_from_open_clip(open_clip_model_config(model), scan_layers=scan_layers)
    return cfg, from_open_clip(load_state_dict(checkpoint), cfg)


def import_open_clip(model: str, checkpoint: str, export_dir: str, merges_path: str | None = None,
                     scan_layers: bool = False) -> str:
    """An open_clip CoCa checkpoint -> a complete simvlm_jax export directory (params.safetensors,
    model.gin, CLIP BPE merges, export_info.json, MODEL_CARD.md), which `caption`, `zero_shot`,
    `export.load_export` and `train.init_from` read. `merges_path`: CLIP's BPE file (default: the
    one open_clip_torch ships). Returns `export_dir`."""
    from simvlm_jax.data import clip_tokenizer  # pylint: disable=g-import-not-at-top  (seqio -> TensorFlow)
    vocab = clip_tokenizer.ClipBpeVocabulary(merges_path)  # fails before the checkpoint is read
    cfg, params = load_open_clip(model, checkpoint, scan_layers)
    coca.CoCaFamily(cfg).check_vocabulary(vocab)
    origin = (f"Imported from the open_clip checkpoint `{os.path.basename(checkpoint)}` (model "
              f"`{os.path.basename(model)}`) with `python -m simvlm_jax.convert_open_clip`; not trained here.")
    return export.export(params, cfg, vocab, export_dir, origin=origin)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="open_clip model name, e.g. coca_ViT-B-32, or its open_clip_config.json "
                    "(open_clip -> ours)")
    ap.add_argument("--checkpoint", help=".bin/.pt/.safetensors open_clip state_dict (open_clip -> ours)")
    ap.add_argument("--export_dir", help="a simvlm_jax export of an open_clip-compatible CoCa (ours -> open_clip)")
    ap.add_argument("--output", required=True,
                    help="open_clip -> ours: the export directory to write (a path ending in .msgpack writes "
                         "only the params, flax-serialized); ours -> open_clip: output directory for "
                         "open_clip.create_model('local-dir:...')")
    ap.add_argument("--format", action="append", choices=("safetensors", "bin"),
                    help="ours -> open_clip weight files (repeatable; default safetensors)")
    ap.add_argument("--merges_path", help="open_clip -> ours: CLIP BPE merges file "
                    "(default: the bpe_simple_vocab_16e6.txt.gz open_clip_torch ships)")
    ap.add_argument("--allow_other_tokenizer", action="store_true",
                    help="ours -> open_clip: convert a model trained with another tokenizer than CLIP BPE")
    ap.add_argument("--scan_layers", action="store_true")
    args = ap.parse_args(argv)
    if args.export_dir:
        if args.model or args.checkpoint:
            ap.error("--export_dir (ours -> open_clip) excludes --model/--checkpoint")
        _export_to_open_clip(args.export_dir, args.output, args.format or ["safetensors"],
                             args.allow_other_tokenizer)
        return
    if not (args.model and args.checkpoint):
        ap.error("open_clip -> ours needs --model and --checkpoint (or give --export_dir)")
    try:
        if args.output.endswith(".msgpack"):
            cfg, params = load_open_clip(args.model, args.checkpoint, args.scan_layers)
            with open(args.output, "wb") as f:
                f.write(serialization.msgpack_serialize(params))
            print(f"wrote {count_params(params):,} params to {args.output}; config: {dataclasses.asdict(cfg)}")
            return
        out = import_open_clip(args.model, args.checkpoint, args.output, args.merges_path, args.scan_layers)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {' '.join(str(e).split())}") from None
    info = export.read_export_info(out)
    print(f"wrote an export of {info['num_params']:,} params to {out}; caption with "
          f"`python -m simvlm_jax.caption --export_dir {out} IMAGE`")


if __name__ == "__main__":
    main()
