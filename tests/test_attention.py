"""cuDNN's fused attention trains with a mask only on even lengths: `layers.pad_to_even` pads odd
query / key lengths so that the padded attention equals the unpadded one, values and gradients
(checked here through XLA's attention; the GPU suite runs the cuDNN path)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simvlm_jax.models import layers


def _padded(q, k, v, mask):
    t = q.shape[1]
    qp, kp, vp, mp = layers.pad_to_even(q, k, v, mask)
    assert qp.shape[1] % 2 == 0 and kp.shape[1] % 2 == 0
    return jax.nn.dot_product_attention(qp, kp, vp, mask=mp)[:, :t]


@pytest.mark.parametrize("t,s,mask_kind", [(77, 77, "causal"), (1, 256, None), (1, 257, "random")])
def test_padding_to_even_lengths_changes_neither_values_nor_gradients(t, s, mask_kind):
    rng = np.random.default_rng(t * 1000 + s)
    q, k, v = (jnp.asarray(rng.normal(size=(2, n, 3, 8)), jnp.float32) for n in (t, s, s))
    if mask_kind == "causal":
        mask = jnp.tril(jnp.ones((t, s), bool))[None, None]
    elif mask_kind == "random":
        mask = jnp.asarray(rng.random((2, 1, t, s)) > 0.3).at[..., 0].set(True)
    else:
        mask = None
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)  # noqa: E731
    np.testing.assert_allclose(_padded(q, k, v, mask), ref(q, k, v), atol=1e-6)
    grads = jax.grad(lambda *a: (_padded(*a, mask) * v[:, :1].sum(1, keepdims=True)).sum(), argnums=(0, 1, 2))
    want = jax.grad(lambda *a: (ref(*a) * v[:, :1].sum(1, keepdims=True)).sum(), argnums=(0, 1, 2))
    for got, exp in zip(grads(q, k, v), want(q, k, v)):
        np.testing.assert_allclose(got, exp, atol=1e-5)


def test_even_lengths_are_left_alone():
    q = jnp.ones((1, 4, 2, 8))
    out = layers.pad_to_even(q, q, q, None)
    assert all(a is b for a, b in zip(out[:3], (q, q, q))) and out[3] is None
