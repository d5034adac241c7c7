"""Params-only inference bundles: safetensors + gin model config + tokenizer + model card.

An export holds no optimizer state and no pickles:
  params.safetensors  flat '/'-joined parameter paths -> arrays
  model.gin           the SimVLMConfig bindings needed to rebuild the model
  tokenizer.model     the SentencePiece model
  export_info.json    format version, parameter count, dtype, metrics
  MODEL_CARD.md       what it is, how it was trained, its metrics
`load_export(dir)` rebuilds (model, params, vocabulary) without the training state.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import seqio
from safetensors.numpy import load_file, save_file

from simvlm_jax.models import simvlm

FORMAT_VERSION = 1


def flatten_params(params: Any) -> dict[str, np.ndarray]:
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


def config_to_gin(cfg: simvlm.SimVLMConfig) -> str:
    lines = ["# SimVLM model config written by simvlm_jax.export"]
    for f in dataclasses.fields(cfg):
        lines.append(f"SimVLMConfig.{f.name} = {getattr(cfg, f.name)!r}")
    return "\n".join(lines) + "\n"


def gin_to_config(text: str) -> simvlm.SimVLMConfig:
    import ast  # pylint: disable=g-import-not-at-top
    kwargs = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("SimVLMConfig.") and "=" in line:
            name, value = line[len("SimVLMConfig."):].split("=", 1)
            kwargs[name.strip()] = ast.literal_eval(value.strip())
    return simvlm.SimVLMConfig(**kwargs)


def export(params: Any, config: simvlm.SimVLMConfig, vocab_path: str, export_dir: str,
           metrics: dict[str, Any] | None = None, dtype: str | None = None,
           training_gin: str | None = None, step: int | None = None) -> str:
    """Writes an inference bundle; `dtype='bfloat16'` casts floating params."""
    flat = {k: _to_host(v) for k, v in flatten_params(params).items()}
    if dtype:
        import ml_dtypes  # pylint: disable=g-import-not-at-top
        target = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}[dtype]
        flat = {k: v.astype(target) if np.issubdtype(v.dtype, np.floating) or v.dtype == ml_dtypes.bfloat16
                else v for k, v in flat.items()}
    if jax.process_index() != 0:
        return export_dir
    tmp = export_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(flat, os.path.join(tmp, "params.safetensors"), metadata={"format": "simvlm_jax", "version": str(FORMAT_VERSION)})
    with open(os.path.join(tmp, "model.gin"), "w", encoding="utf-8") as f:
        f.write(config_to_gin(config))
    shutil.copy(vocab_path, os.path.join(tmp, "tokenizer.model"))
    num_params = int(sum(v.size for v in flat.values()))
    info = {"format_version": FORMAT_VERSION, "model": "SimVLM", "num_params": num_params,
            "dtype": dtype or str(next(iter(flat.values())).dtype), "step": step,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(), "metrics": metrics or {}}
    with open(os.path.join(tmp, "export_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    if training_gin:
        with open(os.path.join(tmp, "training_config.gin"), "w", encoding="utf-8") as f:
            f.write(training_gin)
    metric_lines = "\n".join(f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |"
                             for k, v in (metrics or {}).items())
    with open(os.path.join(tmp, "MODEL_CARD.md"), "w", encoding="utf-8") as f:
        f.write(f"# SimVLM export\n\n{num_params:,} parameters, width {config.width}, "
                f"{config.encoder_layers} encoder / {config.decoder_layers} decoder layers, "
                f"{config.image_size}px images, conv stem stages {config.stem_stages}.\n"
                f"Trained with simvlm_jax (PrefixLM), step {step}.\n\n"
                f"## Metrics\n\n| metric | value |\n|---|---|\n{metric_lines}\n\n"
                "## Use\n\n```\npython -m simvlm_jax.caption --export_dir THIS_DIR image.jpg\n```\n")
    shutil.rmtree(export_dir, ignore_errors=True)
    os.replace(tmp, export_dir)
    return export_dir


def load_export(export_dir: str) -> tuple[simvlm.SimVLM, dict[str, Any], seqio.SentencePieceVocabulary]:
    """(model, params, vocabulary) from an export directory."""
    needed = ["params.safetensors", "model.gin", "tokenizer.model"]
    missing = [n for n in needed if not os.path.exists(os.path.join(export_dir, n))]
    if missing:
        raise FileNotFoundError(f"{export_dir} is not a simvlm_jax export (missing {', '.join(missing)})")
    with open(os.path.join(export_dir, "model.gin"), encoding="utf-8") as f:
        config = gin_to_config(f.read())
    params = unflatten_params(load_file(os.path.join(export_dir, "params.safetensors")))
    if config.param_dtype == "float32":
        params = jax.tree_util.tree_map(
            lambda x: x.astype(np.float32) if str(x.dtype) in ("bfloat16", "float16") else x, params)
    vocab = seqio.SentencePieceVocabulary(os.path.join(export_dir, "tokenizer.model"))
    return simvlm.SimVLM(config), params, vocab
