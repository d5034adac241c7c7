"""Params-only inference bundles: safetensors + gin model config + tokenizer + model card.

An export holds no optimizer state and no pickles:
  params.safetensors  flat '/'-joined parameter paths -> arrays (float32, or bf16/fp16 with `dtype`)
  model.gin           the `SimVLMConfig.*` or `CoCaConfig.*` bindings that rebuild the model
  tokenizer.model     the SentencePiece model, or
  bpe_simple_vocab_16e6.txt.gz   CLIP BPE's merges (open_clip's tokenizer)
  export_info.json    format version, model type, tokenizer ({'type': 'sentencepiece' | 'clip_bpe',
                      'file'}), parameter count, dtype, metrics
  MODEL_CARD.md       what it is, how it was trained, its metrics
  <extra>/            (optional) files in another ecosystem's format, written by `writers`, e.g.
                      open_clip/ for an open_clip-compatible CoCa (`convert_open_clip.OpenClipWriter`)

`load_export(dir)` rebuilds (model, params, vocabulary) without the training state;
`load_params_for_training(dir, params, include)` puts an export's weights (all, or the
paths matching `include`) into a model's param tree for further training.
Bundles of format 1 (SimVLM only, before model types were recorded) still load.
"""
from __future__ import annotations

import ast
import dataclasses
import datetime
import functools
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
from jax.experimental import multihost_utils
import numpy as np
from etils import epath
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from simvlm_jax import storage
from simvlm_jax.models import registry
from simvlm_jax.models.family import ModelFamily

FORMAT_VERSION = 2  # 2: model type (SimVLM | CoCa) and tokenizer recorded; 1: SimVLM only
PARAMS_FILE = "params.safetensors"
TOKENIZER_FILE = "tokenizer.model"
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"  # = clip_tokenizer.MERGES_FILE (not imported: seqio)
# Tokenizer types a bundle records; bundles written before CLIP BPE was stored say 'open_clip'.
TOKENIZER_TYPES = ("sentencepiece", "clip_bpe")
_TOKENIZER_ALIASES = {"open_clip": "clip_bpe"}

EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
ModelConfig = Any  # a registered family's config (SimVLMConfig, CoCaConfig, ...)


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
        x = multihost_utils.process_allgather(x, tiled=True)
    # Contiguous: safetensors writes an array's buffer as is, so a transposed numpy view (e.g.
    # convert_open_clip's kernels) would be stored scrambled.
    x = np.asarray(jax.device_get(x))
    return x if x.flags.c_contiguous else x.copy(order="C")


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
    """The model type an export of `config` records (its family's `export_type`)."""
    return registry.family_of(config).export_type


def config_to_gin(cfg: ModelConfig) -> str:
    """`<ConfigClass>.<field> = <repr>` for every field (also valid gin)."""
    cls = type(cfg).__name__
    lines = [f"# {model_type_of(cfg)} model config written by simvlm_jax.export"]
    lines += [f"{cls}.{f.name} = {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)]
    return "\n".join(lines) + "\n"


def gin_to_config(text: str) -> ModelConfig:
    """The config written by `config_to_gin` (its class is read from the binding prefix)."""
    kwargs: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#") or "=" not in line:
            continue
        name, value = line.split("=", 1)
        cls_name, _, field = name.strip().partition(".")
        if registry.by_config_name(cls_name) is not None:
            kwargs.setdefault(cls_name, {})[field] = ast.literal_eval(value.strip())
    if len(kwargs) != 1:
        known = sorted(f.config_cls.__name__ for f in registry.FAMILIES.values())
        raise ValueError(f"model.gin must bind exactly one of {known}; found {sorted(kwargs) or 'none'}")
    (cls_name, fields), = kwargs.items()
    return registry.by_config_name(cls_name).config_cls(**fields)


# ----------------------------------------------------------------------------- writing

def _tokenizer_note(tokenizer: dict[str, Any]) -> str:
    if tokenizer["type"] == "sentencepiece":
        return f"SentencePiece, `{TOKENIZER_FILE}` in this directory."
    if tokenizer["type"] == "clip_bpe":
        where = (f"merges `{tokenizer['file']}` in this directory" if tokenizer["file"] else
                 "merges file not included: the one open_clip_torch ships is used")
        return (f"CLIP BPE ({where}; `simvlm_jax.data.clip_tokenizer.ClipBpeVocabulary`, ids equal "
                "`open_clip.get_tokenizer('coca_ViT-B-32')`'s); target tokens = its output without the "
                "leading <start_of_text>.")
    return "not included."


def _model_card(fam: ModelFamily, info: dict[str, Any], extra_notes: Sequence[str]) -> str:
    metrics = info["metrics"]
    metric_lines = "\n".join(f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |"
                             for k, v in metrics.items())
    use = "python -m simvlm_jax.caption --export_dir THIS_DIR image.jpg" if fam.can_generate else ""
    use += "\npython -m simvlm_jax.zero_shot --export_dir THIS_DIR --mode classify --image_dir DIR"
    origin = info.get("origin") or f"Trained with simvlm_jax, step {info['step']}."
    card = (f"# {info['model_type']} export\n\n{fam.describe()}\n"
            f"{info['num_params']:,} parameters, weights stored as {info['dtype']}.\n"
            f"{origin}\n\nTokenizer: {_tokenizer_note(info['tokenizer'])}\n\n"
            f"## Metrics\n\n| metric | value |\n|---|---|\n{metric_lines}\n\n## Use\n\n```\n{use}\n```\n")
    for note in extra_notes:
        card += f"\n{note}\n"
    return card


def _write_text(path: str, text: str) -> None:
    storage.write_text(path, text)


def tokenizer_source(fam: ModelFamily, vocabulary: Any) -> tuple[dict[str, Any], str | None]:
    """(export_info.json's `tokenizer` entry, the file to copy into the bundle) for `vocabulary`:
    a SentencePiece model path, a seqio SentencePiece vocabulary, a CLIP BPE vocabulary, or None
    (no tokenizer; for families whose tokenizer lives elsewhere, `fam.external_tokenizer`)."""
    if vocabulary is None:
        kind = _TOKENIZER_ALIASES.get(fam.external_tokenizer, fam.external_tokenizer)
        return {"type": kind, "file": None}, None
    if isinstance(vocabulary, (str, os.PathLike)):
        return {"type": "sentencepiece", "file": TOKENIZER_FILE}, os.fspath(vocabulary)
    # Duck-typed: importing seqio here would load TensorFlow for every export reader.
    if getattr(vocabulary, "kind", None) == "clip_bpe":
        return {"type": "clip_bpe", "file": CLIP_BPE_FILE}, vocabulary.merges_path
    spm_file = getattr(vocabulary, "sentencepiece_model_file", None)
    if spm_file:
        return {"type": "sentencepiece", "file": TOKENIZER_FILE}, spm_file
    raise ValueError(f"export: cannot store a {type(vocabulary).__name__} tokenizer; pass a SentencePiece "
                     "model path or vocabulary, or a clip_tokenizer.ClipBpeVocabulary")


class ExtraWriter(Protocol):
    """Writes a bundle's files in another ecosystem's format (e.g. open_clip's)."""
    name: str  # the bundle's subdirectory and the export_info.json key

    def check_tokenizer(self, tokenizer: dict[str, Any]) -> None:
        """Raises ValueError if files in this format would mis-tokenize with the bundle's tokenizer
        (`export_info.json`'s `tokenizer` entry); runs before anything is written."""

    def __call__(self, host_params: Any, out_dir: str, dtype: str) -> str:
        """Writes into `out_dir`; returns a model-card note on how to load them."""


def export(params: Any, config: ModelConfig, vocabulary: Any, export_dir: str,
           metrics: dict[str, Any] | None = None, dtype: str | None = None,
           training_gin: str | None = None, step: int | None = None,
           writers: Sequence[ExtraWriter] = (), origin: str | None = None) -> str:
    """Writes an inference bundle of any family's model; returns `export_dir`.

    `dtype` ('bfloat16' | 'float16' | 'float32') casts floating params (bf16 halves the
    file). `vocabulary`: the tokenizer the model was trained with, stored in the bundle and
    recorded in export_info.json: the vocabulary `tokenizer.get_vocabulary()` returned
    (SentencePiece or CLIP BPE) or a SentencePiece model path; None: no tokenizer file.
    Each of `writers` adds files in its own subdirectory (e.g.
    `convert_open_clip.OpenClipWriter(config)`: open_clip's state dict); they check the
    config when created and the tokenizer here, before anything is written. `origin`: the
    model card's provenance line (default: trained with simvlm_jax at `step`).
    The bundle appears atomically (written to `export_dir.tmp`, then renamed). `export_dir` may
    be a URL (gs://...): see `_upload_bundle`.
    """
    fam = registry.family_of(config)
    tokenizer, tokenizer_file = tokenizer_source(fam, vocabulary)
    for writer in writers:
        check = getattr(writer, "check_tokenizer", None)
        if check is not None:
            check(tokenizer)
    host_params = jax.tree_util.tree_map(_to_host, nn.meta.unbox(params))
    flat = flatten_params(host_params)
    if dtype:
        flat = cast_floats(flat, dtype)
    if jax.process_index() != 0:
        return export_dir
    info = {"format_version": FORMAT_VERSION, "model": fam.export_type, "model_type": fam.export_type,
            "config_class": type(config).__name__, "tokenizer": tokenizer,
            "num_params": int(sum(v.size for v in flat.values())),
            "dtype": dtype or str(next(iter(flat.values())).dtype), "step": step,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(), "metrics": metrics or {}}
    if origin:
        info["origin"] = origin

    def write(out_dir: str) -> None:
        _write_bundle(out_dir, flat, config, info, tokenizer_file, host_params, writers, dtype, training_gin)

    if storage.is_remote(export_dir):
        _upload_bundle(write, export_dir)
        return export_dir
    tmp = export_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    shutil.rmtree(export_dir, ignore_errors=True)
    os.replace(tmp, export_dir)
    return export_dir


def _write_bundle(out_dir: str, flat: dict[str, np.ndarray], config: ModelConfig, info: dict[str, Any],
                  tokenizer_file: str | None, host_params: Any, writers: Sequence[ExtraWriter],
                  dtype: str | None, training_gin: str | None) -> None:
    """Writes the bundle's files into the local directory `out_dir`; adds the writers' keys to `info`."""
    fam = registry.family_of(config)
    save_file(flat, os.path.join(out_dir, PARAMS_FILE),
              metadata={"format": "simvlm_jax", "version": str(FORMAT_VERSION), "model_type": fam.export_type})
    _write_text(os.path.join(out_dir, "model.gin"), config_to_gin(config))
    if tokenizer_file:
        storage.copy_file(tokenizer_file, os.path.join(out_dir, info["tokenizer"]["file"]))
    notes = []
    for writer in writers:
        notes.append(writer(host_params, os.path.join(out_dir, writer.name), dtype or "float32"))
        info[writer.name] = True
    _write_text(os.path.join(out_dir, "export_info.json"), json.dumps(info, indent=1))
    if training_gin:
        _write_text(os.path.join(out_dir, "training_config.gin"), training_gin)
    _write_text(os.path.join(out_dir, "MODEL_CARD.md"), _model_card(fam, info, notes))


def _upload_bundle(write: Callable[[str], None], export_dir: str) -> None:
    """An export to a URL (gs://...). Object stores cannot rename a directory (a "rename" is a
    copy + delete of each object) but write each object atomically, so the bundle is built in
    a local temporary directory (the extra writers need local files), the old bundle is
    removed, and the files are uploaded directly, model.gin last: until it is there, readers
    report 'not a simvlm_jax export (missing model.gin)'."""
    with tempfile.TemporaryDirectory(prefix="simvlm_jax_export_") as tmp:
        write(tmp)
        if epath.Path(export_dir).exists():
            epath.Path(export_dir).rmtree()
        storage.upload_dir(tmp, export_dir, last=("model.gin",))


# ----------------------------------------------------------------------------- reading

def read_export_info(export_dir: str) -> dict[str, Any]:
    """export_info.json, with format-1 bundles (SimVLM, SentencePiece) filled in."""
    path = os.path.join(export_dir, "export_info.json")
    info: dict[str, Any] = {}
    if epath.Path(path).exists():
        info = json.loads(storage.read_text(path))
    version = info.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise ValueError(f"{export_dir}: export format {version} is newer than this simvlm_jax's "
                         f"({FORMAT_VERSION}); update simvlm_jax")
    info.setdefault("model_type", info.get("model", "SimVLM"))
    info.setdefault("tokenizer", {"type": "sentencepiece", "file": TOKENIZER_FILE})
    kind = info["tokenizer"]["type"]
    info["tokenizer"] = {**info["tokenizer"], "type": _TOKENIZER_ALIASES.get(kind, kind)}
    return info


def _check_export_dir(export_dir: str, info: dict[str, Any]) -> None:
    needed = [PARAMS_FILE, "model.gin"] + ([info["tokenizer"]["file"] or TOKENIZER_FILE]
                                           if info["tokenizer"]["type"] in TOKENIZER_TYPES else [])
    if info["tokenizer"]["type"] == "clip_bpe" and not info["tokenizer"]["file"]:
        needed.pop()  # older bundles: CLIP BPE from open_clip_torch
    missing = [n for n in needed if not epath.Path(export_dir, n).exists()]
    if missing:
        raise FileNotFoundError(f"{export_dir} is not a simvlm_jax export (missing {', '.join(missing)})")


def load_config(export_dir: str) -> ModelConfig:
    """The export's model config (SimVLMConfig or CoCaConfig)."""
    config = gin_to_config(storage.read_text(os.path.join(export_dir, "model.gin")))
    model_type = read_export_info(export_dir)["model_type"]
    if model_type_of(config) != model_type:
        raise ValueError(f"{export_dir}: model.gin holds a {type(config).__name__} but export_info.json "
                         f"says model_type {model_type!r}")
    return config


def load_export(export_dir: str) -> tuple[Any, dict[str, Any], Any]:
    """(model, params, vocabulary) from an export directory.

    The model is the flax module of the bundle's family (`SimVLM`, `CoCa`, ...; its
    family: `registry.family_of(model)`), by the bundle's model type. Low-precision
    (bf16/fp16) params are upcast when the config's param_dtype is float32. The
    vocabulary is the one the bundle records: SentencePiece, or CLIP BPE
    (`clip_tokenizer.ClipBpeVocabulary`, from the bundle's merges file; bundles without one use
    open_clip_torch's, None when that is not installed); None for bundles without a tokenizer.
    """
    info = read_export_info(export_dir)
    _check_export_dir(export_dir, info)
    config = load_config(export_dir)
    with storage.as_local_file(os.path.join(export_dir, PARAMS_FILE)) as path:  # safetensors reads local files
        params = unflatten_params(load_file(path))
    if config.param_dtype == "float32":
        params = jax.tree_util.tree_map(lambda x: x.astype(np.float32) if _is_float(x.dtype) else x, params)
    return registry.family_of(config).module, params, load_vocabulary(export_dir, info)


def load_vocabulary(export_dir: str, info: dict[str, Any] | None = None) -> Any:
    """The bundle's tokenizer as a seqio vocabulary (see `load_export`), or None."""
    tokenizer = (info or read_export_info(export_dir))["tokenizer"]
    file = os.path.join(export_dir, tokenizer["file"]) if tokenizer.get("file") else None
    # A bundle at a URL: the tokenizer readers take local paths, so a local copy of the file.
    if tokenizer["type"] == "sentencepiece":
        import seqio  # pylint: disable=g-import-not-at-top  (TensorFlow: only to load a vocabulary)
        return seqio.SentencePieceVocabulary(storage.local_copy(file or os.path.join(export_dir, TOKENIZER_FILE)))
    if tokenizer["type"] == "clip_bpe":
        from simvlm_jax.data import clip_tokenizer  # pylint: disable=g-import-not-at-top  (seqio -> TensorFlow)
        try:  # without a merges file in the bundle: the one open_clip_torch ships
            return clip_tokenizer.ClipBpeVocabulary(storage.local_copy(file) if file else None)
        except (FileNotFoundError, ImportError) as e:
            logging.getLogger("simvlm_jax").warning("%s: no CLIP BPE tokenizer (%s)", export_dir, e)
    return None


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
    if not epath.Path(path).exists():
        raise FileNotFoundError(f"{export_dir} is not a simvlm_jax export (missing {PARAMS_FILE})")
    with storage.as_local_file(path) as local:  # safetensors reads local files
        return _load_selected(export_dir, local, params, include)


def _load_selected(export_dir: str, path: str, params: Any, include: Sequence[str] | None) -> Any:
    """`load_params_for_training` from the local params file `path`."""
    target = flatten_params(nn.meta.unbox(params))
    stored = _stored_shapes(path)
    relaid = _layer_relayout(target, stored)
    stored = {**{k: v for k, v in stored.items() if k not in relaid.consumed},
              **{k: (shape, dtype) for k, (shape, dtype, _) in relaid.views.items()}}
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
        # A stacked tensor is read once: the model keys sliced from it load one after another.
        read = functools.lru_cache(maxsize=1)(f.get_tensor)
        loaded = {k: _place(relaid.views[k][2](read) if k in relaid.views else read(k), target[k])
                  for k in sorted(selected, key=lambda k: (relaid.source.get(k, k), k))}
        leaves = [loaded.get(k, leaf) for k, leaf in target.items()]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(nn.meta.unbox(params)), leaves)


_LAYER_KEY = re.compile(r"(.+)_(\d+)")


@dataclasses.dataclass
class _Relayout:
    views: dict[str, tuple[tuple[int, ...], str, Callable]]  # model key -> (shape, dtype, read(get) -> array)
    consumed: set[str]  # export keys the views replace
    source: dict[str, str]  # model key -> the stacked export key it is a row of


def _layer_relayout(target: dict[str, Any], stored: dict[str, tuple[tuple[int, ...], str]]) -> _Relayout:
    """Scanned <-> unrolled layers, so an export loads into a model with the other `scan_layers`:
    a model key '.../layers/...' (stacked) missing from the export is the stack of its
    '.../layers_0/...', '.../layers_1/...'; a model key '.../layers_3/...' missing from the export
    is row 3 of its stacked '.../layers/...' (when the model has every row of it). One stacked
    level per key."""
    views, consumed, sliced_from = {}, set(), {}
    for key in target:
        if key in stored:
            continue
        parts = key.split("/")
        for i, part in enumerate(parts):
            def at(name, i=i):
                return "/".join(parts[:i] + [name] + parts[i + 1:])
            layers = list(itertools.takewhile(lambda k: k in stored, (at(f"{part}_{j}") for j in itertools.count())))
            if layers:  # stacked model, unrolled export
                shape, dtype = stored[layers[0]]
                views[key] = ((len(layers),) + shape, dtype, lambda get, ks=tuple(layers): np.stack([get(k) for k in ks]))
                consumed.update(layers)
                break
            m = _LAYER_KEY.fullmatch(part)
            if m and at(m.group(1)) in stored:  # unrolled model, stacked export
                src, row = at(m.group(1)), int(m.group(2))
                shape, dtype = stored[src]
                views[key] = (shape[1:], dtype, lambda get, src=src, row=row: get(src)[row])
                sliced_from[key] = (src, row)
                break
    for src in {src for src, _ in sliced_from.values()}:  # a stacked tensor is used whole or not at all
        keys = [k for k, (s, _) in sliced_from.items() if s == src]
        if {sliced_from[k][1] for k in keys} == set(range(stored[src][0][0])):
            consumed.add(src)
        else:
            for k in keys:
                del views[k]
    return _Relayout(views, consumed, {k: src for k, (src, _) in sliced_from.items() if k in views})
