"""Caption image files with an exported SimVLM model (see `simvlm_jax.export`).

    python -m simvlm_jax.caption --export_dir DIR [--prompt "a picture of"] [--num_beams 3]
        [--max_len N] [--batch_size N] IMAGE...

Each image (jpg/png/webp, anything PIL reads) is converted to RGB, its shorter side
resized to the model's image_size and center-cropped (`preprocessors.resize_center_crop`,
as in training). The prompt is the encoder's text prefix; the caption is decoded with
beam search (`--num_beams 1`: greedy). Prints `path<TAB>caption` per image, in input
order, on stdout. An unreadable, missing or non-image file prints
`error: <path>: <reason>` on stderr and the others are still captioned.
Exit status: 0 all captioned, 1 some failed, 2 bad export dir.
Runs on the default device (CPU is fine); no mesh, no global settings.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import warnings
from typing import Any, Sequence

import numpy as np

MAX_IMAGE_PIXELS = 50_000_000  # decompression-bomb guard, as in training


def load_image(path: str, image_size: int) -> np.ndarray:
    """uint8 [image_size, image_size, 3]: RGB, shorter side resized, center crop."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from simvlm_jax.data import preprocessors  # pylint: disable=g-import-not-at-top

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"image too large ({img.width}x{img.height})")
            img.load()
            if img.mode != "RGB":  # grayscale, CMYK, palette, alpha
                img = img.convert("RGBA").convert("RGB") if "A" in img.getbands() or img.mode == "P" \
                    else img.convert("RGB")
            return preprocessors.resize_center_crop(img, image_size)


def encode_prompt(vocab, prompt: str, max_prefix_len: int) -> np.ndarray:
    ids = list(vocab.encode(prompt))[:max_prefix_len] if prompt else []
    out = np.zeros((max_prefix_len,), np.int32)
    out[:len(ids)] = ids
    return out


def tokens_to_text(vocab, row: Sequence[int]) -> str:
    ids = [int(t) for t in row if t > 0]
    if vocab.eos_id in ids:
        ids = ids[:ids.index(vocab.eos_id)]
    return " ".join(vocab.decode(ids).split())  # one line, single spaces


@functools.lru_cache(maxsize=8)
def make_decoder(model, *, num_beams: int = 3, max_len: int | None = None, min_len: int = 0,
                 length_penalty: float = 1.0, repetition_penalty: float = 1.0):
    """A jitted fn(params, images, prefix_tokens, has_image) -> tokens [B, max_len]: beam
    search, or greedy for num_beams=1 (cached per model config and settings)."""
    import jax  # pylint: disable=g-import-not-at-top

    from simvlm_jax import decoding  # pylint: disable=g-import-not-at-top

    if num_beams <= 1:
        return jax.jit(functools.partial(decoding.greedy_decode, model, max_len=max_len, min_len=min_len,
                                         repetition_penalty=repetition_penalty))
    beam = functools.partial(decoding.beam_search, model, num_beams=num_beams, max_len=max_len,
                             min_len=min_len, length_penalty=length_penalty,
                             repetition_penalty=repetition_penalty)
    return jax.jit(lambda *args: beam(*args)[0])


def iter_captions(model, params: Any, vocab, images: np.ndarray, prompt: str = "a picture of", *,
                  batch_size: int = 8, decoder=None, **decode_kwargs):
    """Yields the captions of uint8 images [N, S, S, 3] one batch (list of str) at a time.
    Batches are padded to one compiled shape, min(batch_size, N)."""
    if not len(images):
        return
    decoder = decoder or make_decoder(model, **decode_kwargs)
    batch_size = max(1, min(batch_size, len(images)))
    prompt_ids = encode_prompt(vocab, prompt, model.config.max_prefix_len)
    prefix = np.tile(prompt_ids, (batch_size, 1))
    has_image = np.ones((batch_size,), np.int32)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
        tokens = np.asarray(decoder(params, chunk, prefix, has_image))
        yield [tokens_to_text(vocab, row) for row in tokens[:n]]


def caption_arrays(model, params: Any, vocab, images: np.ndarray, prompt: str = "a picture of", *,
                   batch_size: int = 8, decoder=None, **decode_kwargs) -> list[str]:
    """Captions uint8 images [N, S, S, 3] (see `iter_captions`)."""
    return [c for batch in iter_captions(model, params, vocab, images, prompt, batch_size=batch_size,
                                         decoder=decoder, **decode_kwargs) for c in batch]


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if isinstance(e, (OSError, ValueError)) else f"{type(e).__name__}: {msg}"


def _image_error(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, IsADirectoryError):
        return "is a directory"
    if isinstance(e, PermissionError):
        return "permission denied"
    if type(e).__name__ == "UnidentifiedImageError":
        return "not a readable image (unknown or corrupt format)"
    return f"cannot read image: {_one_line(e)}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m simvlm_jax.caption", description=__doc__.split("\n\n")[0])
    p.add_argument("--export_dir", required=True, help="directory written by simvlm_jax.export")
    p.add_argument("--prompt", default="a picture of", help="encoder text prefix ('' for none)")
    p.add_argument("--num_beams", type=int, default=3, help="beam size; 1 = greedy")
    p.add_argument("--max_len", type=int, default=None, help="max caption tokens (<= max_target_len)")
    p.add_argument("--min_len", type=int, default=0, help="min caption tokens before EOS")
    p.add_argument("--length_penalty", type=float, default=1.0, help="beam score = logp / len**alpha")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="CTRL penalty; 1 = off")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    args = p.parse_args(argv)
    for name in ("num_beams", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.max_len is not None and args.max_len < 1:
        p.error("--max_len must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.path.isdir(args.export_dir):
        print(f"error: export dir {args.export_dir}: not a directory", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet TensorFlow (imported by seqio)
    from simvlm_jax import export  # pylint: disable=g-import-not-at-top  (heavy: jax, seqio)
    try:
        model, params, vocab = export.load_export(args.export_dir)
    except Exception as e:  # pylint: disable=broad-except
        print(f"error: export dir {args.export_dir}: {_one_line(e)}", file=sys.stderr)
        return 2

    size = model.config.image_size
    paths, arrays, failed = [], [], 0
    for path in args.images:
        try:
            arrays.append(load_image(path, size))
            paths.append(path)
        except Exception as e:  # pylint: disable=broad-except
            failed += 1
            print(f"error: {path}: {_image_error(e)}", file=sys.stderr, flush=True)

    if arrays:
        batches = iter_captions(model, params, vocab, np.stack(arrays), args.prompt,
                                batch_size=args.batch_size, num_beams=args.num_beams, max_len=args.max_len,
                                min_len=args.min_len, length_penalty=args.length_penalty,
                                repetition_penalty=args.repetition_penalty)
        done = 0
        for captions in batches:  # printed as soon as each batch is decoded
            for path, caption in zip(paths[done:done + len(captions)], captions):
                print(f"{path}\t{caption}", flush=True)
            done += len(captions)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
