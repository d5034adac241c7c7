"""Caption image files with an exported SimVLM or CoCa model (see `simvlm_jax.export`).

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
import os
import sys
from typing import Any, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet TensorFlow (imported by seqio)

import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

from simvlm_jax import batching, decoding, export  # noqa: E402  (JAX, not TensorFlow)
from simvlm_jax.models import registry  # noqa: E402

MAX_IMAGE_PIXELS = 50_000_000  # decompression-bomb guard, as in training


def load_image(path: str, image_size: int) -> np.ndarray:
    """uint8 [image_size, image_size, 3], decoded and cropped exactly as in training
    (`preprocessors.open_image` + `resize_center_crop`)."""
    # TensorFlow (via seqio) loads only once there are images to read, so a bad --export_dir
    # fails at once, without TensorFlow's start-up noise.
    from simvlm_jax.data import preprocessors  # pylint: disable=g-import-not-at-top  (TensorFlow)
    data = epath.Path(path).read_bytes()  # a local file or a URL (gs://...)
    img = preprocessors.open_image(data, MAX_IMAGE_PIXELS, min_size=image_size)
    return preprocessors.resize_center_crop(img, image_size)


def iter_captions(model, params: Any, vocab, images: np.ndarray, prompt: str = "a picture of", *,
                  batch_size: int = 8, decoder=None, **decode_kwargs):
    """Yields the captions of uint8 images [N, S, S, 3] one batch (list of str) at a time.
    Batches are padded to one compiled shape, min(batch_size, N). `model`: a generating
    family, its module or config."""
    if not len(images):
        return
    fam = registry.family_of(model)
    decoder = decoder or decoding.make_decoder(fam, **decode_kwargs)
    batch_size = max(1, min(batch_size, len(images)))
    prompt_ids = fam.prompt_ids(vocab, prompt)
    for chunk, n in batching.padded_batches(images, batch_size):
        tokens = np.asarray(decoder(params, fam.decode_inputs(chunk, prompt_ids)))
        yield [decoding.tokens_to_text(vocab, row, fam.eos_id, fam.pad_id) for row in tokens[:n]]


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
    if type(e).__name__ == "UnidentifiedImageError" or getattr(e, "reason", "") in (
            "image_decode_error", "missing_image", "image_unsupported_format"):
        return "not a readable image (unknown or corrupt format)"
    if getattr(e, "reason", "") == "image_too_large":
        return "image too large"
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
    if not epath.Path(args.export_dir).is_dir():  # a local directory or a URL (gs://...)
        print(f"error: export dir {args.export_dir}: not a directory", file=sys.stderr)
        return 2
    try:
        model, params, vocab = export.load_export(args.export_dir)
    except Exception as e:  # pylint: disable=broad-except
        print(f"error: export dir {args.export_dir}: {_one_line(e)}", file=sys.stderr)
        return 2
    if vocab is None:
        print(f"error: export dir {args.export_dir}: no tokenizer to turn ids into text (open_clip CoCa "
              f"bundles need open_clip_torch installed for the CLIP BPE merges file)", file=sys.stderr)
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
