"""Device mesh and the one table mapping logical axis names to mesh axes.

Models name every parameter and key activation dimension logically
('embed', 'mlp', 'heads', 'activation_batch', ...). `LOGICAL_AXIS_RULES` is the
only place that says which mesh axis ('data', 'fsdp', 'tensor') each name is
sharded over. Parameters use the plain names; activations use `activation_*`
names so a parameter's 'embed' dim can be FSDP-sharded while the activations'
batch dim uses the same mesh axis.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Parameters: embed -> fsdp is ZeRO-3 (params, grads and optimizer state all
# sharded); heads/mlp/vocab -> tensor is Megatron-style tensor parallelism.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("norm", None),
    ("position", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_vocab", "tensor"),
    ("activation_height", None),
    ("activation_width", None),
    ("activation_channels", None),
)


@gin.configurable
def axis_rules(overrides: Sequence[tuple[str, Any]] = ()) -> tuple[tuple[str, Any], ...]:
    """The logical-axis rules, with gin `overrides` taking precedence."""
    override_names = {name for name, _ in overrides}
    return tuple(overrides) + tuple(r for r in LOGICAL_AXIS_RULES if r[0] not in override_names)


@gin.configurable
def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, dcn_data: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a ('data', 'fsdp', 'tensor') mesh; one axis may be -1 ("the rest").

    `dcn_data > 1` makes a multi-slice / multi-node mesh: the 'data' axis becomes
    dcn_data (over the slow network between slices or hosts) x data (inside each),
    while 'fsdp' and 'tensor' stay inside a slice/host on the fast interconnect.
    """
    devices = list(devices if devices is not None else jax.devices())
    if dcn_data < 1 or len(devices) % dcn_data:
        raise ValueError(f"make_mesh.dcn_data={dcn_data} must be >= 1 and divide the {len(devices)} devices")
    per_slice = len(devices) // dcn_data
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"make_mesh: data={data}, fsdp={fsdp}, tensor={tensor}: only one axis may be -1 "
                         f"(\"the rest\"); e.g. --gin.make_mesh.data=1 --gin.make_mesh.fsdp=-1 --gin.make_mesh.tensor=1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"make_mesh: mesh axis sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes and per_slice % known == 0:
        sizes[sizes.index(-1)] = per_slice // known
    if math.prod(sizes) != per_slice:
        raise ValueError(f"make_mesh: data={data} x fsdp={fsdp} x tensor={tensor} does not fit the "
                         f"{per_slice} devices per slice ({len(devices)} devices / dcn_data={dcn_data}); "
                         f"e.g. {_mesh_suggestion(per_slice, fsdp, tensor)}")
    if dcn_data > 1:
        # Slices are TPU slices (device.slice_index) or, elsewhere, processes (hosts).
        num_slices = len({getattr(d, "slice_index", 0) for d in devices})
        granule_is_process = num_slices < dcn_data
        arr = mesh_utils.create_hybrid_device_mesh(
            sizes, [dcn_data, 1, 1], devices=devices, process_is_granule=granule_is_process)
    else:
        try:  # topology-aware device order on TPU/GPU
            arr = mesh_utils.create_device_mesh(sizes, devices=devices)
        except Exception:  # pylint: disable=broad-except
            arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def _mesh_suggestion(devices: int, fsdp: int, tensor: int) -> str:
    """A complete mesh override that fits `devices`, keeping fsdp/tensor where they divide it."""
    fsdp = fsdp if fsdp > 0 and devices % fsdp == 0 else 1
    tensor = tensor if tensor > 0 and devices % (fsdp * tensor) == 0 else 1
    return f"--gin.make_mesh.data=-1 --gin.make_mesh.fsdp={fsdp} --gin.make_mesh.tensor={tensor}"


def logical_specs(abstract_boxed: Any) -> Any:
    """Logical PartitionSpecs of a boxed (nn.with_logical_partitioning) pytree.

    Unannotated leaves (step counters, ...) are replicated; optax MaskedNodes
    (frozen params' absent optimizer state) are kept as empty subtrees.
    """
    masked = optax.MaskedNode

    def spec(x):
        if isinstance(x, nn.meta.AxisMetadata):
            value = x.unbox()
            if isinstance(value, masked):  # a frozen param's (absent) optimizer state
                return masked()
            spec = x.get_partition_spec()
            # Optimizer statistics that change rank (Adafactor's factored row/column
            # moments) inherit the param's box but not its dims: replicate them (tiny).
            return spec if len(spec) == getattr(value, "ndim", len(spec)) else P()
        if isinstance(x, masked):
            return x
        return P()

    return jax.tree_util.tree_map(spec, abstract_boxed,
                                  is_leaf=lambda x: isinstance(x, (nn.meta.AxisMetadata, masked)))


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules=None) -> Any:
    """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
    rules = rules or axis_rules()

    def to_sharding(spec):
        if isinstance(spec, optax.MaskedNode):
            return spec
        return NamedSharding(mesh, nn.logical_to_mesh_axes(spec, rules))

    return jax.tree_util.tree_map(to_sharding, logical_specs,
                                  is_leaf=lambda x: isinstance(x, (P, optax.MaskedNode)))


def fit_to_shapes(shardings: Any, abstract: Any) -> Any:
    """Drops the sharding of any dimension its mesh axes do not divide (e.g. a vocab of
    32001 over tensor=2, or Adafactor's (1,)-shaped factored moments): that dim is
    replicated instead of failing at placement time."""

    def fit(sharding, x):
        if not isinstance(sharding, NamedSharding):
            return sharding
        spec = list(sharding.spec) + [None] * (len(x.shape) - len(sharding.spec))
        fitted = []
        for dim, axes in zip(x.shape, spec):
            names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
            ways = math.prod(sharding.mesh.shape[a] for a in names)
            fitted.append(axes if dim % ways == 0 else None)
        return NamedSharding(sharding.mesh, P(*fitted))

    return jax.tree_util.tree_map(fit, shardings, abstract,
                                  is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)))


def batch_sharding(mesh: Mesh, ndim: int, rules=None) -> NamedSharding:
    """Sharding of an input array: leading dim over the batch axes, rest replicated."""
    batch_axes = dict(rules or axis_rules())["activation_batch"]
    return NamedSharding(mesh, P(batch_axes, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def host_batch_to_global(batch: dict[str, np.ndarray], mesh: Mesh,
                         shardings: dict[str, NamedSharding] | None = None) -> dict[str, jax.Array]:
    """Assembles per-process numpy batches into global jax.Arrays on the mesh.

    Each process passes its own slice of the global batch (leading dim); the
    result's leading dim is the global batch size. Pass `shardings` (e.g. the
    Trainer's `batch_shardings`) to skip rebuilding them on every step.
    """
    return {k: jax.make_array_from_process_local_data(
        shardings[k] if shardings else batch_sharding(mesh, v.ndim), v) for k, v in batch.items()}


def batch_mesh_axes(mesh: Mesh, rules=None) -> tuple[str, ...]:
    """The mesh axes the batch dimension is sharded over (the 'activation_batch' rule)."""
    axes = dict(rules or axis_rules())["activation_batch"]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return tuple(a for a in axes if a in mesh.shape)


def num_batch_shards(mesh: Mesh) -> int:
    """How many ways the batch dimension is split over devices."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


# Meshes of the open `activate` contexts, innermost last (see `active_mesh`).
_ACTIVE_MESHES: list[Mesh] = []


def active_mesh() -> Mesh | None:
    """The mesh of the innermost `activate` context, or None outside one.

    Activation constraints (`layers.constrain`) pass it to flax explicitly: flax's logical
    constraints only see jax's abstract mesh (`jax.set_mesh`), which the legacy `with mesh:`
    context does not set, so without it every activation constraint would be a no-op."""
    return _ACTIVE_MESHES[-1] if _ACTIVE_MESHES else None


class activate:  # pylint: disable=invalid-name
    """Context in which logical axis names resolve to `mesh` (for tracing/compiling)."""

    def __init__(self, mesh: Mesh, rules=None):
        self.mesh, self.rules = mesh, rules or axis_rules()

    def __enter__(self):
        # The legacy `with mesh:` context, not jax.set_mesh: with an abstract mesh set, flax
        # re-constrains boxed params at init (and DenseGeneral's reshaped kernels then fail).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.mesh.__enter__()
        self._rules_ctx = nn.logical_axis_rules(self.rules)
        self._rules_ctx.__enter__()
        _ACTIVE_MESHES.append(self.mesh)
        return self

    def __exit__(self, *exc):
        _ACTIVE_MESHES.pop()
        self._rules_ctx.__exit__(*exc)
        self.mesh.__exit__(*exc)


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (what AOT compile and restore need)."""
    # optax MaskedNodes (frozen params' absent state) have no leaves and pass through.
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def shard_bytes(tree: Any) -> tuple[int, int]:
    """(bytes on the most loaded device, total bytes) of abstract arrays with shardings."""
    per_device: dict[Any, int] = {}
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        itemsize = np.dtype(leaf.dtype).itemsize
        total += int(np.prod(leaf.shape)) * itemsize
        for device, index in leaf.sharding.devices_indices_map(leaf.shape).items():
            n = 1
            for sl, dim in zip(index, leaf.shape):
                start, stop, _ = sl.indices(dim)
                n *= stop - start
            per_device[device] = per_device.get(device, 0) + n * itemsize
    return max(per_device.values(), default=0), total
