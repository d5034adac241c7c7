"""Training speed side by side: our CoCa train step vs open_clip's, same device, model, batch and dtype.

`python -m simvlm_jax.benchmark train-compare --open_clip_model=coca_ViT-B-32 --batch_size=16`
builds the open_clip CoCa with random weights and ours from the same open_clip config
(`convert_open_clip.config_from_open_clip`: same widths, depths, image size and text length),
then times one training step of each on random images and tokens:
  * open_clip: forward, `open_clip.CoCaLoss` (contrastive 1 + caption 2, open_clip's defaults and
    ours), backward, global-norm clipping at 1.0, AdamW (fused on a GPU); with
    `--compare_dtype=bfloat16`, torch AMP autocast to bf16 (fp32 master weights), as open_clip's
    `--precision amp_bf16`; `open_clip_compiled` in `--contenders` adds it under `torch.compile`.
  * ours: the sharded train step of `benchmark step` (same loss weights, clipping at 1.0, AdamW)
    with compute in `--compare_dtype`, params in fp32, and on a GPU with bf16 cuDNN attention.
Each side: `--warmup` untimed steps, then the median of `--steps` timed steps, each waited for
(`torch.cuda.synchronize` / `block_until_ready`). Reports images/s of each and ours / theirs.
The last stdout line is one JSON object. Needs torch + open_clip_torch (`bash tests/install_parity.sh`).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from typing import Any

import jax

from simvlm_jax import convert_open_clip, decode_benchmark, partitioning, step_benchmark
from simvlm_jax.models import coca


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("train-compare (also --open_clip_model, --batch_size, --steps, --warmup)")
    g.add_argument("--compare_dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of both sides (train-compare)")
    g.add_argument("--contenders", default="ours,open_clip",
                   help="comma-separated: ours, open_clip (eager), open_clip_compiled (torch.compile)")
    g.add_argument("--torch_device", default="auto", help="cpu, cuda or auto (cuda when torch sees a GPU)")
    g.add_argument("--profile_dir", default="", help="trace our steps there and summarize the top ops (step, train-compare)")


def open_clip_step_time(model_name: str, batch_size: int, dtype: str, device: str, steps: int, warmup: int,
                        compile_model: bool = False) -> dict[str, Any]:
    """Median seconds of one open_clip CoCa training step, and how it was run."""
    torch, open_clip = decode_benchmark.import_torch()
    model, model_cfg = decode_benchmark.build_open_clip(model_name)
    model.to(device).train()
    cuda = device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=cuda)
    loss_fn = open_clip.loss.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)
    forward = torch.compile(model) if compile_model else model
    size, text_len = model_cfg["vision_cfg"]["image_size"], model_cfg["text_cfg"]["context_length"]
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, size, size, generator=gen).to(device)
    text = torch.randint(3, decode_benchmark.SOT, (batch_size, text_len), generator=gen).to(device)
    autocast = torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16,
                              enabled=dtype == "bfloat16")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def train_step():
        with autocast:
            out = forward(images, text)
            clip_loss, caption_loss = loss_fn(out["image_features"], out["text_features"], out["logits"],
                                              out["labels"], out["logit_scale"])
            loss = clip_loss + caption_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    t0 = time.perf_counter()
    for _ in range(max(warmup, 1)):  # the first step compiles (torch.compile) and allocates
        loss = train_step()
    sync()
    warmup_sec = time.perf_counter() - t0
    times = []
    for _ in range(max(steps, 1)):
        t = time.perf_counter()
        loss = train_step()
        sync()
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    return {"step_time_ms_median": sec * 1e3, "examples_per_sec": batch_size / sec,
            "warmup_sec": round(warmup_sec, 2), "final_loss": float(loss.detach()), "torch_compile": compile_model,
            "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(), "device": device,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Times open_clip's and our CoCa train step on the same model, batch and dtype."""
    torch, _ = decode_benchmark.import_torch()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_size = args.batch_size or 16
    device = decode_benchmark.torch_device(args.torch_device)
    model_cfg = convert_open_clip.open_clip_model_config(args.open_clip_model) \
        if args.open_clip_model != "tiny" else decode_benchmark.TINY_OPEN_CLIP
    result: dict[str, Any] = {"open_clip_model": args.open_clip_model, "batch_size": batch_size,
                              "dtype": args.compare_dtype}
    # open_clip first, then its GPU memory is handed back: JAX's allocator (started below, by the
    # first JAX call) takes a fixed share of what is free when it starts.
    contenders = [s.strip() for s in args.contenders.split(",") if s.strip()]
    if not contenders or set(contenders) - {"ours", "open_clip", "open_clip_compiled"}:
        raise ValueError(f"--contenders={args.contenders!r}: use a comma-separated subset of "
                         "ours, open_clip, open_clip_compiled")
    for name in [c for c in ("open_clip", "open_clip_compiled") if c in contenders]:
        compiled = name == "open_clip_compiled"
        try:
            result[name] = open_clip_step_time(args.open_clip_model, batch_size, args.compare_dtype, device,
                                               args.steps, args.warmup, compile_model=compiled)
        except Exception as e:  # pylint: disable=broad-except  (torch.compile may fail on some stacks)
            if not compiled:
                raise
            result[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        print(f"{name}: {json.dumps(result[name])}", file=sys.stderr, flush=True)  # kept if ours fails
        gc.collect()  # the model, its gradients and optimizer state
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if "ours" not in contenders:
        return result
    gpu = jax.default_backend() == "gpu"
    cfg = convert_open_clip.config_from_open_clip(
        model_cfg, dtype=args.compare_dtype,
        attention_impl="cudnn" if gpu and args.compare_dtype == "bfloat16" else None)
    mesh = partitioning.make_mesh(data=-1, fsdp=1, tensor=1)
    result["jax_backend"] = jax.default_backend()
    time_ours = lambda c: step_benchmark.time_train_step(  # noqa: E731
        coca.CoCaFamily(c), mesh, batch_size, steps=args.steps, warmup=args.warmup,
        profile_dir=args.profile_dir or None)
    try:
        result["ours"] = time_ours(cfg)
    except Exception as e:  # pylint: disable=broad-except  (cuDNN may reject a shape: XLA's attention then)
        if cfg.attention_impl != "cudnn":
            raise
        print(f"cuDNN attention failed ({type(e).__name__}: {str(e)[:300]}); XLA attention instead", file=sys.stderr)
        result["ours"] = time_ours(dataclasses.replace(cfg, attention_impl=None))
        result["ours"]["cudnn_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    ours = result["ours"]["examples_per_sec"]
    for name in [c for c in contenders if c != "ours"]:
        if "examples_per_sec" in result[name]:
            result[f"speedup_vs_{name}"] = ours / result[name]["examples_per_sec"]
            print(f"{args.open_clip_model} batch {batch_size} {args.compare_dtype}: ours {ours:.1f} images/s, "
                  f"{name} {result[name]['examples_per_sec']:.1f} images/s -> {result[f'speedup_vs_{name}']:.2f}x",
                  file=sys.stderr)
    return result
