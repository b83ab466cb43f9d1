"""Sharding for qwen2-jax: a device mesh with ``data``, ``expert`` and ``tensor`` axes, the partition rules
for every parameter and cache array (``rules.RULES``, one table), and expert-parallel MoE under ``shard_map``.

    mesh = make_mesh("data=1,expert=4,tensor=2")       # or make_mesh() to use every device as recommended
    model = qwen2_jax.from_pretrained(path, mesh=mesh)  # each device reads only its own blocks

See docs/sharding.md for the recommended meshes and their memory and communication arithmetic.
"""

from qwen2_jax.model.expert_parallel import expert_parallel_moe, shard_map
from .mesh import AXES, add_mesh_argument, default_sizes, describe_mesh, make_mesh, mesh_from_args, parse_spec
from .rules import (RULES, batch_sharding, cache_shardings, check_batch, check_experts, logical_spec,
                    param_shardings, per_device_bytes, replicated, shard_model, to_host)

__all__ = ["AXES", "RULES", "add_mesh_argument", "batch_sharding", "cache_shardings", "check_batch", "check_experts",
           "default_sizes", "describe_mesh", "expert_parallel_moe", "logical_spec", "make_mesh", "mesh_from_args",
           "param_shardings", "parse_spec", "per_device_bytes", "replicated", "shard_map", "shard_model", "to_host"]
