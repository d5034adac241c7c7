"""CoCa (Yu et al. 2022, arXiv 2205.01917): contrastive + captioning image-text model.

Image -> ViT encoder (linear patches, or a ResNet conv stem as in SimVLM) -> attentional poolers:
  * generative pooler: `n_queries` learned queries attend to the encoder tokens;
    its outputs are the image tokens the multimodal decoder cross-attends to;
  * contrastive pooler: 1 query, over the generative pooler's outputs
    ('cascade', the paper's default) or over the encoder tokens ('parallel');
    its output -> LayerNorm -> projection = the image embedding.
Text: [BOS, t_1 .. t_T] + a learned [CLS] appended at the END -> `unimodal_layers`
causal layers (no cross-attention; CLS attends to every non-pad token, pads are
masked as keys) -> CLS output -> LayerNorm -> projection = the text embedding.
The unimodal outputs of [BOS, t_1 .. t_{T-1}] then go through `multimodal_layers`
(causal self-attention + cross-attention to the pooled image tokens) -> caption
logits predicting t_1 .. t_T. One forward pass gives both.

`CoCaConfig.open_clip_compatible=True` reproduces open_clip's CoCa instead (so its
checkpoints can be imported, see `simvlm_jax.convert_open_clip`): ViT with a class
token and ln_pre; ONE pooler with `n_queries` (256) queries whose output 0 is the
contrastive embedding and 1.. feed the decoder; each decoder layer is a self-attention
block followed by a separate cross-attention block (each with its own MLP, and a
LayerNorm on the image tokens); the legacy off-by-one pad mask (key j is masked when
token j-1 is pad); exact (erf) GELU or quickGELU; LayerNorm eps 1e-5.

Every parameter carries logical axis names and the main activations are constrained,
as in `simvlm.py`; `partitioning.LOGICAL_AXIS_RULES` maps them onto the mesh.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Callable

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from simvlm_jax import flops, losses
from simvlm_jax.models import family, layers, simvlm

Array = jax.Array

DTYPES = layers.DTYPES
ACTIVATIONS = ("gelu", "gelu_exact", "quick_gelu")
OPENAI_MEAN = (0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255)
OPENAI_STD = (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CoCaConfig:
    """All CoCa hyper-parameters; every field is a gin binding `CoCaConfig.<field>`."""
    vocab_size: int = 64_000
    image_size: int = 288
    patch_size: int = 18
    # Image encoder: ViT on linear patches, or (stem_stages > 0) on the features of the
    # first ResNet stages (SimVLM's BiT conv stem; patch_size counts input pixels).
    stem_stages: int = 0
    stem_width: int = 64
    stem_units: tuple[int, ...] = (3, 4, 6)
    encoder_width: int = 768
    encoder_layers: int = 12
    encoder_heads: int = 12
    encoder_mlp_dim: int = 3072
    # Text decoder: `unimodal_layers` text-only + `multimodal_layers` with cross-attention.
    decoder_width: int = 768
    unimodal_layers: int = 12
    multimodal_layers: int = 12
    decoder_heads: int = 12
    decoder_mlp_dim: int = 3072
    embed_dim: int = 768            # contrastive (joint) embedding size
    # Attentional pooler(s): output width = decoder_width.
    n_queries: int = 256
    pooler_heads: int = 0           # 0 = decoder_heads
    pooler_layout: str = "cascade"  # 'cascade' (paper) | 'parallel'; ignored if open_clip_compatible
    max_text_len: int = 64          # caption tokens (targets); text positions = max_text_len + 2
    bos_id: int = 0                 # prepended to the targets (open_clip: <start_of_text> = 49406)
    eos_id: int = 1                 # ends generated captions (open_clip: <end_of_text> = 49407)
    pad_id: int = 0
    tie_embeddings: bool = False    # caption logits from the token table (paper mode only)
    open_clip_compatible: bool = False
    activation: str = "gelu"        # 'gelu' (tanh approx.) | 'gelu_exact' | 'quick_gelu' (open_clip mode)
    layer_norm_eps: float = 1e-6
    image_mean: tuple[float, ...] = (127.5, 127.5, 127.5)  # for uint8 images (float = already normalized)
    image_std: tuple[float, ...] = (127.5, 127.5, 127.5)
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = 100.0
    freeze_encoder: bool = False    # stop gradients at the image encoder output (see docs/coca.md)
    dropout_rate: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str | None = None

    def __post_init__(self):
        def check(ok, field, msg):
            if not ok:
                raise ValueError(f"CoCaConfig.{field}={getattr(self, field)!r}: {msg}")
        check(self.encoder_width % self.encoder_heads == 0, "encoder_heads",
              f"encoder_width={self.encoder_width} not divisible by encoder_heads")
        check(self.decoder_width % self.decoder_heads == 0, "decoder_heads",
              f"decoder_width={self.decoder_width} not divisible by decoder_heads")
        check(self.decoder_width % self.num_pooler_heads == 0, "pooler_heads",
              f"decoder_width={self.decoder_width} not divisible by the pooler heads")
        check(self.image_size % self.patch_size == 0, "image_size",
              f"not divisible by patch_size={self.patch_size}")
        check(0 <= self.stem_stages <= len(self.stem_units), "stem_stages",
              f"needs 0..len(stem_units)={len(self.stem_units)}")
        check(self.patch_size % layers.stem_stride(self.stem_stages) == 0, "patch_size",
              f"must be a multiple of the conv stem stride {layers.stem_stride(self.stem_stages)}")
        check(not (self.open_clip_compatible and self.stem_stages), "stem_stages",
              "open_clip's CoCa has no conv stem; use 0 with open_clip_compatible=True")
        check(self.pooler_layout in ("cascade", "parallel"), "pooler_layout", "use 'cascade' or 'parallel'")
        check(self.activation in ACTIVATIONS, "activation", f"choose one of {ACTIVATIONS}")
        check(self.open_clip_compatible or self.activation == "gelu", "activation",
              "paper mode uses the shared TransformerLayer (tanh GELU); other activations need "
              "open_clip_compatible=True")
        check(self.n_queries >= (2 if self.open_clip_compatible else 1), "n_queries",
              "needs >= 1 (open_clip mode: >= 2, query 0 is the contrastive one)")
        check(self.max_text_len >= 1, "max_text_len", "must be >= 1")
        check(self.remat_policy in layers.REMAT_POLICIES, "remat_policy",
              f"choose one of {sorted(layers.REMAT_POLICIES)}")
        check(len(self.image_mean) == 3 and len(self.image_std) == 3, "image_mean", "needs 3 values")
        for f in ("dtype", "param_dtype"):
            check(getattr(self, f) in DTYPES, f, f"choose one of {sorted(DTYPES)}")
        if self.open_clip_compatible:
            check(not self.tie_embeddings, "tie_embeddings", "open_clip's decoder has its own projection")
            check(self.embed_dim == self.decoder_width, "embed_dim",
                  f"open_clip's pooler width is embed_dim and must equal decoder_width={self.decoder_width}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_pooler_heads(self) -> int:
        return self.pooler_heads or self.decoder_heads

    @property
    def num_text_positions(self) -> int:
        return self.max_text_len + 2  # [BOS] + targets + [CLS]

    @property
    def num_image_tokens(self) -> int:
        """Image tokens the multimodal decoder cross-attends to."""
        return self.n_queries - 1 if self.open_clip_compatible else self.n_queries

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]


# ----------------------------------------------------------------------------- building blocks

def _act(name: str) -> Callable[[Array], Array]:
    if name == "gelu":
        return functools.partial(nn.gelu, approximate=True)
    if name == "gelu_exact":
        return functools.partial(nn.gelu, approximate=False)
    return lambda x: x * jax.nn.sigmoid(1.702 * x)


# The shared attention (standard 1/sqrt(head_dim) scale, logical axes, KV cache).
Attention = layers.Attention


class OpenCLIPMLP(nn.Module):
    mlp_dim: int
    activation: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.dense_general(self.mlp_dim, -1, ("embed", "mlp"), ("mlp",), name="c_fc", **kw)(x)
        h = layers.constrain(_act(self.activation)(h), ("activation_batch", "activation_length", "activation_mlp"))
        return layers.dense_general(x.shape[-1], -1, ("mlp", "embed"), ("embed",), name="c_proj", **kw)(h)


class OpenCLIPBlock(nn.Module):
    """open_clip's ResidualAttentionBlock: x + attn(ln_1(x)[, ln_1_kv(kv)]); x + mlp(ln_2(x))."""
    num_heads: int
    mlp_dim: int
    activation: str = "gelu_exact"
    cross: bool = False
    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str | None = None
    decode: bool = False
    max_decode_len: int = 0

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, kv: Array | None = None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.constrain(x, layers.BATCH_LENGTH_EMBED)
        d = x.shape[-1]
        attn = Attention(num_heads=self.num_heads, head_dim=d // self.num_heads,
                                attention_impl=self.attention_impl, is_cross=self.cross,
                                decode=self.decode, max_decode_len=self.max_decode_len, name="attn", **kw)
        h = layers.layer_norm("ln_1", eps=self.eps, **kw)(x)
        if self.cross:
            if kv is not None:  # decode steps after the first reuse the cached image keys/values
                kv = layers.layer_norm("ln_1_kv", eps=self.eps, **kw)(kv)
            h = attn(h, kv, None)
        else:
            h = attn(h, None, mask)
        x = x + h
        h = layers.layer_norm("ln_2", eps=self.eps, **kw)(x)
        x = x + OpenCLIPMLP(self.mlp_dim, self.activation, name="mlp", **kw)(h)
        return layers.constrain(x, layers.BATCH_LENGTH_EMBED), None


class OpenCLIPDecoderLayer(nn.Module):
    """open_clip MultimodalTransformer layer: causal self-attention block, then cross-attention block."""
    num_heads: int
    mlp_dim: int
    activation: str = "gelu_exact"
    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str | None = None
    decode: bool = False
    max_decode_len: int = 0

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, image_tokens: Array):
        kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, activation=self.activation, eps=self.eps,
                  dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl,
                  decode=self.decode)
        x, _ = OpenCLIPBlock(max_decode_len=self.max_decode_len, name="resblock", **kw)(x, mask)
        x, _ = OpenCLIPBlock(cross=True, name="cross_attn", **kw)(x, None, image_tokens)
        return x, None


def _param(module: nn.Module, name: str, init: Callable, names: tuple, shape: tuple, dtype) -> Array:
    return module.param(name, layers.param_with_axes(init, names), shape, dtype)


class AttentionalPooler(nn.Module):
    """`n_queries` learned queries attend (one multi-head attention) to LayerNorm'd tokens."""
    n_queries: int
    width: int
    num_heads: int
    norm_queries: bool = False   # open_clip: ln_q on the queries
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # Unit-scale queries (as open_clip and lucidrains): with small ones every query attends
        # almost uniformly, the pooled image tokens start nearly identical and the decoder's
        # cross-attention gets ~1e-3 of the gradient it gets with these.
        q = _param(self, "query", nn.initializers.normal(1.0), ("position", "embed"),
                   (self.n_queries, self.width), self.param_dtype)
        if self.norm_queries:
            q = layers.layer_norm("ln_q", eps=self.eps, **kw)(q)
        q = jnp.broadcast_to(q.astype(self.dtype)[None], (x.shape[0],) + q.shape)
        kv = layers.layer_norm("ln_k", eps=self.eps, **kw)(x)
        out = Attention(num_heads=self.num_heads, head_dim=self.width // self.num_heads,
                               attention_impl=self.attention_impl, is_cross=True, name="attn", **kw)(q, kv, None)
        return layers.constrain(out, layers.BATCH_LENGTH_EMBED)


def _transformer_layer_kwargs(cfg: CoCaConfig, width: int, heads: int, mlp_dim: int, deterministic: bool,
                              **extra) -> dict:
    return dict(num_heads=heads, head_dim=width // heads, mlp_dim=mlp_dim, dropout_rate=cfg.dropout_rate,
                dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, attention_impl=cfg.attention_impl,
                deterministic=deterministic, eps=cfg.layer_norm_eps, **extra)


def _openclip_kwargs(cfg: CoCaConfig, heads: int, mlp_dim: int, **extra) -> dict:
    return dict(num_heads=heads, mlp_dim=mlp_dim, activation=cfg.activation, eps=cfg.layer_norm_eps,
                dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, attention_impl=cfg.attention_impl,
                **extra)


# ----------------------------------------------------------------------------- towers

class VisionEncoder(nn.Module):
    """Images [B,H,W,3] -> encoder tokens [B, N(+1 class token in open_clip mode), encoder_width].

    uint8 images are normalized with `image_mean`/`image_std`; float images are taken as
    already normalized.
    """
    config: CoCaConfig

    @nn.compact
    def __call__(self, images: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        oc = cfg.open_clip_compatible
        x = images
        if not jnp.issubdtype(x.dtype, jnp.floating):
            x = (x.astype(jnp.float32) - jnp.asarray(cfg.image_mean)) / jnp.asarray(cfg.image_std)
        x = layers.constrain(x.astype(cfg.compute_dtype),
                             ("activation_batch", "activation_height", "activation_width", "activation_channels"))
        if cfg.stem_stages:
            x = simvlm.resnet_stem(x, cfg.stem_width, cfg.stem_units[:cfg.stem_stages], 0.0, deterministic, **kw)
        p, w = cfg.patch_size // layers.stem_stride(cfg.stem_stages), cfg.encoder_width
        x = nn.Conv(w, (p, p), (p, p), padding="VALID", use_bias=not oc, name="conv1" if oc else "patch_embed",
                    kernel_init=layers.param_with_axes(nn.initializers.lecun_normal(),
                                                       (None, None, "conv_in", "embed")),
                    bias_init=layers.param_with_axes(nn.initializers.zeros_init(), ("embed",)), **kw)(x)
        x = x.reshape(x.shape[0], -1, w)
        if oc:
            scale = w ** -0.5
            cls = _param(self, "class_embedding", nn.initializers.normal(scale), ("embed",), (w,), cfg.params_dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, w)), x], axis=1)
            pos = _param(self, "positional_embedding", nn.initializers.normal(scale), ("position", "embed"),
                         (cfg.num_patches + 1, w), cfg.params_dtype)
            x = layers.layer_norm("ln_pre", eps=cfg.layer_norm_eps, **kw)(x + pos.astype(x.dtype)[None])
            run = layers.layer_stack(
                _openclip_kwargs(cfg, cfg.encoder_heads, cfg.encoder_mlp_dim),
                cfg.encoder_layers, scan=cfg.scan_layers, remat_policy=cfg.remat_policy, name="transformer",
                layer_cls=OpenCLIPBlock)
            x = run(x, None)
        else:
            pos = _param(self, "pos_embedding", nn.initializers.normal(0.02), ("position", "embed"),
                         (cfg.num_patches, w), cfg.params_dtype)
            x = nn.Dropout(cfg.dropout_rate)(x + pos.astype(x.dtype)[None], deterministic=deterministic)
            run = layers.layer_stack(
                _transformer_layer_kwargs(cfg, w, cfg.encoder_heads, cfg.encoder_mlp_dim, deterministic),
                cfg.encoder_layers, scan=cfg.scan_layers, remat_policy=cfg.remat_policy, name="layers")
            x = run(x, None)
            x = layers.layer_norm("encoder_norm", eps=cfg.layer_norm_eps, **kw)(x)
        return layers.constrain(x, layers.BATCH_LENGTH_EMBED)


class ImagePooling(nn.Module):
    """Encoder tokens -> (image embedding [B, embed_dim] (unnormalized), decoder image tokens)."""
    config: CoCaConfig

    @nn.compact
    def __call__(self, tokens: Array) -> tuple[Array, Array]:
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        pkw = dict(width=cfg.decoder_width, num_heads=cfg.num_pooler_heads, eps=cfg.layer_norm_eps,
                   attention_impl=cfg.attention_impl, **kw)
        d = cfg.decoder_width
        if cfg.open_clip_compatible:
            x = AttentionalPooler(cfg.n_queries, norm_queries=True, name="attn_pool", **pkw)(tokens)
            x = layers.layer_norm("ln_post", eps=cfg.layer_norm_eps, **kw)(x)
            pooled, image_tokens = x[:, 0], x[:, 1:]
            proj = _param(self, "proj", nn.initializers.normal(d ** -0.5), ("embed", None),
                          (d, cfg.embed_dim), cfg.params_dtype)
            return pooled @ proj.astype(pooled.dtype), image_tokens
        gen = AttentionalPooler(cfg.n_queries, name="generative_pooler", **pkw)(tokens)
        con_input = gen if cfg.pooler_layout == "cascade" else tokens
        con = AttentionalPooler(1, name="contrastive_pooler", **pkw)(con_input)[:, 0]
        con = layers.layer_norm("contrastive_norm", eps=cfg.layer_norm_eps, **kw)(con)
        proj = _param(self, "proj", nn.initializers.normal(d ** -0.5), ("embed", None),
                      (d, cfg.embed_dim), cfg.params_dtype)
        image_tokens = layers.layer_norm("generative_norm", eps=cfg.layer_norm_eps, **kw)(gen)
        return con @ proj.astype(con.dtype), image_tokens


def text_key_mask(text: Array, cfg: CoCaConfig) -> Array:
    """[B, L+1] keys each query may attend to (besides causality) for text + appended CLS.

    Paper mode: every non-pad token, position 0 (BOS, even when BOS == pad) and CLS.
    open_clip mode: its legacy off-by-one mask, key j valid iff token j-1 is not pad
    (key 0 always valid), i.e. [True, text != pad].
    """
    valid = text != cfg.pad_id
    ones = jnp.ones((text.shape[0], 1), bool)
    if cfg.open_clip_compatible:
        return jnp.concatenate([ones, valid], axis=1)
    valid = valid.at[:, 0].set(True)
    return jnp.concatenate([valid, ones], axis=1)


def _unimodal_stack(cfg: CoCaConfig, deterministic: bool, **decode_kwargs) -> Callable:
    if cfg.open_clip_compatible:
        return layers.layer_stack(
            _openclip_kwargs(cfg, cfg.decoder_heads, cfg.decoder_mlp_dim, **decode_kwargs),
            cfg.unimodal_layers, scan=cfg.scan_layers, remat_policy=cfg.remat_policy, name="transformer",
            layer_cls=OpenCLIPBlock)
    return layers.layer_stack(
        _transformer_layer_kwargs(cfg, cfg.decoder_width, cfg.decoder_heads, cfg.decoder_mlp_dim,
                                  deterministic, **decode_kwargs),
        cfg.unimodal_layers, scan=cfg.scan_layers, remat_policy=cfg.remat_policy, name="layers")


class TextEncoder(nn.Module):
    """Unimodal text tower: text [B, L] (+CLS) -> (text embedding [B, E] unnormalized,
    token outputs [B, L, D], the token embedding table [V, D]).

    `decode=True` runs one cached step for caption generation: `text` [B, 1] is the
    token at position `positions`; no CLS is appended (with causal attention the
    token outputs never see it) and the embedding is None.
    """
    config: CoCaConfig

    @nn.compact
    def __call__(self, text: Array, deterministic: bool = True, decode: bool = False,
                 positions: Array | None = None) -> tuple[Array | None, Array, Array]:
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        d = cfg.decoder_width
        b, length = text.shape
        if length + 1 > cfg.num_text_positions:
            raise ValueError(f"text length {length} > CoCaConfig.max_text_len + 1 = {cfg.max_text_len + 1}")
        embed = layers.Embed(cfg.vocab_size, d, embedding_init=nn.initializers.normal(0.02),
                             name="token_embedding", **kw)
        x = embed(text)
        pos = _param(self, "positional_embedding", nn.initializers.normal(0.01), ("position", "embed"),
                     (cfg.num_text_positions, d), cfg.params_dtype)
        if decode:
            x = (x + jax.lax.dynamic_slice_in_dim(pos, positions, 1).astype(x.dtype)[None]).astype(cfg.compute_dtype)
            x = _unimodal_stack(cfg, True, decode=True, max_decode_len=cfg.max_text_len)(x, None)
            return None, layers.constrain(x, layers.BATCH_LENGTH_EMBED), embed.embedding
        cls = _param(self, "cls_emb", nn.initializers.normal(0.01), ("embed",), (d,), cfg.params_dtype)
        x = jnp.concatenate([x, jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d))], axis=1)
        x = (x + pos[: length + 1].astype(x.dtype)[None]).astype(cfg.compute_dtype)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        causal = jnp.tril(jnp.ones((length + 1, length + 1), bool))
        mask = causal[None, None] & text_key_mask(text, cfg)[:, None, None, :]
        x = _unimodal_stack(cfg, deterministic)(x, mask)
        pooled = layers.layer_norm("ln_final", eps=cfg.layer_norm_eps, **kw)(x[:, -1])
        proj = _param(self, "text_projection", nn.initializers.normal(d ** -0.5), ("embed", None),
                      (d, cfg.embed_dim), cfg.params_dtype)
        tokens = layers.constrain(x[:, :-1], layers.BATCH_LENGTH_EMBED)
        return pooled @ proj.astype(pooled.dtype), tokens, embed.embedding


class MultimodalDecoder(nn.Module):
    """Unimodal token outputs [B, T, D] + image tokens -> caption logits [B, T, vocab] (float32).

    `decode=True`: one cached step (T = 1); the image tokens are only read on the call
    that creates the cache (their keys/values are projected once and kept).
    """
    config: CoCaConfig

    @nn.compact
    def __call__(self, x: Array, image_tokens: Array | None, deterministic: bool = True,
                 token_embedding: Array | None = None, decode: bool = False) -> Array:
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        d, t = cfg.decoder_width, x.shape[1]
        # Decode steps: the self-attention KV cache applies causality itself.
        causal = None if decode else jnp.tril(jnp.ones((t, t), bool))[None, None]
        dkw = dict(decode=True, max_decode_len=cfg.max_text_len) if decode else {}
        if cfg.open_clip_compatible:
            run = layers.layer_stack(
                _openclip_kwargs(cfg, cfg.decoder_heads, cfg.decoder_mlp_dim, **dkw),
                cfg.multimodal_layers, scan=cfg.scan_layers, remat_policy=cfg.remat_policy, name="layers",
                layer_cls=OpenCLIPDecoderLayer)
            x = run(x, causal, image_tokens)
        else:
            run = layers.layer_stack(
                _transformer_layer_kwargs(cfg, d, cfg.decoder_heads, cfg.decoder_mlp_dim,
                                          deterministic or decode, cross_attention=True, **dkw),
                cfg.multimodal_layers, scan=cfg.scan_layers, remat_policy=cfg.remat_policy, name="layers")
            x = run(x, causal, image_tokens, None)
        x = layers.layer_norm("ln_final", eps=cfg.layer_norm_eps, **kw)(x)
        if token_embedding is not None:  # tied
            logits = jnp.einsum("btd,vd->btv", x, token_embedding.astype(x.dtype))
        else:
            proj = _param(self, "text_projection", nn.initializers.normal(d ** -0.5), ("embed", "vocab"),
                          (d, cfg.vocab_size), cfg.params_dtype)
            logits = jnp.einsum("btd,dv->btv", x, proj.astype(x.dtype))
        return layers.constrain(logits.astype(jnp.float32),
                                ("activation_batch", "activation_length", "activation_vocab"))


def _l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class CoCa(nn.Module):
    """CoCa. `__call__(batch)` -> dict(image_embed, text_embed, logits, logit_scale).

    batch: 'image' [B,H,W,3] (uint8, or float already normalized) and 'target_tokens'
    [B, T] (caption, 0-padded, T <= max_text_len). The text tower reads
    [bos_id] + target_tokens (+ CLS); `logits` [B, T, vocab] predict `target_tokens`.
    Embeddings are L2-normalized float32; `logit_scale` = min(exp(param), logit_scale_max).

    Params: 'visual' (ViT), 'pooler' (attentional pooler(s) + image projection),
    'text' (token embedding, CLS, unimodal layers, text projection), 'decoder'
    (multimodal layers + vocab projection), 'logit_scale'.
    """
    config: CoCaConfig

    def setup(self):
        cfg = self.config
        self.visual = VisionEncoder(cfg)
        self.pooler = ImagePooling(cfg)
        self.text = TextEncoder(cfg)
        self.decoder = MultimodalDecoder(cfg)
        self.logit_scale = self.param("logit_scale", layers.param_with_axes(
            nn.initializers.constant(cfg.logit_scale_init), ()), (), cfg.params_dtype)

    def image_features(self, images: Array, deterministic: bool = True) -> tuple[Array, Array]:
        """(unnormalized image embedding [B, E], decoder image tokens [B, n, D])."""
        tokens = self.visual(images, deterministic)
        if self.config.freeze_encoder:
            tokens = jax.lax.stop_gradient(tokens)
        return self.pooler(tokens)

    def encode_image(self, images: Array, normalize: bool = True, deterministic: bool = True) -> Array:
        emb, _ = self.image_features(images, deterministic)
        return _l2_normalize(emb) if normalize else emb

    def encode_text(self, text: Array, normalize: bool = True, deterministic: bool = True) -> Array:
        """`text` [B, L]: the full sequence starting with BOS (open_clip: its tokenizer output)."""
        emb, _, _ = self.text(text, deterministic)
        return _l2_normalize(emb) if normalize else emb

    def caption_logits(self, text: Array, image_tokens: Array, deterministic: bool = True) -> Array:
        """Logits [B, L-1, vocab] predicting text[:, 1:] (teacher forcing)."""
        _, tokens, table = self.text(text, deterministic)
        return self.decoder(tokens[:, :-1], image_tokens, deterministic,
                            table if self.config.tie_embeddings else None)

    def decode_step(self, tokens: Array, image_tokens: Array | None, positions: Array) -> Array:
        """One cached caption step: tokens [B, 1] at position `positions` (0 = BOS) ->
        logits [B, 1, vocab]. Run with `mutable=['cache']`; `image_tokens` (from
        `image_features`) is only read on the first call, which creates the cache."""
        _, x, table = self.text(tokens, True, decode=True, positions=positions)
        return self.decoder(x, image_tokens, True, table if self.config.tie_embeddings else None, decode=True)

    def __call__(self, batch: dict[str, Array], deterministic: bool = True) -> dict[str, Array]:
        cfg = self.config
        image_emb, image_tokens = self.image_features(batch["image"], deterministic)
        text = with_bos(batch["target_tokens"], cfg.bos_id)
        text_emb, tokens, table = self.text(text, deterministic)
        logits = self.decoder(tokens[:, :-1], image_tokens, deterministic, table if cfg.tie_embeddings else None)
        return {"image_embed": _l2_normalize(image_emb), "text_embed": _l2_normalize(text_emb),
                "logits": logits,
                "logit_scale": jnp.minimum(jnp.exp(self.logit_scale.astype(jnp.float32)), cfg.logit_scale_max)}


def with_bos(target_tokens: Array, bos_id: int) -> Array:
    """[bos_id] + target_tokens: the text tower's input for captions `target_tokens`."""
    return jnp.pad(target_tokens, ((0, 0), (1, 0)), constant_values=bos_id)


def dummy_batch(cfg: CoCaConfig, batch_size: int = 1) -> dict[str, Array]:
    """A batch of the model's input shapes (for init and compilation)."""
    return {"image": jnp.zeros((batch_size, cfg.image_size, cfg.image_size, 3), jnp.uint8),
            "target_tokens": jnp.zeros((batch_size, cfg.max_text_len), jnp.int32)}


class CoCaFamily(family.ModelFamily):
    """CoCa as a model family: contrastive + captioning objective over image-text pairs;
    generates from [BOS] with the pooled image tokens (no encoder prompt); embeds images
    and texts for retrieval."""
    name = "coca"
    export_type = "CoCa"
    config_cls = CoCaConfig
    module_cls = CoCa
    loss_weights = {"contrastive": 1.0, "caption": 2.0}  # the paper's lambda_con, lambda_cap
    per_shard_objective = True
    can_generate = True
    can_embed = True

    def dummy_batch(self, batch_size: int = 1) -> dict[str, Array]:
        return dummy_batch(self.config, batch_size)

    def objective(self, params, batch, rng, *, loss_weights, mesh=None, batch_axes=(),
                  aux_state=None) -> losses.Objective:
        out = self.module.apply({"params": params}, batch, deterministic=False, rngs={"dropout": rng})
        return losses.contrastive_caption_objective(out, batch["target_tokens"], weights=loss_weights,
                                                    mesh=mesh, batch_axes=batch_axes,
                                                    pad_id=self.config.pad_id)

    def check_batch(self, host_batch) -> None:
        """CoCa reads image + whole caption: text-only rows or a PrefixLM split would silently
        train on blank images or truncated captions, so they are an error."""
        if "has_image" in host_batch and not np.all(np.asarray(host_batch["has_image"]) > 0):
            raise ValueError("CoCa training got text-only examples (has_image=0): train CoCa on image-text "
                             "tasks only (e.g. make_train_iterator.mixture_or_task_name = an image_text_task)")
        if "prefix_tokens" in host_batch and np.any(np.asarray(host_batch["prefix_tokens"])):
            raise ValueError("CoCa training got PrefixLM prefixes: set the image-text task's max_prefix_len=0 "
                             "(or text_prefix_prob=0) so the whole caption is the target")

    def check_vocabulary(self, vocab) -> None:
        if self.config.eos_id != vocab.eos_id:  # CoCa's EOS is a setting (open_clip's is 49407)
            raise ValueError(f"CoCaConfig.eos_id={self.config.eos_id} but the tokenizer's EOS is {vocab.eos_id}: "
                             f"set CoCaConfig.eos_id={vocab.eos_id} (captions are trained to end with it)")
        super().check_vocabulary(vocab)

    def tokens_per_example(self) -> int:
        return self.config.num_patches + self.config.max_text_len + 1

    def train_flops_per_example(self, frozen=()) -> float:  # frozen params counted as trained
        return flops.coca_train_flops_per_example(self.config)

    def describe(self) -> str:
        cfg = self.config
        flavour = "open_clip-compatible " if cfg.open_clip_compatible else ""
        return (f"{flavour}CoCa: ViT width {cfg.encoder_width} x {cfg.encoder_layers} layers "
                f"(patch {cfg.patch_size}), text decoder width {cfg.decoder_width}, "
                f"{cfg.unimodal_layers} unimodal + {cfg.multimodal_layers} multimodal layers, "
                f"{cfg.n_queries} pooler queries, embedding {cfg.embed_dim}, {cfg.image_size}px images.")

    def table_cells(self) -> list[str]:
        cfg = self.config
        pair = lambda a, b: f"{a}" if a == b else f"{a} / {b}"
        mode = "open_clip" if cfg.open_clip_compatible else cfg.pooler_layout
        return [pair(cfg.encoder_width, cfg.decoder_width),
                f"{cfg.encoder_layers} / {cfg.unimodal_layers}+{cfg.multimodal_layers}",
                pair(cfg.encoder_heads, cfg.decoder_heads), pair(cfg.encoder_mlp_dim, cfg.decoder_mlp_dim),
                f"{cfg.image_size} / {cfg.patch_size}",
                family.describe_stem(cfg.stem_stages, cfg.stem_units, cfg.stem_width),
                f"{cfg.num_patches} image -> {cfg.n_queries} queries ({mode})",
                f"{cfg.max_text_len} text (+BOS, CLS)"]

    @property
    def external_tokenizer(self) -> str | None:
        return "open_clip" if self.config.open_clip_compatible else None

    max_decode_len = property(lambda self: self.config.max_text_len)
    eos_id = property(lambda self: self.config.eos_id)

    def prompt_ids(self, vocab, prompt: str) -> np.ndarray:
        """CoCa has no encoder prompt: an empty row (a given prompt is ignored, with a warning)."""
        if prompt:
            logging.getLogger("simvlm_jax").warning("CoCa captions without an encoder prompt; ignoring %r", prompt)
        return np.zeros((0,), np.int32)

    def decode_inputs(self, images, prompt_ids) -> dict[str, np.ndarray]:
        return {"image": images}

    def encode(self, params, inputs) -> Array:
        """The pooled image tokens the multimodal decoder cross-attends to."""
        _, image_tokens = self.module.apply({"params": params}, inputs["image"], method=CoCa.image_features)
        return image_tokens

    def decode_start(self, params, context):
        bos = jnp.full((context.shape[0], 1), self.start_id, jnp.int32)
        return self.apply_cached(params, None, bos, context, jnp.int32(0), method=CoCa.decode_step)

    def decode_step(self, params, cache, tokens, context, t):
        # The pooled image tokens' keys/values are in the cache.
        return self.apply_cached(params, cache, tokens[:, None], None, t, method=CoCa.decode_step)

    def caption_logits(self, params, context, tokens):
        return self.module.apply({"params": params}, with_bos(tokens, self.config.bos_id), context,
                                 method=CoCa.caption_logits)

    def target_layout(self) -> tuple[int, bool]:
        # The text tower's CLS sits after max_text_len positions, as in training.
        return self.config.max_text_len, True

    def embed_images(self, params, images):
        return self.module.apply({"params": params}, images, method=CoCa.encode_image)

    def embed_texts(self, params, targets):
        return self.module.apply({"params": params}, with_bos(targets, self.config.bos_id),
                                 method=CoCa.encode_text)
