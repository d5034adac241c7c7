"""Pretraining of any model family: optimizer, sharded train step, training loop.

The model's objective comes from its family (`ModelFamily.objective`, defined in
`simvlm_jax.losses`). The state (params + optimizer state) is created directly in
its sharded layout (`jax.jit(..., out_shardings=...)`), the step is jitted with
explicit in/out shardings and donates the old state, and the loop feeds global
`jax.Array`s assembled from each host's grain batches.
"""
from __future__ import annotations

import logging
import math
import os
import re
import signal
from typing import Any, Callable

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from orbax.checkpoint import multihost as ocp_multihost

from simvlm_jax import checkpointing, export, flops, host_memory, partitioning, storage
from simvlm_jax.metric_writer import MetricWriter, StepTimer, format_progress
from simvlm_jax.models import layers, registry
from simvlm_jax.models.family import ModelFamily, count_params

log = logging.getLogger("simvlm_jax")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    # Steps whose loss or gradients were NaN/Inf: the update was skipped.
    nonfinite_total: jax.Array = 0
    nonfinite_consecutive: jax.Array = 0
    # The family's state besides params and optimizer state (`ModelFamily.init_aux_state`:
    # e.g. mPLUG's momentum params and feature queues); None for most families.
    aux_state: Any = None


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices/conv kernels only (not norms, biases, embeddings, positions)."""
    def is_kernel(path, _):
        return getattr(path[-1], "key", None) == "kernel"
    return jax.tree_util.tree_map_with_path(is_kernel, params)


class Optimizer(tuple):
    """`make_optimizer`'s (optax transform, lr schedule), unpacked as a pair; `frozen`: the
    regexes of the params it never updates, whose weight gradients the Trainer then does not
    compute (a frozen LM still passes gradients through to what trains before it)."""

    def __new__(cls, tx: optax.GradientTransformation, lr_schedule: Callable, frozen: tuple[str, ...] = ()):
        self = super().__new__(cls, (tx, lr_schedule))
        self.frozen = tuple(frozen)
        return self


def stop_frozen_gradients(params: Any, frozen: tuple[str, ...]) -> Any:
    """`params` with `lax.stop_gradient` on the leaves whose '/'-joined path fully matches one of
    the `frozen` regexes: XLA then skips their weight-gradient matmuls."""
    patterns = [re.compile(p) for p in frozen]
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.lax.stop_gradient(x) if any(p.fullmatch(_path_str(path)) for p in patterns) else x,
        params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scales the gradients down to global norm `max_norm` if above it, as optax's
    clip_by_global_norm but with one multiply by a scalar (min(1, max_norm / norm)) instead of a
    division per element: XLA fuses a multiply into the optimizer's update of each leaf, while it
    materializes a divide's output (expensive to recompute per consumer), which kept a second
    gradient-sized buffer alive (CoCa-B/32 on CPU: temporaries 1.90 -> 1.48 GiB; tests/test_memory.py)."""
    def update_fn(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))
        return jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), updates), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


@gin.configurable
def make_optimizer(total_steps: int, name: str = "adamw", learning_rate: float = 1e-3,
                   warmup_steps: int = 1000, schedule: str = "cosine", end_lr_fraction: float = 0.0,
                   weight_decay: float = 0.01, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   clip_norm: float | None = 1.0, moment_dtype: str | None = None,
                   frozen: tuple[str, ...] = ()) -> Optimizer:
    """Optimizer from gin: 'adamw' or 'adafactor' (CoCa's, with momentum b1), linear warmup
    then `schedule` ('cosine' | 'linear' | 'rsqrt' | 'constant'), global-norm clipping,
    decoupled weight decay on kernels only, `moment_dtype='bfloat16'` for a smaller
    optimizer state, and `frozen`: regexes of param paths ('encoder/.*') that get no
    updates, no optimizer state and no weight gradients."""
    if not 0 <= float(learning_rate) <= float(np.finfo(np.float32).max):
        raise ValueError(f"make_optimizer.learning_rate={learning_rate} must be >= 0 and finite in float32")
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
    chain = [clip_by_global_norm(clip_norm)] if clip_norm else []
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
    return Optimizer(tx, lr, frozen)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


class Trainer:
    """Holds the model family, mesh, optimizer and the compiled sharded functions.

    Everything is an argument: `optimizer` is `(tx, lr_schedule)` (see `make_optimizer`),
    `microbatches` splits each global batch for gradient accumulation, `loss_weights`
    overrides the family's default weights of its objective's terms, `rules` maps logical
    axis names to mesh axes (default `partitioning.LOGICAL_AXIS_RULES`).

    The family's objective per (micro)batch is `Objective(value, weight, sums)`: gradients
    of `value` are summed over microbatches and divided by the summed `weight`, and so are
    the metric `sums`. SimVLM: value = summed target-token NLL, weight = token count (so
    accumulation equals the big batch exactly). CoCa: value = the microbatch's loss
    (contrastive over the microbatch's global rows + caption CE), weight = 1.
    """

    def __init__(self, model: Any, mesh: jax.sharding.Mesh,
                 optimizer: tuple[optax.GradientTransformation, Callable], *, microbatches: int = 1,
                 loss_weights: dict[str, float] | None = None, rules=None, seed: int = 0):
        self.family = registry.family_of(model)
        self.config = self.family.config
        self.model = self.family.module
        if microbatches < 1:
            raise ValueError(f"train.microbatches={microbatches} must be >= 1")
        self.microbatches = microbatches
        self.loss_weights = dict(self.family.loss_weights)
        unknown = sorted(set(loss_weights or {}) - set(self.loss_weights))
        if unknown:
            raise ValueError(f"train.loss_weights: {unknown} are not terms of the {self.family.name} objective; "
                             f"its terms are {sorted(self.loss_weights) or 'none (one loss)'}")
        self.loss_weights.update(loss_weights or {})
        self.mesh = mesh
        self.rules = tuple(rules) if rules is not None else partitioning.LOGICAL_AXIS_RULES
        self.batch_axes = partitioning.batch_mesh_axes(mesh, self.rules)
        self.seed = seed
        self.tx, self.lr_schedule = optimizer
        self.frozen = tuple(getattr(optimizer, "frozen", ()))

        def init_boxed(rng):
            params = self.family.init_params(rng)
            zero = jnp.zeros((), jnp.int32)
            return TrainState(step=zero, params=params, opt_state=self.tx.init(params),
                              nonfinite_total=zero, nonfinite_consecutive=zero,
                              aux_state=self.family.init_aux_state(params, jax.random.fold_in(rng, 1)))

        with self.activate():
            abstract_boxed = jax.eval_shape(init_boxed, jax.random.key(0))
            self.state_logical_specs = partitioning.logical_specs(abstract_boxed)
            self.state_shardings = partitioning.fit_to_shapes(
                partitioning.logical_to_sharding(self.state_logical_specs, mesh, self.rules),
                nn.meta.unbox(abstract_boxed))
        self.abstract_state = partitioning.abstract_like(nn.meta.unbox(abstract_boxed), self.state_shardings)
        self._init = jax.jit(lambda rng: nn.meta.unbox(init_boxed(rng)), out_shardings=self.state_shardings)
        # One sharding per feature the model reads (`model_inputs` drops the others).
        self.batch_shardings = {k: partitioning.batch_sharding(mesh, v.ndim, self.rules)
                                for k, v in self.family.dummy_batch().items()}
        self._step = jax.jit(self._train_step,
                             in_shardings=(self.state_shardings, self.batch_shardings),
                             out_shardings=(self.state_shardings, partitioning.replicated(mesh)),
                             donate_argnums=(0,))
        self._compiled: dict[tuple, Any] = {}  # compile_step's executables, by batch signature

    def activate(self):
        """Context in which logical axis names resolve to this mesh."""
        return partitioning.activate(self.mesh, self.rules)

    def init_state(self) -> TrainState:
        with self.activate():
            state = self._init(jax.random.key(self.seed))
        jax.block_until_ready(state)
        host_memory.release_freed_memory()  # what compiling and running the init freed
        return state

    def _objective(self, params, batch, rng, aux_state):
        """(value to differentiate, (weight, metric sums, aux outputs)) of one (micro)batch;
        see the class doc."""
        if self.frozen:  # frozen params: no weight gradients to compute
            params = stop_frozen_gradients(params, self.frozen)
        obj = self.family.objective(params, batch, rng, loss_weights=self.loss_weights, mesh=self.mesh,
                                    batch_axes=self.batch_axes, aux_state=aux_state)
        return obj.value, (obj.weight, obj.sums, obj.aux_outputs)

    def _mean_objective(self, params, batch, rng, aux_state):
        """`_objective` with its value divided by its (constant) weight."""
        value, aux = self._objective(params, batch, rng, aux_state)
        return value / jnp.maximum(jax.lax.stop_gradient(aux[0]), 1e-9), aux

    def _grads(self, params, batch, rng, aux_state=None):
        """Gradients of the summed value over the summed weight, the summed weight, metric sums
        and the objective's aux outputs (rows of all microbatches, in batch order); microbatched
        with lax.scan if asked."""
        k = self.microbatches
        if k == 1:
            # Dividing before differentiating seeds the backward pass with 1/weight, so the
            # gradients come out final: dividing them afterwards can be one more gradient-sized
            # buffer (SimVLM in tests/test_memory.py: temporaries 1.6x -> 1.3x the params).
            grad_fn = jax.value_and_grad(self._mean_objective, has_aux=True)
            (_, (weight, sums, aux_out)), grads = grad_fn(params, batch, rng, aux_state)
            return grads, weight, sums, aux_out
        grad_fn = jax.value_and_grad(self._objective, has_aux=True)
        # Microbatch i takes rows i::k, so every device keeps an equal share of each one.
        def split(x):
            if x.shape[0] % k:
                raise ValueError(f"global batch {x.shape[0]} is not divisible by train.microbatches={k}")
            # An objective that runs per batch shard (CoCa's contrastive loss, under shard_map)
            # needs every microbatch split evenly over the shards.
            shards = partitioning.num_batch_shards(self.mesh)
            if self.family.per_shard_objective and x.shape[0] % (k * shards):
                raise ValueError(f"{self.family.name}: global batch {x.shape[0]} must be divisible by "
                                 f"train.microbatches={k} x the batch shards data*fsdp={shards}")
            x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
            return layers.constrain(x, (None, "activation_batch") + (None,) * (x.ndim - 2))
        micro = jax.tree_util.tree_map(split, batch)

        def body(carry, xs):
            acc, w_acc, sums_acc = carry
            i, mb = xs
            (_, (weight, sums, aux_out)), g = grad_fn(params, mb, jax.random.fold_in(rng, i), aux_state)
            add = lambda a, b: a + b.astype(a.dtype)
            return (jax.tree_util.tree_map(add, acc, g), w_acc + weight,
                    jax.tree_util.tree_map(add, sums_acc, sums)), aux_out

        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        _, (_, sums_shape, _) = jax.eval_shape(self._objective, params, first, rng, aux_state)
        zero_sums = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), sums_shape)
        init = (zeros, jnp.zeros(()), zero_sums)
        (grads, weight, sums), aux_out = jax.lax.scan(body, init, (jnp.arange(k), micro))
        # SimVLM: d(mean NLL over all target tokens of the global batch) = d(sum) / count,
        # equal to the big-batch gradient whatever the number of microbatches.
        # (A multiply by the reciprocal fuses into the gradients' consumers; a divide would be
        # materialized as one more gradient-sized buffer, see clip_by_global_norm.)
        inv = 1.0 / jnp.maximum(weight, 1e-9)
        grads = jax.tree_util.tree_map(lambda g, p: (g * inv).astype(p.dtype), grads, params)
        # [k, b/k, ...] -> [b, ...] with row r of microbatch i back at batch row r*k + i.
        unsplit = lambda x: x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])
        return grads, weight, sums, jax.tree_util.tree_map(unsplit, aux_out)

    def _update(self, grads, opt_state, params):
        """(new params, new optimizer state) of one optimizer step."""
        updates, opt_state = self.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def _train_step(self, state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.key(self.seed + 1), state.step)
        grads, weight, sums, aux_out = self._grads(state.params, batch, rng, state.aux_state)
        denom = jnp.maximum(weight, 1e-9)
        # Gradients live exactly where their params live (reduce-scattered under FSDP).
        grads = jax.lax.with_sharding_constraint(grads, self.state_shardings.params)
        means = {k: v / denom for k, v in sums.items() if k != "num_target_tokens"}
        loss = means["loss"]
        grad_norm = optax.tree.norm(grads)
        # NaN/Inf loss or gradients: keep the old params and optimizer state and count the skip.
        # The decision comes before the update (from two scalars), so the update runs inside a
        # lax.cond whose skip branch returns the donated state as is: XLA then writes the new
        # state in place, leaf by leaf, and the step's temporaries are about the gradients plus
        # activations (CoCa-B/32: 1.6x the params' bytes). Selecting old vs new per leaf after the
        # update, or first computing the update's norm to also skip non-finite updates, kept old
        # state, new state and updates alive at once (3.4x; tests/test_memory.py). With finite
        # (clipped) gradients and state, AdamW's and Adafactor's updates are finite unless the
        # learning rate itself overflows, which make_optimizer rejects.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # The family's aux state (EMA params, queues) moves only with the params.
        def update():
            params, opt_state = self._update(grads, state.opt_state, state.params)
            return params, opt_state, self.family.update_aux_state(state.aux_state, params, aux_out)
        params, opt_state, aux_state = jax.lax.cond(
            finite, update, lambda: (state.params, state.opt_state, state.aux_state))
        bad = 1 - finite.astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, aux_state=aux_state,
            nonfinite_total=state.nonfinite_total + bad,
            nonfinite_consecutive=(state.nonfinite_consecutive + 1) * bad)
        metrics = {**means, "num_target_tokens": sums["num_target_tokens"], "grad_norm": grad_norm, "learning_rate": self.lr_schedule(state.step),
                   "nonfinite_total": new_state.nonfinite_total,
                   "nonfinite_consecutive": new_state.nonfinite_consecutive}
        return new_state, metrics

    def compile_step(self, state: TrainState, batch: dict[str, jax.Array]):
        """Compiles the train step for these arguments' shapes and shardings now (jit would on the
        first call); `step` then runs this executable for batches like `batch`. The loop compiles
        before its first step so that every process can finish compiling before any of them
        starts the step's collectives (see `train`)."""
        inputs = self.model_inputs(batch)
        with self.activate():
            compiled = self._step.lower(state, inputs).compile()
        host_memory.release_freed_memory()  # the compiler's freed memory: 0.56 GB for CoCa-B/32
        self._compiled[_signature(inputs)] = compiled
        return compiled

    def step(self, state: TrainState, batch: dict[str, jax.Array]):
        inputs = self.model_inputs(batch)
        compiled = self._compiled.get(_signature(inputs)) if self._compiled else None
        with self.activate():
            return compiled(state, inputs) if compiled is not None else self._step(state, inputs)

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The features this model trains on (others, e.g. a PrefixLM prefix for CoCa, are dropped)."""
        missing = [k for k in self.batch_shardings if k not in batch]
        if missing:
            raise KeyError(f"the training batch has no {missing} (has {sorted(batch)}); check the data task")
        return {k: batch[k] for k in self.batch_shardings}


def compile_before_first_step(trainer: Trainer, state: TrainState, batch: dict[str, jax.Array]) -> None:
    """Compiles the step, then waits for every process to have compiled it. Processes compile at
    different speeds (a loaded host, a cache miss on one), and CPU collectives (gloo) give up if
    a peer is 30 s late to the first one, so no process may start the step before all are ready."""
    trainer.compile_step(state, batch)
    if jax.process_count() > 1:
        # `processes` given: the coordination service's barrier, not a collective (which would be
        # the very gloo call that cannot wait).
        ocp_multihost.sync_global_processes("simvlm_jax_train_step_compiled", timeout=COMPILE_SYNC_TIMEOUT_S,
                                            processes=set(range(jax.process_count())))


# How long a process waits for its peers to compile the train step (big models on big slices
# compile for many minutes; a dead peer is caught sooner, by the heartbeat).
COMPILE_SYNC_TIMEOUT_S = 3600


def _signature(batch: dict[str, Any]) -> tuple:
    return tuple((k, v.shape, str(v.dtype), getattr(v, "sharding", None)) for k, v in sorted(batch.items()))


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


def epochs_per_step(pipeline: Any, global_batch_size: int) -> dict[str, float]:
    """{task: fraction of its split one global batch reads} for the gin-bound training data
    (`make_train_iterator.mixture_or_task_name`); {} when no task is bound or a size is unknown."""
    bindings = gin.get_bindings("make_train_iterator")
    name = bindings.get("mixture_or_task_name")
    if not isinstance(name, str):
        return {}
    sizes = pipeline.epochs_per_run(name, bindings.get("split", "train"), global_batch_size, 1)
    return {task: epochs for task, (size, epochs) in sizes.items() if size > 0}


@gin.configurable
def train(work_dir: str, num_steps: int = gin.REQUIRED, global_batch_size: int = gin.REQUIRED,
          seed: int = 0, log_every: int = 50, mesh: jax.sharding.Mesh | None = None,
          model: ModelFamily | None = None, microbatches: int = 1,
          loss_weights: dict[str, float] | None = None, max_consecutive_nonfinite: int = 10,
          loss_spike_factor: float = 3.0, profile_steps: tuple[int, int] | None = None,
          eval_every: int = 0, eval_fn: Callable[[Any, int], dict] | None = None,
          init_from: str | None = None, init_include: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Trains `model` (default: the gin-selected family, `model_family.name`) for `num_steps`,
    resuming from the latest checkpoint in `work_dir`. `microbatches` > 1 accumulates
    gradients over that many slices of each global batch (lax.scan); `loss_weights`
    overrides the family's weights of its objective's terms (CoCa: {'contrastive': 1.0,
    'caption': 2.0}).

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
    # The input pipeline (seqio -> TensorFlow) loads only for training, so the Trainer and
    # the benchmarks import without TensorFlow.
    from simvlm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    storage.makedirs(work_dir)  # local or a URL (gs://...)
    family = registry.family_of(model) if model is not None else registry.model_family()
    mesh = mesh or partitioning.make_mesh()
    if global_batch_size % partitioning.num_batch_shards(mesh):
        raise ValueError(f"train.global_batch_size={global_batch_size} must be divisible by the batch "
                         f"shards data*fsdp={partitioning.num_batch_shards(mesh)} of mesh {dict(mesh.shape)}")
    trainer = Trainer(family, mesh, make_optimizer(num_steps), microbatches=microbatches,
                      loss_weights=loss_weights, rules=partitioning.axis_rules(), seed=seed)
    data_iter = pipeline.make_train_iterator(global_batch_size=global_batch_size, seed=seed, num_steps=num_steps)
    manager = checkpointing.make_manager(work_dir)
    writer = MetricWriter(work_dir)

    restored = checkpointing.restore(manager, trainer.abstract_state, data_iter)
    if restored is None:
        state, start = trainer.init_state(), 0
        log.info("Initialized a new model (%s params) on mesh %s", f"{count_params(state.params):,}",
                 dict(mesh.shape))
        if init_from:
            # Adam/Adafactor moments start at zero whatever the params: only params change.
            state = state.replace(params=export.load_params_for_training(init_from, state.params, init_include))
            log.info("Initialized params from the export %s%s", init_from,
                     f" (only {list(init_include)})" if init_include else "")
    else:
        state, start = restored
        log.info("Resumed from %s at step %d", manager.directory, start)
    writer.write_config(gin.config_str(), dict(mesh.shape), count_params(state.params))

    flops_per_example = family.train_flops_per_example(trainer.frozen)
    peak = flops.peak_flops_per_device()
    tokens_per_example = family.tokens_per_example()

    stop = {"signal": None}
    def on_signal(signum, _):  # preemption: finish the step, checkpoint, exit
        stop["signal"] = signum
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    metrics_host: dict[str, float] = {}
    spikes = LossSpikeDetector(loss_spike_factor)
    epochs = epochs_per_step(pipeline, global_batch_size)
    timer = StepTimer()
    step = start
    try:
        for step in range(start, num_steps):
            if profile_steps and step == profile_steps[0]:
                jax.profiler.start_trace(os.path.join(work_dir, "profile"))
            t_data = timer.clock()
            host_batch = next(data_iter)
            timer.waited(timer.clock() - t_data)
            family.check_batch(host_batch)
            batch = partitioning.host_batch_to_global(trainer.model_inputs(host_batch), mesh,
                                                      trainer.batch_shardings)
            if step == start:
                compile_before_first_step(trainer, state, batch)
            state, metrics = trainer.step(state, batch)
            timer.step()
            done = step + 1
            if profile_steps and done == profile_steps[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                log.info("Wrote a profiler trace of steps %s to %s/profile", profile_steps, work_dir)
            if done % log_every == 0 or done == num_steps or done == start + 1:
                metrics_host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                first = done == start + 1  # its time includes compilation
                step_time = timer.window()
                ex_per_sec = global_batch_size / step_time
                metrics_host.update(step_time_sec=step_time, examples_per_sec=ex_per_sec,
                                    tokens_per_sec=ex_per_sec * tokens_per_example,
                                    data_wait_fraction=timer.data_wait_fraction)
                if peak and not first:
                    metrics_host["mfu"] = flops_per_example * ex_per_sec / (peak * jax.device_count())
                skipped = pipeline.skipped_counts()
                metrics_host.update({f"data/skipped_{k}": v for k, v in skipped.items()})
                metrics_host["loss_spike"] = float(spikes.update(done, metrics_host["loss"]))
                writer.write_scalars(done, metrics_host)
                writer.progress(format_progress(
                    done, num_steps, metrics_host, examples_per_sec=ex_per_sec, eta=timer.eta(num_steps - done),
                    examples_seen=done * global_batch_size, epochs={k: v * done for k, v in epochs.items()},
                    skipped=skipped, first_step_sec=step_time if first else None))
                if metrics_host["nonfinite_consecutive"] >= max_consecutive_nonfinite:
                    raise FloatingPointError(
                        f"{int(metrics_host['nonfinite_consecutive'])} consecutive steps with NaN/Inf loss or "
                        f"gradients (last at step {done}); updates were skipped, so the last checkpoint in "
                        f"{manager.directory} is clean. Lower make_optimizer.learning_rate, check the data, "
                        f"or raise train.max_consecutive_nonfinite.")
            checkpointing.save(manager, done, state, data_iter, force=(done == num_steps))
            if done == start + 1:
                timer.started()  # after compilation and the first save: ex/s and ETA time steps only
            if eval_fn is not None and eval_every and done % eval_every == 0:
                t_eval = timer.clock()
                writer.flush()  # a remote WORK_DIR: the eval report's loss curve reads metrics.jsonl
                eval_out = eval_fn(state.params, done)
                writer.write_scalars(done, {f"eval/{k}": v for k, v in eval_out.items()
                                            if isinstance(v, (int, float))})
                for i, sample in enumerate(eval_out.get("samples", [])):
                    writer.write_image(f"eval/sample_{i}", done, sample["image"])
                    writer.write_text(f"eval/sample_{i}", done, f"**{sample['prediction']}**  \n"
                                      + "  \n".join(sample["references"]))
                timer.exclude(timer.clock() - t_eval)  # throughput and ETA count training steps only
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
