"""Per-example preprocessors (grain transforms) for PrefixLM pretraining.

image-text: DecodeImage -> CleanCaption -> Tokenize -> PrefixLMSplit
text-only:  LineToText -> CleanCaption -> Tokenize -> PrefixLMSplit(text_only) -> AddBlankImage

A transform that meets bad data returns None (grain drops it) and counts the
reason in `SKIPPED`, which the trainer logs; nothing raises mid-run.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import re
import threading
import warnings
from typing import Any

import grain
import numpy as np
from PIL import Image

from simvlm_jax.data import sources

_lock = threading.Lock()
SKIPPED: collections.Counter = collections.Counter()  # reason -> count (this process)


def skip(reason: str) -> None:
    with _lock:
        SKIPPED[reason] += 1


def skipped_counts() -> dict[str, int]:
    with _lock:
        return dict(SKIPPED)


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Aspect-preserving resize of the shorter side to `size`, then a center crop."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), np.uint8)


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
    16-bit, alpha and palette images are converted to RGB.
    """
    image_size: int
    max_image_pixels: int = 50_000_000  # decompression-bomb guard
    formats: tuple[str, ...] = SUPPORTED_FORMATS

    def map(self, record: dict[str, Any]) -> dict[str, Any] | None:
        return self._decode(record, lambda img: resize_center_crop(img, self.image_size))

    def _decode(self, record: dict[str, Any] | None, crop) -> dict[str, Any] | None:
        if record is None or record_error(record):
            return None
        try:
            img = open_image(find_image(record), self.max_image_pixels, tuple(self.formats),
                             min_size=self.image_size)
            image = crop(img)
        except BadImage as e:
            skip(e.reason)
            return None
        except Exception:  # pylint: disable=broad-except
            skip("image_decode_error")
            return None
        caption = record.get("txt")
        if caption is None:
            caption = sources.read_json(record).get("caption")
        return {"image": image, "has_image": np.int32(1), "text": caption,
                "key": record.get("__key__", "")}


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.5, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """Inception-style crop: a random box of `scale` x area and `ratio` aspect, resized to size²
    (falls back to the center crop when no box fits in 10 tries)."""
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return np.asarray(img.resize((size, size), Image.BICUBIC,
                                         box=(left, top, left + cw, top + ch)), np.uint8)
    return resize_center_crop(img, size)


@dataclasses.dataclass
class DecodeImageRandomCrop(grain.transforms.RandomMap):
    """`DecodeImage` with a random resized crop (training augmentation) instead of the
    center crop; same skipping and counting of bad data."""
    image_size: int
    max_image_pixels: int = 50_000_000
    formats: tuple[str, ...] = SUPPORTED_FORMATS
    scale: tuple[float, float] = (0.5, 1.0)

    def __post_init__(self):
        self._decoder = DecodeImage(self.image_size, self.max_image_pixels, self.formats)

    def random_map(self, record: dict[str, Any] | None, rng: np.random.Generator):
        return self._decoder._decode(record, lambda img: random_resized_crop(  # pylint: disable=protected-access
            img, self.image_size, rng, tuple(self.scale)))


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


MODEL_FEATURES = ("image", "has_image", "prefix_tokens", "target_tokens")


@dataclasses.dataclass
class SelectFeatures(grain.transforms.Map):
    """Keeps only the model's input features (drops keys, raw text)."""
    features: tuple[str, ...] = MODEL_FEATURES

    def map(self, ex: dict[str, Any] | None) -> dict[str, Any] | None:
        if ex is None:
            return None
        return {k: ex[k] for k in self.features}
