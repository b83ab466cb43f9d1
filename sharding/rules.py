"""Partition rules: every parameter and cache array, from its logical axes to the mesh, in one table.

Parameters carry logical axes in ``qwen2_jax.model.params.param_table`` (e.g. ``("experts", "moe_mlp", "embed")``);
``RULES`` maps each logical axis to a mesh axis. A dimension whose units (heads for the head
axes, elements otherwise) do not divide by its mesh axis is replicated instead, except the experts, which
must divide: an expert split in two would need a different dispatch.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qwen2_jax.model.cache import KVCache
from qwen2_jax.model.config import Qwen2MoeConfig
from qwen2_jax.errors import InputError
from qwen2_jax.model.params import lookup, nest, param_shape, param_table

# logical axis -> mesh axis (None: replicated).
RULES: dict[str | None, str | None] = {
    "experts": "expert",     # routed experts: each device holds and runs its own
    "moe_mlp": "tensor",     # the experts' intermediate dim: expert weights spread over expert x tensor devices
    "q_heads": "tensor",     # attention: column-parallel q/k/v, row-parallel o_proj
    "kv_heads": "tensor",    # only when num_key_value_heads divides by the tensor axis; replicated otherwise
    "shared_mlp": "tensor",  # the shared expert's intermediate dim
    "mlp": "tensor",         # the dense layers' intermediate dim (none in Qwen2-57B-A14B)
    "vocab": "tensor",       # embedding and lm_head rows
    "batch": "data",         # inputs, KV cache, logits
    "embed": None,           # the residual stream stays whole on every device
    None: None,              # router and shared-expert gate outputs (64 and 1 wide)
}


def _units(cfg: Qwen2MoeConfig, logical: str | None, size: int) -> int:
    """How many indivisible units a dimension holds: whole heads for the head axes, elements otherwise."""
    return {"q_heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads}.get(logical, size)


def check_experts(cfg: Qwen2MoeConfig, mesh: Mesh) -> None:
    n = mesh.shape["expert"]
    if cfg.num_sparse_layers and cfg.num_experts % n:
        raise InputError(f"num_experts={cfg.num_experts} is not divisible by the mesh's expert axis ({n}); "
                         f"use an expert axis size that divides {cfg.num_experts}")


def logical_spec(cfg: Qwen2MoeConfig, mesh: Mesh, axes, shape) -> P:
    """The PartitionSpec for an array with logical ``axes`` and ``shape`` on ``mesh``, by ``RULES``."""
    spec = []
    for logical, size in zip(axes, shape):
        axis = RULES[logical]
        if axis is not None and (mesh.shape[axis] == 1 or _units(cfg, logical, size) % mesh.shape[axis]):
            axis = None  # a trivial axis, or units that do not divide: replicate
        spec.append(axis)
    return P(*spec)


def param_shardings(cfg: Qwen2MoeConfig, mesh: Mesh) -> dict[tuple[str, ...], NamedSharding]:
    """``{Param.path: NamedSharding}`` for every parameter of ``cfg``'s model."""
    check_experts(cfg, mesh)
    return {p.path: NamedSharding(mesh, _param_spec(cfg, mesh, p)) for p in param_table(cfg)}


def _param_spec(cfg: Qwen2MoeConfig, mesh: Mesh, p) -> P:
    shape = param_shape(cfg, p)
    spec = logical_spec(cfg, mesh, p.axes, shape)
    if p.is_scale:  # a quantized weight's scales split as it does; their blocks axis only where the blocks divide
        parts = list(spec) + [None] * (len(shape) - len(spec))
        axis = parts[p.quant_axis]
        if axis is not None and shape[p.quant_axis] % mesh.shape[axis]:
            parts[p.quant_axis] = None
        spec = P(*parts)
    return spec


def cache_shardings(cfg: Qwen2MoeConfig, mesh: Mesh, batch: int | None = None) -> KVCache:
    """A ``KVCache`` of NamedShardings: each layer's keys and values with the batch over ``data`` and the KV
    heads over ``tensor`` when they divide. The same for every batch size (``batch`` is accepted for callers
    that pass it); a batch that does not divide by the data axis is refused by ``check_batch`` or placing the
    arrays."""
    kv = NamedSharding(mesh, logical_spec(cfg, mesh, ("batch", "kv_heads", None, None),
                                          (mesh.shape["data"], cfg.num_key_value_heads, 1, cfg.head_dim)))
    layers = (kv,) * cfg.num_hidden_layers
    return KVCache(k=layers, v=layers, valid=NamedSharding(mesh, P("data", None)), index=NamedSharding(mesh, P()))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """For ``[B, ...]`` arrays (input ids, masks, positions, logits, generated tokens): batch over ``data``."""
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(mesh: Mesh, batch: int) -> None:
    """A one-line InputError unless ``batch`` divides by the mesh's data axis."""
    n = mesh.shape["data"]
    if batch % n:
        raise InputError(f"batch size {batch} is not divisible by the mesh's data axis ({n}); use a batch that is "
                         f"a multiple of {n} (pad with extra prompts) or a mesh with a smaller data axis")


def shard_model(model, mesh: Mesh):
    """Moves an existing model's parameters (e.g. from ``init_random``) into the mesh's shardings, in place,
    and sets ``model.mesh``; returns the model."""
    shardings = param_shardings(model.config, mesh)
    state = nnx.state(model)
    tree = nnx.to_pure_dict(state)
    placed = []
    for path, sharding in shardings.items():
        host = np.asarray(lookup(tree, path))
        # From a host copy, so that it works with devices of other processes too (each process its own blocks).
        placed.append((path, jax.make_array_from_callback(host.shape, sharding, lambda idx, host=host: host[idx])))
    nnx.replace_by_pure_dict(state, nest(placed))
    nnx.update(model, state)
    model.mesh = mesh
    return model


def per_device_bytes(tree) -> dict[int, int]:
    """Bytes held by each addressable device across the arrays of ``tree`` (from ``addressable_shards``)."""
    out: dict[int, int] = {}
    for a in jax.tree.leaves(tree):
        for s in a.addressable_shards:
            out[s.device.id] = out.get(s.device.id, 0) + s.data.nbytes
    return out


def to_host(x) -> np.ndarray:
    """The whole of ``x`` as a numpy array on this host; under a multi-host mesh, gathered from the other
    processes' devices (every process must call it)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
