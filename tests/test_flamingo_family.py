"""Flamingo as a model family: the objective, decoding through the shared decoders (cached ==
teacher forcing, zero- and few-shot prompts, beams over scanned layers), frozen training,
the analytic FLOPs against XLA's count, and export/load. The network itself (parity with
open_flamingo and HF LLaMA) is tests/test_flamingo_model.py."""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simvlm_jax import decoding, export, partitioning, train
from simvlm_jax.models import flamingo, registry
from test_flops import B, hlo_matmul_flops

# 32 px / patch 8 -> 16 patches; LM of 4 layers with cross-attention every 2 (2 groups).
TINY = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, vision_mlp_dim=64,
            resampler_depth=1, resampler_latents=4, resampler_heads=2, resampler_head_dim=16,
            vocab_size=40, lm_width=32, lm_layers=4, lm_heads=4, lm_kv_heads=2, lm_mlp_dim=48, lm_max_len=64,
            cross_attn_every=2, xattn_heads=2, xattn_head_dim=16, max_images=2, max_text_len=16,
            max_caption_len=6, add_bos=True, bos_id=3, eos_id=1, pad_id=0, media_id=38, eoc_id=39)


def _family(**overrides) -> flamingo.FlamingoFamily:
    return flamingo.FlamingoFamily(flamingo.FlamingoConfig(**{**TINY, **overrides}))


def _params(fam, seed=0, gate=0.5):
    """Random params with every cross-attention gate at `gate` (0 at init would hide the images),
    the rest perturbed (N(0, 1)) so that a tiny model's greedy choices depend on its inputs."""
    params = nn.meta.unbox(fam.init_params(jax.random.key(seed)))
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [
        jnp.full_like(x, gate) if "gate" in jax.tree_util.keystr(p) else x + 1.0 * jax.random.normal(k, x.shape)
        for (p, x), k in zip(leaves, keys)])


def _images(n, k=1, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, k, 32, 32, 3), dtype=np.uint8)


def test_objective_is_the_masked_next_token_nll():
    fam = _family()
    params = _params(fam)
    rng = np.random.default_rng(1)
    tokens = rng.integers(4, 38, (3, 16)).astype(np.int32)
    tokens[:, 0], tokens[:, 5] = 38, 38  # two images per row
    mask = (rng.random((3, 16)) < 0.6).astype(np.int32)
    batch = {"images": _images(3, 2), "image_mask": np.ones((3, 2), np.int32), "tokens": tokens, "loss_mask": mask}
    obj = jax.jit(lambda p, b: fam.objective(p, b, jax.random.key(0), loss_weights={}))(params, batch)
    logits = np.asarray(jax.jit(fam.module.apply)({"params": params}, batch)["logits"], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    weights = mask[:, 1:]
    assert float(obj.weight) == weights.sum()
    np.testing.assert_allclose(float(obj.value), (nll * weights).sum(), rtol=1e-5)
    # The masked positions' tokens do not count: their targets may be anything.
    assert float(obj.sums["num_target_tokens"]) == weights.sum()


def test_few_shot_prompt_layout_and_length_check():
    fam = _family()
    images = _images(2)[:, 0]
    shots = _images(2, seed=1)[:, 0]
    inputs = fam.few_shot_inputs(images, np.array([5, 6], np.int32), shots,
                                 [np.array([7, 8, 9]), np.array([10])])
    # [BOS] <image> prompt caption <eoc>, per solved example, then <image> prompt.
    row = [3, 38, 5, 6, 7, 8, 9, 39, 38, 5, 6, 10, 39, 38, 5, 6]
    np.testing.assert_array_equal(inputs["tokens"], np.array([row, row]))
    np.testing.assert_array_equal(inputs["attention_mask"], np.ones((2, len(row))))
    assert inputs["images"].shape == (2, 3, 32, 32, 3)
    np.testing.assert_array_equal(inputs["images"][1, :2], shots)
    np.testing.assert_array_equal(inputs["images"][:, 2], images)
    np.testing.assert_array_equal(inputs["shared_shots"], [1, 1])
    zero = fam.decode_inputs(images, np.zeros((0,), np.int32))
    np.testing.assert_array_equal(zero["tokens"], [[3, 38], [3, 38]])
    assert "shared_shots" not in zero
    with pytest.raises(ValueError, match=r"with 20 solved examples is 123 tokens, over the 58 that "
                                         r"FlamingoConfig.lm_max_len=64 leaves"):
        fam.few_shot_inputs(images, np.array([5]), np.repeat(shots[:1], 20, 0), [np.array([7, 8, 9])] * 20)


def _stacked(params):
    """Unrolled params -> the scanned layout: layer_stack's 'X_0', 'X_1', ... -> 'X' stacked."""
    if not isinstance(params, dict):
        return params
    out, groups = {}, {}
    for key, value in params.items():
        m = re.fullmatch(r"(transformer|layers|blocks)_(\d+)", key)
        if m:
            groups.setdefault(m.group(1), {})[int(m.group(2))] = _stacked(value)
        else:
            out[key] = _stacked(value)
    for name, layers_ in groups.items():
        out[name] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[layers_[i] for i in sorted(layers_)])
    return out


def _inputs(fam, shots, n=3):
    images = _images(n, seed=2)[:, 0]
    prompt = np.array([5], np.int32)
    if not shots:
        return fam.decode_inputs(images, prompt)
    return fam.few_shot_inputs(images, prompt, _images(shots, seed=3)[:, 0],
                               [np.array([7 + i, 8]) for i in range(shots)])


@pytest.mark.parametrize("scan,shots", [(False, 0), (True, 2)], ids=["unrolled-0shot", "scan-2shot"])
def test_cached_decoding_equals_teacher_forcing(scan, shots):
    """decode_start/decode_step (prefill + KV cache) give caption_logits' logits at every step,
    and the shared greedy decoder's tokens equal the no-cache reference's."""
    unrolled = _family()
    params = _params(unrolled)
    fam = _family(scan_layers=scan)
    if scan:
        params = _stacked(params)
    inputs = _inputs(fam, shots)
    encode, caption_logits = jax.jit(fam.encode), jax.jit(fam.caption_logits)  # eager flax is slow
    context = encode(params, inputs)
    captions = jnp.asarray(np.random.default_rng(6).integers(4, 38, (3, 5)), jnp.int32)
    reference = caption_logits(params, context, captions)
    logits, cache = jax.jit(fam.decode_start)(params, context)
    steps = [logits]
    step = jax.jit(fam.decode_step)
    for t in range(4):
        logits, cache = step(params, cache, captions[:, t], context, jnp.int32(t + 1))
        steps.append(logits)
    np.testing.assert_allclose(np.stack(steps, 1), np.asarray(reference), atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(decoding.greedy_decode(fam, params, inputs)),
                                  np.asarray(decoding.greedy_decode_no_cache(fam, params, inputs)))
    # The images reach the logits.
    swapped = encode(params, {**inputs, "images": np.asarray(inputs["images"])[::-1].copy()})
    diff = np.abs(np.asarray(caption_logits(params, swapped, captions)[0] - reference[0]))
    assert np.nanmax(diff) > 1e-3  # (NaN: -inf - -inf at <image> and BOS, never generated)
    assert np.all(np.asarray(reference)[..., [38, 3]] == -np.inf)


def test_beam_search_over_scanned_layers_matches_unrolled():
    """Beams reorder the scanned KV cache along axis 1 but never the per-example decode state
    (key mask, positions, <image> counts: cache entries named decoding.PER_EXAMPLE_PREFIX + ..., axis 0)."""
    unrolled, scanned = _family(), _family(scan_layers=True)
    params = _params(unrolled)
    # 4 rows x 2 beams = 8 = the cache length (prompt 2 + 6 new): the hazard's shape coincidence.
    inputs = unrolled.decode_inputs(_images(4, seed=4)[:, 0], np.zeros((0,), np.int32))
    beams = [decoding.beam_search(f, p, inputs, num_beams=2)
             for f, p in ((unrolled, params), (scanned, _stacked(params)))]
    np.testing.assert_array_equal(np.asarray(beams[0][0]), np.asarray(beams[1][0]))
    np.testing.assert_allclose(np.asarray(beams[0][1]), np.asarray(beams[1][1]), rtol=1e-5)


def test_shared_solved_examples_are_encoded_once_with_the_same_media():
    """`encode` runs the vision tower + resampler on the shared solved examples once (row 0),
    and gives the media of encoding every row's images."""
    fam = _family()
    params = _params(fam)
    inputs = _inputs(fam, shots=3, n=4)
    shared = jax.jit(fam.encode)(params, inputs)["media"]
    each = jax.jit(fam.encode)(params, {k: v for k, v in inputs.items() if k != "shared_shots"})["media"]
    np.testing.assert_allclose(np.asarray(shared), np.asarray(each), atol=1e-4)  # other batch shapes: other fusions
    hlo = jax.jit(fam.encode).lower(params, inputs).compile().as_text()
    assert hlo_matmul_flops(hlo) < 0.5 * hlo_matmul_flops(jax.jit(fam.encode).lower(
        params, {k: v for k, v in inputs.items() if k != "shared_shots"}).compile().as_text())


def test_caption_logits_scores_several_captions_per_image():
    fam = _family()
    params = _params(fam)
    inputs = fam.decode_inputs(_images(2, seed=5)[:, 0], np.array([5], np.int32))
    context = jax.jit(fam.encode)(params, inputs)
    caption_logits = jax.jit(fam.caption_logits)  # eager flax is slow
    captions = jnp.array([[7, 8, 1, 0], [9, 1, 0, 0], [10, 11, 12, 1], [7, 1, 0, 0]], jnp.int32)
    both = caption_logits(params, context, captions)  # rows 0, 1 -> image 0; 2, 3 -> image 1
    for i in range(2):
        one = jax.tree_util.tree_map(lambda x: x[i:i + 1], context)
        for j in range(2):
            alone = caption_logits(params, one, captions[2 * i + j:2 * i + j + 1])
            np.testing.assert_allclose(np.asarray(both[2 * i + j]), np.asarray(alone[0]), atol=1e-5)


def test_check_batch_and_vocabulary_errors():
    fam = _family()
    tokens = np.full((2, 8), 5, np.int32)
    tokens[1, [0, 3, 5]] = 38
    with pytest.raises(ValueError, match=r"batch row 1 has 3 <image> tokens \(id 38\) but 2 images"):
        fam.check_batch({"tokens": tokens, "image_mask": np.ones((2, 2), np.int32)})
    fam.check_batch({"tokens": tokens[:1], "image_mask": np.ones((1, 2), np.int32)})

    class Vocab:
        vocab_size, eos_id = 36, 1
    with pytest.raises(ValueError, match=r"FlamingoConfig.media_id=1 is the tokenizer's piece None, not <image>"):
        _family(media_id=1).check_vocabulary(Vocab())

    class Pieces:
        def id_to_piece(self, i):
            return {30: "▁cat", 31: "<|endofchunk|>"}[i]

    class SentencePiece(Vocab):
        vocab_size, tokenizer = 38, Pieces()
    with pytest.raises(ValueError, match=r"FlamingoConfig.media_id=30 is the tokenizer's piece '▁cat', not <image>"):
        _family(media_id=30).check_vocabulary(SentencePiece())
    with pytest.raises(ValueError, match=r"the trainable rows are ids 39.. but media_id=38 / eoc_id=39 lie below; "
                                         r"set num_extra_tokens=2"):
        _family(num_extra_tokens=1)
    assert fam.extra_token_ids() == (38, 39, 3)


def test_frozen_training_moves_only_the_resampler_and_cross_attention():
    """gin/models/flamingo_*.gin freeze with FROZEN_BY_DEFAULT: one step leaves the vision tower
    and every LM weight bit-identical and changes the resampler and the gated blocks."""
    fam = _family()
    mesh = partitioning.make_mesh(data=-1, fsdp=1, tensor=1)
    tx = train.make_optimizer(10, learning_rate=1e-2, warmup_steps=0, schedule="constant",
                              frozen=flamingo.FROZEN_BY_DEFAULT)
    trainer = train.Trainer(fam, mesh, tx)
    state = trainer.init_state()
    before = jax.device_get(state.params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 38, (8, 16)).astype(np.int32)
    tokens[:, 0], tokens[:, 6] = 38, 38
    batch = {"images": _images(8, 2), "image_mask": np.ones((8, 2), np.int32), "tokens": tokens,
             "loss_mask": np.ones((8, 16), np.int32)}
    for _ in range(2):  # step 1 moves the gates (0 at init: nothing behind them has a gradient yet)
        state, _ = trainer.step(state, partitioning.host_batch_to_global(batch, mesh))
    after = jax.device_get(state.params)
    moved = {jax.tree_util.keystr(p): not np.array_equal(a, b) for (p, a), b in zip(
        jax.tree_util.tree_flatten_with_path(before)[0], jax.tree_util.tree_leaves(after))}
    frozen = [re.compile(r) for r in flamingo.FROZEN_BY_DEFAULT]
    path = lambda k: "/".join(re.findall(r"\['([^']+)'\]", k))  # noqa: E731
    for key, changed in moved.items():
        is_frozen = any(r.fullmatch(path(key)) for r in frozen)
        assert changed != is_frozen, (key, changed)
    assert any(k.startswith("['resampler']") for k, c in moved.items() if c)
    assert any("gated_xattn" in k for k, c in moved.items() if c)


def test_forward_flops_equal_compiled_matmuls():
    """The analytic forward count equals the compiled forward's matmuls and convolutions
    exactly (count_masked: XLA computes the full causal and media-masked matrices)."""
    fam = _family()
    cfg = fam.config
    params = nn.meta.unbox(fam.abstract_params())
    batch = jax.eval_shape(lambda: flamingo.dummy_batch(cfg, B))
    fn = lambda p, b: fam.module.apply({"params": p}, b)["logits"]  # noqa: E731
    compiled = jax.jit(fn).lower(params, batch).compile()
    vision, rest = flamingo.forward_flops(cfg, count_masked=True)
    assert hlo_matmul_flops(compiled.as_text()) / B == pytest.approx(vision + rest, rel=1e-9)


@pytest.mark.parametrize("frozen", [(), flamingo.FROZEN_BY_DEFAULT], ids=["all-trained", "lm-frozen"])
def test_train_step_flops_equal_compiled_matmuls(frozen):
    """The trainer's compiled step (one example per device) against the analytic count: the
    frozen ViT runs forward only; with the model gins' freezing the trainer stop_gradients the
    LM, so its weight gradients and the backward of the layers before the first
    cross-attention block are not computed, and the count leaves them out."""
    fam = _family()
    mesh = partitioning.make_mesh(data=-1, fsdp=1, tensor=1)
    trainer = train.Trainer(fam, mesh, train.make_optimizer(10, frozen=frozen))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_shardings[k])
             for k, v in flamingo.dummy_batch(fam.config, mesh.size).items()}
    with trainer.activate():
        compiled = trainer._step.lower(trainer.abstract_state, batch).compile()  # pylint: disable=protected-access
    assert fam.lm_frozen(frozen) == bool(frozen)
    analytic = flamingo.train_flops_per_example(fam.config, count_masked=True, lm_frozen=bool(frozen))
    assert hlo_matmul_flops(compiled.as_text()) == pytest.approx(analytic, rel=1e-9)
    assert fam.train_flops_per_example(frozen) == flamingo.train_flops_per_example(fam.config, lm_frozen=bool(frozen))


def test_export_round_trip(tmp_path, dataset):
    fam = _family(vocab_size=258, media_id=256, eoc_id=257, add_bos=False, bos_id=0)
    params = _params(fam)
    out = export.export(params, fam.config, dataset.vocab(), str(tmp_path / "export"), step=3)
    model, loaded, _ = export.load_export(out)
    assert registry.family_of(model) == fam
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_flamingo_trains_evaluates_few_shot_and_exports_from_the_cli(tmp_path):
    """gin/flamingo_demo.gin through `python -m simvlm_jax.main`: the loss falls on the built-in
    interleaved data, the eval writes zero- and 4-shot results, and the export captions an
    image through the caption CLI."""
    import json
    import os
    import subprocess
    import sys

    from PIL import Image

    from conftest import REPO_ROOT, compile_cache_env
    env = dict(os.environ, JAX_PLATFORMS="cpu", **compile_cache_env(),
               XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
    work, data = str(tmp_path / "run"), str(tmp_path / "data")
    steps = 40
    cmd = [sys.executable, "-m", "simvlm_jax.main", "--gin_file=gin/flamingo_demo.gin",
           "--mode=prepare,train,eval,export", f"--gin.WORK_DIR='{work}'", f"--gin.DATA_DIR='{data}'",
           f"--gin.NUM_STEPS={steps}", "--gin.BATCH_SIZE=16", "--gin.train.log_every=1",
           "--gin.make_optimizer.warmup_steps=5", "--gin.make_manager.save_every=40",
           "--gin.prepare_builtin.num_train=200", "--gin.prepare_builtin.num_heldout=16",
           "--gin.prepare_builtin.num_text=300", "--gin.prepare_builtin.num_interleaved=100",
           "--gin.evaluate_captioning.max_examples=8", "--gin.evaluate_captioning.batch_size=8",
           "--gin.make_train_iterator.num_threads=1"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(work, "metrics.jsonl")) as f:
        losses_ = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
    first, last = losses_[1], np.mean([losses_[s] for s in range(steps - 4, steps + 1)])
    assert last < first - 1.0, (first, last)
    (eval_dir,) = [os.path.join(work, "eval", d) for d in os.listdir(os.path.join(work, "eval"))]
    with open(os.path.join(eval_dir, "metrics.json")) as f:
        metrics = json.load(f)
    assert set(metrics["few_shot"]) == {"0", "4"} and "cider_4shot" in metrics["metrics"]
    assert os.path.exists(os.path.join(eval_dir, "captions_4shot.json"))
    assert "id='few-shot'" in open(os.path.join(eval_dir, "report.html")).read()
    image = str(tmp_path / "scene.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    cap = subprocess.run([sys.executable, "-m", "simvlm_jax.caption", "--export_dir", os.path.join(work, "export"),
                          "--prompt", "", image], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert cap.returncode == 0, cap.stderr[-3000:]
    assert cap.stdout.startswith(f"{image}\t"), cap.stdout


def test_loss_and_grads_are_the_same_on_a_data_fsdp_tensor_mesh():
    """The objective's loss and gradients (every parameter, gates non-zero) on data=8 and on
    data 2 x fsdp 2 x tensor 2: the logical axis names of the new parameters and activations
    shard without changing the math. One unsharded device gives the float32 noise floor."""
    fam = _family(lm_kv_heads=4)  # tensor 2 splits 4 query and 4 kv heads
    boxed = fam.init_params(jax.random.key(0))
    params = _params(fam)
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 38, (8, 16)).astype(np.int32)
    tokens[:, 0], tokens[:, 6] = 38, 38
    batch = {"images": _images(8, 2), "image_mask": np.ones((8, 2), np.int32), "tokens": tokens,
             "loss_mask": (tokens != 38).astype(np.int32)}
    loss = lambda p, b: fam.objective(p, b, jax.random.key(0), loss_weights={}).value  # noqa: E731
    results = []
    for axes in (dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2),
                 dict(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])):
        mesh = partitioning.make_mesh(**axes)
        shardings = partitioning.fit_to_shapes(partitioning.logical_to_sharding(
            partitioning.logical_specs(boxed), mesh, partitioning.LOGICAL_AXIS_RULES), params)
        with partitioning.activate(mesh):
            value, grads = jax.jit(jax.value_and_grad(loss))(
                jax.device_put(params, shardings), partitioning.host_batch_to_global(batch, mesh))
        results.append((float(value), jax.device_get(grads)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    # float32 sums in another order. The query/key gradients of the attention layers go through
    # softmax's Jacobian, whose terms cancel: there even one unsharded device differs from data=8
    # by up to 2e-3 of the leaf's largest gradient (measured), so each leaf may differ by 1e-4 of
    # its largest gradient or 4x that unsharded-vs-data=8 difference. A sharding mistake (heads
    # mixed, a missing reduction) is off by orders of magnitude more.
    for (path, a), b, c in zip(jax.tree_util.tree_flatten_with_path(results[0][1])[0],
                               jax.tree_util.tree_leaves(results[1][1]), jax.tree_util.tree_leaves(results[2][1])):
        noise = np.abs(a - c).max()
        assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max() + 4 * noise + 1e-7, (jax.tree_util.keystr(path), noise)
    assert any(np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(results[1][1]["resampler"]))
