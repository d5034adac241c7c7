"""One experiment = a work dir + data + model + the modes to run; all settings from gin."""
from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any, Sequence

import gin
import jax
from etils import epath

from simvlm_jax import (checkpointing, convert_open_clip, evaluate, export, metric_writer, partitioning, storage,
                        train)
from simvlm_jax.cli import UserError
from simvlm_jax.data import pipeline, sources, synthetic, tasks, tokenizer  # noqa: F401  (gin configurables)
from simvlm_jax.models import registry

log = logging.getLogger("simvlm_jax")


@gin.configurable
def path_join(base: str = gin.REQUIRED, path: str = gin.REQUIRED) -> str:
    """gin helper: `x = @scope/path_join()` with `scope/path_join.base = %DATA_DIR`."""
    return os.path.join(base, path)


@gin.configurable
def prepare_builtin(data_dir: str = gin.REQUIRED, seed: int = 0, num_train: int = 8000,
                    num_heldout: int = 500, num_text: int = 20000, image_size: int = 64,
                    vocab_size: int = 256, vocab_path: str | None = None, num_interleaved: int = 200,
                    num_interleaved_validation: int = 40) -> dict[str, Any]:
    """Writes the built-in synthetic shards, the interleaved documents (Flamingo; 0 + 0: none)
    and trains the SentencePiece model on the text corpus + training captions. Skips whatever
    already exists (a data dir from before the interleaved documents gains them)."""
    manifest_path = os.path.join(data_dir, "manifest.json")
    if not os.path.exists(manifest_path):
        log.info("Generating built-in data in %s", data_dir)
        synthetic.generate(data_dir, seed=seed, num_train=num_train, num_heldout=num_heldout,
                           num_text=num_text, image_size=image_size)
    if (num_interleaved or num_interleaved_validation) and \
            not os.path.exists(os.path.join(data_dir, "interleaved", "manifest.json")):
        log.info("Generating built-in interleaved documents in %s", data_dir)
        synthetic.generate_interleaved(data_dir, seed=seed, num_train=num_interleaved,
                                       num_validation=num_interleaved_validation, image_size=image_size)
    vocab_path = vocab_path or os.path.join(data_dir, "spm.model")
    if not os.path.exists(vocab_path):
        texts = []
        for path in sources.expand_paths(os.path.join(data_dir, "text", "*.txt")):
            with open(path, encoding="utf-8") as f:
                texts.extend(line.strip() for line in f if line.strip())
        train_src = sources.TarShardSource(os.path.join(data_dir, "train", "*.tar"))
        texts.extend(train_src[i]["txt"].decode("utf-8") for i in range(len(train_src)))
        tokenizer.train_sentencepiece(texts, vocab_path, vocab_size=vocab_size)
        log.info("Trained SentencePiece (%d pieces requested) -> %s", vocab_size, vocab_path)
    return {"data_dir": data_dir, "vocab_path": vocab_path}


@gin.configurable
def register_data(registrations: Sequence[Any] = ()) -> list[Any]:
    """Evaluates the gin references that register seqio tasks/mixtures, e.g.
    `register_data.registrations = [@register_builtin()]`."""
    return list(registrations)


def eval_name(step: int | None, max_examples: int | None = None, from_export: bool = False) -> str:
    """The eval's directory name: its data (evaluate_captioning's annotations file + split,
    shards glob or gin scope), decoding and checkpoint step, e.g. 'heldout_step1200',
    'dataset_coco-test_beam3_step5000' -- so evals of other data or steps never overwrite."""
    bindings = gin.get_bindings("evaluate_captioning")
    if bindings.get("annotations_json"):
        name = os.path.splitext(os.path.basename(str(bindings["annotations_json"])))[0]
        name += f"-{bindings['split']}" if bindings.get("split") else ""
    else:
        shards = bindings.get("shards", "")
        scopes = getattr(shards, "scopes", None)  # `@heldout/path_join()`: the gin scope names it
        if scopes:
            name = scopes[-1]
        else:
            parts = [p for p in str(shards).replace("\\", "/").split("/") if p and not any(c in p for c in "*?[")]
            name = parts[-1] if parts else "eval"
            name = os.path.splitext(name)[0] if name.endswith(".tar") else name
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "eval"
    if int(bindings.get("num_beams", 1)) > 1:
        name += f"_beam{bindings['num_beams']}"
    name += "_export" if from_export else ""
    name += f"_step{step}" if step is not None else ""
    max_examples = max_examples or bindings.get("max_examples")  # a subset is named as one
    return name + (f"_first{max_examples}" if max_examples else "")


def unused_dir(path: str) -> str:
    """`path`, or `path-2`, `path-3`, ... if it exists: an eval never replaces another's files.
    `path` may be a URL (gs://...): there, a directory exists if any object is under it."""
    candidate, n = path, 1
    while epath.Path(candidate).exists():
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def latest_eval_metrics(eval_root: str, step: int | None) -> dict[str, Any] | None:
    """The metrics of the most recent full eval of checkpoint `step` under `eval_root` (for the
    model card of an export made without an eval in the same command)."""
    found = []
    root = epath.Path(eval_root)
    paths = sorted(str(p) for p in root.glob("*/metrics.json")) if root.exists() else []  # none: no evals yet
    for path in paths:
        info = json.loads(storage.read_text(path))
        if info.get("step") == step and info.get("metrics", {}).get("num_images") and \
                "_first" not in os.path.basename(os.path.dirname(path)):
            found.append((storage.mtime(path), path, info))
    if not found:
        return None
    _, path, info = max(found, key=lambda t: t[0])
    return {**info["metrics"], "eval_dir": os.path.dirname(path)}


@gin.configurable
def run(modes: Sequence[str], work_dir: str = gin.REQUIRED, eval_dir: str | None = None,
        export_dir: str | None = None, export_dtype: str | None = None, export_open_clip: bool = False,
        eval_from_export: bool = False, eval_every_max_examples: int | None = 256) -> dict[str, Any]:
    """Runs the requested modes in order and returns a JSON-able summary.

    The model is the gin-selected family (`model_family.name`, set by gin/models/*.gin).
    Each eval writes to its own directory, `eval_dir` or `WORK_DIR/eval/<data>_step<N>`
    (`eval_name`); its metrics are appended to metrics.jsonl / TensorBoard at the checkpoint's
    step. `export_open_clip=True` adds open_clip's files to the export (open_clip-compatible
    CoCa). Evals during training (`train.eval_every`) use the first `eval_every_max_examples`
    examples and skip the constant-caption baseline.
    """
    summary: dict[str, Any] = {"work_dir": storage.display_path(work_dir)}
    eval_root = os.path.join(work_dir, "eval")
    metrics_jsonl = os.path.join(work_dir, "metrics.jsonl")  # the report's loss curve
    export_dir = export_dir or os.path.join(work_dir, "export")
    # Config mistakes fail before any compute (a writer checks what it can represent when created).
    family = registry.model_family()
    writers = [convert_open_clip.OpenClipWriter(family.config)] if export_open_clip and "export" in modes else []
    if "prepare" in modes:
        if "data_dir" not in gin.get_bindings("prepare_builtin"):
            raise UserError("--mode=prepare builds the built-in data (include 'data/builtin.gin' and set "
                            "DATA_DIR); for your own data, make its tokenizer with `python -m "
                            "simvlm_jax.data.tokenizer --input ... --vocab_size ... --output ...` and drop prepare")
        summary.update(prepare_builtin())
    vocab = tokenizer.get_vocabulary()
    family.check_vocabulary(vocab)
    mesh = partitioning.make_mesh()
    summary["mesh"] = dict(mesh.shape)
    log.info("process %d of %d (%s): %d local devices, mesh %s", jax.process_index(), jax.process_count(),
             socket.gethostname(), jax.local_device_count(), dict(mesh.shape))
    params = step = None
    if "train" in modes:
        register_data()

        def eval_during_training(params, step):
            """Captioning eval hook (train.eval_every); images + captions go to TensorBoard."""
            out_dir = unused_dir(os.path.join(eval_root, eval_name(step, eval_every_max_examples)))
            out = evaluate.evaluate_captioning(family, params, vocab, mesh, out_dir,
                                               max_examples=eval_every_max_examples, with_constant_baseline=False,
                                               step=step, metrics_jsonl=metrics_jsonl)
            return {**out["metrics"], "samples": out["samples"]}

        result = train.train(work_dir, mesh=mesh, model=family, eval_fn=eval_during_training)
        params, step = result["state"].params, result["step"]
        summary.update(step=step, checkpoint_dir=result["checkpoint_dir"], train_loss=result["metrics"].get("loss"))
    need_params = any(m in modes for m in ("eval", "export"))
    if need_params and params is None and not ("eval" in modes and eval_from_export and "export" not in modes):
        trainer = train.Trainer(family, mesh, train.make_optimizer(1), rules=partitioning.axis_rules())
        manager = checkpointing.make_manager(work_dir)
        restored = checkpointing.restore(manager, trainer.abstract_state, None)
        if restored is None:
            raise FileNotFoundError(f"No checkpoint in {manager.directory}; run --mode=train first")
        state, step = restored
        params = state.params
        summary.update(step=step, checkpoint_dir=str(manager.directory))
    metrics = None
    if "eval" in modes:
        if eval_from_export:
            step = export.read_export_info(export_dir).get("step", step)
        out_dir = eval_dir or unused_dir(os.path.join(eval_root, eval_name(step, from_export=eval_from_export)))
        report_info = dict(step=step, metrics_jsonl=metrics_jsonl, run_info={
            "checkpoint": export_dir if eval_from_export else summary["checkpoint_dir"]})
        if eval_from_export:
            model, export_params, vocab_e = export.load_export(export_dir)
            out = evaluate.evaluate_captioning(model, export_params, vocab_e, mesh, out_dir, **report_info)
        else:
            out = evaluate.evaluate_captioning(family, params, vocab, mesh, out_dir, **report_info)
        metrics = out["metrics"]
        _record_eval(work_dir, step, metrics)
        summary.update(dict(metrics.items()))
        summary["report"] = out.get("report")
        summary["eval_dir"] = storage.display_path(out_dir)
        log.info("eval: results in %s", storage.display_path(out_dir))
    if "export" in modes:
        if metrics is None:
            metrics = latest_eval_metrics(eval_root, step)
            if metrics is None:
                log.info("export: no eval of checkpoint %s in %s; the model card has no metrics "
                         "(run --mode=eval,export to include them)", step, eval_root)
        export.export(params, family.config, vocab, export_dir,
                      metrics=metrics, dtype=export_dtype, training_gin=gin.config_str(),
                      step=int(step), writers=writers)
        summary["export_dir"] = storage.display_path(export_dir)
        log.info("export: checkpoint %s -> %s", step, storage.display_path(export_dir))
    return summary


def _record_eval(work_dir: str, step: int | None, metrics: dict[str, Any]) -> None:
    """Appends an eval's scalars to the run's metrics.jsonl and TensorBoard at its checkpoint's
    step (its metrics.json already holds the step: evaluate_captioning writes it)."""
    if step is None or jax.process_index() != 0:
        return
    writer = metric_writer.MetricWriter(work_dir)
    scalars = {f"eval/{k}": float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    writer.write_scalars(int(step), scalars)
    writer.close()
