"""Beam search, sampling and the shared logits processor (KV-cache decoders).

References are computed without the decoders: teacher-forced forward passes give the
model's log-probs of a sequence, brute-force enumeration gives the true best sequence
on a 6-token vocabulary. Decoding options other than num_beams/max_len are passed as
traced arguments, so each decoder compiles once per model.
"""
from __future__ import annotations

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from simvlm_jax import decoding
from simvlm_jax.models import registry, simvlm

MAX_LEN = 8


def _noisy_params(model, seed=4, mult=1.0, scale=0.7, emb_scale=0.3):
    """A fresh init emits one token forever; shrink the tied embedding and perturb every other
    param (fixed seed) so that decoding produces varied sequences from a spread distribution."""
    params = jax.jit(lambda: nn.meta.unbox(
        model.init(jax.random.key(0), simvlm.dummy_batch(model.config)))["params"])()
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        x = np.asarray(x)
        if "token_embed" in jax.tree_util.keystr(path):
            return jnp.asarray(x * emb_scale)
        return jnp.asarray(x * (1 + mult * rng.standard_normal(x.shape)) + scale * rng.standard_normal(x.shape),
                           x.dtype)

    return jax.tree_util.tree_map_with_path(perturb, params)


def _stack_layers(params, cfg):
    out = dict(params)
    for part, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        sub = dict(out[part])
        per_layer = [sub.pop(f"layers_{i}") for i in range(n)]
        sub["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_layer)
        out[part] = sub
    return out


def _inputs(cfg, n=4):
    prefix = np.zeros((n, cfg.max_prefix_len), np.int32)
    prefix[0, :3] = [17, 22, 9]
    prefix[1, :5] = [8, 9, 10, 11, 20]   # text-only
    if n > 3:
        prefix[3, :1] = [15]
    prefix = np.where(prefix > 0, 1 + (prefix - 1) % (cfg.vocab_size - 1), 0)  # ids < vocab_size
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (n, cfg.image_size, cfg.image_size, 3)), jnp.uint8)
    has_image = jnp.asarray([1, 0, 1, 0][:n], jnp.int32)
    return images, jnp.asarray(prefix), has_image


class Setup:
    """A tiny model + jitted decoders; every option but num_beams/max_len is traced."""

    def __init__(self, cfg, params):
        self.cfg, self.params = cfg, params
        self.model = model = simvlm.SimVLM(cfg)
        self.inputs = _inputs(cfg)
        self.greedy = jax.jit(functools.partial(decoding.greedy_decode, model))
        self.beam = jax.jit(functools.partial(decoding.beam_search, model),
                            static_argnames=("num_beams", "max_len"))
        self.sample = jax.jit(functools.partial(decoding.sample_decode, model))
        self.forward = jax.jit(model.apply)
        # Every traced option is always passed (a missing keyword would mean a recompile).
        self.defaults = {
            self.greedy: dict(eos_id=1, min_len=0, repetition_penalty=1.0),
            self.beam: dict(length_penalty=1.0, eos_id=1, min_len=0, repetition_penalty=1.0, early_stop=True),
            self.sample: dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, min_len=0,
                              eos_id=1)}

    def logits(self, tokens, inputs=None):
        images, prefix, has_image = inputs or self.inputs
        return np.array(self.forward({"params": self.params}, {
            "image": images, "prefix_tokens": prefix, "has_image": has_image,
            "target_tokens": jnp.asarray(tokens, jnp.int32)}))

    def decode_inputs(self, inputs=None):
        images, prefix, has_image = inputs or self.inputs
        return {"image": images, "prefix_tokens": prefix, "has_image": has_image}

    def run(self, fn, **kw):
        return fn(self.params, self.decode_inputs(), **{**self.defaults[fn], **kw})


@pytest.fixture(scope="module")
def s():
    cfg = tiny_config(vocab_size=32, decoder_layers=2, max_target_len=MAX_LEN)
    return Setup(cfg, _noisy_params(simvlm.SimVLM(cfg)))


def _lengths(tokens, eos_id):
    """Tokens up to and including the first EOS (max_len if none)."""
    tokens = np.asarray(tokens)
    out = []
    for row in tokens:
        hits = np.flatnonzero(row == eos_id)
        out.append(hits[0] + 1 if len(hits) else len(row))
    return np.asarray(out)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _seq_scores(logits, tokens, eos_id, alpha):
    """sum of the model's log-probs of each sequence (through its EOS) / length ** alpha."""
    tokens = np.asarray(tokens)
    logp = np.take_along_axis(_log_softmax(logits.astype(np.float64)), tokens[..., None], -1)[..., 0]
    n = _lengths(tokens, eos_id)
    mask = np.arange(tokens.shape[1])[None] < n[:, None]
    return (logp * mask).sum(1) / n.astype(np.float64) ** alpha


def _raw(s):
    return np.asarray(s.run(s.greedy, eos_id=-1))


def _mid_tokens(s):
    """Tokens the never-stopping greedy decoder emits mid-sequence in some but not all rows."""
    raw = _raw(s)
    return [int(t) for t in np.unique(raw[:, 1:-1]) if 0 < sum(t in r[1:-1] for r in raw) < len(raw)]


# ----------------------------------------------------------------------------- beam search

def test_beam_size_1_is_greedy(s):
    eos_ids = [-1] + _mid_tokens(s)[:3]
    assert len(eos_ids) == 4
    ended_early = 0
    for eos in eos_ids:
        greedy = np.asarray(s.run(s.greedy, eos_id=eos))
        tokens, scores = s.run(s.beam, num_beams=1, length_penalty=0.0, eos_id=eos)
        np.testing.assert_array_equal(np.asarray(tokens), greedy)
        np.testing.assert_allclose(np.asarray(scores), _seq_scores(s.logits(greedy), greedy, eos, 0.0),
                                   rtol=1e-4, atol=1e-4)
        ended_early += int(np.sum(_lengths(greedy, eos) < MAX_LEN))
    assert ended_early >= 2  # the comparison covers sequences that stop at EOS


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_beam_score_is_the_teacher_forced_log_prob(s, alpha):
    ended = 0
    for eos in [-1] + _mid_tokens(s)[:4]:
        tokens, scores = s.run(s.beam, num_beams=4, length_penalty=alpha, eos_id=eos)
        tokens = np.asarray(tokens)
        n = _lengths(tokens, eos)
        ended += int(np.sum(n < MAX_LEN))
        for row, length in zip(tokens, n):
            assert np.all(row[:length] > 0) and np.all(row[length:] == 0), tokens  # no pad; 0 after EOS
        np.testing.assert_allclose(np.asarray(scores), _seq_scores(s.logits(tokens), tokens, eos, alpha),
                                   rtol=1e-4, atol=1e-4)
    assert ended > 0  # hypotheses that end with EOS are covered


def test_beam_search_scores_at_least_greedy(s):
    """Not a theorem for beam search, but it holds here, and beam search must find better
    sequences than greedy for some rows."""
    better = 0
    for eos in _mid_tokens(s)[:3] + [-1]:
        greedy = np.asarray(s.run(s.greedy, eos_id=eos))
        greedy_scores = _seq_scores(s.logits(greedy), greedy, eos, 0.0)
        tokens, scores = s.run(s.beam, num_beams=4, length_penalty=0.0, eos_id=eos)
        scores = np.asarray(scores)
        np.testing.assert_allclose(scores, _seq_scores(s.logits(tokens), tokens, eos, 0.0), rtol=1e-4, atol=1e-4)
        assert np.all(scores >= greedy_scores - 1e-4), (scores, greedy_scores)
        better += int(np.sum(scores > greedy_scores + 1e-3))
    assert better >= 2


def test_beam_search_early_stop_is_exact(s):
    """Stopping once no alive hypothesis can beat the finished ones changes nothing, including
    with length penalties that favour long hypotheses (where a bound on the current length,
    as in HF's default heuristic, would stop too early)."""
    longer = 0
    for eos in _mid_tokens(s)[:4]:
        for alpha in (0.0, 1.0, 2.0, 3.0, -0.5):
            kw = dict(num_beams=4, length_penalty=alpha, eos_id=eos)
            tokens, scores = s.run(s.beam, **kw)
            full_tokens, full_scores = s.run(s.beam, early_stop=False, **kw)
            np.testing.assert_array_equal(np.asarray(tokens), np.asarray(full_tokens), err_msg=str(kw))
            np.testing.assert_allclose(np.asarray(scores), np.asarray(full_scores), rtol=1e-6)
            if alpha == 3.0:
                longer += int(np.sum(_lengths(tokens, eos) > _lengths(s.run(s.beam, **{**kw, "length_penalty": 0.0})[0], eos)))
    assert longer > 0  # large penalties really select longer hypotheses


def test_beam_search_scan_layers_matches_unrolled(s):
    cfg = tiny_config(vocab_size=32, decoder_layers=2, max_target_len=MAX_LEN, scan_layers=True)
    scanned = simvlm.SimVLM(cfg)
    params = _stack_layers(s.params, cfg)
    # The scanned cache has a leading layers axis: [layers, batch * beams, len, heads, head_dim].
    eos = _mid_tokens(s)[0]
    beam = jax.jit(functools.partial(decoding.beam_search, scanned, num_beams=4))
    for alpha in (0.0, 1.0):
        want_tokens, want_scores = s.run(s.beam, num_beams=4, length_penalty=alpha, eos_id=eos)
        tokens, scores = beam(params, s.decode_inputs(), length_penalty=alpha, eos_id=eos)
        np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want_tokens))
        np.testing.assert_allclose(np.asarray(scores), np.asarray(want_scores), rtol=1e-5, atol=1e-5)


def test_beam_search_min_len(s):
    min_len = 4
    # An EOS id with which some caption is shorter than min_len without the constraint.
    for eos in _mid_tokens(s):
        free, _ = s.run(s.beam, num_beams=4, length_penalty=0.0, eos_id=eos)
        if np.any(_lengths(free, eos) <= min_len):
            break
    else:
        pytest.fail("no EOS candidate ends a caption early")
    for alpha in (0.0, 1.0):
        tokens, scores = s.run(s.beam, num_beams=4, length_penalty=alpha, eos_id=eos, min_len=min_len)
        tokens = np.asarray(tokens)
        assert np.all(_lengths(tokens, eos) > min_len), tokens   # >= min_len tokens before the EOS
        # Scores stay the model's log-probs (EOS blocking removes candidates, not mass).
        np.testing.assert_allclose(np.asarray(scores), _seq_scores(s.logits(tokens), tokens, eos, alpha),
                                   rtol=1e-4, atol=1e-4)
    for eos in _mid_tokens(s):  # greedy: an EOS id that ends some caption early
        if np.any(_lengths(s.run(s.greedy, eos_id=eos), eos) <= min_len):
            break
    else:
        pytest.fail("no EOS candidate ends a greedy caption early")
    greedy = np.asarray(s.run(s.greedy, eos_id=eos, min_len=min_len))
    assert np.all(_lengths(greedy, eos) > min_len), greedy
    sampled = np.asarray(s.run(s.sample, rng=jax.random.key(3), eos_id=eos, min_len=min_len))
    assert np.all(_lengths(sampled, eos) > min_len), sampled


@pytest.fixture(scope="module")
def exhaustive():
    """Vocabulary of 6 (pad, EOS=1, four words), max_len 3: every hypothesis (the
    EOS-terminated ones of length 1..3 and the 64 that reach max_len) with its
    teacher-forced per-token log-probs, for 3 prompts."""
    cfg = tiny_config(vocab_size=6, max_target_len=3)
    model = simvlm.SimVLM(cfg)
    params = _noisy_params(model, seed=3, emb_scale=0.5)
    images, prefix, has_image = _inputs(cfg, n=3)
    words, eos = [2, 3, 4, 5], 1
    hyps = [list(w) + [eos] + [0] * (2 - len(w)) for n in range(3) for w in itertools.product(words, repeat=n)]
    hyps += [list(w) for w in itertools.product(words, repeat=3)]
    hyps = np.asarray(hyps, np.int32)
    assert len(hyps) == 1 + 4 + 16 + 64
    rows = np.repeat(np.arange(3), len(hyps))
    logits = np.asarray(jax.jit(model.apply)({"params": params}, {
        "image": images[rows], "prefix_tokens": prefix[rows], "has_image": has_image[rows],
        "target_tokens": jnp.asarray(np.tile(hyps, (3, 1)))}))
    # 16 alive hypotheses x 5 tokens = 80 candidates at the last step: 80 beams keep them all.
    beam = jax.jit(functools.partial(decoding.beam_search, model, num_beams=80, eos_id=eos))
    assert eos == registry.family_of(model).eos_id
    return hyps, logits, functools.partial(beam, params, {"image": images, "prefix_tokens": prefix,
                                                          "has_image": has_image})


EXHAUSTIVE_SETTINGS = [(0.0, 0), (1.0, 0), (0.0, 1), (1.0, 1), (2.0, 0), (0.5, 2)]  # (alpha, min_len)


def _exhaustive_best(hyps, logits, alpha, min_len):
    scores = _seq_scores(logits, np.tile(hyps, (3, 1)), 1, alpha).reshape(3, len(hyps))
    allowed = ~((hyps == 1).any(1) & (_lengths(hyps, 1) <= min_len))  # EOS only after min_len tokens
    scores = np.where(allowed[None], scores, -np.inf)
    return scores.argmax(1), scores.max(1)


@pytest.mark.parametrize("alpha,min_len", EXHAUSTIVE_SETTINGS)
def test_beam_search_finds_the_exhaustive_argmax(exhaustive, alpha, min_len):
    hyps, logits, beam = exhaustive
    best, best_scores = _exhaustive_best(hyps, logits, alpha, min_len)
    tokens, scores = beam(length_penalty=alpha, min_len=min_len)
    np.testing.assert_array_equal(np.asarray(tokens), hyps[best])
    np.testing.assert_allclose(np.asarray(scores), best_scores, rtol=1e-4, atol=1e-4)


def test_exhaustive_reference_is_not_trivial(exhaustive):
    """The true best hypotheses vary with the prompt, the length penalty and min_len (EOS-ended
    ones of several lengths and ones that reach max_len)."""
    hyps, logits, _ = exhaustive
    found = {tuple(hyps[i]) for a, m in EXHAUSTIVE_SETTINGS for i in _exhaustive_best(hyps, logits, a, m)[0]}
    assert len(found) >= 4, found
    assert {int(n) for n in _lengths(np.asarray(sorted(found)), 1)} == {1, 2, 3}, found
    assert any(1 not in h for h in found), found


def test_gather_beams_batch_axis():
    b, k = 2, 3
    flat = jnp.asarray([2, 2, 0, 4, 3, 5])
    unrolled = {"layers_0": {"self_attention": {
        "cached_key": jnp.arange(b * k * 2.0).reshape(b * k, 2), "cache_index": jnp.int32(1)},
        "cross_attention": {"cross_key": jnp.arange(b * k * 1.0).reshape(b * k, 1)}}}
    out = decoding.gather_beams(unrolled, flat, 0, b * k)
    np.testing.assert_array_equal(out["layers_0"]["self_attention"]["cached_key"][:, 0],
                                  2 * np.asarray(flat))
    assert int(out["layers_0"]["self_attention"]["cache_index"]) == 1
    np.testing.assert_array_equal(out["layers_0"]["cross_attention"]["cross_key"][:, 0], np.arange(6))
    # Scanned: leading layers axis (here 6 layers, the same size as batch * beams).
    scanned = {"layers": {"self_attention": {
        "cached_key": jnp.arange(6 * b * k * 1.0).reshape(6, b * k, 1),
        "cache_index": jnp.arange(6, dtype=jnp.int32)}}}
    out = decoding.gather_beams(scanned, flat, 1, b * k)["layers"]["self_attention"]
    np.testing.assert_array_equal(out["cached_key"][..., 0],
                                  np.arange(36).reshape(6, 6)[:, np.asarray(flat)])
    np.testing.assert_array_equal(out["cache_index"], np.arange(6))


# ----------------------------------------------------------------------------- sampling

def test_sampling_limits_equal_greedy(s):
    eos = _mid_tokens(s)[0]
    greedy = np.asarray(s.run(s.greedy, eos_id=eos))
    key = jax.random.key(0)
    for kw in (dict(temperature=0.0), dict(temperature=1e-5), dict(top_k=1), dict(top_k=1, top_p=0.9),
               dict(temperature=2.0, top_p=1e-6)):
        out = np.asarray(s.run(s.sample, rng=key, eos_id=eos, **kw))
        np.testing.assert_array_equal(out, greedy, err_msg=str(kw))
    # A Python temperature of 0 takes the static greedy path.
    static = jax.jit(functools.partial(decoding.sample_decode, s.model, temperature=0.0))
    np.testing.assert_array_equal(np.asarray(static(s.params, s.decode_inputs(), key, eos_id=eos)), greedy)


def test_sampling_is_deterministic_per_rng(s):
    a = np.asarray(s.run(s.sample, rng=jax.random.key(7), eos_id=-1))
    b = np.asarray(s.run(s.sample, rng=jax.random.key(7), eos_id=-1))
    c = np.asarray(s.run(s.sample, rng=jax.random.key(8), eos_id=-1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(a > 0)
    assert not np.array_equal(a, _raw(s))


def _sampled_positions(s, seeds, **kw):
    """(sequence, position, token, teacher-forced logits with pad masked) of every sampled token."""
    out = []
    for seed in seeds:
        tokens = np.asarray(s.run(s.sample, rng=jax.random.key(seed), eos_id=-1, **kw))
        logits = s.logits(tokens)
        logits[..., 0] = -np.inf
        for i, row in enumerate(tokens):
            for t, tok in enumerate(row):
                out.append((tok, logits[i, t]))
    return out


def test_top_k_never_samples_outside_the_top_k(s):
    k, temp = 3, 2.0

    def outside(samples):
        # rank = number of tokens with a clearly larger logit
        return sum(int(np.sum(lg > lg[tok] + 1e-4) >= k) for tok, lg in samples)

    assert outside(_sampled_positions(s, range(4), temperature=temp)) > 0  # the filter matters
    samples = _sampled_positions(s, range(4), temperature=temp, top_k=k)
    assert outside(samples) == 0
    assert len({int(tok) for tok, _ in samples}) > k  # different tokens at different steps


def test_top_p_never_samples_outside_the_nucleus(s):
    p, temp = 0.3, 1.5

    def outside(samples):
        bad = 0
        for tok, lg in samples:
            probs = np.exp(_log_softmax(lg.astype(np.float64) / temp))
            # the token is in the nucleus iff the mass of the tokens above it is < p
            bad += int(probs[probs > probs[tok] * (1 + 1e-4)].sum() >= p + 1e-4)
        return bad

    assert outside(_sampled_positions(s, range(4), temperature=temp)) > 0
    samples = _sampled_positions(s, range(4), temperature=temp, top_p=p)
    assert outside(samples) == 0
    # More than the argmax is sampled: the nucleus holds several tokens.
    assert sum(int(np.sum(lg > lg[tok] + 1e-4) > 0) for tok, lg in samples) > 0


def test_filters_unit():
    logits = jnp.asarray([[1.0, 3.0, 2.0, -1.0], [0.0, 0.0, 5.0, 4.0]])
    np.testing.assert_array_equal(np.isfinite(decoding.filter_top_k(logits, 2)),
                                  [[False, True, True, False], [False, False, True, True]])
    np.testing.assert_array_equal(np.isfinite(decoding.filter_top_k(logits, jnp.int32(0))), True)
    probs = np.asarray(jax.nn.softmax(logits[1]))  # [.005, .005, .727, .268]
    kept = np.isfinite(decoding.filter_top_p(logits, 0.7))
    np.testing.assert_array_equal(kept[1], [False, False, True, False])
    kept = np.isfinite(decoding.filter_top_p(logits, float(probs[2] + 0.01)))
    np.testing.assert_array_equal(kept[1], [False, False, True, True])


# ----------------------------------------------------------------------------- repetition penalty

def test_apply_repetition_penalty_unit():
    logits = jnp.asarray([[2.0, -2.0, 3.0, -1.0, 4.0]])
    out = decoding.apply_repetition_penalty(logits, jnp.asarray([[1, 2, 0]]), 2.0)
    np.testing.assert_allclose(np.asarray(out), [[1.0, -4.0, 1.5, -1.0, 4.0]])  # ids 0, 1, 2 seen
    out = decoding.process_logits(logits, jnp.asarray([[4, 4]]), 0, repetition_penalty=jnp.float32(4.0),
                                  min_len=1, eos_id=3)
    np.testing.assert_allclose(np.asarray(out), [[-np.inf, -2.0, 3.0, -np.inf, 1.0]])


def test_repetition_penalty_greedy_matches_reference(s):
    """Step-by-step reference: teacher-forced logits, penalize the tokens emitted so far, argmax."""
    penalty = 3.0
    out = np.zeros((4, MAX_LEN), np.int32)
    for t in range(MAX_LEN):
        logits = s.logits(out)[:, t].astype(np.float64)
        for i in range(4):
            seen = np.unique(out[i, :t])
            logits[i, seen] = np.where(logits[i, seen] > 0, logits[i, seen] / penalty, logits[i, seen] * penalty)
        logits[:, 0] = -np.inf
        out[:, t] = logits.argmax(-1)
    got = np.asarray(s.run(s.greedy, eos_id=-1, repetition_penalty=penalty))
    np.testing.assert_array_equal(got, out)
    plain = _raw(s)
    assert not np.array_equal(got, plain)
    repeats = lambda x: sum(len(r) - len(set(r.tolist())) for r in x)  # noqa: E731
    assert repeats(got) < repeats(plain)
    # Beam search (1 beam, no length penalty) and zero-temperature sampling share the processor.
    tokens, _ = s.run(s.beam, num_beams=1, length_penalty=0.0, eos_id=-1, repetition_penalty=penalty)
    np.testing.assert_array_equal(np.asarray(tokens), out)
    sampled = s.run(s.sample, rng=jax.random.key(0), temperature=0.0, eos_id=-1, repetition_penalty=penalty)
    np.testing.assert_array_equal(np.asarray(sampled), out)
    wide, _ = s.run(s.beam, num_beams=4, length_penalty=0.0, eos_id=-1, repetition_penalty=penalty)
    assert repeats(np.asarray(wide)) < repeats(s.run(s.beam, num_beams=4, length_penalty=0.0, eos_id=-1)[0])
