"""Greedy decoding: the KV-cache decoder equals the cache-free reference; EOS handling."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from simvlm_jax import decoding
from simvlm_jax.models import simvlm

MAX_LEN = 12


def _prompts(cfg):
    prefix = np.zeros((4, cfg.max_prefix_len), np.int32)
    prefix[0, :3] = [17, 42, 99]
    prefix[1, :5] = [8, 9, 10, 11, 200]   # text-only
    # row 2: image only, no prompt
    prefix[3, :1] = [150]                  # text-only
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.integers(0, 256, (4, cfg.image_size, cfg.image_size, 3)), jnp.uint8),
            jnp.asarray(prefix), jnp.asarray([1, 0, 1, 0], jnp.int32))


def _noisy_params(model, seed=4, mult=1.0, scale=0.7, emb_scale=0.1):
    """A freshly initialised model emits one token forever (the N(0, 1) tied token embedding
    dominates the logits). Shrink the embedding and randomly rescale + shift every other param
    (fixed seed) so that greedy decoding produces varied sequences."""
    cfg = model.config
    params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.key(0), simvlm.dummy_batch(cfg)))["params"])()
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        x = np.asarray(x)
        if "token_embed" in jax.tree_util.keystr(path):
            return jnp.asarray(x * emb_scale)
        noisy = x * (1 + mult * rng.standard_normal(x.shape)) + scale * rng.standard_normal(x.shape)
        return jnp.asarray(noisy, x.dtype)

    return jax.tree_util.tree_map_with_path(perturb, params)


def _stack_layers(params, num_layers=2):
    out = dict(params)
    for part in ("encoder", "decoder"):
        sub = dict(out[part])
        per_layer = [sub.pop(f"layers_{i}") for i in range(num_layers)]
        sub["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_layer)
        out[part] = sub
    return out


@pytest.fixture(scope="module")
def unrolled_params():
    return _noisy_params(simvlm.SimVLM(tiny_config(encoder_layers=2, decoder_layers=2, max_target_len=MAX_LEN)))


@pytest.fixture(scope="module", params=[(False, "none"), (True, "none"), (True, "dots_no_batch")],
                ids=["unrolled", "scan", "scan-remat"])
def setup(request, unrolled_params):
    """The same (perturbed) weights as an unrolled model, a scanned one, and scanned + remat
    (the layout of the base/large/huge gin configs)."""
    scan, remat = request.param
    cfg = tiny_config(encoder_layers=2, decoder_layers=2, max_target_len=MAX_LEN,
                      scan_layers=scan, remat_policy=remat)
    model = simvlm.SimVLM(cfg)
    params = _stack_layers(unrolled_params) if cfg.scan_layers else unrolled_params
    cached = jax.jit(functools.partial(decoding.greedy_decode, model), static_argnames=("max_len",))
    reference = jax.jit(functools.partial(decoding.greedy_decode_no_cache, model),
                        static_argnames=("max_len",))
    return cfg, model, params, cached, reference


def test_kv_cache_decode_equals_no_cache_decode(setup):
    cfg, _, params, cached, reference = setup
    images, prefix, has_image = _prompts(cfg)
    # eos_id=-1: never stop, so every position is compared.
    fast = np.asarray(cached(params, dict(image=images, prefix_tokens=prefix, has_image=has_image), eos_id=-1))
    slow = np.asarray(reference(params, dict(image=images, prefix_tokens=prefix, has_image=has_image), eos_id=-1))
    assert fast.shape == slow.shape == (4, MAX_LEN)
    # The comparison is only meaningful if the model emits varied sequences.
    assert len(np.unique(slow)) >= 8, slow
    assert all(len(np.unique(row)) >= 3 for row in slow), slow
    assert len({tuple(r) for r in slow}) == 4, slow  # different prompts -> different captions
    assert np.all(slow > 0)  # pad/BOS (0) is never generated
    np.testing.assert_array_equal(fast, slow)
    # Scanned and unrolled layers hold the same weights here: the same captions.
    global _FIRST_DECODE
    if _FIRST_DECODE is None:
        _FIRST_DECODE = slow
    np.testing.assert_array_equal(slow, _FIRST_DECODE)


_FIRST_DECODE = None


def test_decode_matches_teacher_forced_argmax(setup):
    """The reference decoder's tokens are the argmax of a full forward pass on its own output."""
    cfg, model, params, _, reference = setup
    images, prefix, has_image = _prompts(cfg)
    tokens = reference(params, dict(image=images, prefix_tokens=prefix, has_image=has_image), eos_id=-1)
    logits = jax.jit(model.apply)({"params": params}, {"image": images, "prefix_tokens": prefix,
                                                       "has_image": has_image, "target_tokens": tokens})
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits.at[..., 0].set(-jnp.inf), -1)),
                                  np.asarray(tokens))


def test_eos_handling(setup):
    cfg, _, params, cached, reference = setup
    images, prefix, has_image = _prompts(cfg)
    raw = np.asarray(reference(params, dict(image=images, prefix_tokens=prefix, has_image=has_image), eos_id=-1))
    # Use a token that the model emits mid-sequence in some (not all) rows as "EOS".
    candidates = [t for t in np.unique(raw[:, 1:-1])
                  if 0 < sum(t in row[1:-1] for row in raw) < len(raw)]
    assert candidates, raw
    eos = int(candidates[0])
    expected = raw.copy()
    for row in expected:
        hits = np.flatnonzero(row == eos)
        if len(hits):
            row[hits[0] + 1:] = 0  # the EOS is kept, everything after it is 0
    assert np.any(expected == 0)
    for fn in (cached, reference):
        out = np.asarray(fn(params, dict(image=images, prefix_tokens=prefix, has_image=has_image), eos_id=eos))
        np.testing.assert_array_equal(out, expected)
    # Shorter max_len: a prefix of the full decode.
    out = np.asarray(cached(params, dict(image=images, prefix_tokens=prefix, has_image=has_image), max_len=5, eos_id=-1))
    np.testing.assert_array_equal(out, raw[:, :5])


def test_every_row_ending_at_step_0_gives_eos_then_zeros(setup):
    cfg, _, params, cached, reference = setup
    images, prefix, has_image = _prompts(cfg)
    raw = np.asarray(reference(params, dict(image=images, prefix_tokens=prefix, has_image=has_image), eos_id=-1))
    rows = jnp.asarray([2, 2, 2, 2])  # the same example 4 times; its first token is the EOS
    for fn in (cached, reference):
        out = np.asarray(fn(params, dict(image=images[rows], prefix_tokens=prefix[rows], has_image=has_image[rows]), eos_id=int(raw[2, 0])))
        np.testing.assert_array_equal(out[:, 0], raw[2, 0])
        np.testing.assert_array_equal(out[:, 1:], 0)


def test_finalize_zeroes_after_first_eos():
    tokens = jnp.asarray([[5, 1, 7, 1, 9], [5, 6, 7, 8, 9], [1, 3, 3, 3, 3]])
    np.testing.assert_array_equal(np.asarray(decoding._finalize(tokens, 1, 0)),
                                  [[5, 1, 0, 0, 0], [5, 6, 7, 8, 9], [1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(decoding._finalize(tokens, 1, 4)),
                                  [[5, 1, 4, 4, 4], [5, 6, 7, 8, 9], [1, 4, 4, 4, 4]])


def test_decoders_block_and_pad_with_the_models_pad_id():
    """Id 0 is a real token when the model's pad id is another (CLIP BPE: id 0 is '!'): it may
    be generated; the pad id never is, and fills the rows after EOS."""
    from simvlm_jax.models import registry
    fam = registry.family_of(tiny_config("coca", vocab_size=8, max_text_len=6, bos_id=6, eos_id=7, pad_id=5))
    params = jax.tree_util.tree_map(lambda x: x * 4.0, nn.meta.unbox(fam.init_params(jax.random.key(0))))
    inputs = {"image": jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)), jnp.uint8)}
    raw = np.asarray(decoding.make_decoder(fam, eos_id=-1)(params, inputs))
    assert 0 in raw and 5 not in raw  # id 0 generated, the pad id never
    eos = int(raw[0, 2])
    for num_beams in (1, 2):
        out = np.asarray(decoding.make_decoder(fam, num_beams=num_beams, eos_id=eos)(params, inputs))
        ended = [r for r in out if eos in list(r[:-1])]
        assert ended and all(set(r[list(r).index(eos) + 1:]) == {5} for r in ended), (num_beams, out)
