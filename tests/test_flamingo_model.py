"""Flamingo model: HF LLaMA and open_flamingo parity (tiny random reference models built
locally), gates at 0 == the bare LM, cached decoding == teacher forcing, media-mask semantics,
logical axes and the default freezing regexes, scan == unrolled, config validation."""
from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simvlm_jax import convert_hf_lm, partitioning, train
from simvlm_jax.models import flamingo

B = 2
BOS, EOS, MEDIA, EOC = 1, 2, 62, 63
# LM: LLaMA 64 wide, 4 query heads over 2 key/value heads (GQA), vocab 62 + <image>, <|endofchunk|>.
LLAMA = dict(vocab_size=62, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rope_theta=1000.0, rms_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS)
# ViT 1 x 32 wide on 16 patches; resampler and cross-attention at non-default (tiny) sizes.
VISION = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, vision_mlp_dim=64)
SMALL = dict(resampler_depth=2, resampler_latents=8, resampler_heads=2, resampler_head_dim=16, resampler_ff_mult=2,
             xattn_heads=2, xattn_head_dim=16, xattn_ff_mult=2)


def tiny(**overrides) -> flamingo.FlamingoConfig:
    return flamingo.FlamingoConfig(**{**VISION, **SMALL, **overrides})


def abstract_params(cfg):
    model = flamingo.Flamingo(cfg)
    batch = flamingo.dummy_batch(cfg, 1, 1, 4)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), batch))["params"]


def random_params(cfg, seed=0, gate=0.5):
    """Random params of the right tree without compiling init; gates = `gate` (0: a fresh model)."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = getattr(path[-1], "key", "")
        if name.endswith("_gate"):
            return jnp.full(x.shape, gate, jnp.float32)
        base, std = {"scale": (1.0, 0.1), "bias": (0.0, 0.1)}.get(name, (0.0, 0.5 if x.ndim and name in (
            "embedding", "latents", "media_time_embs", "class_embedding", "positional_embedding") else 0.08))
        return jnp.asarray(base + std * rng.standard_normal(x.shape), jnp.float32)
    return jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(abstract_params(cfg)))


def interleaved_tokens(rng, length, rows):
    """Rows of text ids (3..61) with <image> / <|endofchunk|> at the given (row -> positions) places."""
    out = rng.integers(3, 62, (len(rows), length)).astype(np.int32)
    for r, (media, eoc) in enumerate(rows):
        out[r, media] = MEDIA
        out[r, eoc] = EOC
    return out


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def to_scanned(params):
    """Unrolled params -> the scanned layout ('name_i' subtrees stacked under 'name')."""
    def walk(tree):
        if not isinstance(tree, dict):
            return tree
        out, groups = {}, {}
        for k, v in tree.items():
            m = re.fullmatch(r"(.+)_(\d+)", k)
            if m and m.group(1) in ("layers", "blocks", "transformer"):
                groups.setdefault(m.group(1), {})[int(m.group(2))] = walk(v)
            else:
                out[k] = walk(v)
        for k, v in groups.items():
            out[k] = convert_hf_lm.stack_trees([v[i] for i in sorted(v)])
        return out
    return walk(params)


# ----------------------------------------------------------------------------- HF LLaMA parity

@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, attn_implementation="eager",
                                      **{**LLAMA, "vocab_size": 64})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms too (HF initialises them to 1)
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path, safe_serialization=True)
    return model, str(path)


def test_hf_llama_parity(hf_llama):
    """Converted from a save_pretrained directory, our LM (text only) gives HF's logits,
    also for a left-padded row (HF gets generate()'s position_ids)."""
    import torch
    model, path = hf_llama
    config_json, state_dict = convert_hf_lm.load_hf_dir(path)
    over = convert_hf_lm.config_overrides_from_hf(config_json)
    assert over["lm_kv_heads"] == 2 and over["rope_theta"] == 1000.0 and over["lm_layers"] == 2
    cfg = tiny(**over, media_id=MEDIA, eoc_id=EOC)
    params = convert_hf_lm.merge_lm(random_params(cfg), convert_hf_lm.lm_from_hf(state_dict, cfg))

    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 62, (B, 10)).astype(np.int32)
    mask = np.ones((B, 10), np.int32)
    mask[1, :4] = 0  # row 1 left-padded
    tokens[1, :4] = 0
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        ref = model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
    ours = jax.jit(lambda p, t, m: flamingo.Flamingo(cfg).apply({"params": p}, t, None, m,
                                                                method=flamingo.Flamingo.lm_logits))(
        params, tokens, mask)
    real = mask.astype(bool)
    err = float(np.abs(np.asarray(ours)[real] - ref[real]).max())
    assert err < 1e-4, err
    # The test can fail: a wrong rotary convention (interleaved pairs) or no key mask breaks it.
    unmasked = jax.jit(lambda p, t: flamingo.Flamingo(cfg).apply({"params": p}, t, None,
                                                                 method=flamingo.Flamingo.lm_logits))(params, tokens)
    assert np.abs(np.asarray(unmasked)[1, 4:] - ref[1, 4:]).max() > 1e-2


def test_hf_converter_errors(hf_llama):
    _, path = hf_llama
    config_json, state_dict = convert_hf_lm.load_hf_dir(path)
    over = convert_hf_lm.config_overrides_from_hf(config_json)
    with pytest.raises(ValueError, match="architectures"):
        convert_hf_lm.config_overrides_from_hf({**config_json, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="rope_scaling"):
        convert_hf_lm.config_overrides_from_hf({**config_json, "rope_scaling": {"rope_type": "llama3"}})
    with pytest.raises(ValueError, match=r"k_proj.weight.*shape \(32, 64\).*expects \(64, 64\).*lm_kv_heads=4"):
        convert_hf_lm.lm_from_hf(state_dict, tiny(**{**over, "lm_kv_heads": 4}))
    with pytest.raises(KeyError, match="model.layers.2"):
        convert_hf_lm.lm_from_hf(state_dict, tiny(**{**over, "lm_layers": 4}))
    with pytest.raises(ValueError, match="more than FlamingoConfig.lm_layers=1"):
        convert_hf_lm.lm_from_hf(state_dict, tiny(**{**over, "lm_layers": 1}))


# ----------------------------------------------------------------------------- open_flamingo parity

def build_open_flamingo(every: int, immediate: bool, max_num_media: int | None = None, seed: int = 0):
    """open_flamingo.Flamingo over a tiny open_clip CLIP and a tiny LLaMA (+2 tokens), every weight
    random, the gates non-zero; the resampler / cross-attention at our SMALL sizes."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("open_flamingo")
    from open_flamingo.src import flamingo as of_flamingo, helpers, utils
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    torch.manual_seed(seed)
    clip = open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1,
                                                        head_width=16, mlp_ratio=2.0),
                          text_cfg=dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1))
    clip.visual.output_tokens = True
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=2 * every,
                                                                attn_implementation="eager", **LLAMA))
    lm.resize_token_embeddings(64, mean_resizing=False)  # + <image>, <|endofchunk|>
    utils.extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("model.layers")
    model = of_flamingo.Flamingo(clip, lm, eoc_token_id=EOC, media_token_id=MEDIA, vis_dim=32,
                                 cross_attn_every_n_layers=every)
    model.perceiver = helpers.PerceiverResampler(dim=32, depth=2, dim_head=16, heads=2, num_latents=8, ff_mult=2,
                                                 max_num_media=max_num_media)
    lm.gated_cross_attn_layers = torch.nn.ModuleList([
        helpers.GatedCrossAttentionBlock(dim=64, dim_visual=32, dim_head=16, heads=2, ff_mult=2,
                                         only_attend_immediate_media=immediate) if (i + 1) % every == 0 else None
        for i in range(2 * every)])
    lm.init_flamingo_layers(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_gate"):
                p.fill_(float(np.random.default_rng(len(name)).uniform(0.3, 0.9)))
            elif p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


OF_CASES = [dict(every=1, scan=False), dict(every=1, scan=True), dict(every=2, scan=False),
            dict(every=2, scan=True), dict(every=1, scan=False, immediate=False, max_num_media=3)]


@pytest.mark.parametrize("case", OF_CASES,
                         ids=["every1", "every1-scan", "every2", "every2-scan", "all-previous-media-time"])
def test_open_flamingo_parity(case):
    import torch
    from simvlm_jax import convert_open_flamingo
    every, immediate = case["every"], case.get("immediate", True)
    model = build_open_flamingo(every, immediate, case.get("max_num_media"))
    cfg = tiny(vocab_size=64, lm_width=64, lm_layers=2 * every, lm_heads=4, lm_kv_heads=2, lm_mlp_dim=96,
               rope_theta=1000.0, rms_norm_eps=1e-5, vision_activation="gelu_exact", cross_attn_every=every,
               only_attend_immediate_media=immediate, scan_layers=case["scan"], media_id=MEDIA, eoc_id=EOC,
               max_num_media=case.get("max_num_media", 0))
    params = convert_open_flamingo.from_open_flamingo(model.state_dict(), cfg)

    rng = np.random.default_rng(1)
    images = rng.standard_normal((B, 2, 32, 32, 3)).astype(np.float32)  # normalized, NHWC
    if immediate:  # row 1 has text before its first image (zero cross-attention in both)
        tokens = interleaved_tokens(rng, 12, [([1, 6], [5, 9]), ([3, 6], [10, 11])])
    else:  # open_flamingo's all-previous mode differs before the first image: start with it
        tokens = interleaved_tokens(rng, 12, [([0, 6], [5, 9]), ([0, 4], [3, 11])])
    with torch.no_grad():
        vision_x = torch.tensor(images).permute(0, 1, 4, 2, 3)[:, :, None]  # [B, T_img, F=1, C, H, W]
        ref = model(vision_x, torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = jax.jit(flamingo.Flamingo(cfg).apply)({"params": params}, {"images": images, "tokens": tokens})["logits"]
    err = rel_err(ours, ref)
    assert err < 1e-4, err
    # The cross-attention matters here: with the gates at 0 the logits move.
    zero = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 0 if getattr(path[-1], "key", "").endswith("_gate") else x, params)
    bare = jax.jit(flamingo.Flamingo(cfg).apply)({"params": zero}, {"images": images, "tokens": tokens})["logits"]
    assert rel_err(bare, ref) > 1e-2


def test_vision_tokens_exclude_the_class_token():
    """open_flamingo reads open_clip's `tokens` output: ln_post(x)[:, 1:], no class token."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    from simvlm_jax import convert_open_clip
    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1,
                                                        head_width=16, mlp_ratio=2.0),
                          text_cfg=dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1))
    clip.visual.output_tokens = True
    cfg = tiny()
    sd = clip.state_dict()
    vision = {"vit": convert_open_clip.vision_from_open_clip(sd, flamingo.vision_config(cfg)),
              "ln_post": {"scale": sd["visual.ln_post.weight"].numpy(), "bias": sd["visual.ln_post.bias"].numpy()}}
    images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = clip.visual(torch.tensor(images).permute(0, 3, 1, 2))[1].numpy()
    ours = flamingo.VisionTower(cfg).apply({"params": vision}, images)
    assert ours.shape == ref.shape == (2, cfg.num_patches, 32)
    assert rel_err(ours, ref) < 1e-5


# ----------------------------------------------------------------------------- model behaviour

@pytest.fixture(scope="module")
def small_model():
    cfg = tiny(cross_attn_every=2, lm_layers=4)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3, 2, 32, 32, 3)).astype(np.uint8)
    return cfg, images


def test_gates_at_zero_give_the_bare_lm_exactly(small_model):
    cfg, images = small_model
    params = random_params(cfg, gate=0.0)
    tokens = interleaved_tokens(np.random.default_rng(0), 10, [([1, 5], [4, 8])] * 3)
    model = flamingo.Flamingo(cfg)
    full = jax.jit(model.apply)({"params": params}, {"images": images, "tokens": tokens})["logits"]
    bare = jax.jit(lambda p, t: model.apply({"params": p}, t, None, method=flamingo.Flamingo.lm_logits))(
        params, tokens)
    np.testing.assert_array_equal(np.asarray(full), np.asarray(bare))
    opened = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.5 if getattr(path[-1], "key", "").endswith("_gate") else x, params)
    moved = jax.jit(model.apply)({"params": opened}, {"images": images, "tokens": tokens})["logits"]
    assert np.abs(np.asarray(moved) - np.asarray(bare)).max() > 1e-3


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_prefill_and_steps_reproduce_teacher_forcing(small_model, scan):
    """Left-padded prompts of different lengths, two images in the prompt, immediate-media
    mode: prefill + one-token steps give lm_logits on the whole (left-padded) sequences."""
    cfg, images = small_model
    cfg = dataclasses.replace(cfg, scan_layers=scan)
    params = random_params(cfg, seed=1)
    rng = np.random.default_rng(2)
    prompt_len, new, max_len = 9, 4, 16
    lengths = [9, 6, 4]  # real prompt tokens per row
    full = np.zeros((3, prompt_len + new), np.int32)
    mask = np.zeros_like(full)
    for r, n in enumerate(lengths):
        seq = rng.integers(3, 62, n + new).astype(np.int32)
        seq[0] = MEDIA
        if n >= 6:
            seq[n - 3] = MEDIA  # a second image inside the prompt
        full[r, prompt_len - n:] = seq
        mask[r, prompt_len - n:] = 1
    model, dec = flamingo.Flamingo(cfg), flamingo.Flamingo(cfg, decode=True)
    media = jax.jit(lambda p, im: model.apply({"params": p}, im, method=flamingo.Flamingo.encode_media))(
        params, images)
    ref = jax.jit(lambda p, t, m, md: model.apply({"params": p}, t, md, m, method=flamingo.Flamingo.lm_logits))(
        params, full, mask, media)

    prefill = jax.jit(lambda p, t, m, md: dec.apply({"params": p}, t, m, md, max_len, method=flamingo.Flamingo.prefill,
                                                    mutable=["cache"]))
    step = jax.jit(lambda p, c, t: dec.apply({"params": p, "cache": c}, t, method=flamingo.Flamingo.step,
                                             mutable=["cache"]))
    logits, cache = prefill(params, full[:, :prompt_len], mask[:, :prompt_len], media)
    outs = [np.asarray(logits)]
    cache = cache["cache"]
    for t in range(prompt_len, prompt_len + new):
        logits, cache = step(params, cache, full[:, t:t + 1])
        cache = cache["cache"]
        outs.append(np.asarray(logits))
    got = np.concatenate(outs, axis=1)
    real = mask.astype(bool)
    err = float(np.abs(got[real] - np.asarray(ref)[real]).max())
    assert err < 1e-5, err
    assert int(cache["lm"]["index"]) == prompt_len + new
    np.testing.assert_array_equal(cache["lm"]["per_example_position"], np.asarray(lengths) + new)
    np.testing.assert_array_equal(cache["lm"]["per_example_num_media"], [2, 2, 1])
    with pytest.raises(ValueError, match="needs the cache"):
        dec.apply({"params": params}, full[:, :1], method=flamingo.Flamingo.step, mutable=["cache"])


def test_media_mask_semantics():
    text_time = jnp.asarray([[0, 1, 1, 2, 3]])
    imm, has = flamingo.media_attention_mask(text_time, 4, 2, immediate=True)   # 2 images x 2 latents
    allp, has_all = flamingo.media_attention_mask(text_time, 4, 2, immediate=False)
    np.testing.assert_array_equal(has, [[False, True, True, True, False]])  # 3 > the 2 images given
    np.testing.assert_array_equal(has_all, [[False, True, True, True, True]])
    np.testing.assert_array_equal(imm[0, 1:4], [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]])
    np.testing.assert_array_equal(allp[0, 1:], [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    assert imm[0, 0].all() and allp[0, 0].all()  # never a fully masked softmax row

    # The module: text before any image gets exactly 0 in both modes; after image 2 the immediate
    # mode ignores image 1, the all-previous mode does not.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 5, 64)), jnp.float32)
    media = jnp.asarray(rng.standard_normal((1, 2, 8, 32)), jnp.float32)
    other = media.at[:, 0].add(1.0)  # image 1 changed
    tt = jnp.asarray([[0, 0, 1, 2, 2]])
    outs = {}
    for immediate in (True, False):
        mod = flamingo.MaskedCrossAttention(2, 16, 8, immediate)
        p = mod.init(jax.random.key(0), x, media, tt)
        outs[immediate] = [np.asarray(mod.apply(p, x, m, tt)) for m in (media, other)]
    for immediate in (True, False):
        a, b = outs[immediate]
        assert not np.any(a[0, :2]) and not np.any(b[0, :2])
        assert np.abs(a[0, 2] - b[0, 2]).max() > 1e-3  # text_time 1 sees image 1 in both modes
    a, b = outs[True]
    np.testing.assert_array_equal(a[0, 3:], b[0, 3:])
    a, b = outs[False]
    assert np.abs(a[0, 3:] - b[0, 3:]).max() > 1e-3


def test_scan_matches_unrolled(small_model):
    cfg, images = small_model
    params = random_params(cfg, seed=4)
    tokens = interleaved_tokens(np.random.default_rng(0), 10, [([0, 5], [4, 9])] * 3)
    batch = {"images": images, "tokens": tokens}
    unrolled = jax.jit(flamingo.Flamingo(cfg).apply)({"params": params}, batch)["logits"]
    scan_cfg = dataclasses.replace(cfg, scan_layers=True, remat_policy="full")
    scanned_params = to_scanned(params)
    assert (jax.tree_util.tree_map(np.shape, scanned_params)
            == jax.tree_util.tree_map(np.shape, nn.meta.unbox(abstract_params(scan_cfg))))
    scanned = jax.jit(flamingo.Flamingo(scan_cfg).apply)({"params": scanned_params}, batch)["logits"]
    err = float(np.abs(np.asarray(scanned) - np.asarray(unrolled)).max())
    assert err < 1e-5, err


def test_sharded_forward_matches_unsharded():
    """data=2 x fsdp=2 x tensor=2: params placed by the logical axis rules, activations
    constrained (a constraint of the wrong rank would fail to trace)."""
    cfg = tiny(scan_layers=True, cross_attn_every=2, lm_layers=4)
    params = random_params(cfg, seed=5)
    rng = np.random.default_rng(5)
    batch = {"images": rng.integers(0, 256, (4, 2, 32, 32, 3)).astype(np.uint8),
             "tokens": interleaved_tokens(rng, 8, [([0, 4], [3, 7])] * 4)}
    model = flamingo.Flamingo(cfg)
    ref = jax.jit(model.apply)({"params": params}, batch)["logits"]
    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = partitioning.logical_to_sharding(partitioning.logical_specs(abstract_params(cfg)), mesh)
    shardings = partitioning.fit_to_shapes(shardings, params)
    placed = jax.device_put(params, shardings)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(placed))
    batch = {k: jax.device_put(v, partitioning.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    with partitioning.activate(mesh):
        out = jax.jit(model.apply)({"params": placed}, batch)["logits"]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- params

@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_logical_axes_and_default_freezing(scan):
    cfg = tiny(scan_layers=scan, cross_attn_every=2, lm_layers=4, num_extra_tokens=2, max_num_media=3)
    boxed = abstract_params(cfg)
    rule_names = {name for name, _ in partitioning.LOGICAL_AXIS_RULES}
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), jax.tree_util.keystr(path)
        assert len(leaf.names) == leaf.value.ndim, (jax.tree_util.keystr(path), leaf.names)
        assert set(leaf.names) - {None} <= rule_names, leaf.names
    paths = [train._path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))[0]]
    frozen = {p for p in paths if any(re.fullmatch(r, p) for r in flamingo.FROZEN_BY_DEFAULT)}
    expected = {p for p in paths if p.startswith(("vision/", "lm/"))
                and "/gated_xattn/" not in p and not p.startswith("lm/extra_embed/")}
    assert frozen == expected
    assert any(p.startswith("lm/embed/") for p in frozen) and any("/decoder_1/" in p for p in frozen)
    assert not any(p.startswith("resampler/") for p in frozen)
    assert {p.split("/")[0] for p in paths} == {"vision", "resampler", "lm"}
    with_embed = {p for p in paths if any(re.fullmatch(r, p) for r in flamingo.FROZEN_TRAIN_EMBEDDINGS)}
    assert with_embed == expected - {p for p in paths if p.startswith("lm/embed/")}


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_extra_token_embeddings_replace_the_new_rows(small_model, tie):
    """ids >= vocab_size - num_extra_tokens read 'extra_embed' (tied: also for their logits);
    the main table's last rows are then unused."""
    cfg, images = small_model
    cfg = dataclasses.replace(cfg, num_extra_tokens=2, tie_embeddings=tie)
    params = random_params(cfg, gate=0.0)
    tokens = np.asarray([[MEDIA, 5, 6, EOC, 7]], np.int32)
    run = jax.jit(lambda p, t: flamingo.Flamingo(cfg).apply({"params": p}, t, None,
                                                            method=flamingo.Flamingo.lm_logits))
    base = np.asarray(run(params, tokens))
    lm = dict(params["lm"])
    lm["embed"] = {"embedding": params["lm"]["embed"]["embedding"].at[-2:].set(0.0)}  # unused rows
    np.testing.assert_array_equal(np.asarray(run({**params, "lm": lm}, tokens)), base)
    lm["extra_embed"] = {"embedding": params["lm"]["extra_embed"]["embedding"] + 1.0}
    assert np.abs(np.asarray(run({**params, "lm": lm}, tokens)) - base).max() > 1e-3


def test_frozen_vision_gets_no_gradient_and_dropout_trains(small_model):
    """freeze_vision: the ViT's gradients are exactly 0 (stop_gradient); the resampler and the
    cross-attention get gradients; dropout (deterministic=False) runs."""
    cfg, images = small_model
    cfg = dataclasses.replace(cfg, dropout_rate=0.1, scan_layers=True)
    params = random_params(cfg, seed=6)
    tokens = interleaved_tokens(np.random.default_rng(6), 8, [([0, 4], [3, 7])] * 3)

    def loss(p):
        out = flamingo.Flamingo(cfg).apply({"params": p}, {"images": images, "tokens": tokens}, deterministic=False,
                                           rngs={"dropout": jax.random.key(1)})
        return jnp.mean(jax.nn.log_softmax(out["logits"])[..., 5])
    grads = jax.jit(jax.grad(loss))(params)
    norm = lambda tree: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree_util.tree_leaves(tree)))  # noqa: E731
    assert norm(grads["vision"]) == 0.0
    assert norm(grads["resampler"]) > 0 and norm(grads["lm"]["blocks"]["gated_xattn"]) > 0


def test_hf_cli_writes_the_lm_params(hf_llama, tmp_path):
    from flax import serialization
    _, path = hf_llama
    out = str(tmp_path / "lm.msgpack")
    convert_hf_lm.main(["--hf_dir", path, "--out", out, "--scan_layers"])
    with open(out, "rb") as f:
        lm = serialization.msgpack_restore(f.read())
    assert set(lm) == {"embed", "blocks", "final_norm", "lm_head"}
    assert lm["blocks"]["decoder_0"]["self_attn"]["k_proj"]["kernel"].shape == (2, 64, 2, 16)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="cross_attn_every.*lm_layers=3 must be a multiple"):
        tiny(lm_layers=3, cross_attn_every=2)
    with pytest.raises(ValueError, match="lm_kv_heads.*lm_heads=4 must be a multiple"):
        tiny(lm_kv_heads=3)
    with pytest.raises(ValueError, match="media_id=64.*below vocab_size=64"):
        tiny(media_id=64)
    with pytest.raises(ValueError, match="remat_policy"):
        tiny(remat_policy="some")


def test_dummy_batch_inits_the_model():
    cfg = tiny()
    batch = flamingo.dummy_batch(cfg, batch_size=2, num_media=3, text_len=7)
    assert batch["images"].shape == (2, 3, 32, 32, 3) and batch["tokens"].shape == (2, 7)
    out = jax.eval_shape(lambda: flamingo.Flamingo(cfg).init_with_output(jax.random.key(0), batch)[0])
    assert out["logits"].shape == (2, 7, cfg.vocab_size)
