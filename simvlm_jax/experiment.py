"""One experiment = a work dir + data + model + the modes to run; all settings from gin."""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import gin
import jax

from simvlm_jax import checkpointing, evaluate, export, partitioning, train
from simvlm_jax.data import synthetic, tokenizer
from simvlm_jax.models import coca

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
        from simvlm_jax.data import sources  # pylint: disable=g-import-not-at-top
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
def eval_hook_overrides(max_examples: int | None = 256, with_constant_baseline: bool = False) -> dict:
    """Cheaper settings for evals during training (`train.eval_every`)."""
    return {"max_examples": max_examples, "with_constant_baseline": with_constant_baseline}


@gin.configurable
def run(modes: Sequence[str], work_dir: str = gin.REQUIRED, eval_dir: str | None = None,
        export_dir: str | None = None, export_dtype: str | None = None,
        eval_from_export: bool = False, model: str = "simvlm") -> dict[str, Any]:
    """Runs the requested modes in order and returns a JSON-able summary.

    `model`: 'simvlm' (configured by `SimVLMConfig.*`) or 'coca' (`CoCaConfig.*`).
    """
    if model not in train.MODEL_CONFIGS:
        raise ValueError(f"run.model={model!r}; choose one of {sorted(train.MODEL_CONFIGS)}")
    summary: dict[str, Any] = {"work_dir": os.path.abspath(work_dir)}
    eval_dir = eval_dir or os.path.join(work_dir, "eval")
    export_dir = export_dir or os.path.join(work_dir, "export")
    if "prepare" in modes:
        summary.update(prepare_builtin())
    model_config = train.MODEL_CONFIGS[model]()
    vocab = tokenizer.get_vocabulary()
    config_name = type(model_config).__name__
    if model_config.vocab_size < vocab.vocab_size:
        raise ValueError(f"{config_name}.vocab_size={model_config.vocab_size} is smaller than the "
                         f"tokenizer's {vocab.vocab_size} pieces; set {config_name}.vocab_size")
    if isinstance(model_config, coca.CoCaConfig) and model_config.eos_id != vocab.eos_id:
        raise ValueError(f"CoCaConfig.eos_id={model_config.eos_id} but the tokenizer's EOS is {vocab.eos_id}: "
                         f"set CoCaConfig.eos_id={vocab.eos_id} (captions are trained to end with it)")
    mesh = partitioning.make_mesh()
    summary["mesh"] = dict(mesh.shape)
    state = trainer = None
    if "train" in modes:
        register_data()
        eval_model = train.build_model(model_config)

        def eval_during_training(params, step):
            """Captioning eval hook (train.eval_every); images + captions go to TensorBoard."""
            out = evaluate.evaluate_captioning(eval_model, params, vocab, mesh,
                                               os.path.join(eval_dir, f"step_{step}"), **eval_hook_overrides())
            return {**out["metrics"], "samples": out["samples"]}

        result = train.train(work_dir, mesh=mesh, model_config=model_config, eval_fn=eval_during_training)
        state, trainer = result["state"], result["trainer"]
        summary.update(step=result["step"], checkpoint_dir=result["checkpoint_dir"],
                       train_loss=result["metrics"].get("loss"))
    need_params = any(m in modes for m in ("eval", "export"))
    if need_params and state is None and not ("eval" in modes and eval_from_export and "export" not in modes):
        trainer = train.Trainer(model_config, mesh, total_steps=1)
        manager = checkpointing.make_manager(work_dir)
        restored = checkpointing.restore(manager, trainer.abstract_state, None)
        if restored is None:
            raise FileNotFoundError(f"No checkpoint in {manager.directory}; run --mode=train first")
        state, step = restored
        summary.update(step=step, checkpoint_dir=str(manager.directory))
    metrics = None
    if "eval" in modes:
        if eval_from_export:
            model, params, vocab_e = export.load_export(export_dir)
            out = evaluate.evaluate_captioning(model, params, vocab_e, mesh, eval_dir)
        else:
            out = evaluate.evaluate_captioning(trainer.model, state.params, vocab, mesh, eval_dir)
        metrics = out["metrics"]
        summary.update({k: v for k, v in metrics.items()})
        summary["report"] = out.get("report")
        summary["eval_dir"] = os.path.abspath(eval_dir)
    if "export" in modes:
        export.export(state.params, model_config, vocab.sentencepiece_model_file, export_dir,
                      metrics=metrics, dtype=export_dtype, training_gin=gin.config_str(),
                      step=int(jax.device_get(state.step)))
        summary["export_dir"] = os.path.abspath(export_dir)
    return summary
