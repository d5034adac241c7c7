"""seqio Tasks and Mixtures: the registry of named datasets, configured from gin.

A Task here = a `SeqioSource` (grain random-access reader per split) + grain
preprocessors + output features (the SentencePiece vocabulary) + metric fns.
seqio names, lists and mixes tasks (rates included); `simvlm_jax.data.pipeline`
turns a task or mixture into a grain pipeline. Register your own data with the
same functions from gin (see README, "Use your own data").
"""
from __future__ import annotations

import logging
import os
from typing import Mapping, Sequence

import gin
import seqio

from simvlm_jax.data import preprocessors as pp
from simvlm_jax.data import sources
from simvlm_jax.data import tokenizer

log = logging.getLogger("simvlm_jax")


def _output_features(vocab) -> dict[str, seqio.Feature]:
    return {"prefix_tokens": seqio.Feature(vocab, add_eos=False, required=False),
            "target_tokens": seqio.Feature(vocab, add_eos=True)}


def _add_task(task: seqio.Task) -> seqio.Task:
    if task.name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(task.name)  # re-registration (tests, notebooks) replaces
    seqio.TaskRegistry.add_provider(task.name, task)
    return task


def _seqio_source(kind: str, splits: Mapping[str, object], source_kwargs: Mapping | None,
                  argname: str) -> sources.SeqioSource:
    if kind not in sources.SOURCE_TYPES:
        raise ValueError(f"{argname}: unknown source {kind!r}; choose one of {sorted(sources.SOURCE_TYPES)}.")
    if not isinstance(splits, Mapping) or not splits:
        raise ValueError(f"{argname} must map split -> data, e.g. {{'train': '/data/x/*.tar'}}; got {splits!r}")
    kwargs = dict(source_kwargs or {})
    return sources.SeqioSource({split: (lambda s=spec: sources.make_source(kind, s, **kwargs))
                                for split, spec in splits.items()})


def _refuse_documents(what: str, source: str) -> None:
    if source in sources.INTERLEAVED_SOURCE_TYPES:
        raise ValueError(f"{what}: source {source!r} holds interleaved documents; register them with "
                         f"interleaved_task (Flamingo)")


def _image_decoder(crop: str, image_size: int, max_image_pixels: int, crop_scale,
                   what: str = "image_text_task") -> object:
    if crop == "center":
        return pp.DecodeImage(image_size, max_image_pixels)
    if crop == "random":
        return pp.DecodeImageRandomCrop(image_size, max_image_pixels, scale=tuple(crop_scale))
    raise ValueError(f"{what}.crop={crop!r}; use 'center' or 'random'")


@gin.configurable
def image_text_task(name: str = gin.REQUIRED, shards: Mapping[str, object] = gin.REQUIRED,
                    image_size: int = gin.REQUIRED, max_prefix_len: int = gin.REQUIRED,
                    max_target_len: int = gin.REQUIRED, text_prefix_prob: float = 0.5,
                    lowercase: bool = False, max_caption_chars: int = 2000,
                    vocabulary: seqio.Vocabulary | None = None, source: str = "tar",
                    source_kwargs: Mapping | None = None,
                    max_image_pixels: int = 50_000_000, crop: str = "center",
                    crop_scale: tuple[float, float] = (0.5, 1.0), text_len: int = 0,
                    mask_id: int | None = None, mlm_probability: float = 0.15) -> seqio.Task:
    """Registers an image-text PrefixLM task.

    Images: aspect-preserving resize of the shorter side + center crop (`crop='center'`),
    or a random resized crop of `crop_scale` x the area (`crop='random'`, training).

    `source` is a `sources.SOURCE_TYPES` key: 'tar' (webdataset shards, default),
    'parquet', 'array_record', 'tfds' or 'coco'. `shards` maps split -> that source's
    data: glob(s) for tar/parquet/array_record, e.g. {'train': '/data/laion/*.tar'};
    a TFDS split name for tfds ({'train': 'train', 'validation': 'val'}); the
    annotations json for coco. A split's value may also be a dict of the source's
    arguments. `source_kwargs` are arguments shared by every split (tfds: name,
    data_dir; coco: image_dir; parquet: image_column, caption_column). See docs/data.md.

    `text_len > 0` (mPLUG) also adds the text-encoder / MLM features `pp.MLM_FEATURES`
    (see `pp.MaskedText`): 'text_tokens' (the caption + EOS, padded or cut to text_len),
    'mlm_tokens' (the same with `mlm_probability` of the caption ids masked BERT-style)
    and 'mlm_labels' (the original ids at the masked positions, 0 elsewhere). `mask_id` is
    then required: the id of the mask token (mPLUG gin files set it to the tokenizer size,
    an id just past the tokenizer's pieces). The caption is tokenized once (capped at
    max_prefix_len + max_target_len tokens, as for the PrefixLM split). 0: off.
    """
    _refuse_documents(f"image_text_task({name!r})", source)
    vocab = vocabulary or tokenizer.get_vocabulary()
    source_ = _seqio_source(source, shards, source_kwargs, f"image_text_task({name!r}).shards")
    masking = []
    features = pp.MODEL_FEATURES
    if text_len:
        if mask_id is None:
            raise ValueError(f"image_text_task.mask_id is required when image_text_task.text_len > 0 "
                             f"(text_len={text_len}): the mask token's id; mPLUG gin files set it to the "
                             f"tokenizer size ({vocab.vocab_size} here)")
        special_ids = tuple(dict.fromkeys((pp.PAD_ID, vocab.eos_id)))  # never masked nor drawn
        masking = [pp.MaskedText(text_len, mask_id, vocab.vocab_size, mlm_probability, special_ids)]
        features = pp.MODEL_FEATURES + pp.MLM_FEATURES
    return _add_task(seqio.Task(
        name, source=source_, output_features=_output_features(vocab),
        preprocessors=[_image_decoder(crop, image_size, max_image_pixels, crop_scale),
                       pp.CleanCaption(max_caption_chars, lowercase),
                       pp.Tokenize(vocab, max_prefix_len + max_target_len),
                       *masking,
                       pp.PrefixLMSplit(max_prefix_len, max_target_len, text_prefix_prob),
                       pp.SelectFeatures(features)],
        shuffle_buffer_size=None))


@gin.configurable
def text_task(name: str = gin.REQUIRED, files: Mapping[str, object] = gin.REQUIRED,
              image_size: int = gin.REQUIRED, max_prefix_len: int = gin.REQUIRED,
              max_target_len: int = gin.REQUIRED, lowercase: bool = False,
              max_chars: int = 20000, vocabulary: seqio.Vocabulary | None = None,
              source: str = "text", source_kwargs: Mapping | None = None) -> seqio.Task:
    """Registers a text-only PrefixLM task (random split point; no image).

    `source`: 'text' (one document per line, default), 'jsonl' (`source_kwargs={'field': 'text'}`)
    or 'array_record' (records with a 'text' or 'txt' member); `files` maps split -> glob(s).
    """
    _refuse_documents(f"text_task({name!r})", source)
    vocab = vocabulary or tokenizer.get_vocabulary()
    source_ = _seqio_source(source, files, source_kwargs, f"text_task({name!r}).files")
    return _add_task(seqio.Task(
        name, source=source_, output_features=_output_features(vocab),
        preprocessors=[pp.LineToText(), pp.CleanCaption(max_chars, lowercase),
                       pp.Tokenize(vocab, max_prefix_len + max_target_len),
                       pp.PrefixLMSplit(max_prefix_len, max_target_len),
                       pp.AddBlankImage(image_size), pp.SelectFeatures()],
        shuffle_buffer_size=None))


def _document_decoder(crop: str, image_size: int, max_images: int, max_image_pixels: int, crop_scale) -> object:
    if crop == "center":
        return pp.DecodeDocumentImages(image_size, max_images, max_image_pixels)
    if crop == "random":
        return pp.DecodeDocumentImagesRandomCrop(image_size, max_images, max_image_pixels, scale=tuple(crop_scale))
    raise ValueError(f"interleaved_task.crop={crop!r}; use 'center' or 'random'")


@gin.configurable
def interleaved_task(name: str = gin.REQUIRED, shards: Mapping[str, object] = gin.REQUIRED,
                     image_size: int = gin.REQUIRED, max_images: int = gin.REQUIRED,
                     max_len: int = gin.REQUIRED, media_id: int = gin.REQUIRED, eoc_id: int = gin.REQUIRED,
                     bos_id: int | None = None, source: str = "interleaved_jsonl",
                     source_kwargs: Mapping | None = None, vocabulary: seqio.Vocabulary | None = None,
                     pairs: bool = False, max_image_pixels: int = 50_000_000, crop: str = "center",
                     crop_scale: tuple[float, float] = (0.5, 1.0)) -> seqio.Task:
    """Registers an interleaved image-text task (Flamingo): features `pp.INTERLEAVED_FEATURES`,
    'images' uint8 [max_images, image_size, image_size, 3], 'image_mask' int32 [max_images],
    'tokens' and 'loss_mask' int32 [max_len] (layout and targets: `pp.InterleavedTokens`).

    `source`: 'interleaved_jsonl' (OBELICS / MMC4 JSON lines; `source_kwargs={'image_dir': ...}`)
    or 'interleaved_tar' (webdataset shards, a .json document + its images per sample); `shards`
    maps split -> glob(s). With `pairs=True` any image-text source of `image_text_task` ('tar',
    'parquet', 'array_record', 'tfds', 'coco') is read instead, each pair as the 1-image document
    "<image>caption<|endofchunk|>" EOS (open_flamingo's LAION examples).

    `media_id` (<image>) and `eoc_id` (<|endofchunk|>) are the model's ids of those tokens,
    usually new ones past the tokenizer's pieces; `bos_id` starts every sequence if not None.
    Images: center crop, or `crop='random'` (a random resized crop of `crop_scale` x the area).
    """
    what = f"interleaved_task({name!r})"
    interleaved = source in sources.INTERLEAVED_SOURCE_TYPES
    if pairs and interleaved:
        raise ValueError(f"{what}: pairs=True reads an image-text source, not {source!r}; set source to one "
                         f"of 'tar', 'parquet', 'array_record', 'tfds', 'coco'")
    if not pairs and not interleaved and source in sources.SOURCE_TYPES:
        raise ValueError(f"{what}: source {source!r} holds no interleaved documents; use one of "
                         f"{list(sources.INTERLEAVED_SOURCE_TYPES)}, or pairs=True to read its image-text "
                         f"pairs as 1-image documents")
    vocab = vocabulary or tokenizer.get_vocabulary()
    source_ = _seqio_source(source, shards, source_kwargs, f"{what}.shards")
    if pairs:
        decode = [_image_decoder(crop, image_size, max_image_pixels, crop_scale, "interleaved_task"),
                  pp.CleanCaption(), pp.PairToDocument(max_images)]
    else:
        decode = [_document_decoder(crop, image_size, max_images, max_image_pixels, crop_scale)]
    return _add_task(seqio.Task(
        name, source=source_, output_features={"tokens": seqio.Feature(vocab, add_eos=True)},
        preprocessors=[*decode, pp.InterleavedTokens(vocab, max_len, media_id, eoc_id, bos_id),
                       pp.SelectFeatures(pp.INTERLEAVED_FEATURES)],
        shuffle_buffer_size=None))


@gin.configurable
def mixture(name: str = gin.REQUIRED, tasks_and_rates: Sequence[tuple] = gin.REQUIRED) -> seqio.Mixture:
    """Registers a seqio Mixture; `tasks_and_rates` = [(task_name, rate), ...]."""
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, [(t, float(r)) for t, r in tasks_and_rates])


# image_text_task arguments that text_task does not take (register_builtin filters them out).
_IMAGE_TEXT_ONLY_KWARGS = ("text_prefix_prob", "text_len", "mask_id", "mlm_probability")


@gin.configurable
def register_builtin(data_dir: str = gin.REQUIRED, text_only_rate: float = 0.125,
                     **task_kwargs) -> str:
    """Registers the built-in synthetic data: 'builtin_image_text', 'builtin_text' and the
    mixture 'builtin_pretrain' (image-text : text-only = 1 - rate : rate, SimVLM's 4096:512
    is rate 0.111). Returns the mixture name. `task_kwargs` go to both tasks, except the
    image-text-only ones (text_prefix_prob and the MLM features' text_len, mask_id,
    mlm_probability). A task of rate 0 is left out of the mixture. With the MLM features
    (text_len > 0, mPLUG) the mixture holds the image-text task only, whatever text_only_rate
    says (logged when it is not 0): text-only examples have neither an image to fuse the text
    with nor the features, and one batch cannot mix the two."""
    if not os.path.isdir(os.path.join(data_dir, "train")):
        raise FileNotFoundError(f"Built-in data not found in {data_dir}. Run "
                                f"`python -m simvlm_jax.main --mode=prepare --gin_file=...` first.")
    if not 0.0 <= text_only_rate <= 1.0:
        raise ValueError(f"register_builtin.text_only_rate={text_only_rate!r} must be in [0, 1]")
    if task_kwargs.get("text_len") and text_only_rate:
        log.warning("register_builtin.text_only_rate=%g ignored: with text_len=%s (the MLM features, "
                    "mPLUG) the mixture 'builtin_pretrain' holds the image-text task only (text-only "
                    "examples lack the features)", text_only_rate, task_kwargs["text_len"])
        text_only_rate = 0.0
    image_text_task(name="builtin_image_text",
                    shards={"train": os.path.join(data_dir, "train", "*.tar"),
                            "validation": os.path.join(data_dir, "heldout", "*.tar")}, **task_kwargs)
    text_kwargs = {k: v for k, v in task_kwargs.items() if k not in _IMAGE_TEXT_ONLY_KWARGS}
    text_task(name="builtin_text", files={"train": os.path.join(data_dir, "text", "*.txt")}, **text_kwargs)
    rates = [("builtin_image_text", 1.0 - text_only_rate), ("builtin_text", text_only_rate)]
    mixture(name="builtin_pretrain", tasks_and_rates=[(t, r) for t, r in rates if r > 0])
    return "builtin_pretrain"


@gin.configurable
def register_builtin_interleaved(data_dir: str = gin.REQUIRED, image_size: int = gin.REQUIRED,
                                 max_images: int = gin.REQUIRED, max_len: int = gin.REQUIRED,
                                 media_id: int = gin.REQUIRED, eoc_id: int = gin.REQUIRED,
                                 bos_id: int | None = None, documents_rate: float = 1.0,
                                 pairs_rate: float = 1.0, vocabulary: seqio.Vocabulary | None = None,
                                 crop: str = "center") -> str:
    """Registers the built-in interleaved data (Flamingo): 'builtin_interleaved' (the synthetic
    documents in DATA_DIR/interleaved), 'builtin_interleaved_pairs' (the image-text shards as
    1-image documents) and the mixture 'builtin_flamingo' of both at documents_rate : pairs_rate
    (open_flamingo trains MMC4 and LAION 1 : 1). Returns the mixture name. A task of rate 0 is
    left out of the mixture. Arguments as `interleaved_task`'s."""
    root = os.path.join(data_dir, "interleaved")
    if not os.path.exists(os.path.join(root, "manifest.json")):
        raise FileNotFoundError(f"Built-in interleaved data not found in {root}. Run "
                                f"`python -m simvlm_jax.main --mode=prepare --gin_file=...` first.")
    if documents_rate < 0 or pairs_rate < 0 or documents_rate + pairs_rate <= 0:
        raise ValueError(f"register_builtin_interleaved: documents_rate={documents_rate!r} and "
                         f"pairs_rate={pairs_rate!r} must be >= 0, not both 0")
    common = dict(image_size=image_size, max_images=max_images, max_len=max_len, media_id=media_id,
                  eoc_id=eoc_id, bos_id=bos_id, vocabulary=vocabulary, crop=crop)
    interleaved_task(name="builtin_interleaved",
                     shards={"train": os.path.join(root, "train.jsonl"),
                             "validation": os.path.join(root, "validation.jsonl")},
                     source="interleaved_jsonl", source_kwargs={"image_dir": os.path.join(root, "images")},
                     **common)
    interleaved_task(name="builtin_interleaved_pairs",
                     shards={"train": os.path.join(data_dir, "train", "*.tar"),
                             "validation": os.path.join(data_dir, "heldout", "*.tar")},
                     source="tar", pairs=True, **common)
    rates = [("builtin_interleaved", documents_rate), ("builtin_interleaved_pairs", pairs_rate)]
    mixture(name="builtin_flamingo", tasks_and_rates=[(t, r) for t, r in rates if r > 0])
    return "builtin_flamingo"
