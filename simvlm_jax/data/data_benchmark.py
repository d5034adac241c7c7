"""Input-pipeline throughput per CPU core: grain (tar, ArrayRecord) vs a plain tf.data pipeline.

    python -m simvlm_jax.benchmark data [--data_num_images 512]   (options: benchmark.add_data_args)

All the pipelines do the same work per example, on the same generated data
(synthetic scenes, JPEG, `--data_source_size` px, written as tar shards, as
ArrayRecord by `simvlm_jax.data.convert`, and as TFRecord for tf.data):
read -> JPEG decode -> aspect-preserving bicubic resize of the shorter side to
`--data_image_size` + center crop -> caption SentencePiece tokenization (+EOS) ->
PrefixLM split -> pad -> batch.

* grain: the framework's own path (`tasks.image_text_task` + `pipeline.make_train_iterator`,
  with global shuffling), 1 read thread. JPEG decode by simplejpeg (libjpeg-turbo,
  pixel-identical to PIL), antialiased Catmull-Rom resize (= PIL BICUBIC) of the
  crop box by cykooz_resizer (`preprocessors` module docstring).
* grain_tar_pil: the same with `DecodeImage(fast=False)`: PIL decode + PIL resize, i.e.
  the image path before the fast one, and what runs where those packages are missing.
* tf.data: TFRecordDataset -> tf.io.decode_jpeg -> tf.image.resize (bicubic,
  antialias) -> crop -> tensorflow_text SentencepieceTokenizer -> batch, 1 parallel
  call, a private thread pool of 1, shuffle buffer 1024. decode_jpeg keeps its default
  (the faster, less exact INTEGER_FAST IDCT; ours is libjpeg-turbo's accurate default).

Both sides may decode JPEGs at 1/2, 1/4, 1/8 scale in the DCT domain when the source
is that many times the target (PIL draft / TF `ratio`): at the default 256 -> 224
neither does, so the numbers are full decodes. The grain side resizes only the
center-crop box (same output grid as resize-then-crop); with square sources that is
the whole image, as on the tf.data side.

"Per core" is images per CPU-second of this process (all its threads) and the wall
rate with one worker thread; the ratio is grain / tf.data on images per CPU-second.
The pipelines are timed in turn for `--data_rounds` rounds (pausing between windows so
one pipeline's prefetching is not billed to the next) and each figure is the median
over rounds, which keeps load from other processes from favouring whichever ran in a
quiet moment. Also reported: per-stage CPU time per image, the PSNR of grain's images
against tf.data's (end to end, and resize only: `tf.image.resize` given our decoded
pixels), and the cores that feed SimVLM-Base on one H100.
The default source size is 256 px, not 224: at 224 -> 224 PIL's resize is a no-op
copy while TF's is not, which would flatter grain.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_text as tftext

from simvlm_jax.data import convert, pipeline, sources, synthetic, tasks, tokenizer
from simvlm_jax.data import preprocessors as pp

# SimVLM-Base's measured training rate on one H100 (README, "Scaling out": cuDNN attention,
# bf16, batch 256): the input rate one GPU consumes.
H100_SIMVLM_BASE_EXAMPLES_PER_S = 1090


def _arg(args, name, default):
    return getattr(args, name, default) if args is not None else default


def _time(it, num_batches: int, batch_size: int) -> dict[str, float]:
    """One timing window of `num_batches` batches (the iterator is already warm)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        next(it)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    time.sleep(0.5)  # let background prefetch finish outside every timing window
    n = num_batches * batch_size
    return {"wall_s": wall, "cpu_s": cpu, "images_per_s": n / wall, "images_per_cpu_s": n / cpu}


def _median_rounds(rounds: list[dict[str, float]], images: int) -> dict[str, Any]:
    """Median over rounds of each rate, and every round's images/CPU-s."""
    med = {k: statistics.median(r[k] for r in rounds) for k in ("images_per_s", "images_per_cpu_s")}
    return {"images": images, "rounds": len(rounds),
            "images_per_s": round(med["images_per_s"], 1), "images_per_cpu_s": round(med["images_per_cpu_s"], 1),
            "images_per_cpu_s_by_round": [round(r["images_per_cpu_s"], 1) for r in rounds]}


def _per_image_us(fn: Callable[[Any], Any], items: Sequence[Any], repeats: int = 3) -> float:
    """Best-of-`repeats` CPU microseconds per item of fn."""
    best = math.inf
    for _ in range(repeats):
        c0 = time.process_time()
        for x in items:
            fn(x)
        best = min(best, time.process_time() - c0)
    return round(best / len(items) * 1e6, 1)


def _stage_times(records: Sequence[dict[str, Any]], image_size: int, vocab) -> dict[str, float]:
    """CPU us per image of each stage of the grain path, fast and PIL variants."""
    jpgs = [r["jpg"] for r in records]
    arrays = [pp.decode_image(j, min_size=image_size) for j in jpgs]
    tok = pp.Tokenize(vocab, 48)
    return {
        "decode_simplejpeg": _per_image_us(lambda j: pp.decode_image(j, min_size=image_size), jpgs),
        "decode_pil": _per_image_us(lambda j: pp.decode_image(j, min_size=image_size, fast=False), jpgs),
        "resize_crop_cykooz": _per_image_us(lambda a: pp.resize_center_crop(a, image_size), arrays),
        "resize_crop_pil": _per_image_us(lambda a: pp.resize_center_crop(a, image_size, fast=False), arrays),
        "clean_tokenize": _per_image_us(lambda r: tok.map(pp.CleanCaption().map({"text": r["txt"]})), records),
    }


def _psnr(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    mse = float(np.mean([np.mean((x.astype(np.float64) - y) ** 2) for x, y in zip(a, b)]))
    return round(10 * math.log10(255.0 ** 2 / mse), 2) if mse > 0 else math.inf


def _quality(records: Sequence[dict[str, Any]], image_size: int) -> dict[str, float]:
    """PSNR (dB) of grain's images (fast and PIL paths) against tf.data's: end to end (each side
    decodes), and resize only (tf.image.resize given the pixels our decoder produced)."""
    ours = {name: [pp.DecodeImage(image_size, fast=fast).map(r)["image"] for r in records]
            for name, fast in (("grain", True), ("grain_pil", False))}
    tf_end_to_end = [_tf_image(r["jpg"], image_size).numpy() for r in records]
    tf_resize = [_tf_resize_crop(tf.constant(pp.decode_image(r["jpg"], min_size=image_size)), image_size).numpy()
                 for r in records]
    out = {f"{name}_end_to_end": _psnr(imgs, tf_end_to_end) for name, imgs in ours.items()}
    out.update({f"{name}_resize": _psnr(imgs, tf_resize) for name, imgs in ours.items()})
    return out


def _tf_image(jpeg, image_size: int):
    """tf.data's image work: decode, bicubic antialiased resize of the shorter side, center crop, uint8."""
    return _tf_resize_crop(tf.io.decode_jpeg(jpeg, channels=3), image_size)


def _tf_resize_crop(img, image_size: int):
    h, w = tf.shape(img)[0], tf.shape(img)[1]
    scale = image_size / tf.cast(tf.minimum(h, w), tf.float32)
    nh = tf.maximum(image_size, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
    nw = tf.maximum(image_size, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
    img = tf.image.resize(img, [nh, nw], method="bicubic", antialias=True)
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    img = tf.image.crop_to_bounding_box(img, top, left, image_size, image_size)
    return tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)


def _pil_task(name: str, like: str, image_size: int) -> str:
    """Registers `name`: task `like` with a PIL-only image decoder (DecodeImage(fast=False))."""
    task = seqio.get_mixture_or_task(like)
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add_provider(name, seqio.Task(
        name, source=task.source, output_features=task.output_features,
        preprocessors=[pp.DecodeImage(image_size, fast=False), *task.preprocessors[1:]],
        shuffle_buffer_size=None))
    return name


def _tf_pipeline(tfrecord: str, spm_path: str, image_size: int, max_prefix_len: int, max_target_len: int,
                 batch_size: int, seed: int = 0):
    with open(spm_path, "rb") as f:
        sp_tokenizer = tftext.SentencepieceTokenizer(model=f.read(), out_type=tf.int32)
    total = max_prefix_len + max_target_len
    spec = {"jpg": tf.io.FixedLenFeature([], tf.string), "txt": tf.io.FixedLenFeature([], tf.string)}

    def process(serialized):
        ex = tf.io.parse_single_example(serialized, spec)
        img = _tf_image(ex["jpg"], image_size)
        tokens = sp_tokenizer.tokenize(ex["txt"])[: total - 1]
        tokens = tf.concat([tokens, [1]], 0)
        n = tf.size(tokens)
        max_k = tf.minimum(max_prefix_len, n - 1)
        min_k = tf.maximum(0, n - max_target_len)
        use_prefix = (tf.random.uniform([]) < 0.5) & (max_k >= 1)
        k_rand = tf.random.uniform([], tf.maximum(min_k, 1), tf.maximum(max_k, 1) + 1, dtype=tf.int32)
        k = tf.where(use_prefix, k_rand, min_k)
        prefix = tf.pad(tokens[:k], [[0, max_prefix_len - k]])
        target = tokens[k:][:max_target_len]
        target = tf.pad(target, [[0, max_target_len - tf.size(target)]])
        return {"image": img, "has_image": tf.constant(1, tf.int32),
                "prefix_tokens": tf.ensure_shape(prefix, [max_prefix_len]),
                "target_tokens": tf.ensure_shape(target, [max_target_len])}

    ds = tf.data.TFRecordDataset(tfrecord).shuffle(1024, seed=seed).repeat()
    ds = ds.map(process, num_parallel_calls=1).batch(batch_size, drop_remainder=True).prefetch(1)
    opts = tf.data.Options()
    opts.threading.private_threadpool_size = 1
    opts.threading.max_intra_op_parallelism = 1
    opts.autotune.enabled = False
    return ds.with_options(opts).as_numpy_iterator()


def _prepare(tmp: str, num_images: int, source_size: int) -> dict[str, Any]:
    """Writes the benchmark data: tar shards, ArrayRecord, TFRecord and a SentencePiece model."""
    synthetic.generate(tmp, image_size=source_size, num_train=num_images, num_heldout=0, num_text=500,
                       samples_per_shard=max(1, num_images // 4))
    tar_glob = os.path.join(tmp, "train", "*.tar")
    tar_src = sources.TarShardSource(tar_glob)
    records = [tar_src[i] for i in range(len(tar_src))]
    with open(os.path.join(tmp, "text", "text-00000.txt"), encoding="utf-8") as f:
        lines = [x.strip() for x in f if x.strip()]
    spm_path = tokenizer.train_sentencepiece(lines + [r["txt"].decode() for r in records],
                                             os.path.join(tmp, "spm.model"), vocab_size=256)
    convert.convert(tar_src, os.path.join(tmp, "ar", "train.array_record"), check_images=False, progress=False)
    tfrecord = os.path.join(tmp, "train.tfrecord")
    with tf.io.TFRecordWriter(tfrecord) as w:
        for rec in records:
            w.write(tf.train.Example(features=tf.train.Features(feature={
                "jpg": tf.train.Feature(bytes_list=tf.train.BytesList(value=[rec["jpg"]])),
                "txt": tf.train.Feature(bytes_list=tf.train.BytesList(value=[rec["txt"]]))}
            )).SerializeToString())
    return {"tar_glob": tar_glob, "ar_glob": os.path.join(tmp, "ar", "*.array_record"), "tfrecord": tfrecord,
            "spm_path": spm_path, "vocab": tokenizer.get_vocabulary(spm_path), "records": records}


def run(args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Generates the data, times the pipelines, prints a table to stderr, returns the figures."""
    num_images = _arg(args, "data_num_images", 512)
    passes = _arg(args, "data_passes", 2)
    num_rounds = max(1, _arg(args, "data_rounds", 3))
    image_size = _arg(args, "data_image_size", 224)
    source_size = _arg(args, "data_source_size", 256)
    batch_size = _arg(args, "data_batch_size", 32)
    work_dir = _arg(args, "data_work_dir", None)
    max_prefix_len, max_target_len = 16, 32

    for setter in (tf.config.threading.set_inter_op_parallelism_threads,
                   tf.config.threading.set_intra_op_parallelism_threads):
        try:
            setter(1)
        except RuntimeError:  # TF already initialized in this process: tf.data options still apply
            pass

    tmp = work_dir or tempfile.mkdtemp(prefix="simvlm_data_bench_")
    try:
        t0 = time.perf_counter()
        data = _prepare(tmp, num_images, source_size)
        setup_s = time.perf_counter() - t0
        num_batches = max(1, num_images * passes // batch_size)
        common = dict(image_size=image_size, max_prefix_len=max_prefix_len, max_target_len=max_target_len,
                      vocabulary=data["vocab"])
        tasks.image_text_task(name="_bench_tar", shards={"train": data["tar_glob"]}, **common)
        tasks.image_text_task(name="_bench_array_record", source="array_record",
                              shards={"train": data["ar_glob"]}, **common)
        _pil_task("_bench_tar_pil", "_bench_tar", image_size)

        def grain_iter(task):
            return pipeline.make_train_iterator(task, global_batch_size=batch_size, seed=0, num_threads=1,
                                                prefetch_buffer_size=1, process_index=0, process_count=1)
        iters = {"grain_tar": grain_iter("_bench_tar"),
                 "grain_array_record": grain_iter("_bench_array_record"),
                 "grain_tar_pil": grain_iter("_bench_tar_pil"),
                 "tf_data_tfrecord": _tf_pipeline(data["tfrecord"], data["spm_path"], image_size,
                                                  max_prefix_len, max_target_len, batch_size)}
        for it in iters.values():
            next(it)  # warm up: first reads, thread start, tf.data's shuffle buffer
        time.sleep(0.5)
        rounds: dict[str, list] = {k: [] for k in iters}
        for _ in range(num_rounds):
            for label, it in iters.items():
                rounds[label].append(_time(it, num_batches, batch_size))
        del iters
        gc.collect()
        results = {k: _median_rounds(v, num_batches * batch_size) for k, v in rounds.items()}

        psnr = _quality(data["records"], image_size)
        stages = _stage_times(data["records"], image_size, data["vocab"])
    finally:
        if not work_dir:
            shutil.rmtree(tmp, ignore_errors=True)
    return _report(results, psnr, stages, image_size=image_size, source_size=source_size, num_images=num_images,
                   timed_images=num_batches * batch_size, batch_size=batch_size, setup_s=setup_s)


def _report(results: dict[str, dict], psnr: dict[str, float], stages: dict[str, float],
            **info: Any) -> dict[str, Any]:
    """Prints the table to stderr; returns the JSON summary."""
    base = results["tf_data_tfrecord"]
    ratio = {k: round(v["images_per_cpu_s"] / base["images_per_cpu_s"], 3)
             for k, v in results.items() if k != "tf_data_tfrecord"}
    ratio_wall = {k: round(v["images_per_s"] / base["images_per_s"], 3)
                  for k, v in results.items() if k != "tf_data_tfrecord"}
    rate = results["grain_array_record"]["images_per_cpu_s"]
    cores = math.ceil(H100_SIMVLM_BASE_EXAMPLES_PER_S / rate)
    out = {"benchmark": "data", **info, "setup_s": round(info["setup_s"], 1), "cpu_count": os.cpu_count(),
           "results": results, "ratio_vs_tf_data": ratio, "ratio_vs_tf_data_wall": ratio_wall,
           "psnr_vs_tf_data_db": psnr, "stage_cpu_us_per_image": stages,
           "cores_per_h100_simvlm_base": cores}
    print(f"input pipeline, {info['source_size']}px JPEG -> {info['image_size']}px + tokenize + batch "
          f"{info['batch_size']}, {info['timed_images']} images x {base['rounds']} rounds timed (median), "
          f"1 worker thread each", file=sys.stderr)
    print(f"  {'pipeline':<22}{'images/s (wall)':>17}{'images/CPU-s':>15}{'vs tf.data':>12}", file=sys.stderr)
    for k, v in results.items():
        r = f"{ratio[k]:.2f}x" if k in ratio else "1.00x"
        print(f"  {k:<22}{v['images_per_s']:>17.1f}{v['images_per_cpu_s']:>15.1f}{r:>12}", file=sys.stderr)
    print(f"  PSNR vs tf.data's images (dB), end to end / resize only: grain {psnr['grain_end_to_end']} / "
          f"{psnr['grain_resize']}, grain_pil {psnr['grain_pil_end_to_end']} / {psnr['grain_pil_resize']}",
          file=sys.stderr)
    print("  CPU us/image: " + ", ".join(f"{k} {v}" for k, v in stages.items()), file=sys.stderr)
    print(f"  SimVLM-Base on one H100 takes {H100_SIMVLM_BASE_EXAMPLES_PER_S} examples/s: "
          f"{cores} cores at {rate:.0f} images/CPU-s (grain_array_record)", file=sys.stderr)
    return out
