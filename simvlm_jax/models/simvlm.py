"""SimVLM (Wang et al. 2021, arXiv 2108.10904): conv-stem ViT encoder + PrefixLM decoder.

Image -> first `stem_stages` ResNet stages (BiT style: weight-standardized
convs + GroupNorm; 0 = linear patch projection) -> patch tokens. The encoder
sees [image tokens; text prefix tokens] with bidirectional attention; the
decoder predicts the text suffix with causal self-attention + cross-attention.
Text-only examples (`has_image == 0`) mask the image tokens out entirely.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import einops
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from simvlm_jax import flops, losses
from simvlm_jax.models import family, layers
from simvlm_jax.models.layers import stem_stride
from simvlm_jax.special_tokens import EOS_ID, PAD_ID

Array = jax.Array

DTYPES = layers.DTYPES


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SimVLMConfig:
    """All SimVLM hyper-parameters; every field is a gin binding `SimVLMConfig.<field>`."""
    vocab_size: int = 32_000
    width: int = 768
    num_heads: int = 12
    mlp_dim: int = 3072
    encoder_layers: int = 12
    decoder_layers: int = 12
    image_size: int = 224
    patch_size: int = 16
    stem_stages: int = 3            # 0 = linear patch projection (the paper's ablation)
    stem_width: int = 64            # ResNet root width; stage i has width stem_width * 2**i
    stem_units: tuple[int, ...] = (3, 4, 6)  # bottleneck units per stage (ResNet-50)
    max_prefix_len: int = 32       # text tokens in the encoder
    max_target_len: int = 64       # text tokens in the decoder
    pos_embedding: str = "learned"  # image positions: 'learned' | 'sincos2d'
    tie_embeddings: bool = True
    dropout_rate: float = 0.0
    drop_path_rate: float = 0.0     # stochastic depth on conv stem + encoder
    dtype: str = "float32"          # compute dtype; params stay `param_dtype`
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str | None = None  # None (auto) | 'xla' | 'cudnn'
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"SimVLMConfig: width={self.width} not divisible by num_heads={self.num_heads}")
        if not 0 <= self.stem_stages <= len(self.stem_units):
            raise ValueError(f"SimVLMConfig: stem_stages={self.stem_stages} needs 0..{len(self.stem_units)} "
                             f"(len(stem_units)={len(self.stem_units)})")
        stride = self.stem_stride
        if self.patch_size % stride:
            raise ValueError(f"SimVLMConfig: patch_size={self.patch_size} must be a multiple of the conv "
                             f"stem stride {stride} (stem_stages={self.stem_stages})")
        if self.image_size % self.patch_size:
            raise ValueError(f"SimVLMConfig: image_size={self.image_size} not divisible by "
                             f"patch_size={self.patch_size}")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                raise ValueError(f"SimVLMConfig.{f}={getattr(self, f)!r}; choose one of {sorted(DTYPES)}")

    @property
    def stem_stride(self) -> int:
        return stem_stride(self.stem_stages)

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]


class StdConv(nn.Conv):
    """Weight-standardized convolution (BiT)."""

    def param(self, name, init_fn, *args, **kwargs):
        p = super().param(name, init_fn, *args, **kwargs)
        if name == "kernel":
            p = p - jnp.mean(p, axis=(0, 1, 2), keepdims=True)
            p = p / jnp.sqrt(jnp.var(p, axis=(0, 1, 2), keepdims=True) + 1e-10)
        return p


def _conv(features, kernel, strides=1, name=None, *, dtype, param_dtype):
    return StdConv(features, (kernel, kernel), (strides, strides), padding="SAME", use_bias=False,
                   dtype=dtype, param_dtype=param_dtype, name=name,
                   kernel_init=layers.param_with_axes(nn.initializers.he_normal(),
                                                      (None, None, "conv_in", "conv_out")))


def _group_norm(name, *, dtype, param_dtype):
    return nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name=name,
                        scale_init=layers.param_with_axes(nn.initializers.ones_init(), ("conv_out",)),
                        bias_init=layers.param_with_axes(nn.initializers.zeros_init(), ("conv_out",)))


class BottleneckUnit(nn.Module):
    width: int
    strides: int = 1
    drop_path_rate: float = 0.0
    deterministic: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out_ch = 4 * self.width
        residual = x
        if x.shape[-1] != out_ch or self.strides != 1:
            residual = _conv(out_ch, 1, self.strides, "conv_proj", **kw)(x)
            residual = _group_norm("gn_proj", **kw)(residual)
        y = nn.relu(_group_norm("gn1", **kw)(_conv(self.width, 1, 1, "conv1", **kw)(x)))
        y = nn.relu(_group_norm("gn2", **kw)(_conv(self.width, 3, self.strides, "conv2", **kw)(y)))
        y = _group_norm("gn3", **kw)(_conv(out_ch, 1, 1, "conv3", **kw)(y))
        y = layers.drop_path(y, self.drop_path_rate, self.deterministic, lambda: self.make_rng("dropout"))
        return nn.relu(residual + y)


def resnet_stem(x: Array, width: int, units: Sequence[int], drop_path_rate: float, deterministic: bool,
                *, dtype, param_dtype) -> Array:
    """The first `len(units)` stages of a BiT ResNet (weight-standardized convs + GroupNorm):
    root conv 7x7/2 + max-pool /2, then bottleneck stages (stage i: width * 2**i, /2 from
    the second). Call from inside a compact module: the convs become its submodules.
    No stages: `x` unchanged."""
    if not units:
        return x
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    x = _conv(width, 7, 2, "root_conv", **kw)(x)
    x = nn.relu(_group_norm("root_gn", **kw)(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
    for s, num_units in enumerate(units):
        for u in range(num_units):
            x = BottleneckUnit(width * 2 ** s, strides=2 if (s > 0 and u == 0) else 1,
                               drop_path_rate=drop_path_rate, deterministic=deterministic,
                               name=f"stage{s + 1}_unit{u + 1}", **kw)(x)
    return x


class ImageEmbedder(nn.Module):
    """uint8 images [B,H,W,3] -> patch tokens [B, N, width] via the ResNet conv stem."""
    config: SimVLMConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, images: Array) -> Array:
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        x = images.astype(cfg.compute_dtype) / 127.5 - 1.0
        x = layers.constrain(x, ("activation_batch", "activation_height", "activation_width",
                                 "activation_channels"))
        x = resnet_stem(x, cfg.stem_width, cfg.stem_units[:cfg.stem_stages], cfg.drop_path_rate,
                        self.deterministic, **kw)
        patch = cfg.patch_size // cfg.stem_stride
        x = nn.Conv(cfg.width, (patch, patch), (patch, patch), padding="VALID", name="patch_embed",
                    kernel_init=layers.param_with_axes(nn.initializers.lecun_normal(),
                                                       (None, None, "conv_in", "embed")),
                    bias_init=layers.param_with_axes(nn.initializers.zeros_init(), ("embed",)), **kw)(x)
        _, h, w, d = x.shape
        x = einops.rearrange(x, "b h w d -> b (h w) d")
        if cfg.pos_embedding == "sincos2d":
            pos = layers.sincos_2d(h, w, d).astype(x.dtype)
        elif cfg.pos_embedding == "learned":
            pos = self.param("pos_embedding", layers.param_with_axes(
                nn.initializers.normal(0.02), ("position", "embed")), (h * w, d), cfg.params_dtype)
        else:
            raise ValueError(f"SimVLMConfig.pos_embedding={cfg.pos_embedding!r}; use 'learned' or 'sincos2d'")
        return layers.constrain(x + pos.astype(x.dtype)[None], layers.BATCH_LENGTH_EMBED)


def shift_right(tokens: Array, bos_id: int = 0) -> Array:
    """Decoder inputs: targets shifted right with BOS (= pad id 0, T5 convention)."""
    return jnp.pad(tokens, ((0, 0), (1, 0)), constant_values=bos_id)[:, :-1]


def _layer_kwargs(cfg: SimVLMConfig, deterministic: bool, **extra) -> dict:
    return dict(num_heads=cfg.num_heads, head_dim=cfg.width // cfg.num_heads, mlp_dim=cfg.mlp_dim,
                dropout_rate=cfg.dropout_rate, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                attention_impl=cfg.attention_impl, deterministic=deterministic,
                eps=cfg.layer_norm_eps, **extra)


def _pos_param(module: nn.Module, name: str, length: int, cfg: SimVLMConfig) -> Array:
    return module.param(name, layers.param_with_axes(nn.initializers.normal(0.02), ("position", "embed")),
                        (length, cfg.width), cfg.params_dtype)


class Encoder(nn.Module):
    """[image tokens; text prefix] -> bidirectional Transformer."""
    config: SimVLMConfig
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, images: Array, prefix_tokens: Array, has_image: Array,
                 deterministic: bool = True) -> tuple[Array, Array]:
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        img = ImageEmbedder(cfg, deterministic=deterministic, name="image_embedder")(images)
        txt = self.shared_embedding(prefix_tokens) * jnp.sqrt(cfg.width).astype(cfg.compute_dtype)
        txt = layers.constrain(txt, layers.BATCH_LENGTH_EMBED)
        txt = txt + _pos_param(self, "prefix_pos_embedding", cfg.max_prefix_len, cfg)[: prefix_tokens.shape[1]][None]
        modality = self.param("modality_embedding", layers.param_with_axes(
            nn.initializers.normal(0.02), (None, "embed")), (2, cfg.width), cfg.params_dtype)
        x = jnp.concatenate([img + modality[0], txt + modality[1]], axis=1).astype(cfg.compute_dtype)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        valid = jnp.concatenate([
            jnp.broadcast_to(has_image[:, None] > 0, img.shape[:2]), prefix_tokens > 0], axis=1)
        mask = valid[:, None, None, :]  # bidirectional over the whole prefix; padding masked
        stack = layers.layer_stack(
            _layer_kwargs(cfg, deterministic, drop_path_rate=cfg.drop_path_rate),
            cfg.encoder_layers, scan=cfg.scan_layers, remat_policy=cfg.remat_policy, name="layers")
        x = stack(x, mask)
        x = layers.layer_norm("encoder_norm", eps=cfg.layer_norm_eps, **kw)(x)
        return layers.constrain(x, layers.BATCH_LENGTH_EMBED), valid


class Decoder(nn.Module):
    """Causal self-attention + cross-attention to the encoder; tied output embedding."""
    config: SimVLMConfig
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, decoder_input_tokens: Array, encoded: Array | None, encoder_valid: Array,
                 deterministic: bool = True, decode: bool = False,
                 positions: Array | None = None) -> Array:
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        t = decoder_input_tokens.shape[1]
        pos_table = _pos_param(self, "target_pos_embedding", cfg.max_target_len, cfg)
        if decode:
            pos = jax.lax.dynamic_slice_in_dim(pos_table, positions, 1)[None]
            self_mask = None  # the KV cache builds the causal mask
        else:
            pos = pos_table[:t][None]
            self_mask = nn.make_causal_mask(decoder_input_tokens, dtype=jnp.bool_)
        x = self.shared_embedding(decoder_input_tokens) * jnp.sqrt(cfg.width).astype(cfg.compute_dtype)
        x = layers.constrain(x, layers.BATCH_LENGTH_EMBED)
        x = (x + pos.astype(x.dtype)).astype(cfg.compute_dtype)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        cross_mask = encoder_valid[:, None, None, :]
        stack = layers.layer_stack(
            _layer_kwargs(cfg, deterministic, cross_attention=True, decode=decode,
                          max_decode_len=cfg.max_target_len),
            cfg.decoder_layers, scan=cfg.scan_layers, remat_policy=cfg.remat_policy, name="layers")
        x = stack(x, self_mask, encoded, cross_mask)
        x = layers.layer_norm("decoder_norm", eps=cfg.layer_norm_eps, **kw)(x)
        if cfg.tie_embeddings:
            logits = self.shared_embedding.attend(x) / jnp.sqrt(cfg.width).astype(x.dtype)
        else:
            logits = layers.dense_general(cfg.vocab_size, -1, ("embed", "vocab"), ("vocab",),
                                          name="logits_dense", **kw)(x)
        return layers.constrain(logits.astype(jnp.float32),
                                ("activation_batch", "activation_length", "activation_vocab"))


class SimVLM(nn.Module):
    """SimVLM PrefixLM encoder-decoder. `__call__` returns decoder logits [B, T, vocab]."""
    config: SimVLMConfig

    def setup(self):
        cfg = self.config
        self.token_embed = layers.Embed(cfg.vocab_size, cfg.width, dtype=cfg.compute_dtype,
                                        param_dtype=cfg.params_dtype)
        self.encoder = Encoder(cfg, self.token_embed)
        self.decoder = Decoder(cfg, self.token_embed)

    def encode(self, images: Array, prefix_tokens: Array, has_image: Array,
               deterministic: bool = True) -> tuple[Array, Array]:
        """Returns (encoded [B, Ni+Tp, D], valid [B, Ni+Tp]) for the image + text prefix."""
        return self.encoder(images, prefix_tokens, has_image, deterministic)

    def decode(self, decoder_input_tokens: Array, encoded: Array | None, encoder_valid: Array,
               deterministic: bool = True, decode: bool = False, positions: Array | None = None) -> Array:
        """Decoder logits [B, T, vocab] (float32).

        `decode=True` runs one step with the KV cache: `decoder_input_tokens` is
        [B, 1] at position `positions` (scalar); `encoded` is only read on the
        call that creates the cache.
        """
        return self.decoder(decoder_input_tokens, encoded, encoder_valid, deterministic, decode, positions)

    def __call__(self, batch: dict[str, Array], deterministic: bool = True) -> Array:
        encoded, valid = self.encode(batch["image"], batch["prefix_tokens"], batch["has_image"],
                                     deterministic=deterministic)
        return self.decode(shift_right(batch["target_tokens"]), encoded, valid,
                           deterministic=deterministic)


def dummy_batch(cfg: SimVLMConfig, batch_size: int = 1) -> dict[str, Array]:
    """A batch of the model's input shapes (for init and compilation)."""
    return {
        "image": jnp.zeros((batch_size, cfg.image_size, cfg.image_size, 3), jnp.uint8),
        "has_image": jnp.ones((batch_size,), jnp.int32),
        "prefix_tokens": jnp.zeros((batch_size, cfg.max_prefix_len), jnp.int32),
        "target_tokens": jnp.zeros((batch_size, cfg.max_target_len), jnp.int32),
    }


class SimVLMFamily(family.ModelFamily):
    """SimVLM as a model family: PrefixLM objective; generates from the image + a text prompt
    (the encoder prefix, e.g. "a picture of"); zero-shot by caption likelihood."""
    name = "simvlm"
    export_type = "SimVLM"
    config_cls = SimVLMConfig
    module_cls = SimVLM
    can_generate = True

    def dummy_batch(self, batch_size: int = 1) -> dict[str, Array]:
        return dummy_batch(self.config, batch_size)

    def objective(self, params, batch, rng, *, loss_weights, mesh=None, batch_axes=(),
                  aux_state=None) -> losses.Objective:
        logits = self.module.apply({"params": params}, batch, deterministic=False, rngs={"dropout": rng})
        return losses.prefix_lm_objective(logits, batch["target_tokens"], PAD_ID)

    def tokens_per_example(self) -> int:
        cfg = self.config
        return cfg.num_image_tokens + cfg.max_prefix_len + cfg.max_target_len

    def train_flops_per_example(self, frozen=()) -> float:  # frozen params counted as trained
        return flops.simvlm_train_flops_per_example(self.config)

    def describe(self) -> str:
        cfg = self.config
        return (f"SimVLM (PrefixLM): width {cfg.width}, {cfg.encoder_layers} encoder / {cfg.decoder_layers} "
                f"decoder layers, {cfg.image_size}px images, conv stem stages {cfg.stem_stages}.")

    def table_cells(self) -> list[str]:
        cfg = self.config
        return [f"{cfg.width}", f"{cfg.encoder_layers} / {cfg.decoder_layers}", f"{cfg.num_heads}",
                f"{cfg.mlp_dim}", f"{cfg.image_size} / {cfg.patch_size}",
                family.describe_stem(cfg.stem_stages, cfg.stem_units, cfg.stem_width),
                f"{cfg.num_image_tokens} image + {cfg.max_prefix_len} prefix", f"{cfg.max_target_len} target"]

    # The decoder starts from BOS = pad (T5 convention) and stops at the tokenizer's EOS.
    max_decode_len = property(lambda self: self.config.max_target_len)
    eos_id = property(lambda self: EOS_ID)
    pad_id = property(lambda self: PAD_ID)
    start_id = property(lambda self: PAD_ID)

    def prompt_ids(self, vocab, prompt: str) -> np.ndarray:
        """The prompt's ids, zero-padded to max_prefix_len (the encoder's text prefix)."""
        return family.encode_prompt(vocab, prompt, self.config.max_prefix_len)

    def decode_inputs(self, images, prompt_ids) -> dict[str, np.ndarray]:
        n = len(images)
        return {"image": images, "prefix_tokens": np.tile(np.asarray(prompt_ids, np.int32), (n, 1)),
                "has_image": np.ones((n,), np.int32)}

    def encode(self, params, inputs) -> tuple[Array, Array]:
        return self.module.apply({"params": params}, inputs["image"], inputs["prefix_tokens"],
                                 inputs["has_image"], method=SimVLM.encode)

    def decode_start(self, params, context):
        encoded, valid = context
        bos = jnp.full((encoded.shape[0], 1), self.start_id, jnp.int32)
        return self.apply_cached(params, None, bos, encoded, valid, decode=True, positions=jnp.int32(0),
                                 method=SimVLM.decode)

    def decode_step(self, params, cache, tokens, context, t):
        _, valid = context  # the encoder output itself is in the cache (cross keys/values)
        return self.apply_cached(params, cache, tokens[:, None], None, valid, decode=True, positions=t,
                                 method=SimVLM.decode)

    def caption_logits(self, params, context, tokens):
        encoded, valid = context
        return self.module.apply({"params": params}, shift_right(tokens, PAD_ID), encoded, valid,
                                 method=SimVLM.decode)

    def target_layout(self) -> tuple[int, bool]:
        return self.config.max_target_len, False
