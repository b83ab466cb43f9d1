"""Expert-parallel MoE dispatch under ``shard_map``.

The routed experts are sharded over the ``expert`` axis (and their intermediate dim over ``tensor``, see
``rules.RULES``). Every token is replicated over the expert shards (tokens are split over ``data`` only);
each shard runs its own experts with one of ``qwen2_jax.moe``'s implementations, with the routing ids
remapped to its local slice and the pairs routed to other shards masked out (weight 0), and one ``psum``
over expert x tensor adds the partial results. No expert weight ever leaves its device; what moves is one
``[tokens, hidden]`` all-reduce per MoE layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from qwen2_jax import moe


def shard_map(f, mesh: Mesh, in_specs, out_specs):
    """``jax.shard_map`` (jax >= 0.7) or ``jax.experimental.shard_map.shard_map`` (older), unchecked: the
    dispatch loops carry values that vary over the expert axis, which the replication checker rejects."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy

    return legacy(f, mesh, in_specs, out_specs, check_rep=False)


def expert_parallel_moe(mesh: Mesh, impl: str = "auto"):
    """A callable with the ``Experts`` impl signature ``(x[T,H], weights[T,K], experts[T,K], gate_proj[E,H,I],
    up_proj[E,H,I], down_proj[E,I,H]) -> [T,H]`` running expert-parallel on ``mesh``; ``impl`` is the
    ``qwen2_jax.moe`` implementation each shard runs on its local experts ("auto" chooses per shard)."""
    n_expert, n_tensor, n_data = mesh.shape["expert"], mesh.shape["tensor"], mesh.shape["data"]

    def run(x, weights, experts, gate_proj, up_proj, down_proj):
        num_experts, _, inner = gate_proj.shape
        if num_experts % n_expert:
            raise ValueError(f"num_experts={num_experts} is not divisible by the mesh's expert axis ({n_expert})")
        # The same layouts as rules.logical_spec gives the weights, so that shard_map moves nothing.
        tokens = "data" if n_data > 1 and x.shape[0] % n_data == 0 else None
        mlp = "tensor" if n_tensor > 1 and inner % n_tensor == 0 else None
        reduce_over = ("expert", "tensor") if mlp else ("expert",)

        def local(x, weights, experts, gate_proj, up_proj, down_proj):
            n_local = gate_proj.shape[0]
            here = moe.choose(x.shape[0], experts.shape[1], n_local) if impl == "auto" else impl
            ids = experts - jax.lax.axis_index("expert") * n_local
            mine = (ids >= 0) & (ids < n_local)
            # Pairs routed to other shards get weight 0 and the id one past the last local expert, which the
            # dense, loop and ragged dispatches skip (no work); gather reads a weight for every pair, so
            # there they point at local expert 0 instead (weight 0: they add exactly nothing).
            elsewhere = 0 if here == "gather" else n_local
            out = moe.dispatch(x, jnp.where(mine, weights, 0), jnp.where(mine, ids, elsewhere),
                               gate_proj, up_proj, down_proj, impl=here)
            return jax.lax.psum(out, reduce_over)

        t = P(tokens)
        return shard_map(local, mesh,
                         in_specs=(t, t, t, P("expert", None, mlp), P("expert", None, mlp), P("expert", mlp, None)),
                         out_specs=t)(x, weights, experts, gate_proj, up_proj, down_proj)

    return run
