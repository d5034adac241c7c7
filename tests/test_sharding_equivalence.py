"""Sharded == unsharded, for SimVLM-Tiny and CoCa-Tiny (gin/models/*_tiny.gin).

Outputs (logits; CoCa also the image/text embeddings), loss and gradients computed
(a) on one device with no mesh at all, (b) on data=2 x fsdp=2 x tensor=2 and
(c) on data=8, with params and batch placed by the project's logical axis rules,
agree to float32 round-off. The tensor mesh is checked to really split heads and
MLP (param shards and the per-device shapes of the compiled matmuls). Also:
bfloat16 compute with float32 params stays close to float32 compute.

Existing neighbours (not repeated here): tests/test_train.py checks the SimVLM
loss on data x fsdp (x tensor) meshes against a 1-device mesh with the conftest
linear-stem config; tests/test_coca.py checks CoCa on data=4 x fsdp=2.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Callable

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from simvlm_jax import losses, partitioning
from simvlm_jax.models import coca, registry, simvlm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8
MESHES = {"dp2_fsdp2_tp2": dict(data=2, fsdp=2, tensor=2), "dp8": dict(data=8, fsdp=1, tensor=1)}
# float32 round-off: sharded reductions sum in a different order (per-leaf relative L2 error).
F32_RTOL = 1e-5


@dataclasses.dataclass
class Case:
    """One model: config, params, a batch, and loss_fn(params, batch, mesh) -> (loss, outputs)."""
    name: str
    config: Any
    boxed: Any                  # abstract params with logical axis metadata
    params: dict
    batch: dict[str, np.ndarray]
    loss_fn: Callable


@dataclasses.dataclass
class Result:
    loss: float
    outputs: dict[str, np.ndarray]
    grads: dict
    hlo: str = ""
    params: dict | None = None  # as placed on the mesh


def _gin_config(name: str, config_cls):
    gin.clear_config()
    try:
        gin.parse_config_file(os.path.join(REPO, "gin", "models", f"{name}.gin"))
        cfg = registry.model_family().config
        assert isinstance(cfg, config_cls), (name, cfg)
        return cfg
    finally:
        gin.clear_config()


def _caption_tokens(rng: np.random.Generator, vocab: int, length: int) -> np.ndarray:
    """BATCH rows of 1..length real tokens (EOS=1 last), 0-padded."""
    out = np.zeros((BATCH, length), np.int32)
    for row, n in enumerate(rng.integers(1, length + 1, BATCH)):
        out[row, :n] = rng.integers(3, vocab, n)
        out[row, n - 1] = 1
    return out


def _simvlm_case(params: dict | None = None, **overrides) -> Case:
    """SimVLM-Tiny (gin) with `overrides`; `params` default: `host_init`."""
    cfg = dataclasses.replace(_gin_config("simvlm_tiny", simvlm.SimVLMConfig), **overrides)
    model = simvlm.SimVLM(cfg)
    rng = np.random.default_rng(0)
    prefix = _caption_tokens(rng, cfg.vocab_size, cfg.max_prefix_len)
    prefix[::3] = 0  # some rows without a text prefix
    batch = {"image": rng.integers(0, 256, (BATCH, cfg.image_size, cfg.image_size, 3), dtype=np.uint8),
             "has_image": np.asarray([1, 1, 0, 1, 1, 0, 1, 1], np.int32),  # text-only rows too
             "prefix_tokens": prefix,
             "target_tokens": _caption_tokens(rng, cfg.vocab_size, cfg.max_target_len)}
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), simvlm.dummy_batch(cfg)))["params"]

    def loss_fn(params, b, mesh):
        logits = model.apply({"params": params}, b)
        obj = losses.prefix_lm_objective(logits, b["target_tokens"])
        return obj.value / jnp.maximum(obj.weight, 1), {"logits": logits}
    return Case("simvlm_tiny", cfg, boxed, host_init(boxed) if params is None else params, batch, loss_fn)


def _coca_case(params: dict | None = None, **overrides) -> Case:
    """CoCa-Tiny (gin) with `overrides`; `params` default: `host_init`."""
    cfg = dataclasses.replace(_gin_config("coca_tiny", coca.CoCaConfig), **overrides)
    model = coca.CoCa(cfg)
    rng = np.random.default_rng(1)
    batch = {"image": rng.integers(0, 256, (BATCH, cfg.image_size, cfg.image_size, 3), dtype=np.uint8),
             "target_tokens": _caption_tokens(rng, cfg.vocab_size, cfg.max_text_len)}

    def loss_fn(params, b, mesh):
        out = model.apply({"params": params}, b)
        batch_axes = partitioning.batch_mesh_axes(mesh) if mesh is not None else ()
        loss = losses.contrastive_caption_objective(out, b["target_tokens"], weights=dict(coca.CoCaFamily.loss_weights),
                                                    mesh=mesh, batch_axes=batch_axes).value
        return loss, {k: out[k] for k in ("logits", "image_embed", "text_embed")}
    boxed = coca.CoCaFamily(cfg).abstract_params()
    return Case("coca_tiny", cfg, boxed, host_init(boxed) if params is None else params, batch, loss_fn)


def host_init(boxed: Any, seed: int = 0) -> dict:
    """Random params of the model's shapes, drawn on the host (compiling `model.init` of the
    conv stem costs ~14 s of CPU): kernels/tables ~ N(0, 1/fan_in) with fan_in = all dims but
    the last, LayerNorm scales ~ 1, other vectors ~ N(0, 0.02^2), CoCa's logit_scale log(1/0.07)."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = getattr(path[-1], "key", "")
        if name == "logit_scale":
            return np.asarray(math.log(1 / 0.07), np.float32)
        if x.ndim >= 2:
            return (rng.standard_normal(x.shape) / math.sqrt(math.prod(x.shape[:-1]))).astype(np.float32)
        base, std = (1.0, 0.1) if name == "scale" else (0.0, 0.02)
        return (base + std * rng.standard_normal(x.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(boxed))


def _host(tree) -> Any:
    return jax.tree_util.tree_map(np.asarray, tree)


def run_unsharded(case: Case) -> Result:
    """One device, no mesh, no axis rules: logical constraints are no-ops."""
    fn = jax.jit(jax.value_and_grad(lambda p, b: case.loss_fn(p, b, None), has_aux=True))
    (loss, outputs), grads = fn(case.params, case.batch)
    return Result(float(loss), _host(outputs), _host(grads))


def run_sharded(case: Case, mesh: Mesh) -> Result:
    """Params placed by their logical axes, batch over ('data', 'fsdp'), traced under the rules."""
    with partitioning.activate(mesh):
        shardings = partitioning.fit_to_shapes(
            partitioning.logical_to_sharding(partitioning.logical_specs(case.boxed), mesh), case.params)
        params = jax.device_put(case.params, shardings)
        batch = partitioning.host_batch_to_global(case.batch, mesh)
        fn = jax.jit(jax.value_and_grad(lambda p, b: case.loss_fn(p, b, mesh), has_aux=True))
        compiled = fn.lower(params, batch).compile()
        (loss, outputs), grads = compiled(params, batch)
    return Result(float(loss), _host(outputs), _host(grads), compiled.as_text(), params)


def _mesh(name: str) -> Mesh:
    return partitioning.make_mesh(**MESHES[name])


@pytest.fixture(scope="module", params=["simvlm", "coca"])
def case_and_reference(request) -> tuple[Case, Result]:
    case = _simvlm_case() if request.param == "simvlm" else _coca_case()
    return case, run_unsharded(case)


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _norm(x) -> float:
    return float(np.linalg.norm(np.asarray(x, np.float64)))


def assert_grads_close(got: dict, want: dict, rtol: float, what: str) -> None:
    """Per leaf: |got - want| <= rtol * (|want| + |all grads| * sqrt(leaf size / total size)).

    The second term is the leaf's share of the global gradient norm: it keeps leaves whose
    gradient is ~0 (attention key biases, whose exact gradient is 0 because softmax ignores
    a per-query constant) from turning pure round-off into a huge relative error.
    """
    leaves = jax.tree_util.tree_leaves_with_path(want)
    got_leaves = jax.tree_util.tree_leaves(got)
    assert len(leaves) == len(got_leaves) > 0, what
    total_size = sum(x.size for _, x in leaves)
    total_norm = math.sqrt(sum(_norm(x) ** 2 for _, x in leaves))
    assert total_norm > 0, what
    for (path, w), g in zip(leaves, got_leaves):
        assert g.shape == w.shape, (what, jax.tree_util.keystr(path))
        err = _norm(np.asarray(g, np.float64) - np.asarray(w, np.float64))
        bound = rtol * (_norm(w) + total_norm * math.sqrt(w.size / total_size))
        assert err <= bound, f"{what} {jax.tree_util.keystr(path)}: error {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_outputs_loss_and_grads_equal_unsharded(case_and_reference, mesh_name):
    case, ref = case_and_reference
    got = run_sharded(case, _mesh(mesh_name))
    assert got.loss == pytest.approx(ref.loss, rel=F32_RTOL)
    assert set(got.outputs) == set(ref.outputs)
    for k, want in ref.outputs.items():
        assert got.outputs[k].shape == want.shape, k
        assert _rel_l2(got.outputs[k], want) < F32_RTOL, (k, _rel_l2(got.outputs[k], want))
    assert_grads_close(got.grads, ref.grads, F32_RTOL, f"{case.name} grads on {mesh_name}")
    _assert_partitioned_as(case, got, MESHES[mesh_name]["tensor"])


# ----------------------------------------------------------------------------- tensor parallelism is real

_DOT = re.compile(r"= f32\[([\d,]*)\][^ ]* dot\(.*op_name=\"([^\"]*)\"")


def forward_dot_shapes(hlo: str, suffix: str) -> list[tuple[int, ...]]:
    """Per-device output shapes of the forward-pass matmuls whose op name ends with `suffix`."""
    shapes = []
    for m in _DOT.finditer(hlo):
        name = m.group(2)
        if name.endswith(suffix) and "transpose(" not in name:
            shapes.append(tuple(int(d) for d in m.group(1).split(",")))
    return shapes


def _dims(cfg) -> dict[str, int]:
    if isinstance(cfg, coca.CoCaConfig):
        assert (cfg.encoder_width, cfg.encoder_mlp_dim) == (cfg.decoder_width, cfg.decoder_mlp_dim)
        return dict(width=cfg.decoder_width, mlp=cfg.decoder_mlp_dim)
    return dict(width=cfg.width, mlp=cfg.mlp_dim)


def _assert_partitioned_as(case: Case, got: Result, tensor: int) -> None:
    """MLP hidden units and attention heads are split `tensor` ways on each device (read from
    the compiled, SPMD-partitioned HLO); so are the placed MLP kernels."""
    d = _dims(case.config)
    wi = forward_dot_shapes(got.hlo, "mlp/wi/dot_general")
    query = forward_dot_shapes(got.hlo, "self_attention/query/dot_general")
    assert wi and query, "expected matmuls not found in the compiled HLO"
    assert {s[-1] for s in wi} == {d["mlp"] // tensor}, wi
    # [tokens, heads * head_dim] per device: heads / tensor of the heads.
    assert {s[-1] for s in query} == {d["width"] // tensor}, query
    kernels = [x for p, x in jax.tree_util.tree_leaves_with_path(got.params)
               if jax.tree_util.keystr(p).endswith("['mlp']['wi']['kernel']")]
    assert kernels
    for k in kernels:
        assert "tensor" in jax.tree_util.tree_leaves(tuple(k.sharding.spec)), k.sharding.spec  # ('embed', 'mlp')
        assert k.addressable_shards[0].data.shape[-1] == k.shape[-1] // tensor
    if tensor > 1:  # row-parallel matmuls (MLP wo, attention out) need a reduction over 'tensor'
        assert re.search(r" (all-reduce|reduce-scatter)(-start)?\(", got.hlo)


# ----------------------------------------------------------------------------- bfloat16 compute

# bfloat16 keeps 8 significand bits: each rounding is <= 2^-9 ~ 0.2% relative. Over the ~10
# rounded activations/matmul inputs of these 2-4 layer models the outputs move ~0.5-0.7%
# (measured relative L2: SimVLM logits 0.64%; CoCa logits 0.66%, embeddings 0.47-0.59%).
# 2% leaves ~3x headroom and still fails on a real discrepancy (a wrong cast, float16
# overflow, a mask lost in bf16), which moves outputs by O(1). The lower bound proves the
# compute really ran in bfloat16.
BF16_RTOL = 2e-2
BF16_MIN_CHANGE = 1e-4


def test_bfloat16_compute_with_float32_params_is_close_to_float32(case_and_reference):
    case, ref = case_and_reference
    make = _simvlm_case if case.name.startswith("simvlm") else _coca_case
    bf16 = make(case.params, dtype="bfloat16")  # the same float32 params
    assert bf16.config.compute_dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree_util.tree_leaves(bf16.params)} == {jnp.dtype("float32")}
    out = jax.jit(lambda p, b: bf16.loss_fn(p, b, None)[1])(bf16.params, bf16.batch)
    for k, want in ref.outputs.items():
        got = np.asarray(out[k])
        assert got.dtype == np.float32 and got.shape == want.shape, k
        err = _rel_l2(got, want)
        assert BF16_MIN_CHANGE < err < BF16_RTOL, (case.name, k, err)
