"""Caption decoding speed: our jitted KV-cache decoders vs open_clip CoCa's `generate`.

Both decode the same random-weight open_clip CoCa (ours converted from its state
dict with `convert_open_clip`) on the same images and device (`--torch_device`, default: the
GPU when torch sees one; JAX's default backend), in float32 (TF32 matmuls on a GPU, JAX's
default there, switched on for torch), with the same strategy and lengths:
  * beam:   plain beam search (open_clip: `generation_type='beam_search'`,
            `num_beam_groups=1`, HF's BeamSearchScorer) vs `decoding.beam_search`;
  * greedy: open_clip `generation_type='top_k'` with `top_k=1` (sampling from one
            token = greedy) vs `decoding.greedy_decode`.
Both generate up to the same length (open_clip with `fixed_output_length=True`); stopping
at EOS is allowed on both sides.
Times are medians over `--repeats` calls after one warm-up call (ours: compiled
there). Reports captions/s for each and the ratio, and how many captions agree
token for token. The last stdout line is one JSON object.

Needs torch + open_clip_torch + transformers<4.50 (`bash tests/install_parity.sh`).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from simvlm_jax import convert_open_clip, decoding
from simvlm_jax.models import coca

# A shrunk CoCa with open_clip's layout (for tests): same code paths as coca_ViT-B-32.
TINY_OPEN_CLIP = {
    "embed_dim": 64,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32,
                   "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 17,
                   "output_tokens": True},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                       "attn_pooler_heads": 2},
}
SOT, EOT = 49406, 49407


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("decode")
    g.add_argument("--open_clip_model", default="coca_ViT-B-32",
                   help="open_clip model name, or 'tiny' (a shrunk CoCa of the same layout)")
    g.add_argument("--strategies", default="beam,greedy", help="comma-separated: beam, greedy")
    g.add_argument("--num_beams", type=int, default=3)
    g.add_argument("--decode_len", type=int, default=20, help="tokens generated after <start_of_text>")
    g.add_argument("--decode_batch", type=int, default=16, help="images per call")
    g.add_argument("--repeats", type=int, default=3, help="timed calls per decoder")
    g.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: all cores)")


def import_torch():
    """(torch, open_clip): the optional PyTorch stack (`bash tests/install_parity.sh`)."""
    import open_clip  # pylint: disable=g-import-not-at-top  (optional: PyTorch)
    import torch  # pylint: disable=g-import-not-at-top  (optional: PyTorch)
    return torch, open_clip


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out = fn()  # warm-up (and our compile)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def build_open_clip(name: str, seed: int = 0):
    """(open_clip CoCa model, its model config dict), random weights; `name` is an open_clip
    model name or 'tiny' (TINY_OPEN_CLIP)."""
    torch, open_clip = import_torch()
    torch.manual_seed(seed)
    if name == "tiny":
        model_cfg, model = TINY_OPEN_CLIP, open_clip.CoCa(**TINY_OPEN_CLIP)
    else:
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None or "multimodal_cfg" not in model_cfg:
            raise ValueError(f"--open_clip_model={name!r} is not an open_clip CoCa model name")
        model = open_clip.create_model(name)  # random weights
    with torch.no_grad():  # open_clip leaves it uninitialized (torch.empty)
        torch.nn.init.normal_(model.text_decoder.text_projection, std=model.text_decoder.width ** -0.5)
    return model, model_cfg


def torch_device(name: str) -> str:
    """`name`, or for 'auto' 'cuda' when torch sees a GPU, else 'cpu'."""
    torch, _ = import_torch()
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _agreement(ours: np.ndarray, theirs: np.ndarray, length: int) -> float:
    """Fraction of captions identical over their first `length` tokens, each cut at its EOS.
    (open_clip forces EOS as the last token of a full-length caption, so compare with
    `length = decode_len - 1`.)"""
    def cut(row):
        row = [int(t) for t in row[:length]]
        return row[:row.index(EOT) + 1] if EOT in row else row
    return sum(cut(a) == cut(b) for a, b in zip(ours, theirs)) / max(len(ours), 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch, _ = import_torch()

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in ("beam", "greedy")]
    if unknown or not strategies:
        raise ValueError(f"--strategies={args.strategies!r}: use a comma-separated subset of beam, greedy")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch_device(getattr(args, "torch_device", "auto"))
    torch_model, model_cfg = build_open_clip(args.open_clip_model)
    torch_model.to(device).eval()
    torch.backends.cuda.matmul.allow_tf32 = True  # as JAX's default float32 matmuls on a GPU
    cfg = convert_open_clip.config_from_open_clip(model_cfg, eos_id=EOT)
    if args.decode_len > cfg.max_text_len:
        raise ValueError(f"--decode_len={args.decode_len} > the model's max_text_len={cfg.max_text_len}")
    model = coca.CoCa(cfg)
    params = jax.tree_util.tree_map(jnp.asarray, convert_open_clip.from_open_clip(torch_model.state_dict(), cfg))

    rng = np.random.default_rng(0)
    n, size = args.decode_batch, cfg.image_size
    pixels = rng.integers(0, 256, (n, size, size, 3)).astype(np.float32)
    normalized = (pixels - np.asarray(coca.OPENAI_MEAN)) / np.asarray(coca.OPENAI_STD)
    images_jax = jnp.asarray(normalized, jnp.float32)           # NHWC, already normalized
    images_torch = torch.from_numpy(normalized.transpose(0, 3, 1, 2).copy()).float().to(device)  # NCHW
    seq_len = args.decode_len + 1  # open_clip counts <start_of_text>

    results: dict[str, Any] = {
        "open_clip_model": args.open_clip_model, "batch": n, "decode_len": args.decode_len,
        "num_beams": args.num_beams, "torch_threads": torch.get_num_threads(), "torch_device": device,
        "jax_devices": jax.device_count(), "jax_backend": jax.default_backend()}
    for strategy in strategies:
        if strategy == "beam":
            ours_fn = jax.jit(lambda p, x: decoding.beam_search(
                model, p, {"image": x}, num_beams=args.num_beams, max_len=args.decode_len, eos_id=EOT)[0])
            theirs_kwargs = dict(generation_type="beam_search", num_beams=args.num_beams, num_beam_groups=1)
        else:  # greedy
            ours_fn = jax.jit(lambda p, x: decoding.greedy_decode(model, p, {"image": x}, max_len=args.decode_len,
                                                                  eos_id=EOT))
            theirs_kwargs = dict(generation_type="top_k", top_k=1)

        ours_sec, ours_tokens = _median_time(
            lambda: jax.block_until_ready(ours_fn(params, images_jax)), args.repeats)

        def theirs():
            with torch.no_grad():
                out = torch_model.generate(images_torch, seq_len=seq_len, min_seq_len=0,
                                           eos_token_id=EOT, sot_token_id=SOT, pad_token_id=0,
                                           fixed_output_length=True, **theirs_kwargs)
            return out.cpu()  # waits for the GPU
        theirs_sec, theirs_tokens = _median_time(theirs, args.repeats)
        theirs_tokens = theirs_tokens.numpy()[:, 1:]  # drop <start_of_text>
        results[strategy] = {
            "ours_captions_per_sec": n / ours_sec, "open_clip_captions_per_sec": n / theirs_sec,
            "speedup": theirs_sec / ours_sec,
            "token_agreement": _agreement(np.asarray(ours_tokens), theirs_tokens, args.decode_len - 1)}
        r = results[strategy]
        print(f"{strategy}: ours {r['ours_captions_per_sec']:.2f} captions/s, open_clip "
              f"{r['open_clip_captions_per_sec']:.2f} captions/s -> {r['speedup']:.1f}x; identical captions "
              f"{r['token_agreement']:.0%}", file=sys.stderr)
    return results
