"""Caption decoding with a KV cache: greedy, beam search and sampling (+ a cache-free reference).

Model-agnostic: every model family that can generate (`ModelFamily.can_generate`)
provides `encode(params, inputs)` (image, prompt, ...: once per example),
`decode_start` (BOS at position 0, creating the KV cache) and `decode_step` (one
token per call). SimVLM's inputs are the image and a text prompt (the encoder
prefix, e.g. "a picture of"); CoCa's only the image. `model` may be a family, its
flax module or its config (`registry.family_of`).

Every decoder is jit-compatible (`lax.while_loop`, stopping early) and returns
tokens [B, max_len] with the model's pad id after the first EOS (the EOS itself is
kept). `max_len` and `num_beams` fix array shapes: bind them with
`functools.partial` or `static_argnames` when jitting. The other options (`eos_id`,
`min_len`, `length_penalty`, `repetition_penalty`, `temperature`, `top_k`, `top_p`)
may be Python numbers or traced scalars (one compilation for every setting); a
Python value that disables a feature skips its computation.

Logits processing, shared by all decoders (`process_logits`):
  * `repetition_penalty` (CTRL, Keskar et al. 2019): the logit of every token
    already generated in this sequence (the prompt is not counted) is divided
    by the penalty if positive and multiplied by it if negative;
  * the model's pad id is never generated (for CLIP BPE, id 0 is a real token);
  * `min_len`: EOS is blocked at steps < min_len, i.e. a caption has at least
    `min_len` tokens before its EOS.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from simvlm_jax.models import registry
from simvlm_jax.models.family import ModelFamily

NEG_INF = -jnp.inf
Model = Any  # a ModelFamily, or a family's flax module or config


# ----------------------------------------------------------------------------- logits processing

def _resolve_max_len(fam: ModelFamily, max_len: int | None) -> int:
    return min(max_len or fam.max_decode_len, fam.max_decode_len)


def apply_repetition_penalty(logits: jax.Array, generated: jax.Array, penalty: float | jax.Array) -> jax.Array:
    """CTRL repetition penalty. logits [..., V]; generated [..., L] (ids already emitted; 0 = none).

    Tokens present in `generated` get `logit / penalty` if the logit is positive and
    `logit * penalty` otherwise. `penalty == 1` is the identity (skipped when it is a
    Python number; a traced penalty is always applied).
    """
    if isinstance(penalty, (int, float)) and penalty == 1.0:
        return logits
    v = logits.shape[-1]
    lead = logits.shape[:-1]
    gen = generated.reshape(-1, generated.shape[-1])
    rows = jnp.arange(gen.shape[0])[:, None]
    seen = jnp.zeros((gen.shape[0], v), jnp.bool_).at[rows, gen].set(True).reshape(lead + (v,))
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def mask_logits(logits: jax.Array, step: jax.Array | int, min_len: int | jax.Array = 0,
                eos_id: int | jax.Array = 1, pad_id: int = 0) -> jax.Array:
    """Never generate `pad_id`; block EOS at steps < `min_len` (eos_id < 0: no EOS)."""
    ids = jnp.arange(logits.shape[-1])
    blocked = jnp.logical_or(ids == pad_id, jnp.logical_and(ids == eos_id, step < min_len))
    return jnp.where(blocked, NEG_INF, logits)


def process_logits(logits: jax.Array, generated: jax.Array, step: jax.Array | int, *,
                   repetition_penalty: float = 1.0, min_len: int = 0,
                   eos_id: int = 1, pad_id: int = 0) -> jax.Array:
    """The logits processor shared by greedy, beam search and sampling.

    logits [..., V] for decoding step `step` (0-based position of the token being chosen);
    generated [..., L]: the tokens emitted so far in each sequence (`pad_id` = none yet).
    """
    logits = apply_repetition_penalty(logits, generated, repetition_penalty)
    return mask_logits(logits, step, min_len, eos_id, pad_id)


def _finalize(tokens: jax.Array, eos_id: int, pad_id: int) -> jax.Array:
    """Sets everything after the first EOS to `pad_id` (the EOS itself is kept)."""
    is_eos = tokens == eos_id
    after_eos = jnp.cumsum(is_eos, axis=1) - is_eos > 0
    return jnp.where(after_eos, pad_id, tokens)


def _batch_size(inputs: dict[str, Any]) -> int:
    return next(iter(jax.tree_util.tree_leaves(inputs))).shape[0]


def _start(fam: ModelFamily, params, inputs, repeat: int = 1):
    """Encodes the inputs (once per example), repeats the context `repeat` times per example
    (rows b * repeat + j) and runs the first decoder step, which creates the KV cache.
    Returns (logits [B * repeat, V], cache, context)."""
    context = fam.encode(params, inputs)
    if repeat > 1:
        context = jax.tree_util.tree_map(lambda x: jnp.repeat(x, repeat, axis=0), context)
    logits, cache = fam.decode_start(params, context)
    return logits, cache, context


# ----------------------------------------------------------------------------- greedy

def greedy_decode(model: Model, params, inputs: dict[str, Any], max_len: int | None = None,
                  eos_id: int | None = None, *, min_len: int = 0,
                  repetition_penalty: float = 1.0) -> jax.Array:
    """Greedy decoding with the KV cache. Returns tokens [B, max_len] (pad after EOS).

    `inputs`: the model's decode features (e.g. `family.decode_inputs(images, prompt_ids)`);
    `eos_id` defaults to the model's. Stops early once every sequence has emitted EOS.
    Jit-compatible.
    """
    fam = registry.family_of(model)
    eos_id = fam.eos_id if eos_id is None else eos_id

    def choose(logits, out, t):
        logits = process_logits(logits, out, t, repetition_penalty=repetition_penalty, min_len=min_len,
                                eos_id=eos_id, pad_id=fam.pad_id)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return _decode_loop(fam, params, inputs, max_len, eos_id, choose)


def _decode_loop(fam: ModelFamily, params, inputs, max_len: int | None, eos_id: int, choose) -> jax.Array:
    """One token per step with the KV cache; `choose(logits, generated, t) -> tokens [B]`.
    Stops once every row has emitted EOS; everything after a row's EOS is pad."""
    max_len = _resolve_max_len(fam, max_len)
    pad_id = fam.pad_id
    logits, cache, context = _start(fam, params, inputs)
    out = jnp.full((_batch_size(inputs), max_len), pad_id, jnp.int32)
    token = choose(logits, out, jnp.int32(0))
    out = out.at[:, 0].set(token)

    def cond(carry):
        t, _, _, _, done = carry
        return jnp.logical_and(t < max_len, jnp.logical_not(jnp.all(done)))

    def body(carry):
        t, token, cache, out, done = carry
        logits, cache = fam.decode_step(params, cache, token, context, t)
        nxt = jnp.where(done, pad_id, choose(logits, out, t))
        out = out.at[:, t].set(nxt)
        return t + 1, nxt, cache, out, jnp.logical_or(done, nxt == eos_id)

    carry = (jnp.int32(1), token, cache, out, token == eos_id)
    _, _, _, out, _ = jax.lax.while_loop(cond, body, carry)
    return _finalize(out, eos_id, pad_id)


def greedy_decode_no_cache(model: Model, params, inputs: dict[str, Any], max_len: int | None = None,
                           eos_id: int | None = None) -> jax.Array:
    """Reference decoder: reruns the whole decoder (teacher forcing) every step (tests/benchmarks)."""
    fam = registry.family_of(model)
    eos_id = fam.eos_id if eos_id is None else eos_id
    max_len = _resolve_max_len(fam, max_len)
    context = fam.encode(params, inputs)
    out = jnp.full((_batch_size(inputs), max_len), fam.pad_id, jnp.int32)

    def body(t, out):
        logits = fam.caption_logits(params, context, out)[:, t]
        nxt = jnp.argmax(logits.at[..., fam.pad_id].set(NEG_INF), axis=-1).astype(jnp.int32)
        return out.at[:, t].set(nxt)

    out = jax.lax.fori_loop(0, max_len, body, out)
    return _finalize(out, eos_id, fam.pad_id)


# ----------------------------------------------------------------------------- beam search

# Cache entries equal across the beams of an example, never reordered: cross-attention keys /
# values of the image, and any entry a family names 'per_example_*' (e.g. Flamingo's prompt
# key-padding mask, next position and <image> count, outside its scanned layers).
PER_EXAMPLE_CACHE = ("cross_key", "cross_value")
PER_EXAMPLE_PREFIX = "per_example_"


def gather_beams(cache: Any, flat_index: jax.Array, batch_axis: int, num_rows: int) -> Any:
    """Reorders the KV cache rows: every cache array whose `batch_axis` has `num_rows`
    (= batch * num_beams) entries is gathered with `flat_index` [num_rows] along it.

    `batch_axis` is 0 for unrolled layers and 1 for scanned ones (the cache then has a
    leading layers axis). Scalars/per-layer `cache_index` are left alone, and so is what is the
    same for every beam of an example: the cross-attention keys/values and per-row decode state
    outside the layers (`PER_EXAMPLE_PREFIX`; its batch axis is 0 even with scanned layers).
    """
    def gather(path, x):
        name = getattr(path[-1], "key", None)
        if name in PER_EXAMPLE_CACHE or str(name).startswith(PER_EXAMPLE_PREFIX):
            return x
        if x.ndim > batch_axis and x.shape[batch_axis] == num_rows:
            return jnp.take(x, flat_index, axis=batch_axis)
        return x

    return jax.tree_util.tree_map_with_path(gather, cache)


class _BeamState(NamedTuple):
    t: jax.Array             # next position to generate
    alive_seq: jax.Array     # [B, K, L] unfinished hypotheses (no EOS), 0 beyond t
    alive_logp: jax.Array    # [B, K] their summed log-probs, best first
    fin_seq: jax.Array       # [B, K, L] finished hypotheses (ending with EOS)
    fin_score: jax.Array     # [B, K] length-penalized scores, best first (-inf = empty slot)
    cache: Any               # KV cache, rows b * K + k in `alive` order


def beam_search(model: Model, params, inputs: dict[str, Any], *, num_beams: int = 3,
                max_len: int | None = None, min_len: int = 0, length_penalty: float = 1.0,
                repetition_penalty: float = 1.0, eos_id: int | None = None,
                early_stop: bool = True, convention: str = "exact") -> tuple[jax.Array, jax.Array]:
    """Beam search with the KV cache. Returns (tokens [B, max_len] of the best hypothesis,
    pad after EOS; scores [B]). `eos_id` defaults to the model's.

    A hypothesis of n tokens (its EOS included; n = max_len for one that never emitted EOS)
    scores `sum(log p) / n ** length_penalty` (log p: the model's log-softmax; with a
    repetition penalty, that of the penalized logits). Keeps K alive (no EOS yet) and K
    finished hypotheses per example (t5x/HF style). As in HF, an EOS candidate enters the
    finished set only if it ranks among the step's top K candidates, so `num_beams=1` with
    `length_penalty=0` is exactly greedy decoding. Stops once no alive hypothesis can beat
    the worst finished one of any example: alive log-probs only decrease, so the bound is
    `best_alive_logp / lp(max_len)` for length_penalty >= 0 (`lp(next length)` below 0).
    The bound is exact, so `early_stop=False` (run to max_len) returns the same result.
    Hypotheses still alive at max_len compete with the finished ones. Jit-compatible.

    `convention` (a Python string) reproduces other implementations token for token:
      * "exact" (default): the above.
      * "hf": transformers' `generate(num_beams=K)` (`BeamSearchScorer`, `early_stopping=
        False`). Its stopping rule is a heuristic: an example stops for good (its alive beams
        are dropped, its finished set frozen) once it has K finished hypotheses and the worst
        of them scores >= best candidate's running log-prob / (tokens so far) ** length_penalty,
        although a longer hypothesis could still score higher; `early_stop` is ignored. The
        repetition penalty applies to log-probs (after the log-softmax), as HF's processors
        do; the pad id may be generated; `min_len` is HF's `min_new_tokens`.
      * "open_clip": open_clip's `CoCa.generate(generation_type='beam_search',
        num_beam_groups=1)`, i.e. "hf" as open_clip drives `BeamSearchScorer`: beam scores
        are sums of the processed raw logits (no log-softmax, so they are not log-probs and
        the length penalty divides a sum of logits), and the length counts open_clip's
        <start_of_text> input too: (n + 1) ** length_penalty. open_clip's `min_seq_len` also
        counts it (= min_len + 1); its `seq_len` = max_len + 1.
    In both, the repetition penalty also counts the decoder's start token as seen.
    """
    fam = registry.family_of(model)
    eos_id = fam.eos_id if eos_id is None else eos_id
    pad_id = fam.pad_id
    max_len = _resolve_max_len(fam, max_len)
    k = int(num_beams)
    if k < 1:
        raise ValueError(f"num_beams={num_beams} must be >= 1")
    if convention not in ("exact", "hf", "open_clip"):
        raise ValueError(f"convention={convention!r}: use 'exact', 'hf' or 'open_clip'")
    hf_like = convention != "exact"
    length_offset = 1 if convention == "open_clip" else 0   # open_clip's <start_of_text>
    start_id = fam.start_id  # the decoder's first input
    b = _batch_size(inputs)
    bk = b * k
    alpha = jnp.asarray(length_penalty, jnp.float32)
    batch_axis = fam.cache_batch_axis

    def lp(length):
        return (jnp.asarray(length, jnp.float32) + length_offset) ** alpha

    def select(state: _BeamState, done: jax.Array, logits: jax.Array, cache) -> tuple[_BeamState, jax.Array]:
        t = state.t
        v = logits.shape[-1]
        generated = state.alive_seq.reshape(bk, max_len)
        if hf_like:  # HF: the tokens so far and the decoder's start token (not pads to come)
            generated = jnp.where(jnp.arange(max_len) < t, generated, start_id)
        if convention == "hf":  # HF's processors see log-probs
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            logp = apply_repetition_penalty(logp, generated, repetition_penalty)
        else:
            logp = apply_repetition_penalty(logits, generated, repetition_penalty).astype(jnp.float32)
            if convention == "exact":
                logp = jax.nn.log_softmax(logp, axis=-1)
        # hf/open_clip never block the pad id (pad_id=-1 matches no token).
        logp = mask_logits(logp, t, min_len, eos_id, -1 if hf_like else pad_id).reshape(b, k, v)
        cand = (state.alive_logp[:, :, None] + logp).reshape(b, k * v)
        top_logp, top_idx = jax.lax.top_k(cand, 2 * k)              # [B, 2K], best first
        parent, token = top_idx // v, (top_idx % v).astype(jnp.int32)
        seqs = jnp.take_along_axis(state.alive_seq, parent[:, :, None], axis=1)
        seqs = seqs.at[:, :, t].set(token)
        is_eos = token == eos_id
        # Alive: the best K candidates that did not end.
        alive_logp, ai = jax.lax.top_k(jnp.where(is_eos, NEG_INF, top_logp), k)
        alive_seq = jnp.take_along_axis(seqs, ai[:, :, None], axis=1)
        alive_parent = jnp.take_along_axis(parent, ai, axis=1)
        # Finished: merge the ending candidates ranked within the top K (not once done).
        ends = jnp.logical_and(is_eos, jnp.arange(2 * k)[None] < k)
        new_fin = jnp.where(jnp.logical_and(ends, ~done[:, None]), top_logp / lp(t + 1), NEG_INF)
        fin_score, fi = jax.lax.top_k(jnp.concatenate([state.fin_score, new_fin], axis=1), k)
        fin_seq = jnp.take_along_axis(jnp.concatenate([state.fin_seq, seqs], axis=1), fi[:, :, None], axis=1)
        if hf_like:  # BeamHypotheses.is_done (early_stopping=False)
            full = fin_score[:, -1] > NEG_INF
            done = done | (full & (fin_score[:, -1] >= top_logp[:, 0] / lp(t + 1)))
        flat = (jnp.arange(b)[:, None] * k + alive_parent).reshape(bk)
        cache = gather_beams(cache, flat, batch_axis, bk)
        return _BeamState(t + 1, alive_seq, alive_logp, fin_seq, fin_score, cache), done

    logits, cache, context = _start(fam, params, inputs, repeat=k)
    zeros = jnp.full((b, k, max_len), pad_id, jnp.int32)
    # Only beam 0 is live at the start (the K rows are identical): no duplicate hypotheses.
    init_logp = jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF)[None].repeat(b, axis=0)
    state = _BeamState(jnp.int32(0), zeros, init_logp, zeros, jnp.full((b, k), NEG_INF, jnp.float32), None)
    carry = select(state, jnp.zeros((b,), bool), logits, cache)

    def cond(carry):
        state, done = carry
        if hf_like:
            stop = jnp.all(done)
        else:
            bound_len = jnp.where(alpha >= 0, max_len, state.t + 1)
            best_possible = state.alive_logp[:, 0] / lp(bound_len)
            stop = jnp.logical_and(early_stop, jnp.all(state.fin_score[:, -1] > best_possible))
        return jnp.logical_and(state.t < max_len, jnp.logical_not(stop))

    def body(carry):
        state, done = carry
        last = jax.lax.dynamic_index_in_dim(state.alive_seq, state.t - 1, axis=2, keepdims=False)
        logits, cache = fam.decode_step(params, state.cache, last.reshape(bk), context, state.t)
        return select(state, done, logits, cache)

    state, done = jax.lax.while_loop(cond, body, carry)
    # Hypotheses alive at max_len are complete too (without EOS), unless their example is done.
    alive_ok = jnp.logical_and(state.t >= max_len, ~done)[:, None]
    alive_score = jnp.where(alive_ok, state.alive_logp / lp(max_len), NEG_INF)
    scores = jnp.concatenate([state.fin_score, alive_score], axis=1)
    seqs = jnp.concatenate([state.fin_seq, state.alive_seq], axis=1)
    best = jnp.argmax(scores, axis=1)
    tokens = jnp.take_along_axis(seqs, best[:, None, None], axis=1)[:, 0]
    return _finalize(tokens, eos_id, pad_id), jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0]


# ----------------------------------------------------------------------------- sampling

def filter_top_k(logits: jax.Array, top_k: int | jax.Array) -> jax.Array:
    """Keeps the `top_k` largest logits (ties at the k-th value are kept too); <= 0: all."""
    v = logits.shape[-1]
    if isinstance(top_k, int) and (top_k <= 0 or top_k >= v):
        return logits
    sorted_logits = -jnp.sort(-logits, axis=-1)
    idx = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, v) - 1
    kth = jnp.take_along_axis(sorted_logits, jnp.broadcast_to(idx, logits.shape[:-1] + (1,)), axis=-1)
    return jnp.where(jnp.logical_and(top_k > 0, logits < kth), NEG_INF, logits)


def filter_top_p(logits: jax.Array, top_p: float | jax.Array) -> jax.Array:
    """Nucleus filtering: keeps the smallest set of most likely tokens whose probability
    reaches `top_p` (always at least the most likely one); >= 1: all."""
    if isinstance(top_p, (int, float)) and top_p >= 1.0:
        return logits
    sorted_logits = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p).at[..., 0].set(True)
    cutoff = jnp.take_along_axis(sorted_logits, jnp.sum(keep, axis=-1, keepdims=True) - 1, axis=-1)
    return jnp.where(jnp.logical_and(top_p < 1.0, logits < cutoff), NEG_INF, logits)


def sample_decode(model: Model, params, inputs: dict[str, Any], rng: jax.Array, *,
                  max_len: int | None = None, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, repetition_penalty: float = 1.0, min_len: int = 0,
                  eos_id: int | None = None) -> jax.Array:
    """Ancestral sampling with the KV cache. Returns tokens [B, max_len] (pad after EOS).

    Per step: `process_logits` (repetition penalty, no pad, `min_len`), then / temperature,
    top-k, top-p (nucleus), then a categorical draw with `fold_in(rng, step)`.
    `temperature <= 0` (or `top_k=1`) is greedy. Deterministic for a fixed `rng`;
    jit-compatible (`max_len` static; the other options may be traced).
    """
    fam = registry.family_of(model)
    eos_id = fam.eos_id if eos_id is None else eos_id

    def choose(logits, out, t):
        logits = process_logits(logits.astype(jnp.float32), out, t, repetition_penalty=repetition_penalty,
                                min_len=min_len, eos_id=eos_id, pad_id=fam.pad_id)
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if isinstance(temperature, (int, float)) and temperature <= 0:
            return greedy
        temp = jnp.asarray(temperature, jnp.float32)
        logits = filter_top_p(filter_top_k(logits / jnp.where(temp > 0, temp, 1.0), top_k), top_p)
        sampled = jax.random.categorical(jax.random.fold_in(rng, t), logits, axis=-1).astype(jnp.int32)
        return jnp.where(temp > 0, sampled, greedy)

    return _decode_loop(fam, params, inputs, max_len, eos_id, choose)


# ----------------------------------------------------------------------------- text in / out

def tokens_to_text(vocab, row, eos_id: int | None = None, pad_id: int = 0) -> str:
    """Decoded tokens of one row up to its EOS (default: the vocabulary's), pads dropped, as
    one line with single spaces."""
    eos_id = vocab.eos_id if eos_id is None else eos_id
    ids = [int(t) for t in row if t != pad_id]
    if eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return " ".join(vocab.decode(ids).split())


@functools.lru_cache(maxsize=8)
def make_decoder(model: Model, *, num_beams: int = 1, max_len: int | None = None, min_len: int = 0,
                 length_penalty: float = 1.0, repetition_penalty: float = 1.0, eos_id: int | None = None):
    """A jitted fn(params, inputs) -> tokens [B, max_len]: greedy for num_beams=1, else beam
    search (cached per model and settings). `eos_id` defaults to the model's."""
    fam = registry.family_of(model)
    if num_beams <= 1:
        return jax.jit(functools.partial(greedy_decode, fam, max_len=max_len, min_len=min_len,
                                         repetition_penalty=repetition_penalty, eos_id=eos_id))
    beam = functools.partial(beam_search, fam, num_beams=num_beams, max_len=max_len, min_len=min_len,
                             length_penalty=length_penalty, repetition_penalty=repetition_penalty,
                             eos_id=eos_id)
    return jax.jit(lambda params, inputs: beam(params, inputs)[0])
