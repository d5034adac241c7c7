"""Pretraining (SimVLM PrefixLM or CoCa): optimizer, loss, sharded train step, training loop.

The state (params + optimizer state) is created directly in its sharded layout
(`jax.jit(..., out_shardings=...)`), the step is jitted with explicit in/out
shardings and donates the old state, and the loop feeds global `jax.Array`s
assembled from each host's grain batches.
"""
from __future__ import annotations

import logging
import math
import os
import re
import signal
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from simvlm_jax import flops, partitioning
from simvlm_jax.models import coca, layers, simvlm
from simvlm_jax.metric_writer import MetricWriter

log = logging.getLogger("simvlm_jax")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    # Steps whose loss or gradients were NaN/Inf: the update was skipped.
    nonfinite_total: jax.Array = 0
    nonfinite_consecutive: jax.Array = 0


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices/conv kernels only (not norms, biases, embeddings, positions)."""
    def is_kernel(path, _):
        return getattr(path[-1], "key", None) == "kernel"
    return jax.tree_util.tree_map_with_path(is_kernel, params)


@gin.configurable
def make_optimizer(total_steps: int, name: str = "adamw", learning_rate: float = 1e-3,
                   warmup_steps: int = 1000, schedule: str = "cosine", end_lr_fraction: float = 0.0,
                   weight_decay: float = 0.01, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   clip_norm: float | None = 1.0, moment_dtype: str | None = None,
                   frozen: tuple[str, ...] = ()) -> tuple[optax.GradientTransformation, Callable]:
    """Optimizer from gin: 'adamw' or 'adafactor' (CoCa's, with momentum b1), linear warmup
    then `schedule` ('cosine' | 'linear' | 'rsqrt' | 'constant'), global-norm clipping,
    decoupled weight decay on kernels only, `moment_dtype='bfloat16'` for a smaller
    optimizer state, and `frozen`: regexes of param paths ('encoder/.*') that get no
    updates and no optimizer state."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup_steps, 1)
    end_lr = learning_rate * end_lr_fraction
    if schedule == "cosine":
        decay = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_lr_fraction)
    elif schedule == "linear":
        decay = optax.linear_schedule(learning_rate, end_lr, decay_steps)
    elif schedule == "rsqrt":
        decay = lambda step: learning_rate * jax.lax.rsqrt((step + max(warmup_steps, 1)) / max(warmup_steps, 1))
    elif schedule == "constant":
        decay = optax.constant_schedule(learning_rate)
    else:
        raise ValueError(f"make_optimizer.schedule={schedule!r}; use 'cosine', 'linear', 'rsqrt' or 'constant'")
    lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), decay],
                              [warmup_steps])
    if moment_dtype is not None and moment_dtype not in layers.DTYPES:
        raise ValueError(f"make_optimizer.moment_dtype={moment_dtype!r}; use None or one of {sorted(layers.DTYPES)}")
    mu_dtype = layers.DTYPES.get(moment_dtype)
    chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    if name == "adamw":
        chain.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask,
                                 mu_dtype=mu_dtype))
    elif name == "adafactor":
        chain.append(optax.adafactor(lr, decay_rate=b2, momentum=b1, dtype_momentum=mu_dtype or jnp.float32,
                                     weight_decay_rate=weight_decay, weight_decay_mask=decay_mask,
                                     multiply_by_parameter_scale=False, clipping_threshold=None))
    else:
        raise ValueError(f"make_optimizer.name={name!r}; use 'adamw' or 'adafactor'")
    tx = optax.chain(*chain)
    if frozen:
        patterns = [re.compile(p) for p in frozen]
        def label(params):
            return jax.tree_util.tree_map_with_path(
                lambda path, _: "frozen" if any(p.fullmatch(_path_str(path)) for p in patterns) else "train",
                params)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, label)
    return tx, lr


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def prefix_lm_loss(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean token cross-entropy over the target (suffix) tokens; pad (0) is ignored.

    The prefix never reaches the decoder's targets, so it is excluded by
    construction: loss = -E log P(x_{>=Tp} | x_{<Tp}).
    """
    nll_sum, num_tokens, correct = token_stats(logits, targets)
    denom = jnp.maximum(num_tokens, 1.0)
    loss = nll_sum / denom
    return loss, {"loss": loss, "token_accuracy": correct / denom, "num_target_tokens": num_tokens}


def token_stats(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of target-token NLL, number of target tokens, number argmax-correct); pad ignored."""
    weights = (targets > 0).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    correct = ((jnp.argmax(logits, -1) == targets) * weights).sum()
    return (nll * weights).sum(), weights.sum(), correct


ModelConfig = simvlm.SimVLMConfig | coca.CoCaConfig
# `run.model` / `benchmark --model` names -> config classes (gin-configured when called).
MODEL_CONFIGS = {"simvlm": simvlm.SimVLMConfig, "coca": coca.CoCaConfig}


def build_model(config: ModelConfig) -> simvlm.SimVLM | coca.CoCa:
    """The model for a config: `SimVLMConfig` -> SimVLM, `CoCaConfig` -> CoCa."""
    return coca.CoCa(config) if isinstance(config, coca.CoCaConfig) else simvlm.SimVLM(config)


def dummy_batch(config: ModelConfig, batch_size: int = 1) -> dict[str, jax.Array]:
    """The training batch a model reads (names and shapes); other features are dropped."""
    module = coca if isinstance(config, coca.CoCaConfig) else simvlm
    return module.dummy_batch(config, batch_size)


@gin.configurable
def coca_loss_weights(contrastive: float = 1.0, caption: float = 2.0) -> tuple[float, float]:
    """CoCa's lambda_con and lambda_cap (paper: 1.0 and 2.0)."""
    return contrastive, caption


class Trainer:
    """Holds the model, mesh, optimizer and the compiled sharded functions.

    The objective per (micro)batch is `(value, weight, sums)`: gradients of `value`
    are summed over microbatches and divided by the summed `weight`, and so are the
    metric `sums`. SimVLM: value = summed target-token NLL, weight = token count (so
    accumulation equals the big batch exactly). CoCa: value = the microbatch's loss
    (contrastive over the microbatch's global rows + caption CE), weight = 1.
    """

    def __init__(self, model_config: ModelConfig, mesh: jax.sharding.Mesh, total_steps: int,
                 seed: int = 0, microbatches: int | None = None):
        self.config = model_config
        self.microbatches = microbatches or gradient_accumulation()
        self.model = build_model(model_config)
        self.is_coca = isinstance(model_config, coca.CoCaConfig)
        self.loss_weights = coca_loss_weights() if self.is_coca else None
        self.mesh = mesh
        self.rules = partitioning.axis_rules()
        self.seed = seed
        self.tx, self.lr_schedule = make_optimizer(total_steps)

        def init_boxed(rng):
            variables = self.model.init({"params": rng, "dropout": rng}, dummy_batch(model_config))
            params = variables["params"]
            zero = jnp.zeros((), jnp.int32)
            return TrainState(step=zero, params=params, opt_state=self.tx.init(params),
                              nonfinite_total=zero, nonfinite_consecutive=zero)

        with self.activate():
            abstract_boxed = jax.eval_shape(init_boxed, jax.random.key(0))
            self.state_logical_specs = partitioning.logical_specs(abstract_boxed)
            self.state_shardings = partitioning.fit_to_shapes(
                partitioning.logical_to_sharding(self.state_logical_specs, mesh, self.rules),
                nn.meta.unbox(abstract_boxed))
        self.abstract_state = partitioning.abstract_like(nn.meta.unbox(abstract_boxed), self.state_shardings)
        self._init = jax.jit(lambda rng: nn.meta.unbox(init_boxed(rng)), out_shardings=self.state_shardings)
        batch_shardings = {k: partitioning.batch_sharding(mesh, v.ndim)
                           for k, v in dummy_batch(model_config).items()}
        self.batch_shardings = batch_shardings
        self._step = jax.jit(self._train_step,
                             in_shardings=(self.state_shardings, batch_shardings),
                             out_shardings=(self.state_shardings, partitioning.replicated(mesh)),
                             donate_argnums=(0,))

    def activate(self):
        """Context in which logical axis names resolve to this mesh."""
        return partitioning.activate(self.mesh, self.rules)

    def init_state(self) -> TrainState:
        with self.activate():
            return self._init(jax.random.key(self.seed))

    def _objective(self, params, batch, rng) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
        """(value to differentiate, (weight, metric sums)) of one (micro)batch; see the class doc."""
        out = self.model.apply({"params": params}, batch, deterministic=False, rngs={"dropout": rng})
        if not self.is_coca:
            nll_sum, n, correct = token_stats(out, batch["target_tokens"])
            return nll_sum, (n, {"loss": nll_sum, "token_accuracy": correct, "num_target_tokens": n})
        lambda_con, lambda_cap = self.loss_weights
        loss, m = coca.coca_loss(out, batch["target_tokens"], lambda_con=lambda_con, lambda_cap=lambda_cap,
                                 mesh=self.mesh, pad_id=self.config.pad_id)
        return loss, (jnp.ones(()), m)

    def _grads(self, params, batch, rng):
        """Summed gradients, summed weight and metric sums; microbatched with lax.scan if asked."""
        grad_fn = jax.value_and_grad(self._objective, has_aux=True)
        k = self.microbatches
        if k == 1:
            (_, (weight, sums)), grads = grad_fn(params, batch, rng)
            return grads, weight, sums
        # Microbatch i takes rows i::k, so every device keeps an equal share of each one.
        def split(x):
            if x.shape[0] % k:
                raise ValueError(f"global batch {x.shape[0]} is not divisible by gradient_accumulation "
                                 f"microbatches={k}")
            # CoCa's contrastive loss runs under shard_map over the batch shards.
            shards = partitioning.num_batch_shards(self.mesh)
            if self.is_coca and x.shape[0] % (k * shards):
                raise ValueError(f"CoCa: global batch {x.shape[0]} must be divisible by gradient_accumulation."
                                 f"microbatches={k} x the batch shards data*fsdp={shards}")
            x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
            return nn.with_logical_constraint(x, (None, "activation_batch") + (None,) * (x.ndim - 2))
        micro = jax.tree_util.tree_map(split, batch)

        def body(carry, xs):
            acc, w_acc, sums_acc = carry
            i, mb = xs
            (_, (weight, sums)), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
            add = lambda a, b: a + b.astype(a.dtype)
            return (jax.tree_util.tree_map(add, acc, g), w_acc + weight,
                    jax.tree_util.tree_map(add, sums_acc, sums)), None

        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        _, (_, sums_shape) = jax.eval_shape(self._objective, params, first, rng)
        zero_sums = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), sums_shape)
        init = (zeros, jnp.zeros(()), zero_sums)
        (grads, weight, sums), _ = jax.lax.scan(body, init, (jnp.arange(k), micro))
        return grads, weight, sums

    def _train_step(self, state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.key(self.seed + 1), state.step)
        grads, weight, sums = self._grads(state.params, batch, rng)
        denom = jnp.maximum(weight, 1e-9)
        # SimVLM: d(mean NLL over all target tokens of the global batch) = d(sum) / count,
        # equal to the big-batch gradient whatever the number of microbatches.
        grads = jax.tree_util.tree_map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
        # Gradients live exactly where their params live (reduce-scattered under FSDP).
        grads = jax.lax.with_sharding_constraint(grads, self.state_shardings.params)
        means = {k: v / denom for k, v in sums.items() if k != "num_target_tokens"}
        loss = means["loss"]
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # NaN/Inf: keep the old params and optimizer state and count the skip.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
        bad = 1 - finite.astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
            nonfinite_total=state.nonfinite_total + bad,
            nonfinite_consecutive=(state.nonfinite_consecutive + 1) * bad)
        metrics = {**means, "num_target_tokens": sums["num_target_tokens"], "grad_norm": grad_norm, "learning_rate": self.lr_schedule(state.step),
                   "nonfinite_total": new_state.nonfinite_total,
                   "nonfinite_consecutive": new_state.nonfinite_consecutive}
        return new_state, metrics

    def step(self, state: TrainState, batch: dict[str, jax.Array]):
        with self.activate():
            return self._step(state, self.model_inputs(batch))

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The features this model trains on (e.g. CoCa drops the PrefixLM prefix)."""
        missing = [k for k in self.batch_shardings if k not in batch]
        if missing:
            raise KeyError(f"the training batch has no {missing} (has {sorted(batch)}); check the data task")
        return {k: batch[k] for k in self.batch_shardings}


@gin.configurable
def gradient_accumulation(microbatches: int = 1) -> int:
    """Number of microbatches each global batch is split into (lax.scan over them)."""
    if microbatches < 1:
        raise ValueError(f"gradient_accumulation.microbatches={microbatches} must be >= 1")
    return microbatches


class LossSpikeDetector:
    """Flags (and logs) a logged loss above `factor` x the running mean of earlier ones."""

    def __init__(self, factor: float, decay: float = 0.9):
        self.factor, self.decay, self.mean = factor, decay, None

    def update(self, step: int, loss: float) -> bool:
        if not math.isfinite(loss):
            return False
        spike = self.mean is not None and loss > self.factor * self.mean
        if spike:
            log.warning("Loss spike at step %d: %.4f vs running mean %.4f", step, loss, self.mean)
        self.mean = loss if self.mean is None else self.decay * self.mean + (1 - self.decay) * loss
        return spike


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@gin.configurable
def train(work_dir: str, num_steps: int = gin.REQUIRED, global_batch_size: int = gin.REQUIRED,
          seed: int = 0, log_every: int = 50, mesh: jax.sharding.Mesh | None = None,
          model_config: ModelConfig | None = None, max_consecutive_nonfinite: int = 10,
          loss_spike_factor: float = 3.0, profile_steps: tuple[int, int] | None = None,
          eval_every: int = 0, eval_fn: Callable[[Any, int], dict] | None = None,
          init_from: str | None = None, init_include: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Trains for `num_steps`, resuming from the latest checkpoint in `work_dir`.

    A new run (no checkpoint yet) with `init_from=EXPORT_DIR` starts from an export's
    weights (`simvlm_jax.export`): all of them, or only the params whose path matches
    one of the `init_include` regexes (e.g. ('visual/.*',) to fine-tune a new CoCa
    head on a pretrained image encoder); the rest keep their random init.

    Logs loss terms, grad norm, lr, examples/s, tokens/s, step time and MFU every
    `log_every` steps; skips NaN/Inf updates and stops after
    `max_consecutive_nonfinite` in a row; warns when the loss exceeds
    `loss_spike_factor` x its running mean; traces steps [a, b) with the JAX
    profiler if `profile_steps=(a, b)`; calls `eval_fn(params, step)` every
    `eval_every` steps. Returns a summary (final step, last metrics, checkpoint dir).
    """
    # The data and checkpoint stacks (TensorFlow, grain, orbax) load only for training,
    # so the model, Trainer and benchmarks import without them.
    from simvlm_jax import checkpointing  # pylint: disable=g-import-not-at-top
    from simvlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    os.makedirs(work_dir, exist_ok=True)
    model_config = model_config or simvlm.SimVLMConfig()
    mesh = mesh or partitioning.make_mesh()
    if global_batch_size % partitioning.num_batch_shards(mesh):
        raise ValueError(f"train.global_batch_size={global_batch_size} must be divisible by the batch "
                         f"shards data*fsdp={partitioning.num_batch_shards(mesh)} of mesh {dict(mesh.shape)}")
    trainer = Trainer(model_config, mesh, num_steps, seed)
    data_iter = pipeline.make_train_iterator(global_batch_size=global_batch_size, seed=seed)
    manager = checkpointing.make_manager(work_dir)
    writer = MetricWriter(work_dir)

    restored = checkpointing.restore(manager, trainer.abstract_state, data_iter)
    if restored is None:
        state, start = trainer.init_state(), 0
        log.info("Initialized a new model (%s params) on mesh %s", f"{count_params(state.params):,}",
                 dict(mesh.shape))
        if init_from:
            from simvlm_jax import export  # pylint: disable=g-import-not-at-top
            # Adam/Adafactor moments start at zero whatever the params: only params change.
            state = state.replace(params=export.load_params_for_training(init_from, state.params, init_include))
            log.info("Initialized params from the export %s%s", init_from,
                     f" (only {list(init_include)})" if init_include else "")
    else:
        state, start = restored
        log.info("Resumed from %s at step %d", manager.directory, start)
    writer.write_config(gin.config_str(), dict(mesh.shape), count_params(state.params))

    flops_per_example = flops.train_flops_per_example(model_config)
    peak = flops.peak_flops_per_device()
    tokens_per_example = tokens_per_example_of(model_config)

    stop = {"signal": None}
    def on_signal(signum, _):  # preemption: finish the step, checkpoint, exit
        stop["signal"] = signum
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    metrics_host: dict[str, float] = {}
    spikes = LossSpikeDetector(loss_spike_factor)
    t_start, t_window, steps_window = time.time(), time.time(), 0
    step = start
    try:
        for step in range(start, num_steps):
            if profile_steps and step == profile_steps[0]:
                jax.profiler.start_trace(os.path.join(work_dir, "profile"))
            host_batch = next(data_iter)
            if trainer.is_coca:
                check_coca_batch(host_batch)
            batch = partitioning.host_batch_to_global(trainer.model_inputs(host_batch), mesh,
                                                      trainer.batch_shardings)
            state, metrics = trainer.step(state, batch)
            steps_window += 1
            done = step + 1
            if profile_steps and done == profile_steps[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                log.info("Wrote a profiler trace of steps %s to %s/profile", profile_steps, work_dir)
            if done % log_every == 0 or done == num_steps or done == start + 1:
                metrics_host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.time() - t_window
                step_time = elapsed / max(steps_window, 1)
                ex_per_sec = global_batch_size / step_time
                metrics_host.update(step_time_sec=step_time, examples_per_sec=ex_per_sec,
                                    tokens_per_sec=ex_per_sec * tokens_per_example)
                if peak and done != start + 1:
                    metrics_host["mfu"] = flops_per_example * ex_per_sec / (peak * jax.device_count())
                metrics_host.update({f"data/skipped_{k}": v for k, v in pipeline.skipped_counts().items()})
                metrics_host["loss_spike"] = float(spikes.update(done, metrics_host["loss"]))
                writer.write_scalars(done, metrics_host)
                rate = (done - start) / max(time.time() - t_start, 1e-9)
                eta = (num_steps - done) / max(rate, 1e-9)
                mfu = f" | MFU {metrics_host['mfu']:.1%}" if "mfu" in metrics_host else ""
                writer.progress(f"step {done}/{num_steps} loss {metrics_host['loss']:.4f} "
                                f"acc {metrics_host['token_accuracy']:.3f} "
                                f"lr {metrics_host['learning_rate']:.2e} | "
                                f"{ex_per_sec:.0f} ex/s{mfu} | ETA {_fmt_time(eta)}")
                t_window, steps_window = time.time(), 0
                if metrics_host["nonfinite_consecutive"] >= max_consecutive_nonfinite:
                    raise FloatingPointError(
                        f"{int(metrics_host['nonfinite_consecutive'])} consecutive steps with NaN/Inf loss or "
                        f"gradients (last at step {done}); updates were skipped, so the last checkpoint in "
                        f"{manager.directory} is clean. Lower make_optimizer.learning_rate, check the data, "
                        f"or raise train.max_consecutive_nonfinite.")
            checkpointing.save(manager, done, state, data_iter, force=(done == num_steps))
            if eval_fn is not None and eval_every and done % eval_every == 0:
                eval_out = eval_fn(state.params, done)
                writer.write_scalars(done, {f"eval/{k}": v for k, v in eval_out.items()
                                            if isinstance(v, (int, float))})
                for i, sample in enumerate(eval_out.get("samples", [])):
                    writer.write_image(f"eval/sample_{i}", done, sample["image"])
                    writer.write_text(f"eval/sample_{i}", done, f"**{sample['prediction']}**  \n"
                                      + "  \n".join(sample["references"]))
            if stop["signal"] is not None:
                checkpointing.save(manager, done, state, data_iter, force=True)
                log.warning("Received signal %d: saved checkpoint at step %d, exiting.", stop["signal"], done)
                break
    finally:
        manager.wait_until_finished()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        writer.close()
    return {"step": int(jax.device_get(state.step)), "metrics": metrics_host,
            "checkpoint_dir": str(manager.directory), "state": state, "trainer": trainer}


def check_coca_batch(batch: dict[str, Any]) -> None:
    """CoCa reads image + whole caption: text-only rows or a PrefixLM split would silently
    train on blank images or truncated captions, so they are an error."""
    if "has_image" in batch and not np.all(np.asarray(batch["has_image"]) > 0):
        raise ValueError("CoCa training got text-only examples (has_image=0): train CoCa on image-text "
                         "tasks only (e.g. make_train_iterator.mixture_or_task_name = an image_text_task)")
    if "prefix_tokens" in batch and np.any(np.asarray(batch["prefix_tokens"])):
        raise ValueError("CoCa training got PrefixLM prefixes: set the image-text task's max_prefix_len=0 "
                         "(or text_prefix_prob=0) so the whole caption is the target")


def tokens_per_example_of(cfg: ModelConfig) -> int:
    """Image tokens + text tokens one training example feeds the model (for tokens/s)."""
    if isinstance(cfg, coca.CoCaConfig):
        return cfg.num_patches + cfg.max_text_len + 1
    return cfg.num_image_tokens + cfg.max_prefix_len + cfg.max_target_len


def count_params(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
