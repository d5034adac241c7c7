"""Training objectives of every model family, and the token statistics they share.

An objective returns `Objective(value, weight, sums)` for one (micro)batch: the
train step differentiates `value`, sums value-gradients, weights and metric sums
over microbatches, then divides both by the summed weight. So a token-weighted
objective (value = summed NLL, weight = token count) accumulates exactly like the
big batch, and a per-batch mean objective uses weight = 1.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from simvlm_jax.models import layers

Array = jax.Array


class Objective(NamedTuple):
    value: Array              # differentiated; summed over microbatches
    weight: Array             # summed over microbatches; gradients and sums are divided by it
    sums: dict[str, Array]    # metric sums ('loss' required; 'num_target_tokens' is logged as a sum)
    # Per-example arrays (batch on axis 0) for `ModelFamily.update_aux_state`, e.g. momentum
    # features to enqueue; concatenated over microbatches in batch order. None: nothing.
    aux_outputs: Any = None


def token_nll_stats(logits: Array, targets: Array, pad_id: int = 0) -> tuple[Array, Array, Array]:
    """(sum of target-token NLL, number of target tokens, number argmax-correct); `pad_id` ignored."""
    weights = (targets != pad_id).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    correct = ((jnp.argmax(logits, -1) == targets) * weights).sum()
    return (nll * weights).sum(), weights.sum(), correct


def prefix_lm_objective(logits: Array, targets: Array, pad_id: int = 0) -> Objective:
    """PrefixLM: -log P(x_{>=Tp} | x_{<Tp}) summed over the target (suffix) tokens, weighted
    by their count. The prefix never reaches the decoder's targets, so it is excluded by
    construction; the mean loss is value / weight."""
    nll_sum, num_tokens, correct = token_nll_stats(logits, targets, pad_id)
    return Objective(nll_sum, num_tokens,
                     {"loss": nll_sum, "token_accuracy": correct, "num_target_tokens": num_tokens})


# ----------------------------------------------------------------------------- contrastive

def _local_contrastive_sum(img: Array, txt: Array, scale: Array, axis_name) -> Array:
    """Sum over this shard's rows of the i->t and t->i cross-entropies against ALL (gathered)
    embeddings: memory [b_local, B_global] per device, never [B, B]."""
    b = img.shape[0]
    if axis_name is None:
        img_all, txt_all, offset = img, txt, 0
    else:
        img_all = jax.lax.all_gather(img, axis_name, tiled=True)
        txt_all = jax.lax.all_gather(txt, axis_name, tiled=True)
        offset = jax.lax.axis_index(axis_name) * b
    labels = offset + jnp.arange(b)
    total = 0.0
    for q, k in ((img, txt_all), (txt, img_all)):
        logits = scale * jnp.einsum("be,ne->bn", q, k)
        pos = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
        total = total + jnp.sum(jax.nn.logsumexp(logits, axis=-1) - pos)
    return total


def contrastive_loss(image_embed: Array, text_embed: Array, logit_scale: Array,
                     mesh: Mesh | None = None, batch_axes: Sequence[str] = ()) -> Array:
    """Symmetric InfoNCE over the GLOBAL batch: mean over i->t and t->i of -log softmax.

    With a `mesh` and its `batch_axes` (`partitioning.batch_mesh_axes`), the loss runs
    under shard_map: each device all-gathers the embeddings ([B, E], small) and computes
    only its own rows' logits [B/n, B]; the row losses are psum'd. Without them it is the
    plain [B, B] computation (one device, or XLA's choice).
    """
    image_embed = image_embed.astype(jnp.float32)
    text_embed = text_embed.astype(jnp.float32)
    logit_scale = jnp.asarray(logit_scale, jnp.float32)
    n = image_embed.shape[0]
    axes = tuple(batch_axes)
    if mesh is None or not axes:
        return _local_contrastive_sum(image_embed, text_embed, logit_scale, None) / (2 * n)

    def local(img, txt, scale):
        return jax.lax.psum(_local_contrastive_sum(img, txt, scale, axes), axes)

    total = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P()), out_specs=P())(
        image_embed, text_embed, logit_scale)
    return total / (2 * n)


def contrastive_caption_objective(outputs: Mapping[str, Array], targets: Array, *,
                                  weights: Mapping[str, float], mesh: Mesh | None = None,
                                  batch_axes: Sequence[str] = (), pad_id: int = 0) -> Objective:
    """CoCa: weights['contrastive'] x InfoNCE over the global batch + weights['caption'] x
    caption cross-entropy (mean over target tokens). `outputs`: image_embed, text_embed,
    logit_scale, logits. A per-batch mean (weight 1): accumulated microbatches average it."""
    con = contrastive_loss(outputs["image_embed"], outputs["text_embed"], outputs["logit_scale"],
                           mesh=mesh, batch_axes=batch_axes)
    nll_sum, n, correct = token_nll_stats(outputs["logits"], targets, pad_id)
    denom = jnp.maximum(n, 1.0)
    cap = nll_sum / denom
    loss = weights["contrastive"] * con + weights["caption"] * cap
    return Objective(loss, jnp.ones(()), {
        "loss": loss, "contrastive_loss": con, "caption_loss": cap, "token_accuracy": correct / denom,
        "num_target_tokens": n, "logit_scale": jnp.asarray(outputs["logit_scale"], jnp.float32)})


# ----------------------------------------------------------------------------- mPLUG / ALBEF

ROWS = ("activation_batch", None)


def _rows(x: Array) -> Array:
    """Constrains a [B, ...] matrix to rows over the batch shards (no-op without a mesh):
    similarity matrices then cost [B/n, B + Q] per device, never [B, B + Q]."""
    return layers.constrain(x, ROWS + (None,) * (x.ndim - 2))


def itc_momentum_loss(image_feat: Array, text_feat: Array, image_feat_m: Array, text_feat_m: Array,
                      image_queue: Array, text_queue: Array, temp: Array, alpha: float
                      ) -> tuple[Array, Array, Array]:
    """ALBEF/mPLUG image-text contrastive loss with momentum features, queues and momentum
    distillation. Features are L2-normalized [B, E]; queues [Q, E] hold past momentum
    features (extra negatives).

    Online image i is scored against the momentum texts [text_feat_m; text_queue] (and
    text i against the momentum images); the target of row i is
    alpha * softmax(momentum row i) + (1 - alpha) * one_hot(i). Returns (loss = mean of
    i2t and t2i cross-entropies over the global batch, sim_i2t [B, B], sim_t2i [B, B]),
    the last two the in-batch similarities / temp, without gradient (for ITM sampling).
    """
    temp = jnp.asarray(temp, jnp.float32)
    b = image_feat.shape[0]
    text_all = jax.lax.stop_gradient(jnp.concatenate([text_feat_m, text_queue.astype(jnp.float32)], 0))
    image_all = jax.lax.stop_gradient(jnp.concatenate([image_feat_m, image_queue.astype(jnp.float32)], 0))
    one_hot = jax.nn.one_hot(jnp.arange(b), text_all.shape[0], dtype=jnp.float32)
    losses_ = []
    sims = []
    for q, q_m, keys in ((image_feat, image_feat_m, text_all), (text_feat, text_feat_m, image_all)):
        sim = _rows(jnp.einsum("be,ne->bn", q.astype(jnp.float32), keys) / temp)
        sim_m = _rows(jnp.einsum("be,ne->bn", jax.lax.stop_gradient(q_m), keys) / jax.lax.stop_gradient(temp))
        target = alpha * jax.nn.softmax(sim_m, -1) + (1.0 - alpha) * one_hot
        losses_.append(-jnp.mean(jnp.sum(jax.nn.log_softmax(sim, -1) * target, -1)))
        sims.append(jax.lax.stop_gradient(sim[:, :b]))
    return (losses_[0] + losses_[1]) / 2, sims[0], sims[1]


def row_hash(tokens: Array) -> Array:
    """[B, T] int token rows -> [B, 2] uint32 hashes (two polynomial hashes mod 2^32):
    equal rows hash equal; distinct rows collide with probability ~2^-64."""
    t = tokens.astype(jnp.uint32)
    k = jnp.arange(t.shape[1], dtype=jnp.uint32)
    def poly(base, seed):
        powers = jnp.cumprod(jnp.full(t.shape[1:], base, jnp.uint32)) * jnp.uint32(seed)
        return jnp.sum((t + jnp.uint32(1)) * (powers ^ k), axis=1, dtype=jnp.uint32)
    return jnp.stack([poly(1_000_003, 2_654_435_761), poly(16_777_619, 40_503)], -1)


def sample_hard_negatives(sim: Array, exclude: Array, rng: Array) -> tuple[Array, Array]:
    """For each row i, one column j sampled with probability softmax(sim[i])_j renormalized
    over the columns not `exclude`d (Gumbel-max). The noise of row i comes from
    fold_in(rng, i), so the draw depends only on the global row, never on the sharding.
    Returns (indices [B] int32, valid [B]: row i had a column to sample)."""
    b = sim.shape[0]
    rows = jnp.arange(b)
    gumbel = jax.vmap(lambda r: jax.random.gumbel(jax.random.fold_in(rng, r), (sim.shape[1],)))(rows)
    scores = _rows(jnp.where(exclude, -jnp.inf, sim.astype(jnp.float32) + _rows(gumbel)))
    return jnp.argmax(scores, -1).astype(jnp.int32), jnp.any(~exclude, -1)


def itm_loss(logits: Array, labels: Array, valid: Array) -> tuple[Array, Array]:
    """2-way matching cross-entropy, mean over the valid rows; (loss, accuracy)."""
    valid = valid.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, labels[:, None], -1)[:, 0]
    denom = jnp.maximum(valid.sum(), 1.0)
    acc = ((jnp.argmax(logits, -1) == labels) * valid).sum() / denom
    return (nll * valid).sum() / denom, acc


def mplug_objective(terms: Mapping[str, Array], weights: Mapping[str, float], stats: Mapping[str, Array],
                    aux_outputs: Any = None) -> Objective:
    """mPLUG: sum of weights[k] x terms[k] over 'itc', 'itm', 'mlm', 'prefix_lm' (each a
    per-batch mean). A per-batch mean (weight 1), as CoCa's."""
    loss = sum(weights[k] * terms[k] for k in ("itc", "itm", "mlm", "prefix_lm"))
    sums = {"loss": loss, **{f"{k}_loss": v for k, v in terms.items()}, **stats}
    return Objective(loss, jnp.ones(()), sums, aux_outputs)
