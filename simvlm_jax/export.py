"""Params-only inference bundles: safetensors + gin model config + tokenizer + model card.

An export holds no optimizer state and no pickles:
  params.safetensors  flat '/'-joined parameter paths -> arrays (float32, or bf16/fp16 with `dtype`)
  model.gin           the `SimVLMConfig.*` or `CoCaConfig.*` bindings that rebuild the model
  tokenizer.model     the SentencePiece model (absent for open_clip CoCa, which uses CLIP BPE)
  export_info.json    format version, model type, tokenizer, parameter count, dtype, metrics
  MODEL_CARD.md       what it is, how it was trained, its metrics
  open_clip/          (optional, open_clip-compatible CoCa) open_clip_config.json +
                      open_clip_model.safetensors: `open_clip.create_model('local-dir:DIR/open_clip')`

`load_export(dir)` rebuilds (model, params, vocabulary) without the training state;
`load_params_for_training(dir, params, include)` puts an export's weights (all, or the
paths matching `include`) into a model's param tree for further training.
Bundles of format 1 (SimVLM only, before model types were recorded) still load.
"""
from __future__ import annotations

import ast
import dataclasses
import datetime
import json
import logging
import os
import re
import shutil
from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import seqio
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from simvlm_jax.models import coca, simvlm

FORMAT_VERSION = 2  # 2: model type (SimVLM | CoCa) and tokenizer recorded; 1: SimVLM only
PARAMS_FILE = "params.safetensors"
TOKENIZER_FILE = "tokenizer.model"
OPEN_CLIP_DIR = "open_clip"

# model type -> (config class, model class); the gin prefix is the config class name.
MODEL_TYPES = {"SimVLM": (simvlm.SimVLMConfig, simvlm.SimVLM), "CoCa": (coca.CoCaConfig, coca.CoCa)}
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
ModelConfig = simvlm.SimVLMConfig | coca.CoCaConfig


# ----------------------------------------------------------------------------- param trees

def flatten_params(params: Any) -> dict[str, Any]:
    """{'a/b/kernel': leaf} in tree-flatten order."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        flat[key] = leaf
    return flat


def unflatten_params(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _to_host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _is_float(dtype: Any) -> bool:
    # ml_dtypes.bfloat16 is not a numpy floating subtype.
    return np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16


def cast_floats(flat: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Floating arrays cast to `dtype` ('float32' | 'bfloat16' | 'float16'); others unchanged."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r}; choose one of {sorted(EXPORT_DTYPES)}")
    target = EXPORT_DTYPES[dtype]
    return {k: v.astype(target) if _is_float(v.dtype) else v for k, v in flat.items()}


# ----------------------------------------------------------------------------- model config <-> gin

def model_type_of(config: ModelConfig) -> str:
    for name, (config_cls, _) in MODEL_TYPES.items():
        if isinstance(config, config_cls):
            return name
    raise TypeError(f"cannot export a {type(config).__name__}; known: {sorted(MODEL_TYPES)}")


def config_to_gin(cfg: ModelConfig) -> str:
    """`<ConfigClass>.<field> = <repr>` for every field (also valid gin)."""
    cls = type(cfg).__name__
    lines = [f"# {model_type_of(cfg)} model config written by simvlm_jax.export"]
    lines += [f"{cls}.{f.name} = {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)]
    return "\n".join(lines) + "\n"


def gin_to_config(text: str) -> ModelConfig:
    """The config written by `config_to_gin` (its class is read from the binding prefix)."""
    by_prefix = {cls.__name__: cls for cls, _ in MODEL_TYPES.values()}
    kwargs: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#") or "=" not in line:
            continue
        name, value = line.split("=", 1)
        cls_name, _, field = name.strip().partition(".")
        if cls_name in by_prefix:
            kwargs.setdefault(cls_name, {})[field] = ast.literal_eval(value.strip())
    if len(kwargs) != 1:
        raise ValueError(f"model.gin must bind exactly one of {sorted(by_prefix)}; found {sorted(kwargs) or 'none'}")
    (cls_name, fields), = kwargs.items()
    return by_prefix[cls_name](**fields)


# ----------------------------------------------------------------------------- writing

def _model_summary(cfg: ModelConfig) -> str:
    if isinstance(cfg, coca.CoCaConfig):
        flavour = "open_clip-compatible " if cfg.open_clip_compatible else ""
        return (f"{flavour}CoCa: ViT width {cfg.encoder_width} x {cfg.encoder_layers} layers "
                f"(patch {cfg.patch_size}), text decoder width {cfg.decoder_width}, "
                f"{cfg.unimodal_layers} unimodal + {cfg.multimodal_layers} multimodal layers, "
                f"{cfg.n_queries} pooler queries, embedding {cfg.embed_dim}, {cfg.image_size}px images.")
    return (f"SimVLM (PrefixLM): width {cfg.width}, {cfg.encoder_layers} encoder / {cfg.decoder_layers} "
            f"decoder layers, {cfg.image_size}px images, conv stem stages {cfg.stem_stages}.")


def _tokenizer_note(tokenizer: dict[str, Any]) -> str:
    if tokenizer["type"] == "sentencepiece":
        return f"SentencePiece, `{TOKENIZER_FILE}` in this directory."
    if tokenizer["type"] == "open_clip":
        return ("CLIP BPE, not included: `simvlm_jax.data.clip_tokenizer.ClipBpeVocabulary()` (reads the "
                "merges file shipped with open_clip_torch; ids equal `open_clip.get_tokenizer('coca_ViT-B-32')`'s); "
                "target tokens = its output without the leading <start_of_text>.")
    return "not included."


def _model_card(config: ModelConfig, info: dict[str, Any]) -> str:
    metrics = info["metrics"]
    metric_lines = "\n".join(f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |"
                             for k, v in metrics.items())
    use = "python -m simvlm_jax.caption --export_dir THIS_DIR image.jpg"
    if info["model_type"] == "CoCa":
        use += "\npython -m simvlm_jax.zero_shot --export_dir THIS_DIR --mode classify --image_dir DIR"
    card = (f"# {info['model_type']} export\n\n{_model_summary(config)}\n"
            f"{info['num_params']:,} parameters, weights stored as {info['dtype']}.\n"
            f"Trained with simvlm_jax, step {info['step']}.\n\nTokenizer: {_tokenizer_note(info['tokenizer'])}\n\n"
            f"## Metrics\n\n| metric | value |\n|---|---|\n{metric_lines}\n\n## Use\n\n```\n{use}\n```\n")
    if info.get("open_clip"):
        card += (f"\nopen_clip weights: `open_clip.create_model('local-dir:THIS_DIR/{OPEN_CLIP_DIR}')` "
                 "(float32 unless exported with a dtype).\n")
    return card


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _tokenizer_info(config: ModelConfig, vocab_path: str | None) -> dict[str, Any]:
    if vocab_path:
        return {"type": "sentencepiece", "file": TOKENIZER_FILE}
    if isinstance(config, coca.CoCaConfig) and config.open_clip_compatible:
        return {"type": "open_clip", "file": None}
    return {"type": None, "file": None}


@gin.configurable(allowlist=["open_clip_state_dict"])
def export(params: Any, config: ModelConfig, vocab_path: str | None, export_dir: str,
           metrics: dict[str, Any] | None = None, dtype: str | None = None,
           training_gin: str | None = None, step: int | None = None,
           open_clip_state_dict: bool = False) -> str:
    """Writes an inference bundle for a SimVLM or CoCa model; returns `export_dir`.

    `dtype` ('bfloat16' | 'float16' | 'float32') casts floating params (bf16 halves the
    file). `vocab_path`: the SentencePiece model (None: no tokenizer, e.g. open_clip CoCa).
    `open_clip_state_dict=True` (gin: `export.open_clip_state_dict`) also writes open_clip's
    files for an open_clip-compatible CoCa (see `export_open_clip`).
    """
    model_type = model_type_of(config)
    if open_clip_state_dict:  # fail before writing anything
        from simvlm_jax import convert_open_clip  # pylint: disable=g-import-not-at-top
        convert_open_clip.config_to_open_clip(config)
    host_params = jax.tree_util.tree_map(_to_host, nn.meta.unbox(params))
    flat = flatten_params(host_params)
    if dtype:
        flat = cast_floats(flat, dtype)
    if jax.process_index() != 0:
        return export_dir
    tmp = export_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(flat, os.path.join(tmp, PARAMS_FILE),
              metadata={"format": "simvlm_jax", "version": str(FORMAT_VERSION), "model_type": model_type})
    _write_text(os.path.join(tmp, "model.gin"), config_to_gin(config))
    if vocab_path:
        shutil.copy(vocab_path, os.path.join(tmp, TOKENIZER_FILE))
    info = {"format_version": FORMAT_VERSION, "model": model_type, "model_type": model_type,
            "config_class": type(config).__name__, "tokenizer": _tokenizer_info(config, vocab_path),
            "num_params": int(sum(v.size for v in flat.values())),
            "dtype": dtype or str(next(iter(flat.values())).dtype), "step": step,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(), "metrics": metrics or {},
            "open_clip": bool(open_clip_state_dict)}
    if open_clip_state_dict:
        export_open_clip(host_params, config, os.path.join(tmp, OPEN_CLIP_DIR), dtype=dtype or "float32")
    _write_text(os.path.join(tmp, "export_info.json"), json.dumps(info, indent=1))
    if training_gin:
        _write_text(os.path.join(tmp, "training_config.gin"), training_gin)
    _write_text(os.path.join(tmp, "MODEL_CARD.md"), _model_card(config, info))
    shutil.rmtree(export_dir, ignore_errors=True)
    os.replace(tmp, export_dir)
    return export_dir


def export_open_clip(params: Any, config: coca.CoCaConfig, out_dir: str,
                     formats: Sequence[str] = ("safetensors",), dtype: str = "float32") -> str:
    """Writes an open_clip-compatible CoCa as open_clip's own files; returns `out_dir`.

    out_dir/open_clip_config.json       {'model_cfg', 'preprocess_cfg'}
    out_dir/open_clip_model.safetensors  ('safetensors' in `formats`)
    out_dir/open_clip_pytorch_model.bin  ('bin': torch.save of the state_dict; needs torch)
    open_clip reads it with `open_clip.create_model('local-dir:' + out_dir)` (strict load);
    the tokenizer it then uses is its CLIP BPE (SimpleTokenizer).
    """
    from simvlm_jax import convert_open_clip  # pylint: disable=g-import-not-at-top
    unknown = set(formats) - {"safetensors", "bin"}
    if unknown or not formats:
        raise ValueError(f"export_open_clip formats {list(formats)}; use 'safetensors' and/or 'bin'")
    model_cfg = convert_open_clip.config_to_open_clip(config)
    torch = _import_torch() if "bin" in formats else None
    state_dict = {k: np.ascontiguousarray(v) for k, v in convert_open_clip.to_open_clip(params, config).items()}
    os.makedirs(out_dir, exist_ok=True)
    _write_text(os.path.join(out_dir, "open_clip_config.json"), json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": convert_open_clip.preprocess_to_open_clip(config)}, indent=1))
    if "safetensors" in formats:
        save_file(cast_floats(state_dict, dtype), os.path.join(out_dir, "open_clip_model.safetensors"))
    if torch is not None:
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        torch.save({k: torch.from_numpy(v).to(torch_dtype) for k, v in state_dict.items()},
                   os.path.join(out_dir, "open_clip_pytorch_model.bin"))
    return out_dir


def _import_torch():
    try:
        import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError("export_open_clip(formats=('bin',)) needs PyTorch (torch.save); install torch or "
                          "use formats=('safetensors',), which open_clip also loads") from e
    return torch


# ----------------------------------------------------------------------------- reading

def read_export_info(export_dir: str) -> dict[str, Any]:
    """export_info.json, with format-1 bundles (SimVLM, SentencePiece) filled in."""
    path = os.path.join(export_dir, "export_info.json")
    info: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    version = info.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise ValueError(f"{export_dir}: export format {version} is newer than this simvlm_jax's "
                         f"({FORMAT_VERSION}); update simvlm_jax")
    info.setdefault("model_type", info.get("model", "SimVLM"))
    info.setdefault("tokenizer", {"type": "sentencepiece", "file": TOKENIZER_FILE})
    return info


def _check_export_dir(export_dir: str, info: dict[str, Any]) -> None:
    needed = [PARAMS_FILE, "model.gin"] + ([TOKENIZER_FILE] if info["tokenizer"]["type"] == "sentencepiece" else [])
    missing = [n for n in needed if not os.path.exists(os.path.join(export_dir, n))]
    if missing:
        raise FileNotFoundError(f"{export_dir} is not a simvlm_jax export (missing {', '.join(missing)})")


def load_config(export_dir: str) -> ModelConfig:
    """The export's model config (SimVLMConfig or CoCaConfig)."""
    with open(os.path.join(export_dir, "model.gin"), encoding="utf-8") as f:
        config = gin_to_config(f.read())
    model_type = read_export_info(export_dir)["model_type"]
    if model_type_of(config) != model_type:
        raise ValueError(f"{export_dir}: model.gin holds a {type(config).__name__} but export_info.json "
                         f"says model_type {model_type!r}")
    return config


def load_export(export_dir: str) -> tuple[simvlm.SimVLM | coca.CoCa, dict[str, Any],
                                          seqio.SentencePieceVocabulary | None]:
    """(model, params, vocabulary) from an export directory.

    The model is a `SimVLM` or a `CoCa`, by the bundle's model type. Low-precision
    (bf16/fp16) params are upcast when the config's param_dtype is float32. The
    vocabulary of open_clip CoCa bundles is CLIP BPE (`clip_tokenizer.ClipBpeVocabulary`,
    None when its merges file is not available); None for bundles without a tokenizer.
    """
    info = read_export_info(export_dir)
    _check_export_dir(export_dir, info)
    config = load_config(export_dir)
    params = unflatten_params(load_file(os.path.join(export_dir, PARAMS_FILE)))
    if config.param_dtype == "float32":
        params = jax.tree_util.tree_map(lambda x: x.astype(np.float32) if _is_float(x.dtype) else x, params)
    vocab = None
    if info["tokenizer"]["type"] == "sentencepiece":
        vocab = seqio.SentencePieceVocabulary(os.path.join(export_dir, TOKENIZER_FILE))
    elif info["tokenizer"]["type"] == "open_clip":
        from simvlm_jax.data import clip_tokenizer  # pylint: disable=g-import-not-at-top
        try:  # CLIP BPE from the merges file open_clip_torch ships (None without it)
            vocab = clip_tokenizer.ClipBpeVocabulary()
        except (FileNotFoundError, ImportError) as e:
            logging.getLogger("simvlm_jax").warning("%s: no CLIP BPE tokenizer (%s)", export_dir, e)
    return MODEL_TYPES[model_type_of(config)][1](config), params, vocab


# ----------------------------------------------------------------------------- restoring for training

def _stored_shapes(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, safetensors dtype name)} without reading the tensors."""
    with safe_open(path, framework="numpy") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def _place(value: np.ndarray, like: Any) -> Any:
    """`value` cast to `like`'s dtype and laid out with its sharding (if any)."""
    value = value.astype(like.dtype)
    if isinstance(like, np.ndarray):
        return value
    sharding = getattr(like, "sharding", None)
    if sharding is None:
        return jnp.asarray(value)
    # Each process builds only its addressable shards (works on multi-host meshes).
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _selection_errors(target: dict[str, Any], stored: dict[str, tuple[tuple[int, ...], str]],
                      selected: set[str], stored_selected: set[str]) -> list[str]:
    errors = []
    missing, unexpected = sorted(selected - stored_selected), sorted(stored_selected - selected)
    if missing:
        errors.append(f"{len(missing)} params of the model are not in the export: {missing[:8]}")
    if unexpected:
        errors.append(f"{len(unexpected)} exported params are not in the model: {unexpected[:8]}")
    wrong_shape = [f"{k}: export {stored[k][0]} vs model {tuple(target[k].shape)}"
                   for k in sorted(selected & stored_selected) if stored[k][0] != tuple(target[k].shape)]
    if wrong_shape:
        errors.append(f"{len(wrong_shape)} shape mismatches: {wrong_shape[:8]}")
    wrong_kind = [f"{k}: export {stored[k][1]} vs model {target[k].dtype}" for k in sorted(selected & stored_selected)
                  if stored[k][1].startswith(("F", "BF")) != _is_float(np.dtype(target[k].dtype))]
    if wrong_kind:
        errors.append(f"float/integer mismatches: {wrong_kind[:8]}")
    return errors


def load_params_for_training(export_dir: str, params: Any, include: Sequence[str] | None = None) -> Any:
    """`params` with its leaves replaced by the export's weights, for training or fine-tuning.

    `params`: the model's (unboxed) param tree: freshly initialized arrays, or
    `jax.ShapeDtypeStruct`s when everything is loaded. Each loaded leaf gets that leaf's
    dtype (a bf16 export is upcast to float32 params) and sharding.
    `include`: regexes (full match on '/'-joined paths such as 'visual/conv1/kernel');
    only matching params are loaded, the others keep their values in `params`
    (e.g. `include=('visual/.*',)` for a new CoCa on an exported image encoder).
    Raises ValueError naming the params missing on either side, or of another shape.
    """
    path = os.path.join(export_dir, PARAMS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{export_dir} is not a simvlm_jax export (missing {PARAMS_FILE})")
    target = flatten_params(nn.meta.unbox(params))
    stored = _stored_shapes(path)
    patterns = [re.compile(p) for p in include] if include is not None else None

    def chosen(key: str) -> bool:
        return patterns is None or any(p.fullmatch(key) for p in patterns)

    selected = {k for k in target if chosen(k)}
    stored_selected = {k for k in stored if chosen(k)}
    errors = _selection_errors(target, stored, selected, stored_selected)
    if patterns is not None:
        unmatched = [p.pattern for p in patterns if not any(p.fullmatch(k) for k in set(target) | set(stored))]
        if unmatched:
            errors.append(f"include patterns matching no param: {unmatched}")
    abstract = sorted(k for k in target if k not in selected and isinstance(target[k], jax.ShapeDtypeStruct))
    if abstract:
        errors.append(f"params not loaded need initialized values, got abstract ones for {abstract[:8]}")
    if errors:
        raise ValueError(f"cannot load {export_dir} into this model (include={include}): " + "; ".join(errors))
    with safe_open(path, framework="numpy") as f:
        leaves = [_place(f.get_tensor(k), leaf) if k in selected else leaf for k, leaf in target.items()]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(nn.meta.unbox(params)), leaves)
