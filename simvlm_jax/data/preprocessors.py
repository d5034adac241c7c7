"""Per-example preprocessors (grain transforms) for PrefixLM pretraining.

image-text: DecodeImage -> CleanCaption -> Tokenize [-> MaskedText] -> PrefixLMSplit
text-only:  LineToText -> CleanCaption -> Tokenize -> PrefixLMSplit(text_only) -> AddBlankImage
interleaved document (Flamingo): DecodeDocumentImages -> InterleavedTokens
image-text as a 1-image document: DecodeImage -> CleanCaption -> PairToDocument -> InterleavedTokens

A transform that meets bad data returns None (grain drops it) and counts the
reason with `skip` (only for an example it drops, or for a part it drops from a kept
example: an interleaved document's unreadable image); nothing raises mid-run. The train
pipeline collects each example's reasons (`collect_skips`) and counts them in
the process that batches, the trainer's, not a grain worker's (see pipeline.py): so
`SKIPPED` there holds what the trainer logs.

Images: JPEGs are decoded by libjpeg-turbo through `simplejpeg` (the same library and
settings as PIL's decoder, so the pixels are identical, without PIL's per-image
overhead); any other format, CMYK/YCCK JPEGs and any JPEG it refuses go through PIL,
which then decides whether the image is bad. Resizing uses `cykooz_resizer`
(fast_image_resize: PIL's convolution resampler with the same Catmull-Rom = PIL
BICUBIC kernel, antialiased, in SIMD), on the crop box only. Either falls back to
PIL when its package is not installed (same output within rounding, 3-4x slower).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import re
import threading
import warnings
from typing import Any, Iterable, Iterator

import grain
import numpy as np
from PIL import Image

from simvlm_jax.data import sources
from simvlm_jax.special_tokens import EOS_ID, PAD_ID

try:  # fast JPEG decoding (libjpeg-turbo); optional: PIL decodes everything otherwise
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the platform's wheels
    simplejpeg = None
try:  # SIMD antialiased resize (fast_image_resize); optional: PIL resizes otherwise
    import cykooz_resizer
except ImportError:  # pragma: no cover - no wheel for e.g. Linux aarch64
    cykooz_resizer = None

_lock = threading.Lock()
SKIPPED: collections.Counter = collections.Counter()  # reason -> count (this process)
_collector = threading.local()  # .reasons: this thread's list while in `collect_skips`, else None


def skip(reason: str) -> None:
    """Counts one example (or an interleaved document's image) dropped for `reason`, or hands it
    to this thread's `collect_skips`."""
    collected = getattr(_collector, "reasons", None)
    if collected is not None:
        collected.append(reason)
    else:
        count_skipped([reason])


def count_skipped(reasons: Iterable[str]) -> None:
    """Adds `reasons` (one entry per dropped example and reason) to this process's SKIPPED."""
    with _lock:
        SKIPPED.update(reasons)


@contextlib.contextmanager
def collect_skips() -> Iterator[list[str]]:
    """Within the block, this thread's `skip` calls append to the yielded list instead of
    counting: a grain worker process's counts would never reach the trainer, so the caller
    carries them to the process that batches."""
    outer = getattr(_collector, "reasons", None)
    _collector.reasons = reasons = []
    try:
        yield reasons
    finally:
        _collector.reasons = outer


def skipped_counts() -> dict[str, int]:
    with _lock:
        return dict(SKIPPED)


Box = tuple[float, float, float, float]  # (left, top, right, bottom) in source pixels
_local = threading.local()  # one resizer per thread (the Rust object is not shared across threads)


def _fir_resize(arr: np.ndarray, box: Box, size: int) -> np.ndarray:
    """resize_box with cykooz_resizer: Catmull-Rom convolution (PIL's BICUBIC) on uint8 RGB."""
    fir = cykooz_resizer
    resizer = getattr(_local, "resizer", None)
    if resizer is None:
        resizer = _local.resizer = fir.Resizer()
    left, top, right, bottom = box
    options = fir.ResizeOptions(resize_alg=fir.ResizeAlg.convolution(fir.FilterType.catmull_rom),
                                crop_box=fir.CropBox(left, top, right - left, bottom - top))
    h, w = arr.shape[:2]
    dst = fir.ImageData(size, size, fir.PixelType.U8x3)
    resizer.resize(fir.ImageData(w, h, fir.PixelType.U8x3, arr.tobytes()), dst, options)
    # bytearray: a writable array (get_buffer returns immutable bytes).
    return np.frombuffer(bytearray(dst.get_buffer()), np.uint8).reshape(size, size, 3)


def resize_box(img: Image.Image | np.ndarray, box: Box, size: int, fast: bool = True) -> np.ndarray:
    """The `box` region of an RGB image resampled to uint8 [size, size, 3]: bicubic
    (Catmull-Rom, PIL's BICUBIC), antialiased when shrinking. Only the box is resampled.
    `fast=False`: PIL even where cykooz_resizer is installed."""
    h, w = (img.height, img.width) if isinstance(img, Image.Image) else img.shape[:2]
    # Float rounding can put an edge a hair outside the image (the Rust resizer then raises).
    left, top, right, bottom = box
    box = (max(0.0, left), max(0.0, top), min(float(w), right), min(float(h), bottom))
    # The Rust resizer only downscales here: fast_image_resize (cykooz-resizer 4.0.1) crashed
    # the process (SIGSEGV) upscaling some fractional crop boxes; upscales are rare and cheap.
    shrinking = box[2] - box[0] >= size and box[3] - box[1] >= size
    if fast and cykooz_resizer is not None and shrinking:
        try:
            return _fir_resize(np.ascontiguousarray(img, np.uint8), box, size)
        except RuntimeError:  # the resizer refused this box: PIL does the same resampling
            pass
    if not isinstance(img, Image.Image):
        img = Image.fromarray(np.asarray(img, np.uint8))
    return np.array(img.resize((size, size), Image.BICUBIC, box=box), np.uint8)  # writable


def center_crop_box(width: int, height: int, size: int) -> Box:
    """The source box that resizing the shorter side to `size` then center-cropping keeps
    (pixel for pixel the same output grid as resize-then-crop, without resizing the rest)."""
    scale = size / min(width, height)
    nw, nh = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    sx, sy = width / nw, height / nh
    return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


def resize_center_crop(img: Image.Image | np.ndarray, size: int, fast: bool = True) -> np.ndarray:
    """Aspect-preserving resize of the shorter side to `size`, then a center crop (an RGB PIL
    image or uint8 [h, w, 3] array in, uint8 [size, size, 3] out)."""
    h, w = (img.height, img.width) if isinstance(img, Image.Image) else img.shape[:2]
    return resize_box(img, center_crop_box(w, h, size), size, fast)


class BadImage(Exception):
    """An image that is skipped; `reason` is its SKIPPED key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


SUPPORTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")  # PIL format names DecodeImage accepts


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: grayscale, 16-bit, CMYK, YCbCr converted; alpha / transparent
    palettes composited onto white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.float32)
        if arr.max(initial=0) > 255:
            arr = arr / 257.0  # 16-bit
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(data: bytes, max_image_pixels: int = 50_000_000,
               formats: tuple[str, ...] = SUPPORTED_FORMATS, min_size: int | None = None) -> Image.Image:
    """Decodes image bytes to an RGB PIL image, or raises BadImage(reason).

    The size is checked from the header before any pixel is decoded (decompression
    bombs never allocate). `min_size`: JPEGs are DCT-downscaled while decoding as long as
    both sides stay >= min_size (much faster for large photos).
    """
    if not data:
        raise BadImage("missing_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
            if img.format not in formats:
                raise BadImage("image_unsupported_format")
            if img.width * img.height > max_image_pixels:
                raise BadImage("image_too_large")
            if min_size and img.format in ("JPEG", "MPO"):
                img.draft("RGB", (min_size, min_size))
            img.load()
        return to_rgb(img)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("image_too_large") from None
    except Exception:  # pylint: disable=broad-except  (truncated, corrupt, unidentifiable)
        raise BadImage("image_decode_error") from None


_JPEG_SOI = b"\xff\xd8\xff"
_FAST_JPEG_COLORSPACES = ("YCbCr", "Gray", "RGB")  # libjpeg-turbo converts these to RGB as PIL does


def draft_factor(width: int, height: int, min_size: int | None) -> int:
    """PIL's `draft` JPEG scale: the largest of 8, 4, 2, 1 that keeps both sides >= min_size."""
    if not min_size:
        return 1
    scale = min(width // min_size, height // min_size)
    return next(s for s in (8, 4, 2, 1) if scale >= s)


def _pixel_limit(max_image_pixels: int) -> int:
    # PIL refuses images over its own MAX_IMAGE_PIXELS too (open_image makes that warning an error).
    limit = Image.MAX_IMAGE_PIXELS
    return max_image_pixels if limit is None else min(max_image_pixels, limit)


def _decode_jpeg_fast(data: bytes, max_image_pixels: int, formats: tuple[str, ...],
                      min_size: int | None) -> np.ndarray | None:
    """simplejpeg decode of a plain JPEG, or None to leave the image to PIL (not a JPEG, CMYK,
    over the size limit, corrupt, truncated, ...: PIL then decodes or classifies it)."""
    if simplejpeg is None or bytes(data[:3]) != _JPEG_SOI or not {"JPEG", "MPO"} <= set(formats):
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in _FAST_JPEG_COLORSPACES or h * w > _pixel_limit(max_image_pixels):
            return None
        # The same DCT-domain downscale as PIL's draft (1/2, 1/4, 1/8 only), so both paths agree.
        k = draft_factor(w, h, min_size)
        return simplejpeg.decode_jpeg(data, "RGB", min_height=-(-h // k), min_width=-(-w // k))
    except Exception:  # pylint: disable=broad-except  (strict mode: any libjpeg warning)
        return None


def _decode_any(data: bytes, max_image_pixels: int, formats: tuple[str, ...], min_size: int | None,
                fast: bool) -> np.ndarray | Image.Image:
    """simplejpeg's array where it applies, else PIL's RGB image (the resizers take either, so
    neither is converted only to be converted back)."""
    if not data:
        raise BadImage("missing_image")
    arr = _decode_jpeg_fast(data, max_image_pixels, formats, min_size) if fast else None
    return open_image(data, max_image_pixels, formats, min_size) if arr is None else arr


def decode_image(data: bytes, max_image_pixels: int = 50_000_000,
                 formats: tuple[str, ...] = SUPPORTED_FORMATS, min_size: int | None = None,
                 fast: bool = True) -> np.ndarray:
    """Image bytes -> uint8 RGB [h, w, 3], or raises BadImage(reason); as `open_image`, with plain
    JPEGs decoded by simplejpeg (pixel-identical to PIL, faster) unless `fast=False`."""
    return np.asarray(_decode_any(data, max_image_pixels, formats, min_size, fast))


def find_image(record: dict[str, Any]) -> bytes:
    """The record's image bytes, or raises BadImage ('missing_image' / 'image_unsupported_format')."""
    data = next((record[e] for e in sources.IMAGE_EXTS if record.get(e)), None)
    if data is None:
        unsupported = any(record.get(e) for e in sources.UNSUPPORTED_IMAGE_EXTS)
        raise BadImage("image_unsupported_format" if unsupported else "missing_image")
    return data


def record_error(record: dict[str, Any] | None) -> bool:
    """True (and counted) if the source could not read this record (see sources.error_record)."""
    if record is not None and sources.ERROR_KEY in record:
        skip(record[sources.ERROR_KEY])
        return True
    return False


@dataclasses.dataclass
class DecodeImage(grain.transforms.Map):
    """Image bytes -> uint8 [size, size, 3]; caption from .txt (or .json 'caption').

    Skips (and counts by reason) records the source could not read, missing / empty /
    corrupt / truncated images, formats outside `formats`, and images over
    `max_image_pixels` (checked from the header, before decoding). Grayscale, CMYK,
    16-bit, alpha and palette images are converted to RGB. `fast=False` decodes and
    resizes with PIL only (see the module docstring).
    """
    image_size: int
    max_image_pixels: int = 50_000_000  # decompression-bomb guard
    formats: tuple[str, ...] = SUPPORTED_FORMATS
    fast: bool = True

    def map(self, record: dict[str, Any]) -> dict[str, Any] | None:
        return self._decode(record, lambda img: resize_center_crop(img, self.image_size, self.fast))

    def decode_bytes(self, data: bytes, crop) -> np.ndarray:
        """One image's bytes -> `crop(decoded image)`, or raises BadImage(reason) (any other
        failure is an 'image_decode_error'). Shared with `DecodeDocumentImages`."""
        try:
            return crop(_decode_any(data, self.max_image_pixels, tuple(self.formats), self.image_size, self.fast))
        except BadImage:
            raise
        except Exception:  # pylint: disable=broad-except
            raise BadImage("image_decode_error") from None

    def _decode(self, record: dict[str, Any] | None, crop) -> dict[str, Any] | None:
        if record is None or record_error(record):
            return None
        try:
            image = self.decode_bytes(find_image(record), crop)
        except BadImage as e:
            skip(e.reason)
            return None
        caption = record.get("txt")
        if caption is None:
            caption = sources.read_json(record).get("caption")
        return {"image": image, "has_image": np.int32(1), "text": caption,
                "key": record.get("__key__", "")}


def random_resized_crop(img: Image.Image | np.ndarray, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.5, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), fast: bool = True) -> np.ndarray:
    """Inception-style crop: a random box of `scale` x area and `ratio` aspect, resized to size²
    (falls back to the center crop when no box fits in 10 tries)."""
    h, w = (img.height, img.width) if isinstance(img, Image.Image) else img.shape[:2]
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return resize_box(img, (left, top, left + cw, top + ch), size, fast)
    return resize_center_crop(img, size, fast)


@dataclasses.dataclass
class DecodeImageRandomCrop(grain.transforms.RandomMap):
    """`DecodeImage` with a random resized crop (training augmentation) instead of the
    center crop; same skipping and counting of bad data."""
    image_size: int
    max_image_pixels: int = 50_000_000
    formats: tuple[str, ...] = SUPPORTED_FORMATS
    scale: tuple[float, float] = (0.5, 1.0)
    fast: bool = True

    def __post_init__(self):
        self._decoder = DecodeImage(self.image_size, self.max_image_pixels, self.formats, self.fast)

    def random_map(self, record: dict[str, Any] | None, rng: np.random.Generator):
        return self._decoder._decode(record, lambda img: random_resized_crop(  # pylint: disable=protected-access
            img, self.image_size, rng, tuple(self.scale), fast=self.fast))


@dataclasses.dataclass
class LineToText(grain.transforms.Map):
    """Text-only record -> {'text'} with no image."""

    def map(self, record: dict[str, Any]) -> dict[str, Any] | None:
        if record is None or record_error(record):
            return None
        text = record.get("text", record.get("txt"))
        return {"text": text, "has_image": np.int32(0), "key": record.get("__key__", "")}


_SPACES = re.compile(r"\s+")


@dataclasses.dataclass
class CleanCaption(grain.transforms.Map):
    """UTF-8 decode, whitespace collapse, optional lowercasing; drops empty or overlong text."""
    max_chars: int = 2000
    lowercase: bool = False

    def map(self, ex: dict[str, Any] | None) -> dict[str, Any] | None:
        if ex is None:
            return None
        text = ex.get("text")
        if text is not None and not isinstance(text, (str, bytes)):
            skip("caption_invalid")
            return None
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                skip("caption_not_utf8")
                return None
        text = _SPACES.sub(" ", text or "").strip()
        if not text:
            skip("caption_empty")
            return None
        if len(text) > self.max_chars:
            skip("caption_too_long")
            return None
        return {**ex, "text": text.lower() if self.lowercase else text}


@dataclasses.dataclass
class Tokenize(grain.transforms.Map):
    """text -> int32 token ids ending with EOS."""
    vocabulary: Any
    max_tokens: int = 512

    def map(self, ex: dict[str, Any] | None) -> dict[str, Any] | None:
        if ex is None:
            return None
        ids = list(self.vocabulary.encode(ex["text"]))[: self.max_tokens - 1]
        ids.append(self.vocabulary.eos_id)
        return {**ex, "tokens": np.asarray(ids, np.int32)}


def pad_to(x: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros((length,), np.int32)
    out[: min(len(x), length)] = x[:length]
    return out


@dataclasses.dataclass
class PrefixLMSplit(grain.transforms.RandomMap):
    """Splits tokens into an encoder prefix and a decoder target (SimVLM's PrefixLM).

    image-text: with probability `text_prefix_prob` the prefix also takes a
    uniformly random leading slice of 1..`max_prefix_len` text tokens; otherwise
    the whole caption is the target (plain captioning).
    text-only: the split point is uniform over 1..len-1, so both sides are
    non-empty. The target always keeps >= 1 token, and the split point is never so
    early that the target (with its EOS) would overflow `max_target_len`
    (`Tokenize` caps texts at max_prefix_len + max_target_len, so one always fits).
    """
    max_prefix_len: int
    max_target_len: int
    text_prefix_prob: float = 0.5

    def random_map(self, ex: dict[str, Any] | None, rng: np.random.Generator):
        if ex is None:
            return None
        tokens = ex.pop("tokens")
        n = len(tokens)
        max_k = min(self.max_prefix_len, n - 1)
        min_k = max(0 if ex["has_image"] else 1, n - self.max_target_len)
        if min_k > max_k:
            skip("text_too_short" if n < 2 else "text_too_long")
            return None
        if ex["has_image"] and min_k == 0:
            use_prefix = max_k >= 1 and rng.random() < self.text_prefix_prob
            k = int(rng.integers(1, max_k + 1)) if use_prefix else 0
        else:
            k = int(rng.integers(max(min_k, 1), max_k + 1))
        ex = {k_: v for k_, v in ex.items() if k_ != "text"}
        ex["prefix_tokens"] = pad_to(tokens[:k], self.max_prefix_len)
        ex["target_tokens"] = pad_to(tokens[k:], self.max_target_len)
        return ex


@dataclasses.dataclass
class AddBlankImage(grain.transforms.Map):
    """Text-only examples get an all-zero image (masked out by `has_image == 0`)."""
    image_size: int

    def map(self, ex: dict[str, Any] | None) -> dict[str, Any] | None:
        if ex is None:
            return None
        return {**ex, "image": np.zeros((self.image_size, self.image_size, 3), np.uint8)}


@dataclasses.dataclass
class MaskedText(grain.transforms.RandomMap):
    """Adds the text-encoder features of mPLUG / ALBEF (BERT-style masked language modeling).

    Reads `ex['tokens']` (the caption ids ending with EOS, from `Tokenize`) without removing
    them (`PrefixLMSplit`, after this, pops them) and adds, each int32 [text_len]:
      * 'text_tokens': the caption ids with EOS, zero-padded (PAD_ID) to `text_len`; a longer
        caption keeps its first `text_len` ids (then its EOS is cut off).
      * 'mlm_tokens': 'text_tokens' with each eligible position (a caption id: not padding,
        not PAD_ID, not one of `special_ids`) selected with probability `mlm_probability`;
        a selected id becomes `mask_id` with probability 0.8, a random id with 0.1, and
        stays unchanged with 0.1 (BERT / ALBEF). Random ids are uniform over
        [0, vocab_size) without `special_ids` and `mask_id` (so a replacement never ends or
        pads the text early; UNK can be drawn unless listed in `special_ids`) and may equal
        the original id, as in BERT.
      * 'mlm_labels': the original id at the selected positions, 0 (PAD_ID) elsewhere, so a
        pad-ignoring cross-entropy trains exactly the selected positions.
    A caption where no position was selected gets one eligible position selected at random
    (every caption trains MLM, as short captions would otherwise often train nothing); with
    no eligible position at all (only EOS) the labels are all 0.

    `image_text_task` passes special_ids=(PAD_ID, the vocabulary's eos_id).
    Every draw comes from the example's `rng` (grain keys it by the example's global index),
    so the same seed gives the same masks, also after resuming a checkpointed iterator.
    """
    text_len: int
    mask_id: int
    vocab_size: int  # the tokenizer's pieces (random replacements are drawn below it)
    mlm_probability: float = 0.15
    special_ids: tuple[int, ...] = (PAD_ID, EOS_ID)

    def __post_init__(self):
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"image_text_task.mlm_probability={self.mlm_probability!r} must be in (0, 1) "
                             f"(BERT / mPLUG: 0.15)")
        if self.text_len < 1:
            raise ValueError(f"image_text_task.text_len={self.text_len!r} must be >= 1 to add the MLM "
                             f"features (0 turns them off in image_text_task)")
        if self.mask_id < 0 or self.mask_id in tuple(self.special_ids):
            raise ValueError(f"image_text_task.mask_id={self.mask_id!r} must be >= 0 and not a special id "
                             f"{tuple(self.special_ids)} (mPLUG gin files set it to the tokenizer size)")
        self.special_ids = tuple(int(i) for i in self.special_ids)
        self._random_ids = np.setdiff1d(np.arange(self.vocab_size, dtype=np.int32),
                                        np.asarray(self.special_ids + (self.mask_id,), np.int32))
        if not len(self._random_ids):
            raise ValueError(f"vocab_size={self.vocab_size!r} leaves no id for random replacements "
                             f"besides the special ids {self.special_ids} and mask_id={self.mask_id}")

    def random_map(self, ex: dict[str, Any] | None, rng: np.random.Generator):
        if ex is None:
            return None
        tokens = np.asarray(ex["tokens"], np.int32)
        n = self.text_len
        text = pad_to(tokens, n)
        eligible = ((np.arange(n) < len(tokens)) & (text != PAD_ID)
                    & ~np.isin(text, np.asarray(self.special_ids, np.int32)))
        selected = eligible & (rng.random(n) < self.mlm_probability)
        if not selected.any() and eligible.any():
            selected[rng.choice(np.flatnonzero(eligible))] = True
        action = rng.random(n)  # < 0.8: mask; [0.8, 0.9): random id; else unchanged
        masked = selected & (action < 0.8)
        randomized = selected & (action >= 0.8) & (action < 0.9)
        mlm = text.copy()
        mlm[masked] = self.mask_id
        mlm[randomized] = self._random_ids[rng.integers(0, len(self._random_ids), int(randomized.sum()))]
        labels = np.where(selected, text, PAD_ID).astype(np.int32)
        return {**ex, "text_tokens": text, "mlm_tokens": mlm, "mlm_labels": labels}


# ----------------------------------------------------------------------------- interleaved documents

# A decoded document (the output of DecodeDocumentImages / PairToDocument, the input of
# InterleavedTokens): {'key', 'elements': [('text', str) | ('image', slot)], 'images': uint8
# [max_images, size, size, 3], 'image_mask': int32 [max_images]}; image slot i is images[i].


def _check_max_images(max_images: int) -> None:
    if max_images < 1:
        raise ValueError(f"interleaved_task.max_images={max_images!r} must be >= 1 (image slots per example)")


@dataclasses.dataclass
class DecodeDocumentImages(grain.transforms.Map):
    """An interleaved document's images -> 'images' uint8 [max_images, size, size, 3] (all-zero
    padding slots) + 'image_mask' int32 [max_images], center-cropped as `DecodeImage`.

    Reads a document record of the interleaved sources ({'elements': [('text', str) |
    ('image', bytes) | ('image_error', reason)]}). Images are decoded in document order until
    `max_images` are kept; later ones are dropped with their place in the text, as open_flamingo
    keeps the first max_num_images. An image that cannot be read or decoded is dropped likewise
    and counted under its reason (DecodeImage's: 'image_decode_error', ...; one count per image,
    the document is kept). A document left with no image is skipped as 'document_no_image'.
    """
    image_size: int
    max_images: int
    max_image_pixels: int = 50_000_000
    formats: tuple[str, ...] = SUPPORTED_FORMATS
    fast: bool = True

    def __post_init__(self):
        _check_max_images(self.max_images)
        self._decoder = DecodeImage(self.image_size, self.max_image_pixels, self.formats, self.fast)

    def map(self, record: dict[str, Any] | None) -> dict[str, Any] | None:
        return self._decode(record, lambda img: resize_center_crop(img, self.image_size, self.fast))

    def _decode(self, record: dict[str, Any] | None, crop) -> dict[str, Any] | None:
        if record is None or record_error(record):
            return None
        size = self.image_size
        images = np.zeros((self.max_images, size, size, 3), np.uint8)
        mask = np.zeros((self.max_images,), np.int32)
        elements, n = [], 0
        for kind, value in record.get("elements", ()):
            if kind == "text":
                elements.append(("text", value))
                continue
            if n == self.max_images:
                continue  # past max_images: dropped unread, with its <image> place
            try:
                if kind != "image":  # the source could not read it ('image_error', reason)
                    raise BadImage(str(value))
                images[n] = self._decoder.decode_bytes(value, crop)
            except BadImage as e:
                skip(e.reason)
                continue
            elements.append(("image", n))
            mask[n] = 1
            n += 1
        if n == 0:
            skip("document_no_image")
            return None
        return {"key": record.get("__key__", ""), "elements": elements, "images": images, "image_mask": mask}


@dataclasses.dataclass
class DecodeDocumentImagesRandomCrop(grain.transforms.RandomMap):
    """`DecodeDocumentImages` with `DecodeImageRandomCrop`'s random resized crop, one per image."""
    image_size: int
    max_images: int
    max_image_pixels: int = 50_000_000
    formats: tuple[str, ...] = SUPPORTED_FORMATS
    scale: tuple[float, float] = (0.5, 1.0)
    fast: bool = True

    def __post_init__(self):
        self._decoder = DecodeDocumentImages(self.image_size, self.max_images, self.max_image_pixels,
                                             self.formats, self.fast)

    def random_map(self, record: dict[str, Any] | None, rng: np.random.Generator):
        return self._decoder._decode(record, lambda img: random_resized_crop(  # pylint: disable=protected-access
            img, self.image_size, rng, tuple(self.scale), fast=self.fast))


@dataclasses.dataclass
class PairToDocument(grain.transforms.Map):
    """An image-text example (after DecodeImage + CleanCaption) -> the 1-image document
    "<image>caption" (InterleavedTokens adds <|endofchunk|> and EOS), so every image-text source
    feeds an interleaved task as open_flamingo's LAION pairs do."""
    max_images: int

    def __post_init__(self):
        _check_max_images(self.max_images)

    def map(self, ex: dict[str, Any] | None) -> dict[str, Any] | None:
        if ex is None:
            return None
        image = ex["image"]
        images = np.zeros((self.max_images,) + image.shape, np.uint8)
        images[0] = image
        mask = np.zeros((self.max_images,), np.int32)
        mask[0] = 1
        return {"key": ex.get("key", ""), "elements": [("image", 0), ("text", ex["text"])],
                "images": images, "image_mask": mask}


# A text is cut to this many characters per token still free before tokenizing: bounds the time a
# huge text takes. SentencePiece pieces are at most 16 characters (its default), so the tokens that
# fit in max_len are the uncut text's, except where one word runs across the cut.
_CHARS_PER_TOKEN = 64


@dataclasses.dataclass
class InterleavedTokens(grain.transforms.Map):
    """A decoded document -> 'tokens' and 'loss_mask', int32 [max_len] (Flamingo's text).

    Layout: [bos_id, if not None] then each element in order: an image -> `media_id` (<image>),
    a text -> its ids; an image's chunk ends with `eoc_id` (<|endofchunk|>) after the one text
    right after it (right after the image if no text follows it); EOS last. Then padded with 0
    (PAD_ID) or cut to max_len (the cut may take the EOS). A pair is "<image>caption<|endofchunk|>"
    EOS, as open_flamingo's LAION text (open_flamingo/train/data.py, preprocess_laion_text); a
    document "<image>text<|endofchunk|><image>text<|endofchunk|>" EOS as its MMC4 text
    (preprocess_interleaved), except that there a chunk runs on to the next <image>, taking in the
    texts after an image's own, while here those come after the <|endofchunk|>.
    Texts are whitespace-collapsed (empty ones dropped); their ids never include media_id or
    eoc_id (a literal "<image>" in a text cannot make an image slot).

    loss_mask[t] = 1 where tokens[t] is a target (predicted from the positions before t),
    following open_flamingo's MMC4 labels (open_flamingo/train/train_utils.py, train_one_epoch):
    not padding, not <image>, not BOS, nothing before the first <image>, and no text between an
    <|endofchunk|> and the next <image> (the MMC4 rule: a leading text, or a text that is not the
    one right after an image, is context only). <|endofchunk|> and EOS are targets (the EOS also
    after the last chunk, as in open_flamingo's LAION labels; its MMC4 loop masks that one).

    Images keep the invariant sum(image_mask) == count(tokens == media_id): the i-th <image> is
    images[i], and an image whose <image> the cut to max_len took is zeroed and masked (0). A
    document with no target within max_len (e.g. a leading text filling it) is skipped as
    'document_no_target'.
    """
    vocabulary: Any
    max_len: int
    media_id: int
    eoc_id: int
    bos_id: int | None = None

    def __post_init__(self):
        eos = self.vocabulary.eos_id
        ids = {"media_id": self.media_id, "eoc_id": self.eoc_id}
        if self.bos_id is not None:
            ids["bos_id"] = self.bos_id
        if len(set(ids.values())) < len(ids) or {PAD_ID, eos} & set(ids.values()):
            raise ValueError(f"interleaved_task: {ids} must be distinct ids other than pad ({PAD_ID}) and EOS "
                             f"({eos}); e.g. media_id = the tokenizer size ({self.vocabulary.vocab_size}), "
                             f"eoc_id = media_id + 1 (new tokens past its pieces)")
        if self.max_len < 2:
            raise ValueError(f"interleaved_task.max_len={self.max_len!r} must be >= 2 (an <image> and a target)")

    def _text_ids(self, text: str, room: int) -> list[int]:
        ids = self.vocabulary.encode(text[: _CHARS_PER_TOKEN * (room + 1)])
        return [int(i) for i in ids if i != self.media_id and i != self.eoc_id]

    def layout(self, elements) -> tuple[list[int], list[int]]:
        """(token ids, 1 where a target) of the whole document, stopping once past max_len."""
        tokens: list[int] = []
        targets: list[int] = []

        def add(ids: list[int], target: bool) -> None:
            tokens.extend(ids)
            targets.extend([int(target)] * len(ids))

        if self.bos_id is not None:
            add([self.bos_id], False)
        in_chunk = False  # after an <image>, before its <|endofchunk|>
        for kind, value in elements:
            if len(tokens) > self.max_len:
                break  # the rest is cut anyway
            if kind == "image":
                if in_chunk:  # the previous image had no text of its own
                    add([self.eoc_id], True)
                add([self.media_id], False)
                in_chunk = True
                continue
            text = _SPACES.sub(" ", value or "").strip()
            if not text:
                continue
            ids = self._text_ids(text, self.max_len - len(tokens))
            if in_chunk:  # the image's own text, then the end of its chunk
                add(ids, True)
                add([self.eoc_id], True)
                in_chunk = False
            else:  # before the first image, or after an <|endofchunk|>: context, not a target
                add(ids, False)
        if in_chunk:
            add([self.eoc_id], True)
        add([self.vocabulary.eos_id], True)
        return tokens, targets

    def map(self, ex: dict[str, Any] | None) -> dict[str, Any] | None:
        if ex is None:
            return None
        tokens, targets = self.layout(ex["elements"])
        tokens, loss_mask = pad_to(np.asarray(tokens), self.max_len), pad_to(np.asarray(targets), self.max_len)
        if not loss_mask.any():
            skip("document_no_target")
            return None
        kept = int(np.sum(tokens == self.media_id))  # images whose <image> survived the cut
        images, image_mask = ex["images"], ex["image_mask"]
        if kept < int(image_mask.sum()):
            images, image_mask = images.copy(), image_mask.copy()
            images[kept:] = 0
            image_mask[kept:] = 0
        out = {k: v for k, v in ex.items() if k != "elements"}
        return {**out, "images": images, "image_mask": image_mask, "tokens": tokens, "loss_mask": loss_mask}


MODEL_FEATURES = ("image", "has_image", "prefix_tokens", "target_tokens")
MLM_FEATURES = ("text_tokens", "mlm_tokens", "mlm_labels")  # MaskedText's (mPLUG's text encoder / MLM)
INTERLEAVED_FEATURES = ("images", "image_mask", "tokens", "loss_mask")  # interleaved_task's (Flamingo)


@dataclasses.dataclass
class SelectFeatures(grain.transforms.Map):
    """Keeps only the model's input features (drops keys, raw text); tasks that add
    `MaskedText` keep `MODEL_FEATURES + MLM_FEATURES`, interleaved tasks `INTERLEAVED_FEATURES`."""
    features: tuple[str, ...] = MODEL_FEATURES

    def map(self, ex: dict[str, Any] | None) -> dict[str, Any] | None:
        if ex is None:
            return None
        return {k: ex[k] for k in self.features}
