"""Input-pipeline throughput per CPU core: grain (tar, ArrayRecord) vs a plain tf.data pipeline.

    python -m simvlm_jax.data.data_benchmark [--data_num_images 512]
    (wired as `python -m simvlm_jax.benchmark data`)

All three pipelines do the same work per example, on the same generated data
(synthetic scenes, JPEG, `--data_source_size` px, written as tar shards, as
ArrayRecord by `simvlm_jax.data.convert`, and as TFRecord for tf.data):
read -> JPEG decode -> aspect-preserving bicubic resize of the shorter side to
`--data_image_size` + center crop -> caption SentencePiece tokenization (+EOS) ->
PrefixLM split -> pad -> batch.

* grain: the framework's own path (`tasks.image_text_task` + `pipeline.make_train_iterator`,
  with global shuffling), 1 read thread.
* tf.data: TFRecordDataset -> tf.io.decode_jpeg -> tf.image.resize (bicubic,
  antialias) -> crop -> tensorflow_text SentencepieceTokenizer -> batch, 1 parallel
  call, a private thread pool of 1, shuffle buffer 1024.

"Per core" is images per CPU-second of this process (all its threads) and the wall
rate with one worker thread; the ratio is grain / tf.data on images per CPU-second.
The default source size is 256 px, not 224: at 224 -> 224 PIL's resize is a no-op
copy while TF's is not, which would flatter grain.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Sequence


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data benchmark")
    g.add_argument("--data_num_images", type=int, default=512, help="generated images (data)")
    g.add_argument("--data_passes", type=int, default=2, help="timed passes over them (data)")
    g.add_argument("--data_image_size", type=int, default=224, help="output image size (data)")
    g.add_argument("--data_source_size", type=int, default=256, help="generated JPEG size (data)")
    g.add_argument("--data_batch_size", type=int, default=32, help="batch size (data)")
    g.add_argument("--data_work_dir", default=None, help="where to write the data (default: a temp dir)")


def _arg(args, name, default):
    return getattr(args, name, default) if args is not None else default


def _time(it, num_batches: int, batch_size: int) -> dict[str, float]:
    next(it)  # warm up (first read, thread start)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        next(it)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = num_batches * batch_size
    return {"images": n, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "images_per_s": round(n / wall, 1), "images_per_cpu_s": round(n / cpu, 1)}


def _tf_pipeline(tfrecord: str, spm_path: str, image_size: int, max_prefix_len: int, max_target_len: int,
                 batch_size: int, seed: int = 0):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_text as tftext  # pylint: disable=g-import-not-at-top
    with open(spm_path, "rb") as f:
        tokenizer = tftext.SentencepieceTokenizer(model=f.read(), out_type=tf.int32)
    total = max_prefix_len + max_target_len
    spec = {"jpg": tf.io.FixedLenFeature([], tf.string), "txt": tf.io.FixedLenFeature([], tf.string)}

    def process(serialized):
        ex = tf.io.parse_single_example(serialized, spec)
        img = tf.io.decode_jpeg(ex["jpg"], channels=3)
        h, w = tf.shape(img)[0], tf.shape(img)[1]
        scale = image_size / tf.cast(tf.minimum(h, w), tf.float32)
        nh = tf.maximum(image_size, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
        nw = tf.maximum(image_size, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
        img = tf.image.resize(img, [nh, nw], method="bicubic", antialias=True)
        top, left = (nh - image_size) // 2, (nw - image_size) // 2
        img = tf.image.crop_to_bounding_box(img, top, left, image_size, image_size)
        img = tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)
        tokens = tokenizer.tokenize(ex["txt"])[: total - 1]
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


def run(args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Generates the data, times the three pipelines, prints a table to stderr, returns the figures."""
    num_images = _arg(args, "data_num_images", 512)
    passes = _arg(args, "data_passes", 2)
    image_size = _arg(args, "data_image_size", 224)
    source_size = _arg(args, "data_source_size", 256)
    batch_size = _arg(args, "data_batch_size", 32)
    work_dir = _arg(args, "data_work_dir", None)
    max_prefix_len, max_target_len = 16, 32

    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    for setter in (tf.config.threading.set_inter_op_parallelism_threads,
                   tf.config.threading.set_intra_op_parallelism_threads):
        try:
            setter(1)
        except RuntimeError:  # TF already initialized in this process: tf.data options still apply
            pass
    from simvlm_jax.data import convert, pipeline, sources, synthetic, tasks, tokenizer  # pylint: disable=g-import-not-at-top

    tmp = work_dir or tempfile.mkdtemp(prefix="simvlm_data_bench_")
    try:
        t0 = time.perf_counter()
        synthetic.generate(tmp, image_size=source_size, num_train=num_images, num_heldout=0, num_text=500,
                           samples_per_shard=max(1, num_images // 4))
        tar_glob = os.path.join(tmp, "train", "*.tar")
        tar_src = sources.TarShardSource(tar_glob)
        captions = [tar_src[i]["txt"].decode() for i in range(len(tar_src))]
        with open(os.path.join(tmp, "text", "text-00000.txt"), encoding="utf-8") as f:
            lines = [x.strip() for x in f if x.strip()]
        spm_path = tokenizer.train_sentencepiece(lines + captions, os.path.join(tmp, "spm.model"), vocab_size=256)
        vocab = tokenizer.get_vocabulary(spm_path)
        convert.convert(tar_src, os.path.join(tmp, "ar", "train.array_record"), check_images=False, progress=False)
        tfrecord = os.path.join(tmp, "train.tfrecord")
        with tf.io.TFRecordWriter(tfrecord) as w:
            for i in range(len(tar_src)):
                rec = tar_src[i]
                w.write(tf.train.Example(features=tf.train.Features(feature={
                    "jpg": tf.train.Feature(bytes_list=tf.train.BytesList(value=[rec["jpg"]])),
                    "txt": tf.train.Feature(bytes_list=tf.train.BytesList(value=[rec["txt"]]))}
                )).SerializeToString())
        setup_s = time.perf_counter() - t0

        num_batches = max(1, num_images * passes // batch_size)
        common = dict(image_size=image_size, max_prefix_len=max_prefix_len, max_target_len=max_target_len,
                      vocabulary=vocab)
        tasks.image_text_task(name="_bench_tar", shards={"train": tar_glob}, **common)
        tasks.image_text_task(name="_bench_array_record", source="array_record",
                              shards={"train": os.path.join(tmp, "ar", "*.array_record")}, **common)
        results = {}
        for label, task in (("grain_tar", "_bench_tar"), ("grain_array_record", "_bench_array_record")):
            it = pipeline.make_train_iterator(task, global_batch_size=batch_size, seed=0, num_threads=1,
                                              prefetch_buffer_size=1, process_index=0, process_count=1)
            results[label] = _time(it, num_batches, batch_size)
            del it
            gc.collect()
            time.sleep(0.2)
        it = _tf_pipeline(tfrecord, spm_path, image_size, max_prefix_len, max_target_len, batch_size)
        results["tf_data_tfrecord"] = _time(it, num_batches, batch_size)
        del it
        gc.collect()
    finally:
        if not work_dir:
            shutil.rmtree(tmp, ignore_errors=True)

    base = results["tf_data_tfrecord"]
    ratio = {k: round(v["images_per_cpu_s"] / base["images_per_cpu_s"], 3)
             for k, v in results.items() if k != "tf_data_tfrecord"}
    ratio_wall = {k: round(v["images_per_s"] / base["images_per_s"], 3)
                  for k, v in results.items() if k != "tf_data_tfrecord"}
    out = {"benchmark": "data", "image_size": image_size, "source_image_size": source_size,
           "num_images": num_images, "timed_images": num_batches * batch_size, "batch_size": batch_size,
           "setup_s": round(setup_s, 1), "cpu_count": os.cpu_count(), "results": results,
           "ratio_vs_tf_data": ratio, "ratio_vs_tf_data_wall": ratio_wall}
    print(f"input pipeline, {source_size}px JPEG -> {image_size}px + tokenize + batch {batch_size}, "
          f"{out['timed_images']} images timed, 1 worker thread each", file=sys.stderr)
    print(f"  {'pipeline':<22}{'images/s (wall)':>17}{'images/CPU-s':>15}{'vs tf.data':>12}", file=sys.stderr)
    for k, v in results.items():
        r = f"{ratio[k]:.2f}x" if k in ratio else "1.00x"
        print(f"  {k:<22}{v['images_per_s']:>17.1f}{v['images_per_cpu_s']:>15.1f}{r:>12}", file=sys.stderr)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simvlm_jax.data.data_benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    print(json.dumps(run(parser.parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
