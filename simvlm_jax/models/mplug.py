"""mPLUG (Li et al. 2022, arXiv 2205.12005): vision-language learning by skip-connected fusion.

Image -> CLIP-style ViT (class token, ln_pre; `ln_post` applied, the final projection
skipped, as the reference's `skip_last_layer=True`) [-> Linear + LayerNorm to the text
width when the widths differ, as the reference's `visn_fc` for ViT-L] -> image tokens,
token 0 the image [CLS].
Text -> a learned [CLS] prepended -> `text_layers` bidirectional layers -> text tokens.
Fusion ("skip-connected network") over (image tokens, text tokens), `fusion_layers` layers;
layer j (0-based) is
  * a **connected** layer if j > 0 and j % fusion_stride == 0: one self-attention + MLP
    layer over the concatenation [image; text]; its outputs are split and written back
    to the image and the text tokens;
  * an **asymmetric co-attention** layer otherwise: text self-attention -> text-to-image
    cross-attention -> MLP; the image tokens are not touched.
This is the reference code's rule (AliceMind `mPLUG/models/modeling_mplug.py`, `FusionLayer`:
`layer_nums == 0 or layer_nums % stride_layer != 0` -> co-attention): the first group
has `fusion_stride` co-attention layers, every later group 1 connected + `fusion_stride - 1`
co-attention layers. (The paper describes N blocks of S co-attention layers + 1 connected
layer; the released code, followed here, counts the connected layers among the fusion
layers and places them at multiples of S.) The base config (6 layers, stride 3) is
[co, co, co, connected, co, co]; a stride >= fusion_layers gives no connected layer at all (the reference's
mPLUG-Large config, `config_bert.json`, has stride 6 with 6 fusion layers).
Decoder: causal self-attention + cross-attention to the fused sequence [image; text]
(as the reference's VQA/PrefixLM decoder) -> tied LM head -> vocab logits.
Heads: ITC projections of the image/text [CLS] to `embed_dim` (L2-normalized) with a
learned temperature (init 0.07, clipped to [0.001, 0.5] as ALBEF/mPLUG clamp it); ITM:
a 2-way linear head on the fused text [CLS]; MLM: BERT's LM head (dense + GELU +
LayerNorm, logits tied to the text token table, + bias) on the fused text tokens.

Differences from the reference, and why:
  * Pre-LN layers (the shared `layers.TransformerLayer`, as SimVLM and CoCa) instead of
    BERT's post-LN, so the three families share one layer (not compared with post-LN
    here). For the connected layer: the reference adds its post-LN output to the image
    tokens (x + LN(x + update)); a pre-LN layer's output already is x + update (the residual stream), so it is
    written back as is; adding x again would double the image path at every connected
    layer. Pre-LN stacks end in a LayerNorm: the text encoder ('encoder_norm', in place
    of BERT's embedding LayerNorm), the decoder ('decoder_norm', likewise), the fusion
    text output ('text_norm') and the fused image tokens the decoder reads
    ('fused_image_norm'); the last two have no counterpart in the reference.
  * Text-side MLPs use the shared layer's tanh-approximate GELU (BERT: exact GELU; the
    LM heads use exact GELU).
  * A learned [CLS] embedding instead of the tokenizer's [CLS] id (any vocabulary works);
    no token-type embeddings (one segment); position tables sized to the configured text
    lengths (BERT: 512).
  * The reference builds dead modules (the fusion model's own embeddings and 6 unused
    BERT layers, the CLIP text tower); they are not built here. tests/test_mplug_model.py
    derives the reference's parameter count and checks ours against it exactly.

Every parameter carries logical axis names and the main activations are constrained, as
in `simvlm.py` / `coca.py`; `partitioning.LOGICAL_AXIS_RULES` maps them onto the mesh.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from simvlm_jax import flops, losses, momentum
from simvlm_jax.models import coca, family, layers, simvlm

Array = jax.Array

DTYPES = layers.DTYPES
LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MPLUGConfig:
    """All mPLUG hyper-parameters; every field is a gin binding `MPLUGConfig.<field>`.

    Defaults: mPLUG-Base (`configs/config_bert_stride3.json` + `pretrain_mplug_base.yaml`).
    """
    vocab_size: int = 30_522        # bert-base-uncased
    image_size: int = 256
    patch_size: int = 16
    # Vision: CLIP ViT (class token, ln_pre, quickGELU, LayerNorm eps 1e-5), run by
    # coca.VisionEncoder in its open_clip mode, so open_clip/CLIP weights map onto it.
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp_dim: int = 3072
    vision_activation: str = "quick_gelu"
    vision_layer_norm_eps: float = 1e-5
    # ViT on linear patches, or (stem_stages > 0) on the features of the first BiT ResNet
    # stages (SimVLM's conv stem; patch_size counts input pixels; no CLIP weights then).
    stem_stages: int = 0
    stem_width: int = 64
    stem_units: tuple[int, ...] = (3, 4, 6)
    image_mean: tuple[float, ...] = coca.OPENAI_MEAN  # for uint8 images (float = already normalized)
    image_std: tuple[float, ...] = coca.OPENAI_STD
    # Text side (text encoder, fusion, decoder): BERT-base widths.
    text_width: int = 768
    text_heads: int = 12
    text_mlp_dim: int = 3072
    text_layers: int = 6            # bidirectional text encoder
    fusion_layers: int = 6          # co-attention + connected layers in total
    fusion_stride: int = 3          # layer j > 0 with j % fusion_stride == 0 is a connected layer
    decoder_layers: int = 12
    embed_dim: int = 256            # ITC projection
    max_text_len: int = 32          # text encoder tokens (a learned [CLS] is prepended)
    max_target_len: int = 32        # decoder tokens
    max_prefix_len: int = 16        # PrefixLM: text encoder prefix tokens (<= max_text_len)
    bos_id: int = 0                 # first decoder input (pad, T5 convention, as SimVLM)
    pad_id: int = 0
    eos_id: int = 1                 # the tokenizer's EOS (seqio/T5 convention; BERT's [SEP] is 102)
    mask_id: int = 103              # MLM [MASK]: bert-base-uncased's; may be the tokenizer's size (an extra id)
    # ITC with momentum encoders and queues (ALBEF / mPLUG pretraining).
    momentum: float = 0.995         # EMA decay of the momentum encoders
    queue_size: int = 65_536        # momentum features kept as extra negatives
    distill_alpha: float = 0.4      # soft-target weight of momentum distillation (0 = one-hot targets)
    temperature_init: float = 0.07
    temperature_min: float = 0.001  # ALBEF/mPLUG clamp the temperature to [0.001, 0.5]
    temperature_max: float = 0.5
    layer_norm_eps: float = 1e-12   # BERT's
    dropout_rate: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str | None = None

    def __post_init__(self):
        def check(ok, field, msg):
            if not ok:
                raise ValueError(f"MPLUGConfig.{field}={getattr(self, field)!r}: {msg}")
        check(self.vision_width % self.vision_heads == 0, "vision_heads",
              f"vision_width={self.vision_width} not divisible by vision_heads")
        check(self.text_width % self.text_heads == 0, "text_heads",
              f"text_width={self.text_width} not divisible by text_heads")
        check(self.image_size % self.patch_size == 0, "image_size", f"not divisible by patch_size={self.patch_size}")
        check(self.fusion_stride >= 1, "fusion_stride", "must be >= 1")
        check(0 <= self.stem_stages <= len(self.stem_units), "stem_stages",
              f"needs 0..len(stem_units)={len(self.stem_units)}")
        check(self.patch_size % layers.stem_stride(self.stem_stages) == 0, "patch_size",
              f"must be a multiple of the conv stem stride {layers.stem_stride(self.stem_stages)}")
        check(self.vision_activation in coca.ACTIVATIONS, "vision_activation", f"choose one of {coca.ACTIVATIONS}")
        check(self.max_text_len >= 1, "max_text_len", "must be >= 1")
        check(self.max_target_len >= 1, "max_target_len", "must be >= 1")
        check(0 <= self.max_prefix_len <= self.max_text_len, "max_prefix_len",
              f"must lie in [0, max_text_len={self.max_text_len}] (the prefix runs through the text encoder)")
        check(0 <= self.mask_id < self.vocab_size, "mask_id", f"must be an id below vocab_size={self.vocab_size}")
        check(0.0 <= self.momentum < 1.0, "momentum", "must lie in [0, 1)")
        check(self.queue_size >= 1, "queue_size", "must be >= 1 (and at least the global batch)")
        check(0.0 <= self.distill_alpha <= 1.0, "distill_alpha", "must lie in [0, 1]")
        check(0 < self.temperature_min <= self.temperature_init <= self.temperature_max, "temperature_init",
              f"must lie in [temperature_min={self.temperature_min}, temperature_max={self.temperature_max}]")
        check(self.remat_policy in layers.REMAT_POLICIES, "remat_policy",
              f"choose one of {sorted(layers.REMAT_POLICIES)}")
        check(len(self.image_mean) == 3 and len(self.image_std) == 3, "image_mean", "needs 3 values")
        for f in ("dtype", "param_dtype"):
            check(getattr(self, f) in DTYPES, f, f"choose one of {sorted(DTYPES)}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        return self.num_patches + 1  # + the ViT class token

    @property
    def connected_layers(self) -> tuple[int, ...]:
        """Indices of the fusion layers that are connected layers."""
        return tuple(j for j in range(1, self.fusion_layers) if j % self.fusion_stride == 0)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]


def fusion_plan(num_layers: int, stride: int) -> list[tuple[bool, int, int]]:
    """The fusion layers as runs (connected, first layer, count), in order: each connected
    layer alone, consecutive co-attention layers together (one scan per run)."""
    plan: list[tuple[bool, int, int]] = []
    for j in range(num_layers):
        connected = j > 0 and j % stride == 0
        if connected or not plan or plan[-1][0]:
            plan.append((connected, j, 1))
        else:
            plan[-1] = (False, plan[-1][1], plan[-1][2] + 1)
    return plan


def with_cls(mask: Array) -> Array:
    """Key mask [B, T] of text tokens -> [B, T+1] of [CLS] + tokens (the [CLS] always valid)."""
    return jnp.pad(mask, ((0, 0), (1, 0)), constant_values=True)


def _param(module: nn.Module, name: str, init, names: tuple, shape: tuple, dtype) -> Array:
    return module.param(name, layers.param_with_axes(init, names), shape, dtype)


def _layer_kwargs(cfg: MPLUGConfig, deterministic: bool, **extra) -> dict:
    return dict(num_heads=cfg.text_heads, head_dim=cfg.text_width // cfg.text_heads, mlp_dim=cfg.text_mlp_dim,
                dropout_rate=cfg.dropout_rate, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
                attention_impl=cfg.attention_impl, deterministic=deterministic, eps=cfg.layer_norm_eps, **extra)


def _stack(cfg: MPLUGConfig, kwargs: dict, num_layers: int, name: str):
    return layers.layer_stack(kwargs, num_layers, scan=cfg.scan_layers, remat_policy=cfg.remat_policy, name=name)


def vision_config(cfg: MPLUGConfig) -> coca.CoCaConfig:
    """The CoCaConfig whose (open_clip-mode) VisionEncoder is mPLUG's CLIP ViT. With a conv
    stem it reads the stem's feature map: sizes in stem pixels."""
    w, stride = cfg.vision_width, layers.stem_stride(cfg.stem_stages)
    return coca.CoCaConfig(
        open_clip_compatible=True, image_size=cfg.image_size // stride, patch_size=cfg.patch_size // stride,
        encoder_width=w,
        encoder_layers=cfg.vision_layers, encoder_heads=cfg.vision_heads, encoder_mlp_dim=cfg.vision_mlp_dim,
        activation=cfg.vision_activation, layer_norm_eps=cfg.vision_layer_norm_eps, image_mean=cfg.image_mean,
        image_std=cfg.image_std, decoder_width=w, decoder_heads=cfg.vision_heads, embed_dim=w,
        dtype=cfg.dtype, param_dtype=cfg.param_dtype, scan_layers=cfg.scan_layers,
        remat_policy=cfg.remat_policy, attention_impl=cfg.attention_impl)


# ----------------------------------------------------------------------------- towers

class ImageEncoder(nn.Module):
    """Images [B,H,W,3] -> image tokens [B, 1 + N, text_width] (token 0: the ViT class token)."""
    config: MPLUGConfig

    @nn.compact
    def __call__(self, images: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        x = images
        if cfg.stem_stages:  # the ViT then patchifies the stem's (float) features
            if not jnp.issubdtype(x.dtype, jnp.floating):
                x = (x.astype(jnp.float32) - jnp.asarray(cfg.image_mean)) / jnp.asarray(cfg.image_std)
            x = simvlm.resnet_stem(x.astype(cfg.compute_dtype), cfg.stem_width, cfg.stem_units[:cfg.stem_stages],
                                   0.0, deterministic, **kw)
        x = coca.VisionEncoder(vision_config(cfg), name="vit")(x, deterministic)
        x = layers.layer_norm("ln_post", eps=cfg.vision_layer_norm_eps, **kw)(x)
        if cfg.vision_width != cfg.text_width:  # the reference's visn_fc + visn_layer_norm (ViT-L)
            x = layers.dense_general(cfg.text_width, -1, ("embed", None), (None,), name="visn_fc", **kw)(x)
            x = layers.layer_norm("visn_norm", eps=cfg.layer_norm_eps, **kw)(x)
            x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        return layers.constrain(x, layers.BATCH_LENGTH_EMBED)


class TextEncoder(nn.Module):
    """Text [B, T] + key mask [B, T] -> [CLS] + tokens [B, T+1, text_width], bidirectional."""
    config: MPLUGConfig
    token_embed: nn.Module

    @nn.compact
    def __call__(self, tokens: Array, mask: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        b, t = tokens.shape
        if t > cfg.max_text_len:
            raise ValueError(f"text length {t} > MPLUGConfig.max_text_len={cfg.max_text_len}")
        d = cfg.text_width
        cls = _param(self, "cls_embedding", nn.initializers.normal(0.02), ("embed",), (d,), cfg.params_dtype)
        pos = _param(self, "positional_embedding", nn.initializers.normal(0.02), ("position", "embed"),
                     (cfg.max_text_len + 1, d), cfg.params_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(cfg.compute_dtype), (b, 1, d)), self.token_embed(tokens)], 1)
        x = (x + pos[: t + 1].astype(x.dtype)[None]).astype(cfg.compute_dtype)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        x = _stack(cfg, _layer_kwargs(cfg, deterministic), cfg.text_layers, "layers")(
            x, with_cls(mask)[:, None, None, :])
        x = layers.layer_norm("encoder_norm", eps=cfg.layer_norm_eps, **kw)(x)
        return layers.constrain(x, layers.BATCH_LENGTH_EMBED)


class FusionEncoder(nn.Module):
    """(image tokens [B, N, D], text tokens [B, T, D], text key mask [B, T]) ->
    (fused image tokens, fused text tokens): see the module docstring for the layer plan.

    Params: co-attention runs 'co_attention_{j}' (first layer j; unrolled: layer j+i is
    'co_attention_{j}_{i}', scanned: one stacked 'co_attention_{j}'), connected layers
    'connected_{j}', and 'text_norm' (the text output's LayerNorm; the image output is
    returned as is, so without connected layers it equals the input exactly).
    """
    config: MPLUGConfig

    @nn.compact
    def __call__(self, image: Array, text: Array, text_mask: Array,
                 deterministic: bool = True) -> tuple[Array, Array]:
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        n = image.shape[1]
        text_keys = text_mask[:, None, None, :]
        joint_keys = jnp.concatenate([jnp.ones(image.shape[:2], bool), text_mask], 1)[:, None, None, :]
        connected_cls = layers.TransformerLayer
        if cfg.remat_policy != "none":
            connected_cls = nn.remat(connected_cls, policy=layers.REMAT_POLICIES[cfg.remat_policy])
        for connected, first, count in fusion_plan(cfg.fusion_layers, cfg.fusion_stride):
            if connected:
                x = jnp.concatenate([image, text], axis=1)
                x, _ = connected_cls(**_layer_kwargs(cfg, deterministic), name=f"connected_{first}")(x, joint_keys)
                # Pre-LN: the output is image + this layer's update (the skip connection).
                image, text = x[:, :n], x[:, n:]
            else:  # image tokens are keys/values only: untouched
                text = _stack(cfg, _layer_kwargs(cfg, deterministic, cross_attention=True), count,
                              f"co_attention_{first}")(text, text_keys, image, None)
        text = layers.layer_norm("text_norm", eps=cfg.layer_norm_eps, **kw)(text)
        return layers.constrain(image, layers.BATCH_LENGTH_EMBED), layers.constrain(text, layers.BATCH_LENGTH_EMBED)


class LMHead(nn.Module):
    """BERT's LM head: dense + GELU + LayerNorm, logits tied to `token_embed` + a bias; float32."""
    config: MPLUGConfig
    token_embed: nn.Module

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        h = layers.dense_general(cfg.text_width, -1, ("embed", None), (None,), name="transform", **kw)(x)
        h = layers.layer_norm("transform_norm", eps=cfg.layer_norm_eps, **kw)(nn.gelu(h, approximate=False))
        bias = _param(self, "bias", nn.initializers.zeros_init(), ("vocab",), (cfg.vocab_size,), cfg.params_dtype)
        logits = self.token_embed.attend(h).astype(jnp.float32) + bias.astype(jnp.float32)
        return layers.constrain(logits, LOGITS_AXES)


class Decoder(nn.Module):
    """Causal text decoder with cross-attention to the fused [image; text] sequence."""
    config: MPLUGConfig
    token_embed: nn.Module

    @nn.compact
    def __call__(self, tokens: Array, memory: Array | None, memory_mask: Array, deterministic: bool = True,
                 decode: bool = False, positions: Array | None = None) -> Array:
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        pos_table = _param(self, "positional_embedding", nn.initializers.normal(0.02), ("position", "embed"),
                           (cfg.max_target_len, cfg.text_width), cfg.params_dtype)
        if decode:
            pos = jax.lax.dynamic_slice_in_dim(pos_table, positions, 1)[None]
            self_mask = None  # the KV cache masks the future itself
        else:
            if tokens.shape[1] > cfg.max_target_len:
                raise ValueError(f"decoder length {tokens.shape[1]} > MPLUGConfig.max_target_len={cfg.max_target_len}")
            pos = pos_table[: tokens.shape[1]][None]
            self_mask = nn.make_causal_mask(tokens, dtype=jnp.bool_)
        x = (self.token_embed(tokens) + pos.astype(cfg.compute_dtype)).astype(cfg.compute_dtype)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        stack = _stack(cfg, _layer_kwargs(cfg, deterministic or decode, cross_attention=True, decode=decode,
                                          max_decode_len=cfg.max_target_len), cfg.decoder_layers, "layers")
        x = stack(x, self_mask, memory, memory_mask[:, None, None, :])
        x = layers.layer_norm("decoder_norm", eps=cfg.layer_norm_eps, **kw)(x)
        return LMHead(cfg, self.token_embed, name="lm_head")(x)


def _l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class MPLUG(nn.Module):
    """mPLUG. The methods are the pieces the objectives combine (ITC / ITM / MLM / PrefixLM);
    `__call__(batch)` runs each once (so `init` creates every parameter) and returns
    dict(image_feat, text_feat, temperature, itm_logits, mlm_logits, logits).

    batch: 'image' [B,H,W,3] (uint8, or float already normalized), 'text_tokens' [B, T]
    (text encoder input, pad_id-padded, T <= max_text_len) and 'target_tokens' [B, Td]
    (decoder targets; the decoder reads them shifted right with bos_id).

    Params: 'visual' (ViT 'vit' + ln_post [+ visn_fc]), 'token_embed' (text encoder table,
    tied to the MLM head), 'text_encoder', 'fusion', 'fused_image_norm', 'decoder_embed'
    (the decoder's own table, as the reference's separate decoder), 'decoder' (layers +
    tied 'lm_head'), 'vision_proj', 'text_proj', 'temperature', 'itm_head', 'mlm_head'.
    """
    config: MPLUGConfig

    def setup(self):
        cfg = self.config
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        embed = dict(embedding_init=nn.initializers.normal(0.02), **kw)
        self.visual = ImageEncoder(cfg)
        self.token_embed = layers.Embed(cfg.vocab_size, cfg.text_width, **embed)
        self.text_encoder = TextEncoder(cfg, self.token_embed)
        self.fusion = FusionEncoder(cfg)
        self.fused_image_norm = layers.layer_norm(eps=cfg.layer_norm_eps, **kw)
        self.decoder_embed = layers.Embed(cfg.vocab_size, cfg.text_width, **embed)
        self.decoder = Decoder(cfg, self.decoder_embed)
        proj = lambda: layers.dense_general(cfg.embed_dim, -1, ("embed", None), (None,), **kw)
        self.vision_proj, self.text_proj = proj(), proj()
        self.temperature = self.param("temperature", layers.param_with_axes(
            nn.initializers.constant(cfg.temperature_init), ()), (), cfg.params_dtype)
        self.itm_head = layers.dense_general(2, -1, ("embed", None), (None,), **kw)
        self.mlm_head = LMHead(cfg, self.token_embed)

    def encode_image(self, images: Array, deterministic: bool = True) -> Array:
        """Image tokens [B, 1 + N, text_width]; token 0 is the image [CLS]."""
        return self.visual(images, deterministic)

    def encode_text(self, tokens: Array, mask: Array | None = None, deterministic: bool = True) -> Array:
        """Text tokens [B, T+1, text_width] ([CLS] first) of `tokens` [B, T]; `mask` [B, T]
        (True = a real token; default tokens != pad_id). The fusion and the decoder take
        `with_cls(mask)` as the key mask of these tokens."""
        mask = tokens != self.config.pad_id if mask is None else mask
        return self.text_encoder(tokens, mask, deterministic)

    def fuse(self, image_tokens: Array, text_tokens: Array, text_mask: Array,
             deterministic: bool = True) -> tuple[Array, Array]:
        """(fused image tokens, fused text tokens) of the skip-connected fusion; `text_mask`
        [B, T+1] is the key mask of `text_tokens` ([CLS] included)."""
        return self.fusion(image_tokens, text_tokens, text_mask, deterministic)

    def fused_sequence(self, fused_image: Array, fused_text: Array, text_mask: Array) -> tuple[Array, Array]:
        """(the decoder's memory [B, N + T + 1, D] = [norm(fused image); fused text], its key mask)."""
        memory = jnp.concatenate([self.fused_image_norm(fused_image), fused_text], axis=1)
        mask = jnp.concatenate([jnp.ones(fused_image.shape[:2], bool), text_mask], axis=1)
        return layers.constrain(memory, layers.BATCH_LENGTH_EMBED), mask

    def decode(self, decoder_input_tokens: Array, memory: Array | None, memory_mask: Array,
               deterministic: bool = True, decode: bool = False, positions: Array | None = None) -> Array:
        """Decoder logits [B, Td, vocab] (float32); position t predicts target t.

        `decode=True` runs one step with the KV cache (as SimVLM.decode): tokens [B, 1] at
        position `positions`; `memory` is only read on the call that creates the cache."""
        return self.decoder(decoder_input_tokens, memory, memory_mask, deterministic, decode, positions)

    def itc_features(self, image_tokens: Array, text_tokens: Array) -> tuple[Array, Array, Array]:
        """(image feature [B, E], text feature [B, E], temperature): L2-normalized float32
        projections of the two [CLS] tokens; the temperature clipped to its range."""
        image_feat = _l2_normalize(self.vision_proj(image_tokens[:, 0]))
        text_feat = _l2_normalize(self.text_proj(text_tokens[:, 0]))
        temp = jnp.clip(self.temperature.astype(jnp.float32), self.config.temperature_min,
                        self.config.temperature_max)
        return image_feat, text_feat, temp

    def itm_logits(self, fused_cls: Array) -> Array:
        """Match / no-match logits [B, 2] (float32; index 1 = match) of the fused text [CLS]."""
        return self.itm_head(fused_cls).astype(jnp.float32)

    def mlm_logits(self, fused_text: Array) -> Array:
        """Vocab logits [B, T, vocab] (float32) of fused text tokens (pass fused_text[:, 1:]
        to drop the [CLS])."""
        return self.mlm_head(fused_text)

    def encode_prefix(self, images: Array, prefix_tokens: Array, deterministic: bool = True
                      ) -> tuple[Array, Array]:
        """The decoder's (memory, key mask) for images + a text prefix (PrefixLM, captioning)."""
        mask = with_cls(prefix_tokens != self.config.pad_id)
        image = self.encode_image(images, deterministic)
        text = self.encode_text(prefix_tokens, deterministic=deterministic)
        return self.fused_sequence(*self.fuse(image, text, mask, deterministic), mask)

    def embed_image(self, images: Array) -> Array:
        """ITC image features [B, embed_dim] (L2-normalized)."""
        return _l2_normalize(self.vision_proj(self.encode_image(images)[:, 0]))

    def embed_text(self, tokens: Array) -> Array:
        """ITC text features [B, embed_dim] (L2-normalized) of token rows (pad_id-padded)."""
        return _l2_normalize(self.text_proj(self.encode_text(tokens)[:, 0]))

    def match_log_prob(self, image_tokens: Array, tokens: Array) -> Array:
        """ITM: log P(match) [B] of (image tokens row i, text row i)."""
        mask = with_cls(tokens != self.config.pad_id)
        _, fused = self.fuse(image_tokens, self.encode_text(tokens), mask)
        return jax.nn.log_softmax(self.itm_logits(fused[:, 0]), -1)[:, 1]

    def itc_embed(self, images: Array, tokens: Array) -> tuple[Array, Array]:
        """(image features, text features): what the momentum encoders compute."""
        return self.embed_image(images), self.embed_text(tokens)

    def __call__(self, batch: dict[str, Array], deterministic: bool = True) -> dict[str, Array]:
        cfg = self.config
        text_ids = batch["text_tokens"]
        text_mask = with_cls(text_ids != cfg.pad_id)
        image = self.encode_image(batch["image"], deterministic)
        text = self.encode_text(text_ids, deterministic=deterministic)
        image_feat, text_feat, temp = self.itc_features(image, text)
        fused_image, fused_text = self.fuse(image, text, text_mask, deterministic)
        memory, memory_mask = self.fused_sequence(fused_image, fused_text, text_mask)
        logits = self.decode(simvlm.shift_right(batch["target_tokens"], cfg.bos_id), memory, memory_mask,
                             deterministic)
        return {"image_feat": image_feat, "text_feat": text_feat, "temperature": temp,
                "itm_logits": self.itm_logits(fused_text[:, 0]), "mlm_logits": self.mlm_logits(fused_text[:, 1:]),
                "logits": logits}


def dummy_batch(cfg: MPLUGConfig, batch_size: int = 1) -> dict[str, Array]:
    """A training batch of the model's input shapes (for init and compilation): the image,
    the caption for ITC/ITM ('text_tokens'), its MLM-masked copy and labels (the data
    task's `text_len`/`mask_id`, `preprocessors.MaskedText`) and the PrefixLM split."""
    text = jnp.zeros((batch_size, cfg.max_text_len), jnp.int32)
    return {"image": jnp.zeros((batch_size, cfg.image_size, cfg.image_size, 3), jnp.uint8),
            "text_tokens": text, "mlm_tokens": text, "mlm_labels": text,
            "prefix_tokens": jnp.zeros((batch_size, cfg.max_prefix_len), jnp.int32),
            "target_tokens": jnp.zeros((batch_size, cfg.max_target_len), jnp.int32)}


# ----------------------------------------------------------------------------- the family

# The momentum ("EMA") encoders of ITC: the image tower, the text tower and their projections.
MOMENTUM_PARAMS = ("visual", "token_embed", "text_encoder", "vision_proj", "text_proj")


class MPLUGFamily(family.ModelFamily):
    """mPLUG as a model family: ITC (momentum encoders + queues in the train state, momentum
    distillation) + ITM (global hard negatives) + MLM + PrefixLM; generates from the image
    and a text prompt through the fusion; embeds images and texts (ITC) for retrieval."""
    name = "mplug"
    export_type = "mPLUG"
    config_cls = MPLUGConfig
    module_cls = MPLUG
    loss_weights = {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "prefix_lm": 1.0}  # mPLUG sums them unweighted
    can_generate = True
    can_embed = True
    can_match = True

    def dummy_batch(self, batch_size: int = 1) -> dict[str, Array]:
        return dummy_batch(self.config, batch_size)

    def init_aux_state(self, params, rng):
        cfg = self.config
        image_rng, text_rng = jax.random.split(rng)
        return {"ema": momentum.ema_subset(params, MOMENTUM_PARAMS),
                "image_queue": momentum.init_queue(cfg.queue_size, cfg.embed_dim, rng=image_rng),
                "text_queue": momentum.init_queue(cfg.queue_size, cfg.embed_dim, rng=text_rng),
                "queue_ptr": jnp.zeros((), jnp.int32)}

    def update_aux_state(self, aux_state, params, aux_outputs):
        """EMA of the updated params (ALBEF updates at the start of the next step's forward,
        from the same params: identical), then the batch's momentum features enqueued."""
        ptr = aux_state["queue_ptr"]
        image_queue, new_ptr = momentum.enqueue(aux_state["image_queue"], ptr, aux_outputs["image_feat_m"])
        text_queue, _ = momentum.enqueue(aux_state["text_queue"], ptr, aux_outputs["text_feat_m"])
        return {"ema": momentum.ema_update(aux_state["ema"], params, self.config.momentum),
                "image_queue": image_queue, "text_queue": text_queue, "queue_ptr": new_ptr}

    def objective(self, params, batch, rng, *, loss_weights, mesh=None, batch_axes=(),
                  aux_state=None) -> losses.Objective:
        cfg = self.config
        if aux_state is None:
            raise ValueError("mPLUG's objective needs its aux state (momentum params + queues): "
                             "aux_state=family.init_aux_state(params, rng)")
        b = batch["image"].shape[0]
        if b > cfg.queue_size:
            raise ValueError(f"MPLUGConfig.queue_size={cfg.queue_size} is smaller than the batch {b}: "
                             f"raise it to at least the global batch")

        def run(method, *args, key: int | None = None, p=params):
            rngs = {"dropout": jax.random.fold_in(rng, key)} if key is not None else {}
            return self.module.apply({"params": p}, *args, method=method, rngs=rngs)

        pad = cfg.pad_id
        text_ids = batch["text_tokens"]
        text_mask = with_cls(text_ids != pad)
        # ITC: momentum features (EMA params, no gradient), then the online ones against
        # momentum features of the batch + the queues.
        image_m, text_m = jax.lax.stop_gradient(
            run(MPLUG.itc_embed, batch["image"], text_ids, p={**params, **aux_state["ema"]}))
        image = run(MPLUG.encode_image, batch["image"], False, key=0)
        text = run(MPLUG.encode_text, text_ids, None, False, key=1)
        image_feat, text_feat, temp = run(MPLUG.itc_features, image, text)
        itc, sim_i2t, sim_t2i = losses.itc_momentum_loss(
            image_feat, text_feat, image_m, text_m, aux_state["image_queue"], aux_state["text_queue"], temp,
            cfg.distill_alpha)
        # ITM: per image a hard negative text, per text a hard negative image, over the global
        # batch; the positive and rows with the same caption are never drawn.
        key = losses.row_hash(text_ids)
        same = layers.constrain(jnp.all(key[:, None] == key[None], -1), losses.ROWS)
        neg_text, text_ok = losses.sample_hard_negatives(sim_i2t, same, jax.random.fold_in(rng, 100))
        neg_image, image_ok = losses.sample_hard_negatives(sim_t2i, same, jax.random.fold_in(rng, 101))
        rows = lambda *xs: layers.constrain(jnp.concatenate(xs, 0), layers.BATCH_LENGTH_EMBED[:xs[0].ndim])
        itm_image = rows(image, jnp.take(image, neg_image, 0), image)
        itm_text = rows(text, text, jnp.take(text, neg_text, 0))
        itm_mask = jnp.concatenate([text_mask, text_mask, jnp.take(text_mask, neg_text, 0)], 0)
        _, fused = run(MPLUG.fuse, itm_image, itm_text, itm_mask, False, key=2)
        itm_labels = jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)])
        itm_valid = jnp.concatenate([jnp.ones((b,), bool), image_ok, text_ok])
        itm, itm_acc = losses.itm_loss(run(MPLUG.itm_logits, fused[:, 0]), itm_labels, itm_valid)
        # MLM: the masked caption through the text encoder and the fusion with the image.
        mlm_text = run(MPLUG.encode_text, batch["mlm_tokens"], text_ids != pad, False, key=3)
        _, fused_mlm = run(MPLUG.fuse, image, mlm_text, text_mask, False, key=4)
        nll, n_mlm, mlm_correct = losses.token_nll_stats(run(MPLUG.mlm_logits, fused_mlm[:, 1:]),
                                                         batch["mlm_labels"], pad)
        mlm = nll / jnp.maximum(n_mlm, 1.0)
        # PrefixLM: the decoder generates the caption's suffix from the image + its prefix.
        prefix = batch["prefix_tokens"]
        prefix_mask = with_cls(prefix != pad)
        prefix_text = run(MPLUG.encode_text, prefix, None, False, key=5)
        fused_image, fused_text = run(MPLUG.fuse, image, prefix_text, prefix_mask, False, key=6)
        memory, memory_mask = run(MPLUG.fused_sequence, fused_image, fused_text, prefix_mask)
        targets = batch["target_tokens"]
        logits = run(MPLUG.decode, simvlm.shift_right(targets, cfg.bos_id), memory, memory_mask, False, key=7)
        nll, n_target, correct = losses.token_nll_stats(logits, targets, pad)
        prefix_lm = nll / jnp.maximum(n_target, 1.0)
        return losses.mplug_objective(
            {"itc": itc, "itm": itm, "mlm": mlm, "prefix_lm": prefix_lm}, loss_weights,
            {"itm_accuracy": itm_acc, "mlm_accuracy": mlm_correct / jnp.maximum(n_mlm, 1.0),
             "token_accuracy": correct / jnp.maximum(n_target, 1.0), "num_target_tokens": n_target,
             "temperature": temp},
            {"image_feat_m": image_m, "text_feat_m": text_m})

    def check_vocabulary(self, vocab) -> None:
        cfg = self.config
        if vocab.eos_id != cfg.eos_id:
            raise ValueError(f"MPLUGConfig.eos_id={cfg.eos_id} but the tokenizer's EOS is {vocab.eos_id}: "
                             f"set MPLUGConfig.eos_id={vocab.eos_id}")
        if cfg.mask_id in (cfg.pad_id, cfg.eos_id):
            raise ValueError(f"MPLUGConfig.mask_id={cfg.mask_id} is the pad/EOS id; use the tokenizer's "
                             f"[MASK] piece or its size {vocab.vocab_size} (an extra id)")
        super().check_vocabulary(vocab)

    def extra_token_ids(self) -> tuple[int, ...]:
        return (self.config.mask_id,)  # [MASK] may sit past the tokenizer's pieces

    def tokens_per_example(self) -> int:
        cfg = self.config
        return cfg.num_image_tokens + cfg.max_text_len + 1 + cfg.max_target_len

    def train_flops_per_example(self, frozen=()) -> float:  # frozen params counted as trained
        return train_flops_per_example(self.config)

    def describe(self) -> str:
        cfg = self.config
        return (f"mPLUG: CLIP ViT width {cfg.vision_width} x {cfg.vision_layers} layers (patch {cfg.patch_size}), "
                f"text width {cfg.text_width}: {cfg.text_layers} text / {cfg.fusion_layers} fusion (stride "
                f"{cfg.fusion_stride}) / {cfg.decoder_layers} decoder layers, {cfg.image_size}px images; "
                f"ITC + ITM + MLM + PrefixLM.")

    def table_cells(self) -> list[str]:
        cfg = self.config
        pair = lambda a, b: f"{a}" if a == b else f"{a} / {b}"
        return [pair(cfg.vision_width, cfg.text_width),
                f"{cfg.vision_layers} / {cfg.text_layers}+{cfg.fusion_layers}+{cfg.decoder_layers}",
                pair(cfg.vision_heads, cfg.text_heads), pair(cfg.vision_mlp_dim, cfg.text_mlp_dim),
                f"{cfg.image_size} / {cfg.patch_size}",
                family.describe_stem(cfg.stem_stages, cfg.stem_units, cfg.stem_width),
                f"{cfg.num_image_tokens} image + {cfg.max_text_len} text (stride {cfg.fusion_stride})",
                f"{cfg.max_target_len} target"]

    max_decode_len = property(lambda self: self.config.max_target_len)
    eos_id = property(lambda self: self.config.eos_id)

    def prompt_ids(self, vocab, prompt: str) -> np.ndarray:
        """The prompt's ids, zero-padded to max_prefix_len (the text encoder's prefix)."""
        return family.encode_prompt(vocab, prompt, self.config.max_prefix_len)

    def decode_inputs(self, images, prompt_ids) -> dict[str, np.ndarray]:
        return {"image": images, "prefix_tokens": np.tile(np.asarray(prompt_ids, np.int32), (len(images), 1))}

    def encode(self, params, inputs) -> tuple[Array, Array]:
        return self.module.apply({"params": params}, inputs["image"], inputs["prefix_tokens"],
                                 method=MPLUG.encode_prefix)

    def decode_start(self, params, context):
        memory, mask = context
        bos = jnp.full((memory.shape[0], 1), self.start_id, jnp.int32)
        return self.apply_cached(params, None, bos, memory, mask, decode=True, positions=jnp.int32(0),
                                 method=MPLUG.decode)

    def decode_step(self, params, cache, tokens, context, t):
        _, mask = context  # the memory's keys/values are in the cache
        return self.apply_cached(params, cache, tokens[:, None], None, mask, decode=True, positions=t,
                                 method=MPLUG.decode)

    def caption_logits(self, params, context, tokens):
        memory, mask = context
        return self.module.apply({"params": params}, simvlm.shift_right(tokens, self.config.bos_id), memory, mask,
                                 method=MPLUG.decode)

    def target_layout(self) -> tuple[int, bool]:
        # Texts are both embedded (text encoder) and scored (decoder): the shorter table bounds.
        return min(self.config.max_text_len, self.config.max_target_len), False

    def embed_images(self, params, images):
        return self.module.apply({"params": params}, images, method=MPLUG.embed_image)

    def embed_texts(self, params, targets):
        return self.module.apply({"params": params}, targets, method=MPLUG.embed_text)

    def match_context(self, params, images):
        return self.module.apply({"params": params}, images, method=MPLUG.encode_image)

    def match_scores(self, params, context, targets):
        return self.module.apply({"params": params}, context, targets, method=MPLUG.match_log_prob)


# ----------------------------------------------------------------------------- CLIP weights

def import_open_clip_vision(params: Any, state_dict: Any, cfg: MPLUGConfig) -> dict:
    """`params` (unboxed) with the image tower replaced by an open_clip CLIP (or CoCa) ViT:
    'visual/vit' from its blocks and 'visual/ln_post' from its ln_post (the CLIP
    projection is not used, as the reference's skip_last_layer). The config's vision
    fields must match the checkpoint's (patch, width, layers, heads, MLP)."""
    from simvlm_jax import convert_open_clip  # pylint: disable=g-import-not-at-top  (it imports export -> registry -> here)
    fields = "image_size/patch_size/vision_width/vision_layers/vision_heads/vision_mlp_dim"
    if cfg.stem_stages:
        raise ValueError(f"MPLUGConfig.stem_stages={cfg.stem_stages}: CLIP ViT weights fit a linear-patch "
                         f"image tower only; set MPLUGConfig.stem_stages=0 to import them")
    try:
        vit = convert_open_clip.vision_from_open_clip(state_dict, vision_config(cfg))
    except (KeyError, ValueError) as e:
        raise ValueError(f"the open_clip vision tower does not fit MPLUGConfig's vision fields ({fields}): "
                         f"{type(e).__name__}: {e}") from e
    ln_post = {"scale": np.asarray(state_dict["visual.ln_post.weight"]),
               "bias": np.asarray(state_dict["visual.ln_post.bias"])}
    visual = {**params["visual"], "vit": vit, "ln_post": ln_post}
    want = jax.tree_util.tree_map(np.shape, params["visual"])
    got = jax.tree_util.tree_map(np.shape, visual)
    if want != got:
        raise ValueError(f"the open_clip vision tower does not fit MPLUGConfig's vision fields ({fields}): "
                         f"ours {want}, checkpoint {got}")
    return {**params, "visual": visual}


# ----------------------------------------------------------------------------- FLOPs

def _fusion_flops(cfg: MPLUGConfig, text_tokens: int, count_masked: bool = False) -> float:
    d, m, n = cfg.text_width, cfg.text_mlp_dim, cfg.num_image_tokens
    total = 0.0
    for connected, _, count in fusion_plan(cfg.fusion_layers, cfg.fusion_stride):
        if connected:
            total += count * (flops._self_attention(n + text_tokens, d) + flops._mlp(n + text_tokens, d, m))
        else:
            total += count * (flops._self_attention(text_tokens, d) + flops._cross_attention(text_tokens, n, d)
                              + flops._mlp(text_tokens, d, m))
    return total


def _image_flops(cfg: MPLUGConfig) -> float:
    n, w = cfg.num_image_tokens, cfg.vision_width
    total = flops._image_embedding_flops(cfg.image_size, cfg.patch_size, w, cfg.stem_stages, cfg.stem_width,
                                         cfg.stem_units)
    total += cfg.vision_layers * (flops._self_attention(n, w) + flops._mlp(n, w, cfg.vision_mlp_dim))
    if cfg.vision_width != cfg.text_width:
        total += flops._dense(n, w, cfg.text_width)
    return total


def _text_flops(cfg: MPLUGConfig, tokens: int) -> float:
    d = cfg.text_width
    return cfg.text_layers * (flops._self_attention(tokens, d) + flops._mlp(tokens, d, cfg.text_mlp_dim))


def _lm_head_flops(cfg: MPLUGConfig, tokens: int) -> float:
    return flops._dense(tokens, cfg.text_width, cfg.text_width) + flops._dense(tokens, cfg.text_width, cfg.vocab_size)


def forward_flops(cfg: MPLUGConfig, batch_size: int = 0, count_masked: bool = False) -> float:
    """Forward FLOPs of one training example through the online model (what the backward
    pass differentiates): the image once, the text encoder 3x (caption, masked caption,
    prefix), the fusion 5x (ITM's positive + 2 negatives, MLM, PrefixLM), MLM head,
    decoder, ITC projections, and with `batch_size` > 0 the example's ITC similarity rows
    against batch + queue (both directions; ITM sampling reuses them)."""
    d, e = cfg.text_width, cfg.embed_dim
    t, tp, td = cfg.max_text_len + 1, cfg.max_prefix_len + 1, cfg.max_target_len
    total = _image_flops(cfg) + 2 * _text_flops(cfg, t) + _text_flops(cfg, tp)
    total += 2 * flops._dense(1, d, e)                                          # ITC projections
    total += 4 * _fusion_flops(cfg, t, count_masked) + _fusion_flops(cfg, tp, count_masked)
    total += 3 * flops._dense(1, d, 2)                                          # ITM head
    total += _lm_head_flops(cfg, t - 1)                                         # MLM head
    memory = cfg.num_image_tokens + tp
    total += cfg.decoder_layers * (flops._self_attention(td, d, causal=True, count_masked=count_masked)
                                   + flops._cross_attention(td, memory, d) + flops._mlp(td, d, cfg.text_mlp_dim))
    total += _lm_head_flops(cfg, td)
    if batch_size:
        total += 2 * flops._dense(1, e, batch_size + cfg.queue_size)
    return float(total)


def momentum_flops(cfg: MPLUGConfig, batch_size: int = 0) -> float:
    """Forward-only FLOPs per example of the momentum encoders (image + caption + projections)
    and, with `batch_size`, of the momentum similarity rows used as distillation targets."""
    total = _image_flops(cfg) + _text_flops(cfg, cfg.max_text_len + 1) + 2 * flops._dense(1, cfg.text_width, cfg.embed_dim)
    if batch_size:
        total += 2 * flops._dense(1, cfg.embed_dim, batch_size + cfg.queue_size)
    return float(total)


def train_flops_per_example(cfg: MPLUGConfig, batch_size: int = 0, count_masked: bool = False) -> float:
    """Training FLOPs per example: 3 x the online forward + the momentum forward."""
    return 3.0 * forward_flops(cfg, batch_size, count_masked) + momentum_flops(cfg, batch_size)
