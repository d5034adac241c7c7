"""Greedy caption decoding with a KV cache (and a cache-free reference).

The image and the text prompt (e.g. "a picture of") form the encoder prefix;
the decoder then generates from BOS. With the cache each step costs one token:
self-attention keys/values are appended to the cache and the cross-attention
keys/values of the encoder output are projected once, when the cache is built.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from simvlm_jax.data.tokenizer import EOS_ID, PAD_ID
from simvlm_jax.models import simvlm


def _next_token(logits: jax.Array) -> jax.Array:
    """Greedy choice; pad/BOS (id 0) is never generated."""
    return jnp.argmax(logits.at[..., PAD_ID].set(-jnp.inf), axis=-1).astype(jnp.int32)


def _finalize(tokens: jax.Array, eos_id: int) -> jax.Array:
    """Zeroes everything after the first EOS (the EOS itself is kept)."""
    is_eos = tokens == eos_id
    after_eos = jnp.cumsum(is_eos, axis=1) - is_eos > 0
    return jnp.where(after_eos, PAD_ID, tokens)


def greedy_decode(model: simvlm.SimVLM, params, images: jax.Array, prefix_tokens: jax.Array,
                  has_image: jax.Array, max_len: int | None = None, eos_id: int = EOS_ID) -> jax.Array:
    """Greedy decoding with the KV cache. Returns tokens [B, max_len] (0 after EOS).

    Stops early once every sequence has emitted EOS. Jit-compatible.
    """
    cfg = model.config
    max_len = min(max_len or cfg.max_target_len, cfg.max_target_len)
    variables = {"params": params}
    encoded, valid = model.apply(variables, images, prefix_tokens, has_image, method=model.encode)
    b = images.shape[0]
    bos = jnp.full((b, 1), PAD_ID, jnp.int32)
    # First step creates the cache (and the cross-attention keys/values).
    logits, mutated = model.apply(variables, bos, encoded, valid, decode=True, positions=jnp.int32(0),
                                  method=model.decode, mutable=["cache"])
    token = _next_token(logits[:, -1])
    out = jnp.zeros((b, max_len), jnp.int32).at[:, 0].set(token)
    done = token == eos_id

    def cond(carry):
        t, _, _, _, done = carry
        return jnp.logical_and(t < max_len, jnp.logical_not(jnp.all(done)))

    def body(carry):
        t, token, cache, out, done = carry
        logits, mutated = model.apply({**variables, "cache": cache}, token[:, None], None, valid,
                                      decode=True, positions=t, method=model.decode, mutable=["cache"])
        nxt = _next_token(logits[:, -1])
        nxt = jnp.where(done, PAD_ID, nxt)
        out = out.at[:, t].set(nxt)
        return t + 1, nxt, mutated["cache"], out, jnp.logical_or(done, nxt == eos_id)

    carry = (jnp.int32(1), token, mutated["cache"], out, done)
    _, _, _, out, _ = jax.lax.while_loop(cond, body, carry)
    return _finalize(out, eos_id)


def greedy_decode_no_cache(model: simvlm.SimVLM, params, images: jax.Array, prefix_tokens: jax.Array,
                           has_image: jax.Array, max_len: int | None = None,
                           eos_id: int = EOS_ID) -> jax.Array:
    """Reference decoder: recomputes the whole decoder every step (for tests/benchmarks)."""
    cfg = model.config
    max_len = min(max_len or cfg.max_target_len, cfg.max_target_len)
    variables = {"params": params}
    encoded, valid = model.apply(variables, images, prefix_tokens, has_image, method=model.encode)
    b = images.shape[0]
    out = jnp.zeros((b, max_len), jnp.int32)

    def body(t, out):
        dec_in = simvlm.shift_right(out)
        logits = model.apply(variables, dec_in, encoded, valid, method=model.decode)
        nxt = _next_token(logits[:, t])
        return out.at[:, t].set(nxt)

    out = jax.lax.fori_loop(0, max_len, body, out)
    return _finalize(out, eos_id)


@functools.lru_cache(maxsize=8)
def jitted_greedy(model: simvlm.SimVLM, max_len: int | None = None):
    """A jitted greedy decoder for `model` (cached per model config)."""
    return jax.jit(functools.partial(greedy_decode, model, max_len=max_len))
