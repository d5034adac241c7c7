"""One experiment = a work dir + data + model + the modes to run; all settings from gin."""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import gin

from simvlm_jax import checkpointing, convert_open_clip, evaluate, export, partitioning, train
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
                    vocab_size: int = 256, vocab_path: str | None = None) -> dict[str, Any]:
    """Writes the built-in synthetic shards and trains the SentencePiece model on the
    text corpus + training captions. Skips whatever already exists."""
    manifest_path = os.path.join(data_dir, "manifest.json")
    if not os.path.exists(manifest_path):
        log.info("Generating built-in data in %s", data_dir)
        synthetic.generate(data_dir, seed=seed, num_train=num_train, num_heldout=num_heldout,
                           num_text=num_text, image_size=image_size)
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


@gin.configurable
def run(modes: Sequence[str], work_dir: str = gin.REQUIRED, eval_dir: str | None = None,
        export_dir: str | None = None, export_dtype: str | None = None, export_open_clip: bool = False,
        eval_from_export: bool = False, eval_every_max_examples: int | None = 256) -> dict[str, Any]:
    """Runs the requested modes in order and returns a JSON-able summary.

    The model is the gin-selected family (`model_family.name`, set by gin/models/*.gin).
    `export_open_clip=True` adds open_clip's files to the export (open_clip-compatible CoCa).
    Evals during training (`train.eval_every`) use the first `eval_every_max_examples`
    examples and skip the constant-caption baseline.
    """
    summary: dict[str, Any] = {"work_dir": os.path.abspath(work_dir)}
    eval_dir = eval_dir or os.path.join(work_dir, "eval")
    export_dir = export_dir or os.path.join(work_dir, "export")
    # Config mistakes fail before any compute (a writer checks what it can represent when created).
    family = registry.model_family()
    writers = [convert_open_clip.OpenClipWriter(family.config)] if export_open_clip and "export" in modes else []
    if "prepare" in modes:
        summary.update(prepare_builtin())
    vocab = tokenizer.get_vocabulary()
    family.check_vocabulary(vocab)
    mesh = partitioning.make_mesh()
    summary["mesh"] = dict(mesh.shape)
    params = step = None
    if "train" in modes:
        register_data()

        def eval_during_training(params, step):
            """Captioning eval hook (train.eval_every); images + captions go to TensorBoard."""
            out = evaluate.evaluate_captioning(family, params, vocab, mesh, os.path.join(eval_dir, f"step_{step}"),
                                               max_examples=eval_every_max_examples, with_constant_baseline=False)
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
            model, export_params, vocab_e = export.load_export(export_dir)
            out = evaluate.evaluate_captioning(model, export_params, vocab_e, mesh, eval_dir)
        else:
            out = evaluate.evaluate_captioning(family, params, vocab, mesh, eval_dir)
        metrics = out["metrics"]
        summary.update(dict(metrics.items()))
        summary["report"] = out.get("report")
        summary["eval_dir"] = os.path.abspath(eval_dir)
    if "export" in modes:
        export.export(params, family.config, vocab.sentencepiece_model_file, export_dir,
                      metrics=metrics, dtype=export_dtype, training_gin=gin.config_str(),
                      step=int(step), writers=writers)
        summary["export_dir"] = os.path.abspath(export_dir)
    return summary
