"""Device mesh ('data', 'fsdp', 'tp'), named sharding strategies and parameter/batch shardings.

Parameters carry logical axis names (`embed`, `vocab`, `heads`, ...); a strategy maps each logical
axis to mesh axes. Switching strategy is a config value, never a code change.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tp")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated), per strategy.
# Every strategy also shards the batch over ('data', 'fsdp'); unlisted logical axes are replicated.
# The Rechead's width shards too: its three [vocab, d] text towers and their Adam moments are the largest
# stage-1 arrays (3 x 125 MB at the paper's d = 1024), replicated on every chip otherwise. Their vocabulary
# axis is `rechead_vocab`, never sharded: the encoder's 30,522 tokens divide by no tp size above 2.
_FSDP = {"embed": "fsdp", "items": "fsdp", "rechead_embed": "fsdp"}
_TP = {"vocab": "tp", "heads": "tp", "kv_heads": "tp", "mlp": "tp"}
STRATEGIES: dict[str, dict[str, Any]] = {
    "dp": {},
    "fsdp": dict(_FSDP),
    "tp": dict(_TP),
    "fsdp_tp": {**_FSDP, **_TP},
}


def inference_strategy(strategy: str | Mapping[str, Any]) -> str | dict:
    """Returns `strategy` without its fsdp weight sharding: what sampling holds weights in. A decode step under
    fsdp would all-gather every weight at every token (the TPU plan measured ~the model's size per token)."""
    if isinstance(strategy, str):
        return {"fsdp": "dp", "fsdp_tp": "tp"}.get(strategy, strategy)
    uses_fsdp = lambda axes: "fsdp" in (axes if isinstance(axes, (tuple, list)) else (axes,))  # noqa: E731
    return {k: v for k, v in strategy.items() if not uses_fsdp(v)}


def activation_sharding(mesh: Mesh, strategy) -> NamedSharding:
    """Returns the sharding of decoder activations `[batch, seq, embed]`: batch over ('data', 'fsdp') under
    every strategy; seq and embed by the strategy's `activation_length` / `activation_embed` rules (default
    replicated: Megatron-style tp all-reduces back to full width between blocks)."""
    rules = dict(logical_rules(strategy))
    return NamedSharding(mesh, P(BATCH_AXES, rules.get("activation_length"), rules.get("activation_embed")))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh sizes per axis; one size may be -1 meaning 'all remaining devices'."""

    data: int = -1
    fsdp: int = 1
    tp: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Returns concrete (data, fsdp, tp) sizes whose product is `num_devices`."""
        sizes = [self.data, self.fsdp, self.tp]
        if sizes.count(-1) > 1:
            raise ValueError(f"mesh {sizes}: at most one axis may be -1")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh {sizes}: sizes must be positive or -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible "
                                 f"by the fixed axes' product {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                             f"but {num_devices} are available")
        return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Returns a Mesh with axes ('data', 'fsdp', 'tp') over `devices` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = config.resolve(len(devices))
    try:  # topology-aware device order on TPU/GPU; plain reshape elsewhere
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_rules(strategy: str | Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Returns flax-style logical axis rules for a named strategy or a user-given {logical: mesh} table."""
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown sharding strategy {strategy!r}; expected one of {sorted(STRATEGIES)} "
                             f"or a {{logical_axis: mesh_axis}} table")
        strategy = STRATEGIES[strategy]
    for logical, mesh_axes in strategy.items():
        for ax in (mesh_axes if isinstance(mesh_axes, (tuple, list)) else [mesh_axes]):
            if ax is not None and ax not in MESH_AXES:
                raise ValueError(f"strategy maps {logical!r} to unknown mesh axis {ax!r}; mesh axes are {MESH_AXES}")
    return tuple(strategy.items())


def _mesh_axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_sharding(logical: P, shape: Sequence[int], mesh: Mesh, rules, name: str = "array") -> NamedSharding:
    """Returns the NamedSharding of one array with logical spec `logical`; raises if a mesh size does not
    divide the dimension it shards (instead of silently replicating it)."""
    spec = nn.logical_to_mesh_axes(logical, rules)
    for dim, (size, axes, lname) in enumerate(zip(shape, spec, logical)):
        n = _mesh_axis_size(mesh, axes)
        if size % n:
            raise ValueError(f"cannot shard {name}: dimension {dim} ({lname!r}, size {size}) is mapped to mesh "
                             f"axes {axes} of total size {n}, which does not divide it; choose another strategy "
                             f"or mesh shape")
    return NamedSharding(mesh, spec)


def tree_shardings(abstract_boxed: Any, mesh: Mesh, strategy) -> Any:
    """Returns a pytree of NamedSharding for a pytree of (abstract) `nn.LogicallyPartitioned` leaves."""
    rules = logical_rules(strategy)
    specs = nn.get_partition_spec(abstract_boxed)
    shapes = nn.unbox(abstract_boxed)
    paths_specs, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))
    flat_shapes = jax.tree_util.tree_leaves(shapes)
    out = [logical_to_sharding(spec, arr.shape, mesh, rules, name=jax.tree_util.keystr(path))
           for (path, spec), arr in zip(paths_specs, flat_shapes)]
    return jax.tree_util.tree_unflatten(treedef, out)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Returns the sharding of a `[batch, ...]` array: batch over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def host_batch_to_global(batch: Any, mesh: Mesh) -> Any:
    """Returns `batch` (a pytree of host `[batch, ...]` arrays, identical on every process) as global jax
    Arrays split over ('data', 'fsdp'); each process places only the rows its devices hold, so the same code
    runs on one host and on a pod (where jit refuses host arrays for multi-process shardings)."""
    def put(x):
        sharding = batch_sharding(mesh, np.ndim(x))
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global
            return x
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    return jax.tree_util.tree_map(put, batch)


def to_host(tree: Any) -> Any:
    """Returns `tree` with every array as a NumPy array holding its global value, on every process.

    An array split over devices of other processes (a sharded output on a pod) is all-gathered: a collective,
    so every process must call this in the same order, as the single-program code paths do."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree_util.tree_map(get, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    """Returns a fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, P())


def bytes_per_device(tree: Any) -> dict[int, int]:
    """Returns {device id: bytes of `tree`'s shards resident on that device}."""
    out: dict[int, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
    return out
