"""CoCa beyond the forward pass: cached caption decoding, the sharded Trainer (loss,
gradient accumulation, frozen encoder), the conv-stem encoder."""
from __future__ import annotations

import functools

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from simvlm_jax import decoding, partitioning, train
from simvlm_jax.models import coca, family, simvlm

# conftest's tiny CoCa, with 2 + 2 text layers (decoding tests see a deeper cache).
SIZES = dict(vocab_size=50, unimodal_layers=2, multimodal_layers=2, embed_dim=32)
OPEN_CLIP = dict(open_clip_compatible=True, activation="gelu_exact", layer_norm_eps=1e-5, bos_id=3)
EOS = 1


def tiny(**overrides) -> coca.CoCaConfig:
    return tiny_config("coca", **{**SIZES, **overrides})


def sharp_params(cfg, seed=0):
    """Random params with larger weights, so that greedy/beam choices are far from ties."""
    model = coca.CoCa(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(seed), coca.dummy_batch(cfg, 2))["params"])
    return model, jax.tree_util.tree_map(lambda x: x * 3 if x.ndim >= 2 else x, params)


def images(n=3, size=32, seed=1):
    return jax.random.randint(jax.random.key(seed), (n, size, size, 3), 0, 255).astype(jnp.uint8)


# ----------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("overrides", [{}, dict(OPEN_CLIP, scan_layers=True)], ids=["paper", "open_clip-scan"])
def test_cached_decoding_equals_recomputing_the_whole_caption(overrides):
    """KV cache (unimodal + multimodal self-attention, cached image keys/values) gives the
    tokens of the cache-free decoder, which re-runs teacher forcing every step."""
    cfg = tiny(**overrides)
    model, params = sharp_params(cfg)
    imgs = images()
    none = jnp.zeros((3, 0), jnp.int32)
    has = jnp.ones((3,), jnp.int32)
    inputs = {"image": imgs, "prefix_tokens": none, "has_image": has}
    cached = jax.jit(functools.partial(decoding.greedy_decode, model, eos_id=EOS))(params, inputs)
    ref = jax.jit(functools.partial(decoding.greedy_decode_no_cache, model, eos_id=EOS))(params, inputs)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(ref))
    assert cached.shape == (3, cfg.max_text_len)
    assert len(set(map(tuple, np.asarray(cached).tolist()))) > 1  # the image matters
    beam1, _ = decoding.beam_search(model, params, inputs, num_beams=1, length_penalty=0.0, eos_id=EOS)
    np.testing.assert_array_equal(np.asarray(beam1), np.asarray(cached))


def test_cached_step_logits_equal_teacher_forcing():
    cfg = tiny()
    model, params = sharp_params(cfg)
    imgs = images(2)
    caption = jnp.asarray([[5, 9, 13, 2, 7], [4, 4, 8, 30, 1]], jnp.int32)
    _, image_tokens = model.apply({"params": params}, imgs, method=model.image_features)
    full = model.apply({"params": params}, coca.with_bos(caption, cfg.bos_id), image_tokens,
                       method=model.caption_logits)
    text = coca.with_bos(caption, cfg.bos_id)
    logits, cache = [], None
    for t in range(caption.shape[1]):
        variables = {"params": params} if cache is None else {"params": params, "cache": cache}
        out, mutated = model.apply(variables, text[:, t:t + 1], image_tokens if cache is None else None,
                                   jnp.int32(t), method=model.decode_step, mutable=["cache"])
        cache = mutated["cache"]
        logits.append(out[:, 0])
    np.testing.assert_allclose(np.stack(logits, 1), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_beam_scores_match_teacher_forcing_and_make_decoder_uses_config_eos():
    """The beam's reported score is the teacher-forced log-prob of the tokens it returns:
    the KV caches of CoCa's two text stacks follow their beams when hypotheses are reordered."""
    cfg = tiny(eos_id=7)
    model, params = sharp_params(cfg, seed=2)
    imgs = images(4, seed=3)
    none, has = jnp.zeros((4, 0), jnp.int32), jnp.ones((4,), jnp.int32)
    inputs = {"image": imgs, "prefix_tokens": none, "has_image": has}
    greedy = decoding.make_decoder(model)(params, inputs)
    # make_decoder ends captions at CoCaConfig.eos_id: nothing follows a 7.
    for row in np.asarray(greedy):
        if 7 in row.tolist():
            assert not row[row.tolist().index(7) + 1:].any()
    beam, beam_scores = decoding.beam_search(model, params, inputs, num_beams=4, length_penalty=0.0,
                                             eos_id=7)
    np.testing.assert_allclose(np.asarray(beam_scores), _sequence_logp(model, params, imgs, np.asarray(beam), cfg, 7),
                               rtol=1e-4, atol=1e-4)
    assert not np.array_equal(np.asarray(beam), np.asarray(greedy))  # beams were reordered


def _sequence_logp(model, params, imgs, tokens, cfg, eos):
    """Sum of log p of each row's tokens up to and including its EOS (teacher forcing)."""
    _, image_tokens = model.apply({"params": params}, imgs, method=model.image_features)
    logits = model.apply({"params": params}, coca.with_bos(jnp.asarray(tokens), cfg.bos_id),
                         image_tokens, method=model.caption_logits)
    # As in beam search (and HF): log-softmax over the raw logits, masks applied afterwards.
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    out = []
    for r, row in enumerate(tokens):
        n = row.tolist().index(eos) + 1 if eos in row.tolist() else len(row)
        out.append(sum(logp[r, t, row[t]] for t in range(n)))
    return np.asarray(out)


# ----------------------------------------------------------------------------- training

def coca_batch(cfg, batch_size=8, seed=0, full_length=False):
    rng = np.random.default_rng(seed)
    targets = np.zeros((batch_size, cfg.max_text_len), np.int32)
    for row in range(batch_size):
        n = cfg.max_text_len if full_length else int(rng.integers(2, cfg.max_text_len + 1))
        targets[row, :n] = rng.integers(2, cfg.vocab_size, n)
    return {"image": rng.integers(0, 256, (batch_size, cfg.image_size, cfg.image_size, 3)).astype(np.uint8),
            "target_tokens": targets,
            # A PrefixLM pipeline's extra features: the CoCa trainer must drop them.
            "prefix_tokens": np.zeros((batch_size, 0), np.int32), "has_image": np.ones((batch_size,), np.int32)}


def make_trainer(cfg, mesh_shape, microbatches=1, contrastive_weight=1.0, **opt):
    gin.clear_config()
    for k, v in dict(learning_rate=3e-3, warmup_steps=1, **opt).items():
        gin.bind_parameter(f"make_optimizer.{k}", v)
    mesh = partitioning.make_mesh(**mesh_shape)
    return train.Trainer(cfg, mesh, train.make_optimizer(20), microbatches=microbatches,
                         loss_weights={"contrastive": contrastive_weight})


def run_steps(trainer, batches):
    state, metrics = trainer.init_state(), []
    for b in batches:
        batch = partitioning.host_batch_to_global(trainer.model_inputs(b), trainer.mesh, trainer.batch_shardings)
        state, m = trainer.step(state, batch)
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    return state, metrics


def test_coca_trains_on_a_tensor_parallel_mesh_and_loss_terms_are_logged():
    cfg = tiny(unimodal_layers=1, multimodal_layers=1)
    trainer = make_trainer(cfg, dict(data=2, fsdp=2, tensor=2))
    specs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda s: s.spec, trainer.state_shardings.params))
    assert any("tensor" in str(s) for s in specs)
    batch = coca_batch(cfg)
    _, metrics = run_steps(trainer, [batch] * 12)
    first, last = metrics[0], metrics[-1]
    for k in ("loss", "contrastive_loss", "caption_loss", "token_accuracy", "logit_scale", "grad_norm"):
        assert np.isfinite(last[k]), k
    # loss = 1.0 * contrastive + 2.0 * caption (the paper's weights are the defaults)
    assert last["loss"] == pytest.approx(last["contrastive_loss"] + 2.0 * last["caption_loss"], rel=1e-5)
    assert first["num_target_tokens"] == float((batch["target_tokens"] > 0).sum())
    assert last["loss"] < 0.6 * first["loss"]  # memorizes the fixed batch
    assert last["contrastive_loss"] < first["contrastive_loss"]


@pytest.mark.slow
def test_coca_grad_accumulation_equals_big_batch_for_the_caption_loss():
    """Caption CE over equal-length captions: 2 microbatches == one big batch. (The
    contrastive term uses each microbatch's negatives, as open_clip's accumulation does.)"""
    cfg = tiny(unimodal_layers=1, multimodal_layers=1)
    batches = [coca_batch(cfg, batch_size=16, seed=s, full_length=True) for s in range(3)]
    results = []
    for k in (1, 2):
        trainer = make_trainer(cfg, dict(data=4, fsdp=2, tensor=1), microbatches=k, contrastive_weight=0.0)
        results.append(run_steps(trainer, batches))
    (s1, m1), (s2, m2) = results
    # Losses after updates agree, so the updates did; the gradient norms directly.
    # (Params are not compared elementwise: Adam turns float noise in ~0 gradients into
    # lr-sized steps.)
    for key in ("loss", "caption_loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in m1], [m[key] for m in m2], rtol=2e-5, err_msg=key)


def test_frozen_encoder_training_keeps_the_encoder_and_has_no_optimizer_state_for_it():
    """CoCa frozen-encoder mode: a new pooler + heads train, the image encoder stays as is."""
    cfg = tiny(freeze_encoder=True, unimodal_layers=1, multimodal_layers=1)
    trainer = make_trainer(cfg, dict(data=2, fsdp=4, tensor=1), frozen=("visual/.*",))
    init = trainer.init_state()
    init_visual = jax.device_get(init.params["visual"])
    init_pooler = jax.device_get(init.params["pooler"])
    state, metrics = run_steps(trainer, [coca_batch(cfg)] * 4)
    same = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), b), state.params["visual"], init_visual)
    assert all(jax.tree_util.tree_leaves(same))
    changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(np.asarray(a), b),
                                     state.params["pooler"], init_pooler)
    assert all(jax.tree_util.tree_leaves(changed))
    # No Adam moments for the frozen encoder: the optimizer state is smaller than 2x params.
    n_params = family.count_params(state.params)
    n_visual = family.count_params(state.params["visual"])
    n_opt = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.opt_state) if hasattr(x, "shape"))
    assert n_opt <= 2 * (n_params - n_visual) + 64
    assert metrics[-1]["loss"] < metrics[0]["loss"]


# ----------------------------------------------------------------------------- conv stem

def test_conv_stem_encoder_gives_the_same_token_grid():
    linear = tiny(image_size=64, patch_size=16)
    stem = tiny(image_size=64, patch_size=16, stem_stages=2, stem_width=32, stem_units=(1, 1))
    for cfg in (linear, stem):
        model = coca.CoCa(cfg)
        variables = model.init(jax.random.key(0), coca.dummy_batch(cfg, 2))
        tokens = model.apply(variables, jnp.zeros((2, 64, 64, 3), jnp.uint8), method=lambda m, x: m.visual(x))
        assert tokens.shape == (2, 16, cfg.encoder_width)  # 64/16 = 4 x 4 tokens either way
        visual = variables["params"]["visual"]
        assert ("root_conv" in visual) == bool(cfg.stem_stages)
    # Stride 8 after 2 stages -> the patch conv is 2x2 over stem features (32 * 2 * 4 channels).
    kernel = nn.meta.unbox(variables["params"]["visual"]["patch_embed"]["kernel"])
    assert kernel.shape == (2, 2, 256, 32)


def test_conv_stem_config_errors_name_the_field():
    with pytest.raises(ValueError, match="patch_size"):
        tiny(stem_stages=3, patch_size=8, image_size=32)
    with pytest.raises(ValueError, match="stem_stages"):
        tiny(stem_stages=1, **OPEN_CLIP)
    assert simvlm.stem_stride(3) == 16 and simvlm.stem_stride(0) == 1


def test_coca_batches_with_text_only_rows_or_prefixes_are_refused():
    cfg = tiny()
    ok = coca_batch(cfg, batch_size=4)
    coca.CoCaFamily(cfg).check_batch(ok)
    text_only = dict(ok, has_image=np.asarray([1, 0, 1, 1], np.int32))
    with pytest.raises(ValueError, match="image-text"):
        coca.CoCaFamily(cfg).check_batch(text_only)
    prefixed = dict(ok, prefix_tokens=np.asarray([[0, 0], [5, 0], [0, 0], [0, 0]], np.int32))
    with pytest.raises(ValueError, match="max_prefix_len=0"):
        coca.CoCaFamily(cfg).check_batch(prefixed)
