"""Zero-shot image-text retrieval and image classification, for CoCa and SimVLM.

    python -m simvlm_jax.zero_shot --export_dir DIR --mode retrieval \\
        --annotations captions.json --image_dir IMAGES [--split test] [--max_images N]
    python -m simvlm_jax.zero_shot --export_dir DIR --mode classify --image_dir ROOT \\
        [--classnames names.txt] [--templates templates.txt]

Both print one `name value` line per metric, then one JSON line. Options are gin
bindings (`--gin_file F.gin`, `--gin.NAME=VALUE`): `ZeroShotOptions.<field>` (batch
sizes, SimVLM score and prompt, lowercasing) and `zero_shot_classification.templates`.

Scores
  * CoCa: cosine similarity of the L2-normalized contrastive embeddings
    (`CoCa.encode_image`, and `CoCa.encode_text` on [bos_id] + caption tokens + EOS,
    zero-padded to max_text_len: the text tower's training input).
  * SimVLM (no contrastive embeddings): log P(caption | image, prompt) under the
    PrefixLM decoder, teacher-forced, targets = caption tokens + EOS (as in training).
    `score='mean'` (default) divides by the number of target tokens: otherwise an
    image->text ranking prefers short captions, since every token adds a negative
    log-probability. For text->image both give the same ranking (one caption, many images).
    The prompt (default '') is the encoder's text prefix.

SimVLM cost: every (image, caption) pair is one decoder pass over the caption's T
tokens, about N_img * N_txt * T * (2 * decoder params + 2 * width * vocab) FLOPs, plus
one encoder pass per image (encoded once, reused for every caption). The Bt captions
of a block share one row of the decoder's cross-attention (their Bt * T queries attend
to the same image keys/values), so the encoder output is neither copied nor
re-projected per caption (3.8x faster than tiling it, SimVLM-Base on CPU). Captions
are scored in length-sorted chunks padded to a multiple of 8 tokens, not to the
longest caption. SimVLM-Base (12 decoder layers, width 768, 32k vocab: ~0.26 GFLOP
per token) on 1k images x 5k captions x 16 tokens is ~2e16 FLOPs: about a minute at
300 TFLOP/s (bf16, `SimVLMConfig.dtype`), several in float32 on one H100; on CPU
(measured: 7 pairs/s on 2 shared cores) only tiny sets are practical.

Retrieval protocol (CLIP / COCO Karpathy): image->text R@K: an image is a hit when ANY
of its captions is among its K best-scored texts; text->image R@K: a caption's one
image is among its K best-scored images. Ties count against the query (a positive
tied with a negative ranks below it), so a constant score gets R@K = 0 unless K
reaches the number of candidates. Recalls are percentages; `mean_recall` averages the six.

Classification: an ImageFolder layout (one subfolder per class; class name = folder
name with '_' -> ' ', or `--classnames`). Each class name is put into every prompt
template; CoCa: the class embedding is the re-normalized mean of the templates'
normalized text embeddings (CLIP's prompt ensembling); SimVLM: the class score is the
mean over templates of the prompt's caption score. top-1/top-5 accuracy (ties count
against), and the mean per-class top-1 accuracy.

Images are decoded exactly as in training and captioning eval (`preprocessors.open_image`
+ `resize_center_crop` to the model's image_size); captions are whitespace-collapsed
like `preprocessors.CleanCaption`. Everything runs on the default device.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from simvlm_jax import batching, cli, export, storage
from simvlm_jax.batching import map_batches
from simvlm_jax.cli import UserError, add_gin_args, load_gin, split_gin_args
from simvlm_jax.data import preprocessors, sources
from simvlm_jax.models import registry
from simvlm_jax.models.family import ModelFamily

log = logging.getLogger("simvlm_jax")

KS = (1, 5, 10)
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
    "a picture of a {}.",
)


# ----------------------------------------------------------------------------- metrics

def _as_float(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


def _check_finite(scores: np.ndarray) -> None:
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{int(np.sum(~np.isfinite(scores)))} non-finite scores: ranks are undefined")


def single_positive_ranks(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """0-based rank of each row's one positive column: the number of OTHER columns scored
    >= it (ties count against the positive). scores [Q, C], positive [Q] int."""
    rows = np.arange(len(scores))
    pos = scores[rows, positive]
    return (scores >= pos[:, None]).sum(axis=1) - 1


def multi_positive_ranks(scores: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based rank of each row's best positive column, and which rows have a positive.

    scores [Q, C]; owner [C]: the row each column belongs to (column c is a positive of
    row owner[c]). Rank = number of negatives scored >= the best positive.
    """
    q = scores.shape[0]
    pos = scores[owner, np.arange(scores.shape[1])]
    best = np.full(q, -np.inf)
    np.maximum.at(best, owner, pos)
    ge_all = (scores >= best[:, None]).sum(axis=1)
    ge_pos = np.bincount(owner, weights=pos >= best[owner], minlength=q).astype(np.int64)
    has_positive = np.bincount(owner, minlength=q) > 0
    return ge_all - ge_pos, has_positive


def _recalls(ranks: np.ndarray, prefix: str, ks: Sequence[int]) -> dict[str, float]:
    out = {f"{prefix}_R@{k}": float(100.0 * np.mean(ranks < k)) for k in ks}
    out[f"{prefix}_median_rank"] = float(np.floor(np.median(ranks)) + 1)
    return out


def retrieval_metrics(similarity: np.ndarray, text_to_image: np.ndarray,
                      ks: Sequence[int] = KS) -> dict[str, float]:
    """Image->text and text->image R@K (percent), median ranks (1-based) and mean recall.

    similarity [N_img, N_txt] (higher = more similar); text_to_image [N_txt]: the image index
    of each text (several texts per image allowed). Images without a text are retrieval
    candidates for text->image but are not image->text queries.
    """
    sim = _as_float(similarity)
    t2i = np.asarray(text_to_image, np.int64)
    if sim.ndim != 2 or t2i.shape != (sim.shape[1],):
        raise ValueError(f"similarity {sim.shape} needs [N_img, N_txt] and text_to_image [N_txt], "
                         f"got {t2i.shape}")
    if len(t2i) == 0 or t2i.min() < 0 or t2i.max() >= sim.shape[0]:
        raise ValueError(f"text_to_image must index the {sim.shape[0]} images")
    _check_finite(sim)
    i2t_ranks, has_text = multi_positive_ranks(sim, t2i)
    t2i_ranks = single_positive_ranks(sim.T, t2i)
    out = {**_recalls(i2t_ranks[has_text], "image_to_text", ks), **_recalls(t2i_ranks, "text_to_image", ks)}
    out["mean_recall"] = float(np.mean([out[f"{d}_R@{k}"] for d in ("image_to_text", "text_to_image")
                                        for k in ks]))
    out["num_images"] = int(sim.shape[0])
    out["num_texts"] = int(sim.shape[1])
    return out


def classification_metrics(scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """top-k accuracy (percent; ties count against; k >= num_classes omitted) and the mean
    per-class top-1 accuracy. scores [N, C], labels [N]."""
    scores = _as_float(scores)
    labels = np.asarray(labels, np.int64)
    _check_finite(scores)
    ranks = single_positive_ranks(scores, labels)
    num_classes = scores.shape[1]
    out = {f"top{k}": float(100.0 * np.mean(ranks < k)) for k in ks if k < num_classes or k == 1}
    present = np.unique(labels)
    out["mean_per_class_top1"] = float(100.0 * np.mean([np.mean(ranks[labels == c] < 1) for c in present]))
    out["num_images"] = int(len(labels))
    out["num_classes"] = int(num_classes)
    return out


# ----------------------------------------------------------------------------- text

def clean_text(text: str, lowercase: bool = False) -> str:
    """Whitespace collapse (+ optional lowercasing), as `preprocessors.CleanCaption`."""
    text = " ".join(text.split())
    return text.lower() if lowercase else text


def tokenize_captions(vocab, texts: Sequence[str], max_len: int, pad_to_max: bool = False,
                      lowercase: bool = False, eos_id: int | None = None) -> tuple[np.ndarray, int]:
    """(target tokens [N, L] int32: caption ids + EOS (default vocab.eos_id), zero-padded;
    number truncated). Captions longer than max_len - 1 tokens are cut (EOS kept).
    L = max_len with `pad_to_max`, else the longest row (shorter decoder passes)."""
    if vocab is None:
        raise ValueError("this export has no tokenizer: zero-shot evaluation needs one (open_clip CoCa "
                         "bundles: install open_clip_torch, whose CLIP BPE merges file it reads)")
    eos = vocab.eos_id if eos_id is None else eos_id
    rows, truncated = [], 0
    for text in texts:
        ids = list(vocab.encode(clean_text(text, lowercase)))
        truncated += len(ids) > max_len - 1
        rows.append(ids[:max_len - 1] + [eos])
    length = max_len if pad_to_max else max(len(r) for r in rows)
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out, truncated


def format_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Class-major prompts: class c, template t at index c * len(templates) + t."""
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise ValueError(f"every template needs a '{{}}' for the class name; bad: {bad or 'none given'}")
    return [t.replace("{}", name) for name in class_names for t in templates]


# ----------------------------------------------------------------------------- model calls

def _l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _prepare_params(params: Any) -> Any:
    return jax.device_put(nn.meta.unbox(params))


@functools.lru_cache(maxsize=8)
def _embed_fns(fam: ModelFamily) -> tuple[Callable, Callable]:
    return jax.jit(fam.embed_images), jax.jit(fam.embed_texts)


def image_embeddings(fam: ModelFamily, params, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """L2-normalized image embeddings [N, E] (float32) of a family that embeds."""
    image_fn, _ = _embed_fns(fam)
    return map_batches(functools.partial(image_fn, params), images, batch_size).astype(np.float32)


def text_embeddings(fam: ModelFamily, params, targets: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """L2-normalized text embeddings [N, E] of target rows [N, L] (ids + EOS)."""
    _, text_fn = _embed_fns(fam)
    return map_batches(functools.partial(text_fn, params), targets, batch_size).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _scoring_fns(fam: ModelFamily) -> tuple[Callable, Callable]:

    def loglik_fn(params, context, targets):
        """Sum of target-token log-probs [Bi, Bt] for every (image, caption) pair. Row
        i * Bt + j of the decoder input is caption j for image i; the image's encoding is
        shared by its Bt captions (`ModelFamily.caption_logits`)."""
        bi, bt = jax.tree_util.tree_leaves(context)[0].shape[0], targets.shape[0]
        tiled = jnp.tile(targets, (bi, 1))
        logits = fam.caption_logits(params, context, tiled)
        target_logit = jnp.take_along_axis(logits, tiled[..., None], axis=-1)[..., 0]
        logp = target_logit - jax.nn.logsumexp(logits, axis=-1)
        return jnp.sum(jnp.where(tiled != fam.pad_id, logp, 0.0), axis=-1).reshape(bi, bt)

    return jax.jit(fam.encode), jax.jit(loglik_fn)


LENGTH_BUCKET = 8  # caption chunks are padded to a multiple of this many tokens


def length_sorted_chunks(targets: np.ndarray, chunk_size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(order, chunks): captions sorted by length, cut into chunks of `chunk_size` rows (the
    last zero-padded), each only as long as its longest row rounded up to LENGTH_BUCKET
    tokens: short captions skip the padding of the longest (few compiled shapes).
    chunks[k] holds captions order[k * chunk_size: (k + 1) * chunk_size]."""
    lengths = (targets != 0).sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    chunks = []
    for start in range(0, len(order), chunk_size):
        rows = targets[order[start:start + chunk_size]]
        t = min(targets.shape[1], -(-int(lengths[order[start:start + chunk_size]].max()) // LENGTH_BUCKET)
                * LENGTH_BUCKET)
        chunk = np.zeros((chunk_size, t), np.int32)
        chunk[:len(rows)] = rows[:, :t]
        chunks.append(chunk)
    return order, chunks


def caption_scores(fam: ModelFamily, params, images: np.ndarray, targets: np.ndarray, prompt_ids: np.ndarray,
                   score: str = "mean", image_batch_size: int = 8, text_batch_size: int = 128) -> np.ndarray:
    """log P(caption | image, prompt) for every pair: [N_img, N_txt] float32, with any
    generating family.

    targets [N_txt, T]: caption ids + EOS, padded; prompt_ids: `fam.prompt_ids(...)`.
    score 'mean': per target token (EOS included); 'sum': total. Each block of
    image_batch_size x text_batch_size pairs is one jitted call (its logits take
    pairs * T * vocab * 4 bytes); each image is encoded once.
    """
    if score not in ("mean", "sum"):
        raise ValueError(f"score={score!r}; use 'mean' or 'sum'")
    encode_fn, loglik_fn = _scoring_fns(fam)
    n_img, n_txt = len(images), len(targets)
    bi, bt = max(1, min(image_batch_size, n_img)), max(1, min(text_batch_size, n_txt))
    order, chunks = length_sorted_chunks(targets, bt)
    chunks = [jax.device_put(c) for c in chunks]
    out = np.zeros((n_img, n_txt), np.float32)
    t0 = last_log = time.time()
    for start, (block, n) in zip(range(0, n_img, bi), batching.padded_batches(images, bi)):
        context = encode_fn(params, fam.decode_inputs(block, prompt_ids))
        sums = jax.device_get([loglik_fn(params, context, c) for c in chunks])  # dispatched back to back
        out[start:start + n, order] = np.concatenate(sums, axis=1)[:n, :n_txt]
        if time.time() - last_log > 30:
            last_log = time.time()
            log.info("zero_shot: %d/%d images x %d texts scored (%.0f s)", start + n, n_img, n_txt,
                     last_log - t0)
    if score == "mean":
        out /= np.maximum((targets != fam.pad_id).sum(axis=1), 1)[None, :]
    return out


# ----------------------------------------------------------------------------- scores

@gin.configurable
@dataclasses.dataclass(frozen=True)
class ZeroShotOptions:
    """How texts are tokenized and pairs scored; gin bindings `ZeroShotOptions.<field>`."""
    batch_size: int = 64              # CoCa: images per call
    text_batch_size: int = 256        # CoCa: texts per call
    score: str = "mean"               # SimVLM: 'mean' (per token) | 'sum' log-likelihood
    prompt: str = ""                  # SimVLM: encoder text prefix
    pair_image_batch_size: int = 8    # SimVLM: images x texts per decoder call
    pair_text_batch_size: int = 128
    lowercase: bool = False           # lowercase texts (as CleanCaption(lowercase=True))
    rerank_k: int = 16                # families that match pairs (mPLUG's ITM): re-rank the top k; 0 = off

    def __post_init__(self):
        if self.score not in ("mean", "sum"):
            raise ValueError(f"ZeroShotOptions.score={self.score!r}; use 'mean' or 'sum'")
        if self.rerank_k < 0:
            raise ValueError(f"ZeroShotOptions.rerank_k={self.rerank_k} must be >= 0 (0: no re-ranking)")
        for f in ("batch_size", "text_batch_size", "pair_image_batch_size", "pair_text_batch_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"ZeroShotOptions.{f}={getattr(self, f)} must be >= 1")


def _text_targets(fam: ModelFamily, vocab, texts: Sequence[str], opts: ZeroShotOptions) -> tuple[np.ndarray, int]:
    max_len, pad_to_max = fam.target_layout()
    return tokenize_captions(vocab, texts, max_len, pad_to_max, opts.lowercase, fam.eos_id)


def _family(model) -> ModelFamily:
    fam = registry.family_of(model)
    if not (fam.can_embed or fam.can_generate):
        raise ValueError(f"zero-shot evaluation needs a model that embeds or generates; {fam.name} does neither")
    return fam


def similarity_matrix(model, params, vocab, images: np.ndarray, texts: Sequence[str],
                      opts: ZeroShotOptions | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """(scores [N_img, N_txt], info): cosine similarity of embeddings (families that embed,
    e.g. CoCa), else caption log-likelihood (e.g. SimVLM)."""
    sim, info, _ = _similarity(model, params, vocab, images, texts, opts or ZeroShotOptions())
    return sim, info


def _similarity(model, params, vocab, images: np.ndarray, texts: Sequence[str], opts: ZeroShotOptions
                ) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
    """`similarity_matrix`, plus the texts' target rows (re-ranking scores them again)."""
    fam = _family(model)
    params = _prepare_params(params)
    targets, truncated = _text_targets(fam, vocab, texts, opts)
    info: dict[str, Any] = {"model": type(fam.module).__name__, "num_truncated_texts": truncated}
    if fam.can_embed:
        img = image_embeddings(fam, params, images, opts.batch_size)
        txt = text_embeddings(fam, params, targets, opts.text_batch_size)
        return img @ txt.T, info, targets
    info.update(score=opts.score, prompt=opts.prompt)
    return caption_scores(fam, params, images, targets, fam.prompt_ids(vocab, opts.prompt), opts.score,
                          opts.pair_image_batch_size, opts.pair_text_batch_size), info, targets


def class_scores(model, params, vocab, images: np.ndarray, class_names: Sequence[str],
                 templates: Sequence[str] = DEFAULT_TEMPLATES,
                 opts: ZeroShotOptions | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """(scores [N_img, num_classes], info) with prompt-template ensembling (see module doc)."""
    opts = opts or ZeroShotOptions()
    fam = _family(model)
    prompts = format_prompts(class_names, templates)
    c, m = len(class_names), len(templates)
    if not fam.can_embed:
        scores, info = similarity_matrix(fam, params, vocab, images, prompts, opts)
        return scores.reshape(len(images), c, m).mean(axis=2), info
    params = _prepare_params(params)
    targets, truncated = _text_targets(fam, vocab, prompts, opts)
    txt = text_embeddings(fam, params, targets, opts.text_batch_size)
    class_emb = _l2_normalize(txt.reshape(c, m, -1).mean(axis=1))
    img = image_embeddings(fam, params, images, opts.batch_size)
    return img @ class_emb.T, {"model": type(fam.module).__name__, "num_truncated_texts": truncated}


def rerank_top_k(fam: ModelFamily, params, images: np.ndarray, targets: np.ndarray, sim: np.ndarray,
                 k: int, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """ALBEF/mPLUG retrieval: the first-stage `sim` [N_img, N_txt] picks each image's top-k
    texts and each text's top-k images; the family's pair scores (`match_scores`, e.g. ITM's
    log P(match)) re-rank those candidates above all others. Returns (scores for
    image->text, scores for text->image), both [N_img, N_txt]: re-scored candidates keep
    their pair score, the rest keep `sim` shifted below every candidate's score."""
    n_img, n_txt = sim.shape
    ctx_fn, score_fn = jax.jit(fam.match_context), jax.jit(fam.match_scores)
    image_ctx = [jax.device_get(ctx_fn(params, images[i:i + batch_size])) for i in range(0, n_img, batch_size)]
    image_ctx = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, 0), *image_ctx)
    top_t = np.argsort(-sim, axis=1, kind="stable")[:, :min(k, n_txt)]
    top_i = np.argsort(-sim.T, axis=1, kind="stable")[:, :min(k, n_img)]
    cand_t = np.zeros(sim.shape, bool)   # [i, j]: text j is among image i's top k
    np.put_along_axis(cand_t, top_t, True, axis=1)
    cand_i = np.zeros(sim.shape, bool)   # [i, j]: image i is among text j's top k
    np.put_along_axis(cand_i, top_i.T, True, axis=0)
    rows_all, cols_all = np.nonzero(cand_t | cand_i)  # every pair scored once
    pair = np.zeros(sim.shape, np.float64)
    for start in range(0, len(rows_all), batch_size):
        rows, cols = rows_all[start:start + batch_size], cols_all[start:start + batch_size]
        n = len(rows)
        rows, cols = np.pad(rows, (0, batch_size - n), mode="edge"), np.pad(cols, (0, batch_size - n), mode="edge")
        ctx = jax.tree_util.tree_map(lambda x: x[rows], image_ctx)  # fixed shape: one compile
        pair[rows[:n], cols[:n]] = np.asarray(score_fn(params, ctx, targets[cols]), np.float64)[:n]
    scored = pair[cand_t | cand_i]
    shifted = sim.astype(np.float64) - sim.max() + scored.min() - 1.0 - (sim.max() - sim.min())
    i2t, t2i = np.where(cand_t, pair, shifted), np.where(cand_i, pair, shifted)
    return i2t, t2i


def zero_shot_retrieval(model, params, vocab, images: np.ndarray, texts: Sequence[str],
                        text_to_image: np.ndarray, opts: ZeroShotOptions | None = None) -> dict[str, Any]:
    """Retrieval metrics (see `retrieval_metrics`) of uint8 images [N, S, S, 3] and their texts.

    Families that score pairs (`can_match`, mPLUG's ITM) with `opts.rerank_k > 0` are
    evaluated the ALBEF way: the embedding similarity ranks everything, the pair scores
    re-rank its top k; both are reported (`rerank/...` keys hold the re-ranked metrics)."""
    opts = opts or ZeroShotOptions()
    t0 = time.time()
    sim, info, targets = _similarity(model, params, vocab, images, texts, opts)
    out = {**retrieval_metrics(sim, text_to_image), **info}
    fam = registry.family_of(model)
    if fam.can_match and opts.rerank_k:
        i2t, t2i = rerank_top_k(fam, _prepare_params(params), images, targets, sim, opts.rerank_k,
                                opts.batch_size)
        by_i2t, by_t2i = retrieval_metrics(i2t, text_to_image), retrieval_metrics(t2i, text_to_image)
        rerank = {k: v for k, v in by_i2t.items() if k.startswith("image_to_text")}
        rerank.update({k: v for k, v in by_t2i.items() if k.startswith("text_to_image")})
        rerank["mean_recall"] = float(np.mean([v for k, v in rerank.items() if "_R@" in k]))
        out.update({f"rerank/{k}": v for k, v in rerank.items()}, rerank_k=opts.rerank_k)
    return {**out, "seconds": round(time.time() - t0, 2)}


@gin.configurable
def zero_shot_classification(model, params, vocab, images: np.ndarray, labels: np.ndarray,
                             class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                             opts: ZeroShotOptions | None = None) -> dict[str, Any]:
    """Accuracy metrics (see `classification_metrics`) of images with integer labels."""
    t0 = time.time()
    scores, info = class_scores(model, params, vocab, images, class_names, templates, opts)
    return {**classification_metrics(scores, labels), **info, "num_templates": len(templates),
            "seconds": round(time.time() - t0, 2)}


# ----------------------------------------------------------------------------- data

def load_captioned_images(annotations: str, image_dir: str, image_size: int, split: str | None = None,
                          max_images: int | None = None) -> tuple[np.ndarray, list[str], np.ndarray, int]:
    """(images [N, S, S, 3] uint8, captions, text_to_image [N_txt], number of unreadable images)
    from a COCO captions / Karpathy json + image folder (`sources.CocoCaptionsSource`)."""
    splits = split.split(",") if split else None
    src = sources.CocoCaptionsSource(annotations, image_dir, splits)
    decode = preprocessors.DecodeImage(image_size)
    images, texts, owner, skipped = [], [], [], 0
    for i in range(len(src) if max_images is None else min(max_images, len(src))):
        record = src[i]
        ex = decode.map(record)
        if ex is None:
            skipped += 1
            continue
        for caption in sources.read_json(record).get("references") or []:
            texts.append(caption)
            owner.append(len(images))
        images.append(ex["image"])
    if not texts:
        raise ValueError(f"{annotations}: no readable image with a caption")
    return np.stack(images), texts, np.asarray(owner, np.int64), skipped


def load_image_folder(root: str, image_size: int, max_per_class: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """(images, labels, class folder names (sorted), number of unreadable files) of an
    ImageFolder tree root/<class>/<image>."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise FileNotFoundError(f"{root}: no class subfolders (expected ROOT/<class>/<image>)")
    images, labels, skipped = [], [], 0
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder)
                       if not f.startswith(".") and os.path.isfile(os.path.join(folder, f)))
        for f in files[:max_per_class]:
            try:
                with open(os.path.join(folder, f), "rb") as fh:
                    img = preprocessors.open_image(fh.read(), min_size=image_size)
                images.append(preprocessors.resize_center_crop(img, image_size))
                labels.append(label)
            except (preprocessors.BadImage, OSError):
                skipped += 1
    if not images:
        raise ValueError(f"{root}: no readable images in the class subfolders")
    return np.stack(images), np.asarray(labels, np.int64), classes, skipped


def _read_lines(path: str) -> list[str]:
    return [line.strip() for line in storage.read_text(path).split("\n") if line.strip()]


# ----------------------------------------------------------------------------- CLI

def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m simvlm_jax.zero_shot", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export_dir", required=True, help="directory written by simvlm_jax.export")
    p.add_argument("--mode", required=True, choices=("retrieval", "classify"))
    p.add_argument("--image_dir", required=True,
                   help="retrieval: the COCO image folder; classify: ROOT with one subfolder per class")
    p.add_argument("--annotations", help="retrieval: COCO captions json or Karpathy dataset_coco.json")
    p.add_argument("--split", help="Karpathy json only: split(s) to keep, e.g. 'test' (comma-separated)")
    p.add_argument("--max_images", type=int, help="retrieval: first N images; classify: N per class")
    p.add_argument("--classnames", help="classify: file, one class name per line, in sorted-folder order")
    p.add_argument("--templates", help="classify: file, one prompt template with '{}' per line")
    p.add_argument("--score", choices=("mean", "sum"), help="SimVLM: per-token mean (default) or sum log-lik")
    p.add_argument("--prompt", help="SimVLM: encoder text prefix (default '')")
    add_gin_args(p)
    p.add_argument("--output", help="also write the metrics JSON here")
    args, rest = p.parse_known_args(argv)
    bindings, unknown = split_gin_args(rest)
    if unknown:
        p.error(f"unknown argument(s): {' '.join(unknown)}")
    if args.mode == "retrieval" and not args.annotations:
        p.error("--mode retrieval needs --annotations")
    if args.max_images is not None and args.max_images < 1:
        p.error("--max_images must be >= 1")
    return args, bindings


def options_from_args(args: argparse.Namespace) -> ZeroShotOptions:
    """gin-bound ZeroShotOptions, with --score / --prompt when given."""
    overrides = {k: v for k, v in (("score", args.score), ("prompt", args.prompt)) if v is not None}
    return dataclasses.replace(ZeroShotOptions(), **overrides)


def run(args: argparse.Namespace, model, params, vocab, opts: ZeroShotOptions) -> dict[str, Any]:
    """Loads the data named by `args` and evaluates (model, params, vocab) on it."""
    size = model.config.image_size
    if args.mode == "retrieval":
        images, texts, owner, skipped = load_captioned_images(args.annotations, args.image_dir, size,
                                                              args.split, args.max_images)
        metrics = zero_shot_retrieval(model, params, vocab, images, texts, owner, opts)
    else:
        images, labels, folders, skipped = load_image_folder(args.image_dir, size, args.max_images)
        names = [f.replace("_", " ") for f in folders]
        if args.classnames:
            names = _read_lines(args.classnames)
            if len(names) != len(folders):
                raise ValueError(f"{args.classnames}: {len(names)} names for {len(folders)} class folders")
        templates = {"templates": _read_lines(args.templates)} if args.templates else {}
        metrics = zero_shot_classification(model, params, vocab, images, labels, names, opts=opts, **templates)
    return {"mode": args.mode, **metrics, "num_unreadable_images": skipped}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, bindings = parse_args(list(sys.argv[1:] if argv is None else argv))
    except UserError as e:
        print(f"error: {cli.one_line(str(e))}", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        force=True)  # an imported library (TF/absl) may already have set a root handler
    try:
        load_gin(args.gin_file, bindings, args.gin_search_path)
        opts = options_from_args(args)
        model, params, vocab = export.load_export(args.export_dir)
        result = run(args, model, params, vocab, opts)
    except (UserError, FileNotFoundError, ValueError, TypeError) as e:
        if os.environ.get("SIMVLM_DEBUG"):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for k, v in result.items():
        print(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}")
    line = json.dumps(result)
    if args.output:  # a local path or a URL (gs://...)
        storage.write_text(args.output, line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
