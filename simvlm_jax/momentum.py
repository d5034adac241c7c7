"""Train-state machinery of self-distillation objectives: an EMA ("momentum") copy of
some parameters and FIFO feature queues.

ALBEF/mPLUG's ITC (momentum encoders + queues of their features), MoCo, data2vec-style
EMA teachers and TCL's intra-modal contrastive terms all keep, next to params and
optimizer state, a slowly moving copy of (part of) the params and/or a ring buffer of
past features. A family opts in through `ModelFamily.init_aux_state` /
`update_aux_state`; the Trainer keeps the result in `TrainState.aux_state`, so it is
sharded, checkpointed, restored on another mesh and skipped on NaN steps like params.

Everything here is pure and boxed with logical axis names where it creates arrays:
EMA leaves keep their params' names (sharded like them), queues are sharded over the
batch axes ('activation_batch'), so a queue costs O(size / batch shards) per device.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

QUEUE_AXES = ("activation_batch", None)


def ema_subset(params: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """The top-level subtrees `keys` of a param dict (boxed or not): the momentum copy's
    initial value (ALBEF copies the online encoders at init)."""
    keys = tuple(keys)
    missing = [k for k in keys if k not in params]
    if missing:
        raise KeyError(f"momentum params {missing} are not in the model's params {sorted(params)}")
    return {k: params[k] for k in keys}


def ema_update(ema: Any, params: Mapping[str, Any], decay: float) -> Any:
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf over ema's subtrees (float32
    math, stored in each ema leaf's dtype). No gradient flows into it."""
    online = {k: params[k] for k in ema}
    def mix(e, p):
        p = jax.lax.stop_gradient(p)
        return (decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)).astype(e.dtype)
    return jax.tree_util.tree_map(mix, ema, online)


def init_queue(size: int, dim: int, dtype=jnp.float32, fill: str = "random", rng: Array | None = None) -> Any:
    """A boxed [size, dim] feature queue. `fill='random'`: L2-normalized Gaussian rows
    (as MoCo/ALBEF initialize theirs: valid unit vectors until real features replace
    them); 'zeros': all zeros."""
    if fill == "random":
        rng = jax.random.key(0) if rng is None else rng
        q = jax.random.normal(rng, (size, dim), jnp.float32)
        q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    elif fill == "zeros":
        q = jnp.zeros((size, dim), jnp.float32)
    else:
        raise ValueError(f"init_queue fill={fill!r}; use 'random' or 'zeros'")
    return nn.LogicallyPartitioned(q.astype(dtype), names=QUEUE_AXES)


def enqueue(queue: Array, ptr: Array, feats: Array) -> tuple[Array, Array]:
    """Writes `feats` [B, D] into the ring buffer `queue` [Q, D] at rows ptr, ptr+1, ...
    (mod Q: it wraps around) and returns (queue, new ptr). B <= Q."""
    size, b = queue.shape[0], feats.shape[0]
    if b > size:
        raise ValueError(f"cannot enqueue {b} features into a queue of {size}; make the queue at least "
                         f"the global batch")
    rows = (ptr + jnp.arange(b)) % size
    queue = queue.at[rows].set(jax.lax.stop_gradient(feats).astype(queue.dtype))
    return queue, ((ptr + b) % size).astype(ptr.dtype)
