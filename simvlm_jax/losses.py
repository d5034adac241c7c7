"""Training objectives of every model family, and the token statistics they share.

An objective returns `Objective(value, weight, sums)` for one (micro)batch: the
train step differentiates `value`, sums value-gradients, weights and metric sums
over microbatches, then divides both by the summed weight. So a token-weighted
objective (value = summed NLL, weight = token count) accumulates exactly like the
big batch, and a per-batch mean objective uses weight = 1.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

Array = jax.Array


class Objective(NamedTuple):
    value: Array              # differentiated; summed over microbatches
    weight: Array             # summed over microbatches; gradients and sums are divided by it
    sums: dict[str, Array]    # metric sums ('loss' required; 'num_target_tokens' is logged as a sum)


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
