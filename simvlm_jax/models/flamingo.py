"""Flamingo (Alayrac et al. 2022, arXiv 2204.14198) as OpenFlamingo builds it (Awadalla et al. 2023).

Images [B, T_img, H, W, 3] -> CLIP ViT (coca.VisionEncoder in open_clip mode) + ln_post -> the
patch tokens WITHOUT the class token (open_flamingo reads `vision_encoder(x)[1]`, the `tokens`
output of open_clip's VisionTransformer, which is ln_post(x)[:, 1:] for its default pool_type
'tok') -> Perceiver resampler -> `resampler_latents` media tokens per image.

Text: a LLaMA-style decoder-only LM (pre-RMSNorm, grouped-query self-attention with rotary
position embeddings in HF's rotate_half layout, SwiGLU MLP, final RMSNorm, lm_head) with a
gated cross-attention-dense block before LM layer i iff (i + 1) % cross_attn_every == 0, as
open_flamingo's FlamingoLMMixin places them. Each block computes
    x = x + tanh(attn_gate) * xattn(LN(x), media);  x = x + tanh(ff_gate) * ff(x)
with both gates initialised to 0, so a fresh model is exactly its LM.

Which media a text token sees: text_time = cumsum over the sequence of (token == media_id), the
number of <image> tokens at or before it. With `only_attend_immediate_media` it attends to the
latents of image number text_time only, otherwise to those of every image <= text_time. A token
with no such image (text_time == 0, or beyond the images given) gets a zero cross-attention
output. Deviation from open_flamingo: it zeroes them only in the immediate mode; in the
all-previous mode its fully masked rows softmax to uniform attention over all media (so text
before the first image sees every image); here they are zero in both modes. The images of a row
are matched to its <image> tokens in order; images past the row's <image> count are never
attended, so zero-padded images need no mask.

Decoding (`Flamingo(cfg, decode=True)`, flax 'cache' collection): `prefill` runs a left-padded
prompt and creates the cache (self-attention keys/values [B, kv_heads, max_len, head_dim] per
layer, the media keys/values projected once per cross-attention block, and the decode state:
key-padding mask, each row's next position, its <image> count); `step` appends tokens. Tokens
after the prompt keep counting <image> tokens, so a generated row attends to the latest image
of its prompt, as open_flamingo's use_cached_media.

Param tree: 'vision' {'vit', 'ln_post'}, 'resampler' {'latents', ['media_time_embs'],
'layers'|'layers_i', 'norm'}, 'lm' {'embed', ['extra_embed'], 'blocks'|'blocks_g'
{'decoder_j', 'gated_xattn'}, 'final_norm', ['lm_head']}. Group g holds LM layers
g*cross_attn_every .. g*cross_attn_every + cross_attn_every - 1 and the gated block that runs
before its last layer; with `scan_layers` the groups are scanned (params stacked on a leading
'layers' axis). `FROZEN_BY_DEFAULT` freezes the vision tower and the LM's own weights.

Every parameter carries logical axis names and the main activations are constrained;
`partitioning.LOGICAL_AXIS_RULES` maps them onto the mesh.
"""
from __future__ import annotations

import dataclasses
import re
import functools
from typing import Any, Mapping

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from simvlm_jax import flops, losses
from simvlm_jax.models import coca, family, layers

Array = jax.Array

DTYPES = layers.DTYPES
LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")
MLP_AXES = ("activation_batch", "activation_length", "activation_mlp")
ATTENTION_IMPLS = (None, "xla", "cudnn")
TORCH_LN_EPS = 1e-5  # open_flamingo's resampler / cross-attention LayerNorms: torch's default eps

# open_flamingo's resampler and cross-attention hyper-parameters, fixed in its code (every
# released checkpoint uses them): bind these (plus the sizes) to import one.
OPEN_FLAMINGO_FIXED = dict(resampler_depth=6, resampler_latents=64, resampler_heads=8, resampler_head_dim=64,
                           resampler_ff_mult=4, xattn_heads=8, xattn_head_dim=64, xattn_ff_mult=4)

# `make_optimizer.frozen` regexes (re.fullmatch on '/'-joined param paths) that freeze the vision
# tower and the LM's own weights (token table, layers, final norm, lm_head) and train the
# resampler, the gated cross-attention blocks and, when num_extra_tokens > 0, `lm/extra_embed`
# (the new tokens' input embeddings): with those, open_flamingo's default (freeze_lm_embeddings=False).
FROZEN_BY_DEFAULT = ("vision/.*", "lm/(embed|final_norm|lm_head)/.*", r"lm/blocks(_\d+)?/decoder_\d+/.*")
# The same, with the LM's whole input token table trainable (open_flamingo's
# freeze_lm_embeddings=False trains only the new tokens' rows: num_extra_tokens does that).
FROZEN_TRAIN_EMBEDDINGS = ("vision/.*", "lm/(final_norm|lm_head)/.*", r"lm/blocks(_\d+)?/decoder_\d+/.*")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class FlamingoConfig:
    """All Flamingo hyper-parameters; every field is a gin binding `FlamingoConfig.<field>`.

    Defaults: a tiny ViT and LM with Flamingo's resampler (6 layers, 64 latents, 8 heads x 64)
    and cross-attention (8 heads x 64) sizes, `OPEN_FLAMINGO_FIXED`, which open_flamingo's
    checkpoints also need; gin/models/flamingo_*.gin set every size. The LM fields of a HF
    checkpoint: `convert_hf_lm.config_overrides_from_hf`.
    """
    # Vision: open_clip CLIP ViT (class token, ln_pre, ln_post; the projection is not used).
    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    vision_mlp_dim: int = 64
    vision_activation: str = "gelu_exact"  # open_clip's nn.GELU; 'quick_gelu' for OpenAI's CLIP weights
    vision_layer_norm_eps: float = 1e-5
    image_mean: tuple[float, ...] = coca.OPENAI_MEAN  # for uint8 images (float = already normalized)
    image_std: tuple[float, ...] = coca.OPENAI_STD
    freeze_vision: bool = True      # stop_gradient on the vision tower output
    # ln_post on the patch tokens, as open_clip >= 2.24 returns them (open_flamingo on today's
    # open_clip). Older open_clip applied ln_post to the pooled output only; checkpoints trained
    # on it (OpenFlamingo's releases used open_clip 2.x) may need False: not verified offline.
    vision_tokens_ln_post: bool = True
    # Perceiver resampler (width = vision_width); defaults: Flamingo's / open_flamingo's sizes.
    resampler_depth: int = 6
    resampler_latents: int = 64
    resampler_heads: int = 8
    resampler_head_dim: int = 64
    resampler_ff_mult: int = 4
    max_num_media: int = 0          # > 0: a learned [max_num_media, 1, vision_width] media-time table
    # LLaMA-style LM.
    vocab_size: int = 64            # the base LM vocab + the new tokens (<image>, <|endofchunk|>, ...)
    lm_width: int = 64
    lm_layers: int = 2
    lm_heads: int = 4
    lm_kv_heads: int = 2            # grouped-query attention: lm_heads % lm_kv_heads == 0
    lm_head_dim: int = 0            # 0 = lm_width // lm_heads
    lm_mlp_dim: int = 128           # SwiGLU hidden size
    lm_max_len: int = 64            # longest sequence (training text, prompt + generated tokens)
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    # > 0: ids >= vocab_size - num_extra_tokens read their input embedding from a separate small
    # table 'lm/extra_embed' (trainable under FROZEN_BY_DEFAULT) instead of 'lm/embed'.
    num_extra_tokens: int = 0
    # Gated cross-attention-dense blocks.
    cross_attn_every: int = 1       # before LM layer i iff (i + 1) % cross_attn_every == 0
    xattn_heads: int = 8
    xattn_head_dim: int = 64
    xattn_ff_mult: int = 4
    only_attend_immediate_media: bool = True
    # Training batch and generation shapes (the data task's max_images / max_len; captions).
    max_images: int = 2             # images per training example (T_img)
    max_text_len: int = 0           # tokens per training example; 0 = lm_max_len
    max_caption_len: int = 20       # longest generated caption (after the prompt)
    # Token ids. add_bos: prompts start with bos_id (as the data task's bos_id; LLaMA's
    # tokenizer adds one, the built-in SentencePiece has none).
    add_bos: bool = True
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0
    media_id: int = 62              # <image>
    eoc_id: int = 63                # <|endofchunk|>
    dropout_rate: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str | None = None

    def __post_init__(self):
        def check(ok, field, msg):
            if not ok:
                raise ValueError(f"FlamingoConfig.{field}={getattr(self, field)!r}: {msg}")
        check(self.image_size % self.patch_size == 0, "image_size", f"not divisible by patch_size={self.patch_size}")
        check(self.vision_width % self.vision_heads == 0, "vision_heads",
              f"vision_width={self.vision_width} not divisible by vision_heads")
        check(self.vision_activation in coca.ACTIVATIONS, "vision_activation", f"choose one of {coca.ACTIVATIONS}")
        check(len(self.image_mean) == 3 and len(self.image_std) == 3, "image_mean", "needs 3 values (and image_std)")
        for f in ("resampler_depth", "resampler_latents", "resampler_heads", "resampler_head_dim",
                  "resampler_ff_mult", "lm_layers", "lm_heads", "lm_kv_heads", "lm_mlp_dim", "lm_max_len",
                  "xattn_heads", "xattn_head_dim", "xattn_ff_mult", "cross_attn_every"):
            check(getattr(self, f) >= 1, f, "must be >= 1")
        check(self.max_num_media >= 0, "max_num_media", "must be >= 0 (0 = no media-time embedding)")
        check(self.lm_head_dim > 0 or self.lm_width % self.lm_heads == 0, "lm_heads",
              f"lm_width={self.lm_width} not divisible by lm_heads; set lm_head_dim explicitly")
        check(self.lm_heads % self.lm_kv_heads == 0, "lm_kv_heads",
              f"lm_heads={self.lm_heads} must be a multiple of lm_kv_heads (grouped-query attention)")
        check(self.head_dim % 2 == 0, "lm_head_dim", f"rotary embeddings need an even head dim, got {self.head_dim}")
        check(self.lm_layers % self.cross_attn_every == 0, "cross_attn_every",
              f"lm_layers={self.lm_layers} must be a multiple of cross_attn_every (the layers are scanned in "
              f"groups of cross_attn_every); pick a divisor of lm_layers")
        for f in ("bos_id", "eos_id", "pad_id", "media_id", "eoc_id"):
            check(0 <= getattr(self, f) < self.vocab_size, f, f"must be an id below vocab_size={self.vocab_size}")
        check(self.media_id != self.eoc_id, "eoc_id", "must differ from media_id")
        check(self.media_id != self.pad_id, "media_id", "must differ from pad_id")
        check(0 <= self.num_extra_tokens < self.vocab_size, "num_extra_tokens",
              f"must lie in [0, vocab_size={self.vocab_size})")
        first_extra = self.vocab_size - self.num_extra_tokens
        check(not self.num_extra_tokens or min(self.media_id, self.eoc_id) >= first_extra, "num_extra_tokens",
              f"the trainable rows are ids {first_extra}.. but media_id={self.media_id} / eoc_id={self.eoc_id} "
              f"lie below; set num_extra_tokens={self.vocab_size - min(self.media_id, self.eoc_id)}")
        check(not self.add_bos or self.bos_id not in (self.media_id, self.eoc_id), "bos_id",
              "must differ from media_id and eoc_id")
        check(self.max_images >= 1, "max_images", "must be >= 1")
        check(0 <= self.max_text_len <= self.lm_max_len, "max_text_len", f"must lie in [0, lm_max_len={self.lm_max_len}]")
        check(1 <= self.max_caption_len < self.lm_max_len, "max_caption_len",
              f"must lie in [1, lm_max_len={self.lm_max_len}) (the prompt needs room too)")
        check(0.0 <= self.dropout_rate < 1.0, "dropout_rate", "must lie in [0, 1)")
        check(self.remat_policy in layers.REMAT_POLICIES, "remat_policy",
              f"choose one of {sorted(layers.REMAT_POLICIES)}")
        check(self.attention_impl in ATTENTION_IMPLS, "attention_impl", f"choose one of {ATTENTION_IMPLS}")
        for f in ("dtype", "param_dtype"):
            check(getattr(self, f) in DTYPES, f, f"choose one of {sorted(DTYPES)}")

    @property
    def head_dim(self) -> int:
        return self.lm_head_dim or self.lm_width // self.lm_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_groups(self) -> int:
        """Scanned units: `cross_attn_every` LM layers + one gated cross-attention block."""
        return self.lm_layers // self.cross_attn_every

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]


def vision_config(cfg: FlamingoConfig) -> coca.CoCaConfig:
    """The CoCaConfig whose (open_clip-mode) VisionEncoder is Flamingo's CLIP ViT."""
    w = cfg.vision_width
    return coca.CoCaConfig(
        open_clip_compatible=True, image_size=cfg.image_size, patch_size=cfg.patch_size, encoder_width=w,
        encoder_layers=cfg.vision_layers, encoder_heads=cfg.vision_heads, encoder_mlp_dim=cfg.vision_mlp_dim,
        activation=cfg.vision_activation, layer_norm_eps=cfg.vision_layer_norm_eps, image_mean=cfg.image_mean,
        image_std=cfg.image_std, decoder_width=w, decoder_heads=cfg.vision_heads, embed_dim=w,
        dtype=cfg.dtype, param_dtype=cfg.param_dtype, scan_layers=cfg.scan_layers,
        remat_policy=cfg.remat_policy, attention_impl=cfg.attention_impl)


def _kw(cfg: FlamingoConfig) -> dict:
    return dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)


def _param(module: nn.Module, name: str, init, names: tuple, shape: tuple, dtype) -> Array:
    return module.param(name, layers.param_with_axes(init, names), shape, dtype)


# ----------------------------------------------------------------------------- vision + resampler

class VisionTower(nn.Module):
    """Images [N, H, W, 3] -> patch tokens after ln_post, class token dropped [N, num_patches, vision_width]."""
    config: FlamingoConfig

    @nn.compact
    def __call__(self, images: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        x = coca.VisionEncoder(vision_config(cfg), name="vit")(images, deterministic)
        normed = layers.layer_norm("ln_post", eps=cfg.vision_layer_norm_eps, **_kw(cfg))(x)  # params either way
        x = normed if cfg.vision_tokens_ln_post else x
        return layers.constrain(x[:, 1:], layers.BATCH_LENGTH_EMBED)


class FeedForward(nn.Module):
    """LayerNorm -> Linear -> exact GELU -> Linear, no biases (open_flamingo's FeedForward)."""
    mlp_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.layer_norm("norm", eps=TORCH_LN_EPS, **kw)(x)
        h = layers.dense_general(self.mlp_dim, -1, ("embed", "mlp"), ("mlp",), use_bias=False, name="wi", **kw)(h)
        h = layers.constrain(nn.gelu(h, approximate=False), MLP_AXES)  # torch nn.GELU(): exact
        return layers.dense_general(x.shape[-1], -1, ("mlp", "embed"), ("embed",), use_bias=False, name="wo",
                                    **kw)(h)


class PerceiverLayer(nn.Module):
    """Latents [M, n, D] attend to concat(LN(media), LN(latents)) [M, v + n, D], then a feed-forward.

    Scan-compatible: `(latents, media) -> (latents, None)`.
    """
    num_heads: int
    head_dim: int
    ff_mult: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, latents: Array, media: Array):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        media = layers.layer_norm("norm_media", eps=TORCH_LN_EPS, **kw)(media)
        q = layers.layer_norm("norm_latents", eps=TORCH_LN_EPS, **kw)(latents)
        h = layers.Attention(num_heads=self.num_heads, head_dim=self.head_dim, is_cross=True, use_bias=False,
                             attention_impl=self.attention_impl, name="attn", **kw)(
            q, jnp.concatenate([media, q], axis=1), None)
        latents = latents + h
        latents = latents + FeedForward(latents.shape[-1] * self.ff_mult, name="ff", **kw)(latents)
        return layers.constrain(latents, layers.BATCH_LENGTH_EMBED), None


class PerceiverResampler(nn.Module):
    """Vision tokens [B, T_img, v, D] -> media [B, T_img, resampler_latents, D] (each image on its own)."""
    config: FlamingoConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        b, t, v, d = x.shape
        if cfg.max_num_media:
            if t > cfg.max_num_media:
                raise ValueError(f"{t} images per row > FlamingoConfig.max_num_media={cfg.max_num_media}")
            table = _param(self, "media_time_embs", nn.initializers.normal(1.0), ("position", None, "embed"),
                           (cfg.max_num_media, 1, d), cfg.params_dtype)
            x = x + table[:t].astype(x.dtype)[None]
        latents = _param(self, "latents", nn.initializers.normal(1.0), ("position", "embed"),
                         (cfg.resampler_latents, d), cfg.params_dtype)
        lat = jnp.broadcast_to(latents.astype(cfg.compute_dtype)[None], (b * t, cfg.resampler_latents, d))
        run = layers.layer_stack(
            dict(num_heads=cfg.resampler_heads, head_dim=cfg.resampler_head_dim, ff_mult=cfg.resampler_ff_mult,
                 attention_impl=cfg.attention_impl, **_kw(cfg)),
            cfg.resampler_depth, scan=cfg.scan_layers, remat_policy=cfg.remat_policy, name="layers",
            layer_cls=PerceiverLayer)
        lat = run(lat, x.reshape(b * t, v, d).astype(cfg.compute_dtype))
        lat = layers.layer_norm("norm", eps=TORCH_LN_EPS, **_kw(cfg))(lat)
        return lat.reshape(b, t, cfg.resampler_latents, d)


# ----------------------------------------------------------------------------- LM

class RMSNorm(nn.Module):
    """x / rms(x) * scale, the statistics in float32 (as HF's LlamaRMSNorm)."""
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _param(self, "scale", nn.initializers.ones_init(), ("norm",), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def rotary(x: Array, positions: Array, theta: float) -> Array:
    """Rotary position embedding of x [B, T, N, H] at integer `positions` [B, T], in HF LLaMA's
    rotate_half layout (frequency k rotates dims k and k + H/2), so HF's q_proj / k_proj
    weights need no permutation."""
    h = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq           # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]      # [B, T, 1, H]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class SelfAttention(nn.Module):
    """Causal grouped-query self-attention with rotary embeddings, no biases (LLaMA).

    `mask` [B, 1, T, S] (True = attend) comes from the LM: causality + key padding. Decode
    mode writes this call's keys/values at cache slots `cache_index` .. + T of a heads-major
    cache [B, kv_heads, max_decode_len, head_dim] and attends over the whole cache.
    """
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str | None = None
    decode: bool = False
    max_decode_len: int = 0

    @nn.compact
    def __call__(self, x: Array, mask: Array, positions: Array, cache_index: Array | None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        proj = lambda heads, name: layers.dense_general(  # noqa: E731
            (heads, self.head_dim), -1, ("embed", "heads", "kv"), ("heads", "kv"), name=name, **kw)
        q = rotary(proj(self.num_heads, "q_proj")(x), positions, self.rope_theta)
        k = rotary(proj(self.num_kv_heads, "k_proj")(x), positions, self.rope_theta)
        v = proj(self.num_kv_heads, "v_proj")(x)
        q = layers.constrain(q, layers.BATCH_LENGTH_HEADS_KV)
        k = layers.constrain(k, layers.BATCH_LENGTH_HEADS_KV)
        v = layers.constrain(v, layers.BATCH_LENGTH_HEADS_KV)
        if self.decode:
            # Heads-major, as layers.Attention's cache: each step reads it without a transpose.
            heads_major = lambda t: jnp.swapaxes(t, 1, 2)  # noqa: E731
            shape = (x.shape[0], self.num_kv_heads, self.max_decode_len, self.head_dim)
            ck = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
            cv = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
            ck.value = jax.lax.dynamic_update_slice(ck.value, heads_major(k).astype(ck.value.dtype),
                                                    (0, 0, cache_index, 0))
            cv.value = jax.lax.dynamic_update_slice(cv.value, heads_major(v).astype(cv.value.dtype),
                                                    (0, 0, cache_index, 0))
            out = layers.attend_cached(q, ck.value.astype(q.dtype), cv.value.astype(q.dtype), mask)
        else:
            out = layers.attend(q, k, v, mask, self.attention_impl)
        out = layers.constrain(out, layers.BATCH_LENGTH_HEADS_KV)
        return layers.dense_general(x.shape[-1], (-2, -1), ("heads", "kv", "embed"), ("embed",), name="o_proj",
                                    **kw)(out)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (LLaMA's MLP)."""
    mlp_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        dense = functools.partial(layers.dense_general, self.mlp_dim, -1, ("embed", "mlp"), ("mlp",), **kw)
        h = nn.silu(dense(name="gate_proj")(x)) * dense(name="up_proj")(x)
        h = layers.constrain(h, MLP_AXES)
        return layers.dense_general(x.shape[-1], -1, ("mlp", "embed"), ("embed",), name="down_proj", **kw)(h)


class DecoderLayer(nn.Module):
    """x + attn(RMSNorm(x)); x + mlp(RMSNorm(x)) (HF LlamaDecoderLayer)."""
    config: FlamingoConfig
    deterministic: bool = True
    decode: bool = False
    max_decode_len: int = 0

    @nn.compact
    def __call__(self, x: Array, mask: Array, positions: Array, cache_index: Array | None) -> Array:
        cfg = self.config
        kw = _kw(cfg)
        drop = lambda h: nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)  # noqa: E731
        h = RMSNorm(cfg.rms_norm_eps, name="input_norm", **kw)(x)
        h = SelfAttention(cfg.lm_heads, cfg.lm_kv_heads, cfg.head_dim, cfg.rope_theta,
                          attention_impl=cfg.attention_impl, decode=self.decode,
                          max_decode_len=self.max_decode_len, name="self_attn", **kw)(h, mask, positions, cache_index)
        x = x + drop(h)
        h = RMSNorm(cfg.rms_norm_eps, name="mlp_norm", **kw)(x)
        x = x + drop(SwiGLU(cfg.lm_mlp_dim, name="mlp", **kw)(h))
        return layers.constrain(x, layers.BATCH_LENGTH_EMBED)


def media_attention_mask(text_time: Array, num_media_tokens: int, latents_per_media: int,
                         immediate: bool) -> tuple[Array, Array]:
    """(mask [B, T, S], has_media [B, T]) of text tokens over the flattened media tokens
    (S = T_img * latents_per_media). Token t sees image j (1-based) iff j == text_time[t]
    (`immediate`) or j <= text_time[t]; has_media is False where it sees none. Those rows' mask
    is all True, so no softmax row is fully masked (its output is zeroed instead)."""
    media_time = jnp.arange(num_media_tokens) // latents_per_media + 1
    tt = text_time[..., None]
    mask = (tt == media_time) if immediate else (tt >= media_time)
    has_media = jnp.any(mask, axis=-1)
    return mask | ~has_media[..., None], has_media


class MaskedCrossAttention(nn.Module):
    """Text x [B, T, D] attends (LN(x) queries, no biases) to media [B, T_img, n, D_v] as
    `media_attention_mask` allows; tokens that see no image get 0.

    Decode mode projects the media keys/values once, on the call that creates the cache
    ('cross_key' / 'cross_value', heads-major [B, heads, T_img * n, head_dim]); later calls
    may pass media=None.
    """
    num_heads: int
    head_dim: int
    latents_per_media: int
    immediate: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    decode: bool = False

    @nn.compact
    def __call__(self, x: Array, media: Array | None, text_time: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        proj = lambda name: layers.dense_general(  # noqa: E731
            (self.num_heads, self.head_dim), -1, ("embed", "heads", "kv"), ("heads", "kv"), name=name, **kw)
        h = layers.layer_norm("norm", eps=TORCH_LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype)(x)
        q = layers.constrain(proj("to_q")(h), layers.BATCH_LENGTH_HEADS_KV)
        to_k, to_v = proj("to_k"), proj("to_v")

        def project(module):  # flattened media -> heads-major [B, N, T_img * n, H]
            m = media.reshape(media.shape[0], -1, media.shape[-1]).astype(self.dtype)
            return jnp.swapaxes(layers.constrain(module(m), layers.BATCH_LENGTH_HEADS_KV), 1, 2)

        if self.decode:
            k = self.variable("cache", "cross_key", lambda: project(to_k)).value
            v = self.variable("cache", "cross_value", lambda: project(to_v)).value
        else:
            k, v = project(to_k), project(to_v)
        mask, has_media = media_attention_mask(text_time, k.shape[2], self.latents_per_media, self.immediate)
        out = layers.attend_cached(q, k.astype(q.dtype), v.astype(q.dtype), mask[:, None])
        out = jnp.where(has_media[:, :, None, None], out, 0).astype(out.dtype)
        out = layers.constrain(out, layers.BATCH_LENGTH_HEADS_KV)
        return layers.dense_general(x.shape[-1], (-2, -1), ("heads", "kv", "embed"), ("embed",), name="to_out",
                                    **kw)(out)


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(attn_gate) * xattn(x, media); x + tanh(ff_gate) * ff(x); gates start at 0."""
    config: FlamingoConfig
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x: Array, media: Array | None, text_time: Array) -> Array:
        cfg = self.config
        kw = _kw(cfg)
        gate = lambda name: jnp.tanh(_param(self, name, nn.initializers.zeros_init(), (), (),  # noqa: E731
                                            cfg.params_dtype).astype(jnp.float32)).astype(cfg.compute_dtype)
        drop = lambda h: nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)  # noqa: E731
        h = MaskedCrossAttention(cfg.xattn_heads, cfg.xattn_head_dim, cfg.resampler_latents,
                                 cfg.only_attend_immediate_media, decode=self.decode, name="attn", **kw)(
            x, media, text_time)
        x = x + gate("attn_gate") * drop(h)
        h = FeedForward(cfg.lm_width * cfg.xattn_ff_mult, name="ff", **kw)(x)
        x = x + gate("ff_gate") * drop(h)
        return layers.constrain(x, layers.BATCH_LENGTH_EMBED)


class FlamingoBlock(nn.Module):
    """`cross_attn_every` LM layers, the gated cross-attention block before the last one.

    Scan-compatible: `(x, mask, positions, cache_index, media, text_time) -> (x, None)`.
    `cross_attend=False` (text only) skips the cross-attention.
    """
    config: FlamingoConfig
    deterministic: bool = True
    decode: bool = False
    max_decode_len: int = 0
    cross_attend: bool = True

    @nn.compact
    def __call__(self, x: Array, mask: Array, positions: Array, cache_index: Array | None,
                 media: Array | None, text_time: Array | None):
        cfg = self.config
        n = cfg.cross_attn_every
        for j in range(n):
            if j == n - 1 and self.cross_attend:
                x = GatedCrossAttentionBlock(cfg, self.deterministic, self.decode, name="gated_xattn")(
                    x, media, text_time)
            x = DecoderLayer(cfg, self.deterministic, self.decode, self.max_decode_len, name=f"decoder_{j}")(
                x, mask, positions, cache_index)
        return x, None


class FlamingoLM(nn.Module):
    """Tokens [B, T] (+ media [B, T_img, n, D_v] or None: text only) -> logits [B, T, vocab] (float32).

    Training (`decode=False`): causal attention over the row; `attention_mask` [B, T] (1 = real
    token, HF-style) masks padding keys, positions = max(cumsum(attention_mask) - 1, 0).
    Decode: `max_len > 0` is the prefill (creates the cache, max_len slots; the cache must not
    exist yet); `max_len == 0` appends tokens to the existing cache.
    """
    config: FlamingoConfig
    decode: bool = False

    def _has_media_cache(self) -> bool:
        """Whether the prefill cached media keys/values (the cross-attention then runs)."""
        cache = self.variables.get("cache", {})
        return any(isinstance(v, Mapping) and "gated_xattn" in v for v in cache.values())

    def _decode_state(self, tokens: Array, valid: Array, max_len: int) -> tuple[Array, Array, Array, Array]:
        """Reads and advances the decode state; (self mask [B,1,T,S], positions, text_time, cache index)."""
        cfg = self.config
        b, t = tokens.shape
        prefill = max_len > 0
        if prefill == self.has_variable("cache", "index"):
            raise ValueError("Flamingo.prefill needs a fresh cache (apply without a 'cache' collection)" if prefill
                             else "Flamingo.step needs the cache that Flamingo.prefill created")
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        key_mask = self.variable("cache", "per_example_key_mask", jnp.zeros, (b, max_len), bool)
        position = self.variable("cache", "per_example_position", jnp.zeros, (b,), jnp.int32)   # next position
        num_media = self.variable("cache", "per_example_num_media", jnp.zeros, (b,), jnp.int32)  # <image> tokens so far
        i = index.value
        slots = jnp.arange(key_mask.value.shape[1])
        query_slots = i + jnp.arange(t)
        key_mask.value = jax.lax.dynamic_update_slice(key_mask.value, valid, (0, i))
        causal = slots[None, :] <= query_slots[:, None]
        # Each query also sees its own slot: a padding query is then never fully masked.
        mask = (key_mask.value[:, None, :] & causal[None]) | (slots[None, :] == query_slots[:, None])[None]
        positions = jnp.maximum(position.value[:, None] + jnp.cumsum(valid, axis=1) - 1, 0)
        text_time = num_media.value[:, None] + jnp.cumsum(tokens == cfg.media_id, axis=1)
        index.value = i + t
        position.value = position.value + jnp.sum(valid, axis=1, dtype=jnp.int32)
        num_media.value = text_time[:, -1].astype(jnp.int32)
        return mask[:, None], positions, text_time, i

    @nn.compact
    def __call__(self, tokens: Array, media: Array | None, attention_mask: Array | None = None,
                 deterministic: bool = True, max_len: int = 0) -> Array:
        cfg = self.config
        kw = _kw(cfg)
        b, t = tokens.shape
        if not self.decode and t > cfg.lm_max_len:
            raise ValueError(f"text length {t} > FlamingoConfig.lm_max_len={cfg.lm_max_len}")
        embed = layers.Embed(cfg.vocab_size, cfg.lm_width, embedding_init=nn.initializers.normal(0.02),
                             name="embed", **kw)
        x = embed(tokens)
        base = cfg.vocab_size - cfg.num_extra_tokens
        extra = None
        if cfg.num_extra_tokens:
            extra = layers.Embed(cfg.num_extra_tokens, cfg.lm_width, embedding_init=nn.initializers.normal(0.02),
                                 name="extra_embed", **kw)
            new = extra(jnp.clip(tokens - base, 0, cfg.num_extra_tokens - 1))
            x = jnp.where((tokens >= base)[..., None], new, x)
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)

        if self.decode:
            if max_len > cfg.lm_max_len:
                raise ValueError(f"max_len={max_len} > FlamingoConfig.lm_max_len={cfg.lm_max_len}")
            if max_len and t > max_len:
                raise ValueError(f"prompt length {t} > max_len={max_len}")
            cross = media is not None if max_len else self._has_media_cache()
            mask, positions, text_time, cache_index = self._decode_state(tokens, valid, max_len)
        else:
            cross = media is not None
            causal = jnp.tril(jnp.ones((t, t), bool))
            mask = ((causal[None] & valid[:, None, :]) | jnp.eye(t, dtype=bool)[None])[:, None]
            positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
            text_time = jnp.cumsum(tokens == cfg.media_id, axis=1)
            cache_index = None

        run = layers.layer_stack(
            dict(config=cfg, deterministic=deterministic or self.decode, decode=self.decode, max_decode_len=max_len,
                 cross_attend=cross),
            cfg.num_groups, scan=cfg.scan_layers, remat_policy="none" if self.decode else cfg.remat_policy,
            name="blocks", layer_cls=FlamingoBlock)
        x = run(x, mask, positions, cache_index, media if cross else None, text_time if cross else None)
        x = RMSNorm(cfg.rms_norm_eps, name="final_norm", **kw)(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
            if extra is not None:  # the new tokens' rows come from the extra table, as their inputs
                logits = jnp.concatenate([logits[..., :base], extra.attend(x)], axis=-1)
        else:
            logits = layers.dense_general(cfg.vocab_size, -1, ("embed", "vocab"), ("vocab",), use_bias=False,
                                          kernel_init=nn.initializers.normal(0.02), name="lm_head", **kw)(x)
        return layers.constrain(logits.astype(jnp.float32), LOGITS_AXES)


# ----------------------------------------------------------------------------- the model

class Flamingo(nn.Module):
    """Flamingo. `__call__(batch)` -> {'logits': [B, L, vocab]}, logits[:, t] predicting tokens[:, t+1].

    batch: 'images' [B, T_img, H, W, 3] (uint8, normalized with image_mean/std, or float
    already normalized) and 'tokens' [B, L] int32, with one `media_id` per image in order
    (other keys, e.g. 'loss_mask', are ignored).
    """
    config: FlamingoConfig
    decode: bool = False

    def setup(self):
        self.vision = VisionTower(self.config)
        self.resampler = PerceiverResampler(self.config)
        self.lm = FlamingoLM(self.config, decode=self.decode)

    def encode_media(self, images: Array, deterministic: bool = True) -> Array:
        """Images [B, T_img, H, W, 3] -> media [B, T_img, resampler_latents, vision_width]."""
        b, t = images.shape[:2]
        feats = self.vision(images.reshape(b * t, *images.shape[2:]), deterministic)
        if self.config.freeze_vision:  # no backward pass through the frozen ViT
            feats = jax.lax.stop_gradient(feats)
        return self.resampler(feats.reshape(b, t, *feats.shape[1:]))

    def lm_logits(self, tokens: Array, media: Array | None, attention_mask: Array | None = None,
                  deterministic: bool = True) -> Array:
        """Logits [B, L, vocab] (float32); media None = the bare LM (no cross-attention)."""
        if self.decode:
            raise ValueError("Flamingo(decode=True) runs prefill / step; use decode=False for lm_logits")
        return self.lm(tokens, media, attention_mask, deterministic)

    def prefill(self, tokens: Array, attention_mask: Array, media: Array | None, max_len: int) -> Array:
        """A left-padded prompt [B, P] (attention_mask 1 = real token) -> logits [B, P, vocab];
        creates the cache (apply with mutable=['cache'] and no 'cache' collection) with
        `max_len` >= P + new tokens slots. media None: text-only generation."""
        if not self.decode:
            raise ValueError("Flamingo.prefill needs Flamingo(config, decode=True)")
        return self.lm(tokens, media, attention_mask, True, max_len=max_len)

    def step(self, tokens: Array, media: Array | None = None) -> Array:
        """Appends tokens [B, T] (usually T = 1) to the cache -> logits [B, T, vocab]. The media
        keys/values cached by `prefill` are used; `media` is ignored."""
        if not self.decode:
            raise ValueError("Flamingo.step needs Flamingo(config, decode=True)")
        del media
        return self.lm(tokens, None, None, True, max_len=0)

    def __call__(self, batch: Mapping[str, Array], deterministic: bool = True) -> dict[str, Array]:
        media = self.encode_media(batch["images"], deterministic)
        return {"logits": self.lm_logits(batch["tokens"], media, None, deterministic)}


def dummy_batch(cfg: FlamingoConfig, batch_size: int = 1, num_media: int | None = None,
                text_len: int | None = None) -> dict[str, Array]:
    """Zeros of the training batch's shapes (for init and compilation); default sizes
    max_images and max_text_len (or lm_max_len)."""
    num_media = num_media or cfg.max_images
    text_len = text_len or cfg.max_text_len or cfg.lm_max_len
    return {"images": jnp.zeros((batch_size, num_media, cfg.image_size, cfg.image_size, 3), jnp.uint8),
            "image_mask": jnp.zeros((batch_size, num_media), jnp.int32),
            "tokens": jnp.zeros((batch_size, text_len), jnp.int32),
            "loss_mask": jnp.zeros((batch_size, text_len), jnp.int32)}


# ----------------------------------------------------------------------------- the family

class FlamingoFamily(family.ModelFamily):
    """Flamingo as a model family: next-token loss on interleaved image-text documents (the
    data's 'loss_mask' picks the targets); generates captions after an <image> and a text
    prompt, and in context after k solved examples (`few_shot_inputs`)."""
    name = "flamingo"
    export_type = "Flamingo"
    config_cls = FlamingoConfig
    module_cls = Flamingo
    can_generate = True
    can_few_shot = True

    def __init__(self, config: FlamingoConfig | None = None):
        super().__init__(config)
        self.decoder = Flamingo(self.config, decode=True)

    def dummy_batch(self, batch_size: int = 1) -> dict[str, Array]:
        return dummy_batch(self.config, batch_size)

    def random_batch(self, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Every image used: the text is max_images chunks, each <image> + random ids, all
        trained but the <image> tokens."""
        cfg = self.config
        host = {k: np.array(v) for k, v in self.dummy_batch(batch_size).items()}
        host["images"] = rng.integers(0, 256, host["images"].shape, dtype=np.uint8)
        host["image_mask"][:] = 1
        tokens = rng.integers(3, min(cfg.media_id, cfg.eoc_id), host["tokens"].shape)
        starts = np.arange(cfg.max_images) * (tokens.shape[1] // cfg.max_images)
        tokens[:, starts] = cfg.media_id
        host["tokens"] = tokens.astype(np.int32)
        host["loss_mask"] = (tokens != cfg.media_id).astype(np.int32)
        return host

    def objective(self, params, batch, rng, *, loss_weights, mesh=None, batch_axes=(),
                  aux_state=None) -> losses.Objective:
        cfg = self.config
        logits = self.module.apply({"params": params}, batch, deterministic=False, rngs={"dropout": rng})["logits"]
        tokens = batch["tokens"]
        # logits[:, t] predicts tokens[:, t + 1]; positions the mask leaves out become pad (ignored).
        targets = jnp.where(batch["loss_mask"][:, 1:] > 0, tokens[:, 1:], cfg.pad_id)
        nll, num_tokens, correct = losses.token_nll_stats(logits[:, :-1], targets, cfg.pad_id)
        return losses.Objective(nll, num_tokens, {"loss": nll, "token_accuracy": correct,
                                                  "num_target_tokens": num_tokens})

    def check_batch(self, host_batch) -> None:
        cfg = self.config
        media = (host_batch["tokens"] == cfg.media_id).sum(-1)
        images = host_batch["image_mask"].sum(-1) if "image_mask" in host_batch else None
        if images is not None and (media > images).any():
            row = int(np.argmax(media > images))
            raise ValueError(f"batch row {row} has {int(media[row])} <image> tokens (id {cfg.media_id}) but "
                             f"{int(images[row])} images: the data's media_id must be FlamingoConfig.media_id "
                             f"and every <image> needs its image (interleaved_task keeps them paired)")

    def extra_token_ids(self) -> tuple[int, ...]:
        cfg = self.config
        return (cfg.media_id, cfg.eoc_id) + ((cfg.bos_id,) if cfg.add_bos else ())

    def check_vocabulary(self, vocab) -> None:
        cfg = self.config
        pieces = vocab.vocab_size
        processor = getattr(vocab, "tokenizer", None)  # SentencePiece's processor, if any
        for field, name in (("media_id", "<image>"), ("eoc_id", "<|endofchunk|>")):
            i = getattr(cfg, field)
            if i >= pieces:
                continue  # a new token past the tokenizer's pieces (the usual case)
            piece = processor.id_to_piece(i) if hasattr(processor, "id_to_piece") else None
            if i in (vocab.eos_id, cfg.pad_id) or piece != name:
                raise ValueError(f"FlamingoConfig.{field}={i} is the tokenizer's piece {piece!r}, not {name}; use an "
                                 f"id past its {pieces} pieces (e.g. media_id={pieces}, eoc_id={pieces + 1})")
        super().check_vocabulary(vocab)

    def tokens_per_example(self) -> int:
        cfg = self.config
        return cfg.max_images * cfg.num_patches + (cfg.max_text_len or cfg.lm_max_len)

    def train_flops_per_example(self, frozen=()) -> float:
        return train_flops_per_example(self.config, lm_frozen=self.lm_frozen(frozen))

    def lm_frozen(self, frozen) -> bool:
        """Whether the `frozen` regexes cover every weight of the LM's own layers and head."""
        patterns = [re.compile(p) for p in frozen]
        paths = ["/".join(str(getattr(k, "key", k)) for k in path)
                 for path, _ in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(self.abstract_params()))[0]]
        lm = [p for p in paths if re.fullmatch(r"lm/(lm_head|blocks(_\d+)?/decoder_\d+)/.*", p)]
        return bool(patterns) and all(any(r.fullmatch(p) for r in patterns) for p in lm)

    def describe(self) -> str:
        cfg = self.config
        return (f"Flamingo: CLIP ViT width {cfg.vision_width} x {cfg.vision_layers} layers (patch {cfg.patch_size}, "
                f"{cfg.image_size}px{', frozen' if cfg.freeze_vision else ''}), Perceiver resampler "
                f"{cfg.resampler_depth} layers x {cfg.resampler_latents} latents, LLaMA-style LM width "
                f"{cfg.lm_width} x {cfg.lm_layers} layers with gated cross-attention every {cfg.cross_attn_every}.")

    def table_cells(self) -> list[str]:
        cfg = self.config
        heads = f"{cfg.lm_heads}" + (f" ({cfg.lm_kv_heads} kv)" if cfg.lm_kv_heads != cfg.lm_heads else "")
        return [f"{cfg.vision_width} / {cfg.lm_width}",
                f"{cfg.vision_layers} / {cfg.lm_layers} (+{cfg.num_groups} xattn, {cfg.resampler_depth} resampler)",
                f"{cfg.vision_heads} / {heads}", f"{cfg.vision_mlp_dim} / {cfg.lm_mlp_dim} SwiGLU",
                f"{cfg.image_size} / {cfg.patch_size}", "linear",
                f"{cfg.max_images} x {cfg.resampler_latents} latents",
                f"{cfg.max_text_len or cfg.lm_max_len} interleaved"]

    # ------------------------------------------------------------------ generation

    max_decode_len = property(lambda self: self.config.max_caption_len)
    # A caption ends its chunk: generation stops at <|endofchunk|>, as open_flamingo's generate.
    eos_id = property(lambda self: self.config.eoc_id)
    text_eos_id = property(lambda self: self.config.eos_id)
    cache_batch_axis = property(lambda self: 1 if self.config.scan_layers else 0)

    def prompt_ids(self, vocab, prompt: str) -> np.ndarray:
        """The text after each <image> (e.g. 'Output:'); may be empty."""
        return np.asarray(list(vocab.encode(prompt)) if prompt else [], np.int32)

    def decode_inputs(self, images, prompt_ids) -> dict[str, np.ndarray]:
        return self.few_shot_inputs(images, prompt_ids, np.zeros((0, *images.shape[1:]), images.dtype), [])

    def few_shot_inputs(self, images, prompt_ids, shot_images, shot_ids) -> dict[str, np.ndarray]:
        """[BOS] (<image> prompt caption <|endofchunk|>) per solved example, then <image> prompt:
        open_flamingo's captioning prompt. Every row has the same length (no padding)."""
        cfg = self.config
        prompt = [int(i) for i in prompt_ids]
        tokens = [cfg.bos_id] if cfg.add_bos else []
        for ids in shot_ids:
            tokens += [cfg.media_id, *prompt, *(int(i) for i in ids), cfg.eoc_id]
        tokens += [cfg.media_id, *prompt]
        room = cfg.lm_max_len - cfg.max_caption_len
        if len(tokens) > room:
            raise ValueError(f"the prompt with {len(shot_ids)} solved examples is {len(tokens)} tokens, over the "
                             f"{room} that FlamingoConfig.lm_max_len={cfg.lm_max_len} leaves after "
                             f"max_caption_len={cfg.max_caption_len}: use fewer shots or raise lm_max_len")
        b = len(images)
        media = np.concatenate([np.broadcast_to(shot_images[None], (b, *shot_images.shape)), images[:, None]], 1)
        row = np.asarray(tokens, np.int32)
        out = {"images": media, "tokens": np.tile(row, (b, 1)), "attention_mask": np.ones((b, len(row)), np.int32)}
        if len(shot_ids):  # marks the images before the last as the same in every row (see `encode`)
            out["shared_shots"] = np.ones((b,), np.int32)
        return out

    def encode(self, params, inputs) -> dict[str, Array]:
        """Media, prompt and mask. The solved examples' images, the same in every row
        (`shared_shots`), are encoded once, from row 0 (unless a media-time embedding makes an
        image's latents depend on its position)."""
        images = inputs["images"]
        run = lambda x: self.module.apply({"params": params}, x, method=Flamingo.encode_media)  # noqa: E731
        if "shared_shots" in inputs and not self.config.max_num_media:
            shots = run(images[:1, :-1])
            media = jnp.concatenate([jnp.broadcast_to(shots, (images.shape[0], *shots.shape[1:])),
                                     run(images[:, -1:])], axis=1)
        else:
            media = run(images)
        return {"media": media, "tokens": inputs["tokens"], "attention_mask": inputs["attention_mask"]}

    def _never_generated(self, logits: Array) -> Array:
        """A caption never holds <image> (it would start a new media chunk: the per-example
        <image> count in the cache must stay equal across beams) nor BOS."""
        cfg = self.config
        ids = [cfg.media_id] + ([cfg.bos_id] if cfg.add_bos else [])
        return logits.at[..., jnp.asarray(ids)].set(-jnp.inf)

    def decode_start(self, params, context):
        max_len = context["tokens"].shape[1] + self.config.max_caption_len
        logits, mutated = self.decoder.apply({"params": params}, context["tokens"], context["attention_mask"],
                                             context["media"], max_len, method=Flamingo.prefill, mutable=["cache"])
        return self._never_generated(logits[:, -1]), mutated["cache"]

    def decode_step(self, params, cache, tokens, context, t):
        logits, mutated = self.decoder.apply({"params": params, "cache": cache}, tokens[:, None],
                                             method=Flamingo.step, mutable=["cache"])
        return self._never_generated(logits[:, -1]), mutated["cache"]

    def caption_logits(self, params, context, tokens):
        prompt, mask, media = context["tokens"], context["attention_mask"], context["media"]
        m = tokens.shape[0] // prompt.shape[0]
        if m > 1:  # m captions per context row
            prompt, mask, media = (jnp.repeat(x, m, axis=0) for x in (prompt, mask, media))
        seq = jnp.concatenate([prompt, tokens[:, :-1]], axis=1)
        full_mask = jnp.concatenate([mask, jnp.ones(tokens[:, :-1].shape, mask.dtype)], axis=1)
        logits = self.module.apply({"params": params}, seq, media, full_mask, method=Flamingo.lm_logits)
        p = prompt.shape[1]
        return self._never_generated(logits[:, p - 1:p - 1 + tokens.shape[1]])

    def target_layout(self) -> tuple[int, bool]:
        return self.config.max_caption_len, False


# ----------------------------------------------------------------------------- FLOPs

def _vision_flops(cfg: FlamingoConfig) -> float:
    """One image through the ViT (+ class token), forward."""
    n, w = cfg.num_patches + 1, cfg.vision_width
    patch = 2.0 * cfg.num_patches * cfg.patch_size ** 2 * 3 * w
    return patch + cfg.vision_layers * (flops._self_attention(n, w) + flops._mlp(n, w, cfg.vision_mlp_dim))


def _resampler_flops(cfg: FlamingoConfig) -> float:
    """One image's resampler, forward: latents query [patches; latents]."""
    n, p, w = cfg.resampler_latents, cfg.num_patches, cfg.vision_width
    inner = cfg.resampler_heads * cfg.resampler_head_dim
    per_layer = (flops._dense(n, w, inner) + flops._dense(p + n, w, 2 * inner) + flops._dense(n, inner, w)
                 + flops._attention_core(n, p + n, inner) + flops._mlp(n, w, cfg.resampler_ff_mult * w))
    return cfg.resampler_depth * per_layer


def _lm_flops(cfg: FlamingoConfig, tokens: int, count_masked: bool = False) -> float:
    """The LM over `tokens` positions, forward: GQA projections, causal attention, SwiGLU, logits."""
    w, h = cfg.lm_width, cfg.head_dim
    q, kv = cfg.lm_heads * h, cfg.lm_kv_heads * h
    attn = (flops._dense(tokens, w, q) + 2 * flops._dense(tokens, w, kv) + flops._dense(tokens, q, w)
            + flops._attention_core(tokens, tokens, q, causal=True, count_masked=count_masked))
    mlp = 3 * flops._dense(tokens, w, cfg.lm_mlp_dim)
    return cfg.lm_layers * (attn + mlp) + flops._dense(tokens, w, cfg.vocab_size)


def _xattn_flops(cfg: FlamingoConfig, tokens: int, media_tokens: int) -> float:
    """The gated cross-attention-dense blocks, forward. Every text position attends to every
    media token (the media mask is applied to the full matrix)."""
    w, inner = cfg.lm_width, cfg.xattn_heads * cfg.xattn_head_dim
    per_block = (flops._dense(tokens, w, inner) + flops._dense(media_tokens, cfg.vision_width, 2 * inner)
                 + flops._attention_core(tokens, media_tokens, inner) + flops._dense(tokens, inner, w)
                 + flops._mlp(tokens, w, cfg.xattn_ff_mult * w))
    return cfg.num_groups * per_block


def forward_flops(cfg: FlamingoConfig, count_masked: bool = False) -> tuple[float, float]:
    """(frozen vision tower, the rest) forward FLOPs of one training example: max_images
    images, max_text_len (or lm_max_len) tokens."""
    t = cfg.max_text_len or cfg.lm_max_len
    rest = (cfg.max_images * _resampler_flops(cfg) + _lm_flops(cfg, t, count_masked)
            + _xattn_flops(cfg, t, cfg.max_images * cfg.resampler_latents))
    return cfg.max_images * _vision_flops(cfg), rest


def train_flops_per_example(cfg: FlamingoConfig, count_masked: bool = False, lm_frozen: bool = False) -> float:
    """Training FLOPs of one example: the vision tower forward only when frozen (its output is
    stop_gradient'ed), 3x forward for the rest; with `lm_frozen` (the trainer's stop_gradient
    on frozen params) the LM's weight gradients are not computed, and neither is the backward
    pass of the LM layers before the first cross-attention block (nothing before them trains).
    A frozen LM still runs the rest of its backward pass: the gradient reaches the
    cross-attention blocks through it."""
    vision, rest = forward_flops(cfg, count_masked)
    total = (vision if cfg.freeze_vision else 3 * vision) + 3 * rest
    if lm_frozen:
        t = cfg.max_text_len or cfg.lm_max_len
        core = flops._attention_core(t, t, cfg.lm_heads * cfg.head_dim, causal=True, count_masked=count_masked)
        dense = _lm_flops(cfg, t, count_masked) - cfg.lm_layers * core  # weight matmuls, forward
        dense_layer = (dense - flops._dense(t, cfg.lm_width, cfg.vocab_size)) / cfg.lm_layers
        total -= dense + (cfg.cross_attn_every - 1) * (dense_layer + 2 * core)
    return total
