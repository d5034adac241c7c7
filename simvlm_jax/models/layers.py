"""Transformer building blocks shared by SimVLM and CoCa.

Every parameter is created with logical axis names and every main activation is
constrained with `activation_*` names; `simvlm_jax.partitioning` maps both onto
the mesh. Attention goes through `jax.nn.dot_product_attention` (cuDNN flash
attention on GPU when `attention_impl='cudnn'`, XLA elsewhere).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from simvlm_jax import partitioning

Array = jax.Array
Dtype = Any

# Config strings -> dtypes (compute dtype, param dtype, optimizer moments).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")
BATCH_LENGTH_HEADS_KV = ("activation_batch", "activation_length", "activation_heads", "activation_kv")

default_kernel_init = nn.initializers.xavier_uniform()


def param_with_axes(init: Callable, names: tuple[str | None, ...]) -> Callable:
    return nn.with_logical_partitioning(init, names)


def constrain(x: Array, names: tuple[str | None, ...]) -> Array:
    """Constrains activation `x` to the logical axes `names` on the active mesh (a no-op outside
    `partitioning.activate`). The mesh is passed explicitly: flax alone would not see it."""
    return nn.with_logical_constraint(x, names, mesh=partitioning.active_mesh())


def dense_general(features, axis, kernel_names, bias_names, *, dtype, param_dtype,
                  name=None, use_bias=True, kernel_init=default_kernel_init) -> nn.DenseGeneral:
    return nn.DenseGeneral(
        features=features, axis=axis, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias,
        kernel_init=param_with_axes(kernel_init, kernel_names),
        bias_init=param_with_axes(nn.initializers.zeros_init(), bias_names), name=name)


def layer_norm(name: str | None = None, *, dtype, param_dtype, eps: float = 1e-6) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
                        scale_init=param_with_axes(nn.initializers.ones_init(), ("norm",)),
                        bias_init=param_with_axes(nn.initializers.zeros_init(), ("norm",)))


def pad_to_even(q: Array, k: Array, v: Array, mask: Array | None) -> tuple[Array, Array, Array, Array | None]:
    """Pads odd query / key lengths by one (a masked key; a query row that attends to key 0 and is
    dropped after): cuDNN's fused attention with a mask trains only on even lengths (CoCa's 77
    text tokens, its pooler's single query). Unchanged when both are even."""
    t, s = q.shape[1], k.shape[1]
    pad_t, pad_s = t % 2, s % 2
    if not (pad_t or pad_s):
        return q, k, v, mask
    if mask is None:
        mask = jnp.ones((q.shape[0], 1, t, s), bool)
    mask = jnp.broadcast_to(mask, (q.shape[0], mask.shape[1], t, s))
    seq = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))  # noqa: E731
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_t), (0, pad_s)))  # padding: False
    if pad_t:  # no all-masked row: its softmax would divide by zero
        mask = mask.at[:, :, t:, 0].set(True)
    return seq(q, pad_t), seq(k, pad_s), seq(v, pad_s), mask


def attend_cached(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
    """[B,T,N,H] queries x a heads-major KV cache [B,N,S,H] -> [B,T,N,H]; `mask` broadcastable
    to [B,N,T,S]. The math of jax.nn.dot_product_attention's XLA path (scale 1/sqrt(H), float32
    logits and softmax, masked logits at -0.7 x float32 max) with the cache's [B, N] as the
    matmuls' batch dimensions, so no step copies the cache into another layout.

    Grouped-query attention: a cache of K < N heads ([B,K,S,H], K dividing N) serves query
    heads k*G .. k*G+G-1 (G = N/K) from its head k, as jax.nn.dot_product_attention and
    HF's repeat_kv group them; `mask` then broadcasts to [B,1,T,S]."""
    b, t, n, h = q.shape
    groups = n // k.shape[1]
    if groups > 1:
        if n % k.shape[1]:
            raise ValueError(f"attend_cached: {n} query heads for {k.shape[1]} key/value heads")
        qg = q.reshape(b, t, k.shape[1], groups, h)
        logits = jnp.einsum("btkgh,bksh->bkgts", qg, k, preferred_element_type=jnp.float32) * h ** -0.5
        if mask is not None:
            logits = jnp.where(jnp.expand_dims(mask, -3), logits, -0.7 * jnp.finfo(jnp.float32).max)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bkgts,bksh->btkgh", probs, v).reshape(b, t, n, h)
    logits = jnp.einsum("btnh,bnsh->bnts", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = jnp.where(mask, logits, -0.7 * jnp.finfo(jnp.float32).max)
    return jnp.einsum("bnts,bnsh->btnh", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)


def attend(q: Array, k: Array, v: Array, mask: Array | None, impl: str | None) -> Array:
    """[B,T,N,H] x [B,S,N,H] -> [B,T,N,H]; `mask` broadcastable to [B,N,T,S], True = attend."""
    if impl == "cudnn":  # cuDNN flash attention: bf16/fp16 inputs, a full-size mask, even lengths
        t = q.shape[1]
        q, k, v, mask = pad_to_even(q, k, v, mask)
        if mask is not None:
            mask = jnp.broadcast_to(mask, (q.shape[0], mask.shape[1], q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")[:, :t]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


class MLP(nn.Module):
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense_general(self.mlp_dim, -1, ("embed", "mlp"), ("mlp",), name="wi", **kw)(x)
        h = constrain(nn.gelu(h), ("activation_batch", "activation_length", "activation_mlp"))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return dense_general(d, -1, ("mlp", "embed"), ("embed",), name="wo", **kw)(h)


class Attention(nn.Module):
    """Multi-head attention; self-attention (optionally with a KV cache) or cross-attention.

    Decode mode (`decode=True`) processes one query position per call:
      * self-attention appends this step's key/value to the 'cache' collection;
      * cross-attention projects the encoder output once, on the call that
        creates the cache, and reuses the cached keys/values afterwards.

    Shared cross-attention sources: when `kv_input` has Bk rows and `x` has Bk * m
    (rows i*m .. i*m+m-1 belong to source i, e.g. m captions scored against one
    image), the m query rows of source i attend as one row of m*T positions, so each
    source is projected once (cross-attention queries do not interact).
    """
    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    is_cross: bool = False
    decode: bool = False
    max_decode_len: int = 0
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array, kv_input: Array | None, mask: Array | None) -> Array:
        rows, length, width = x.shape
        shared = (self.is_cross and not self.decode and kv_input is not None
                  and kv_input.shape[0] != rows)
        if shared:
            if rows % kv_input.shape[0]:
                raise ValueError(f"cross-attention: {rows} query rows for {kv_input.shape[0]} sources")
            x = x.reshape(kv_input.shape[0], (rows // kv_input.shape[0]) * length, width)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
        proj = functools.partial(dense_general, (self.num_heads, self.head_dim), -1,
                                 ("embed", "heads", "kv"), ("heads", "kv"), **kw)
        q = proj(name="query")(x)  # dot_product_attention applies the 1/sqrt(head_dim) scale
        q = constrain(q, BATCH_LENGTH_HEADS_KV)
        key_proj, value_proj = proj(name="key"), proj(name="value")

        if self.decode:
            # The cache is heads-major, [B, N, S, H]: each step's attention reads it without
            # transposing it (a [B, S, N, H] cache was, per layer and step: 17% of op time in a
            # CPU profile of CoCa-B/32 beam search, docs/performance.md).
            heads_major = lambda t: jnp.swapaxes(t, 1, 2)  # noqa: E731  [B,S,N,H] <-> [B,N,S,H]
            if self.is_cross:  # encoder keys/values: projected once, when the cache is created
                k = self.variable("cache", "cross_key", lambda: heads_major(key_proj(kv_input))).value
                v = self.variable("cache", "cross_value", lambda: heads_major(value_proj(kv_input))).value
            else:
                k_new, v_new = heads_major(key_proj(x)), heads_major(value_proj(x))
                b, n, _, h = k_new.shape
                shape = (b, n, self.max_decode_len, h)
                ck = self.variable("cache", "cached_key", jnp.zeros, shape, k_new.dtype)
                cv = self.variable("cache", "cached_value", jnp.zeros, shape, v_new.dtype)
                idx = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
                i = idx.value
                ck.value = jax.lax.dynamic_update_slice(ck.value, k_new, (0, 0, i, 0))
                cv.value = jax.lax.dynamic_update_slice(cv.value, v_new, (0, 0, i, 0))
                idx.value = i + x.shape[1]
                k, v = ck.value, cv.value
                # Attend to cached positions <= i (the query is at position i).
                step_mask = (jnp.arange(self.max_decode_len) <= i)[None, None, None, :]
                mask = step_mask if mask is None else jnp.logical_and(mask, step_mask)
            out = attend_cached(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        else:
            src = x if kv_input is None else kv_input
            k = constrain(key_proj(src), BATCH_LENGTH_HEADS_KV)
            v = constrain(value_proj(src), BATCH_LENGTH_HEADS_KV)
            out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask, self.attention_impl)
        out = constrain(out, BATCH_LENGTH_HEADS_KV)
        out = dense_general(width, (-2, -1), ("heads", "kv", "embed"), ("embed",), name="out", **kw)(out)
        return out.reshape(rows, length, width) if shared else out


def drop_path(x: Array, rate: float, deterministic: bool, rng_fn: Callable[[], Array]) -> Array:
    """Stochastic depth: drops the whole residual branch per example."""
    if deterministic or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng_fn(), 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class TransformerLayer(nn.Module):
    """Pre-LN layer: self-attention [+ cross-attention] + MLP.

    Scan-compatible: `__call__(x, *broadcast_args) -> (x, None)`.
    """
    num_heads: int
    head_dim: int
    mlp_dim: int
    dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    cross_attention: bool = False
    deterministic: bool = True
    decode: bool = False
    max_decode_len: int = 0
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: Array, self_mask: Array | None, encoded: Array | None = None,
                 cross_mask: Array | None = None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        akw = dict(num_heads=self.num_heads, head_dim=self.head_dim,
                   attention_impl=self.attention_impl, **kw)
        det = self.deterministic
        dp = functools.partial(drop_path, rate=self.drop_path_rate, deterministic=det,
                               rng_fn=lambda: self.make_rng("dropout"))
        x = constrain(x, BATCH_LENGTH_EMBED)

        h = layer_norm("pre_self_attention_norm", eps=self.eps, **kw)(x)
        h = Attention(decode=self.decode, max_decode_len=self.max_decode_len,
                      name="self_attention", **akw)(h, None, self_mask)
        x = x + dp(nn.Dropout(self.dropout_rate)(h, deterministic=det))

        if self.cross_attention:
            h = layer_norm("pre_cross_attention_norm", eps=self.eps, **kw)(x)
            h = Attention(is_cross=True, decode=self.decode, name="cross_attention", **akw)(
                h, encoded, cross_mask)
            x = x + dp(nn.Dropout(self.dropout_rate)(h, deterministic=det))

        h = layer_norm("pre_mlp_norm", eps=self.eps, **kw)(x)
        h = MLP(self.mlp_dim, self.dropout_rate, name="mlp", **kw)(h, det)
        x = x + dp(nn.Dropout(self.dropout_rate)(h, deterministic=det))
        return constrain(x, BATCH_LENGTH_EMBED), None


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def layer_stack(layer_kwargs: dict, num_layers: int, *, scan: bool, remat_policy: str,
                name: str, layer_cls: type[nn.Module] | None = None) -> Callable:
    """Returns fn(x, *args) -> x applying `num_layers` layers of `layer_cls`
    (default TransformerLayer; any module with `(x, *args) -> (x, None)`).

    `scan=True` stacks the params on a leading 'layers' axis and compiles one
    layer body (compile time flat in depth); `remat_policy` picks what the
    backward pass recomputes.
    """
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={remat_policy!r}; choose one of {sorted(REMAT_POLICIES)}")
    layer_cls = layer_cls or TransformerLayer
    if remat_policy != "none":
        layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan)

    def apply(x, *args):
        if num_layers == 0:
            return x
        if scan:
            stacked = nn.scan(
                layer_cls, variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * len(args), length=num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stacked(**layer_kwargs, name=name)(x, *args)
            return x
        for i in range(num_layers):
            x, _ = layer_cls(**layer_kwargs, name=f"{name}_{i}")(x, *args)
        return x

    return apply


def stem_stride(stages: int) -> int:
    """Stride of the first `stages` BiT ResNet stages: root conv (/2) + max-pool (/2), then /2
    per stage after the first; 0 stages: 1."""
    return 1 if stages == 0 else 4 * 2 ** (stages - 1)


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10_000.0) -> Array:
    """Fixed 2-D sin-cos position embedding, [h*w, dim] (MoCo v3 / big_vision)."""
    if dim % 4:
        raise ValueError(f"sincos2d position embedding needs width % 4 == 0, got {dim}")
    y, x = jnp.mgrid[:h, :w]
    omega = 1.0 / (temperature ** (jnp.arange(dim // 4) / (dim // 4 - 1 if dim > 4 else 1)))
    y = y.reshape(-1)[:, None] * omega[None]
    x = x.reshape(-1)[:, None] * omega[None]
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)


class Embed(nn.Module):
    """Token embedding table ('vocab', 'embed') used for lookup and tied output logits.

    Under FSDP the table is stored sharded over 'embed'; it is gathered (constrained to
    ('vocab', None)) before use, so XLA all-gathers the weight instead of resharding
    the batch-sharded activations.
    """
    vocab_size: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    embedding_init: Callable = nn.initializers.normal(1.0)

    def setup(self):
        self.embedding = self.param("embedding", param_with_axes(self.embedding_init, ("vocab", "embed")),
                                    (self.vocab_size, self.features), self.param_dtype)

    def _gathered(self) -> Array:
        return constrain(jnp.asarray(self.embedding, self.dtype), ("vocab", None))

    def __call__(self, tokens: Array) -> Array:
        return constrain(jnp.take(self._gathered(), tokens, axis=0), BATCH_LENGTH_EMBED)

    def attend(self, x: Array) -> Array:
        return jnp.einsum("...d,vd->...v", x, self._gathered())
