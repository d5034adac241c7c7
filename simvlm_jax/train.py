"""PrefixLM pretraining: optimizer, loss, sharded train step and the training loop.

The state (params + optimizer state) is created directly in its sharded layout
(`jax.jit(..., out_shardings=...)`), the step is jitted with explicit in/out
shardings and donates the old state, and the loop feeds global `jax.Array`s
assembled from each host's grain batches.
"""
from __future__ import annotations

import functools
import json
import logging
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

from simvlm_jax import checkpointing, partitioning
from simvlm_jax.data import pipeline
from simvlm_jax.models import simvlm
from simvlm_jax.metric_writer import MetricWriter

log = logging.getLogger("simvlm_jax")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


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
    mu_dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, None: None}.get(moment_dtype, "bad")
    if isinstance(mu_dtype, str):
        raise ValueError(f"make_optimizer.moment_dtype={moment_dtype!r}; use None, 'float32' or 'bfloat16'")
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
    weights = (targets > 0).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    num_tokens = weights.sum()
    denom = jnp.maximum(num_tokens, 1.0)
    loss = (nll * weights).sum() / denom
    accuracy = ((jnp.argmax(logits, -1) == targets) * weights).sum() / denom
    return loss, {"loss": loss, "token_accuracy": accuracy, "num_target_tokens": num_tokens}


class Trainer:
    """Holds the model, mesh, optimizer and the compiled sharded functions."""

    def __init__(self, model_config: simvlm.SimVLMConfig, mesh: jax.sharding.Mesh, total_steps: int,
                 seed: int = 0):
        self.config = model_config
        self.model = simvlm.SimVLM(model_config)
        self.mesh = mesh
        self.rules = partitioning.axis_rules()
        self.seed = seed
        self.tx, self.lr_schedule = make_optimizer(total_steps)

        def init_boxed(rng):
            variables = self.model.init({"params": rng, "dropout": rng}, simvlm.dummy_batch(model_config))
            params = variables["params"]
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

        with self.activate():
            abstract_boxed = jax.eval_shape(init_boxed, jax.random.key(0))
            self.state_logical_specs = nn.get_partition_spec(abstract_boxed)
            self.state_shardings = partitioning.logical_to_sharding(self.state_logical_specs, mesh, self.rules)
        self.abstract_state = checkpointing.abstract_like(nn.meta.unbox(abstract_boxed), self.state_shardings)
        self._init = jax.jit(lambda rng: nn.meta.unbox(init_boxed(rng)), out_shardings=self.state_shardings)
        batch_shardings = {k: partitioning.batch_sharding(mesh, v.ndim)
                           for k, v in simvlm.dummy_batch(model_config).items()}
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

    def _train_step(self, state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.key(self.seed + 1), state.step)

        def loss_fn(params):
            logits = self.model.apply({"params": params}, batch, deterministic=False, rngs={"dropout": rng})
            return prefix_lm_loss(logits, batch["target_tokens"])

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "grad_norm": optax.global_norm(grads),
                   "learning_rate": self.lr_schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def step(self, state: TrainState, batch: dict[str, jax.Array]):
        with self.activate():
            return self._step(state, batch)


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@gin.configurable
def train(work_dir: str, num_steps: int = gin.REQUIRED, global_batch_size: int = gin.REQUIRED,
          seed: int = 0, log_every: int = 50, mesh: jax.sharding.Mesh | None = None,
          model_config: simvlm.SimVLMConfig | None = None) -> dict[str, Any]:
    """Trains for `num_steps`, resuming from the latest checkpoint in `work_dir`.

    Returns a summary dict (final step, last metrics, checkpoint dir).
    """
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
    else:
        state, start = restored
        log.info("Resumed from %s at step %d", manager.directory, start)
    writer.write_config(gin.config_str(), dict(mesh.shape), count_params(state.params))

    stop = {"signal": None}
    def on_signal(signum, _):  # preemption: finish the step, checkpoint, exit
        stop["signal"] = signum
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    metrics_host: dict[str, float] = {}
    t_start, t_window, ex_window = time.time(), time.time(), 0
    step = start
    try:
        for step in range(start, num_steps):
            batch = partitioning.host_batch_to_global(next(data_iter), mesh)
            state, metrics = trainer.step(state, batch)
            ex_window += global_batch_size
            done = step + 1
            if done % log_every == 0 or done == num_steps or done == start + 1:
                metrics_host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.time() - t_window
                metrics_host["examples_per_sec"] = ex_window / max(elapsed, 1e-9)
                metrics_host.update({f"data/skipped_{k}": v for k, v in pipeline.skipped_counts().items()})
                writer.write_scalars(done, metrics_host)
                rate = (done - start) / max(time.time() - t_start, 1e-9)
                eta = (num_steps - done) / max(rate, 1e-9)
                writer.progress(f"step {done}/{num_steps} loss {metrics_host['loss']:.4f} "
                                f"acc {metrics_host['token_accuracy']:.3f} "
                                f"lr {metrics_host['learning_rate']:.2e} | "
                                f"{metrics_host['examples_per_sec']:.0f} ex/s | ETA {_fmt_time(eta)}")
                t_window, ex_window = time.time(), 0
            checkpointing.save(manager, done, state, data_iter, force=(done == num_steps))
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


def count_params(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
