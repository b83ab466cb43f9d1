"""Expert-parallel MoE dispatch under ``shard_map``.

The routed experts are sharded over the ``expert`` axis (and their intermediate dim over ``tensor``, see
``rules.RULES``). Every token is replicated over the expert shards (tokens are split over ``data`` only);
each shard runs its own experts with one of ``qwen2_jax.model.moe``'s implementations, with the routing ids
remapped to its local slice and the pairs routed to other shards masked out (weight 0). The shared expert
(its intermediate dim over ``tensor``) runs in the same ``shard_map``: its partial sums, already scaled by
the sigmoid gate, join the experts' on the first expert shard, so that one ``psum`` over expert x tensor adds
everything. No weight ever leaves its device; what moves is one ``[tokens, hidden]`` all-reduce per MoE layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from . import moe
from qwen2_jax.errors import InputError
from .matmul import product
from .quant import QArray


def shard_map(f, mesh: Mesh, in_specs, out_specs):
    """``jax.shard_map`` (jax >= 0.7) or ``jax.experimental.shard_map.shard_map`` (older), unchecked: the
    dispatch loops carry values that vary over the expert axis, which the replication checker rejects."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy

    return legacy(f, mesh, in_specs, out_specs, check_rep=False)


def _weight_spec(mesh: Mesh, w, spec: P):
    """shard_map's spec for a weight: a ``QArray``'s scales split like its values, their blocks axis too where
    the blocks divide (rules.param_shardings places them so); one scale per channel stays whole."""
    if not isinstance(w, QArray):
        return spec
    parts = list(spec) + [None] * (w.ndim - len(spec))
    scale_parts = list(parts)
    axis = parts[w.axis]
    if axis is not None and w.scale.shape[w.axis] % mesh.shape[axis]:
        if w.scale.shape[w.axis] != 1:
            raise InputError(f"quantization blocks: {w.scale.shape[w.axis]} blocks along a weight's inputs do not "
                             f"divide by the mesh's {axis} axis ({mesh.shape[axis]}); choose a block size that does")
        scale_parts[w.axis] = None
    return QArray(P(*parts), P(*scale_parts), w.axis)


def expert_parallel_moe(mesh: Mesh, impl: str = "auto", platform: str | None = None):
    """A callable ``(x[T,H], weights[T,K], experts[T,K], gate_up_proj[E,2,I,H], down_proj[E,H,I], shared=None)
    -> [T,H]`` running the routed experts expert-parallel on ``mesh``, plus, with ``shared =
    (gate[T,1], gate_proj[S,H], up_proj[S,H], down_proj[H,S])``, the shared expert scaled by its gate value;
    ``impl`` is the ``qwen2_jax.model.moe`` implementation each shard runs on its local experts ("auto" chooses per
    shard, for ``platform``, default the mesh's)."""
    platform = moe.canonical_platform(platform or mesh.devices.flat[0].platform)
    n_expert, n_tensor, n_data = mesh.shape["expert"], mesh.shape["tensor"], mesh.shape["data"]

    def run(x, weights, experts, gate_up_proj, down_proj, shared=None):
        num_experts, _, inner, _ = gate_up_proj.shape
        if num_experts % n_expert:
            raise InputError(f"num_experts={num_experts} is not divisible by the mesh's expert axis ({n_expert})")
        # The same layouts as rules.logical_spec gives the weights, so that shard_map moves nothing.
        tokens = "data" if n_data > 1 and x.shape[0] % n_data == 0 else None
        split = lambda n: "tensor" if n_tensor > 1 and n % n_tensor == 0 else None
        mlp = split(inner)
        shared_mlp = split(shared[1].shape[0]) if shared is not None else None
        reduce_over = ("expert", "tensor") if mlp or shared_mlp else ("expert",)

        def local(x, weights, experts, gate_up_proj, down_proj, *shared):
            n_local = gate_up_proj.shape[0]
            here = (moe.choose(x.shape[0], experts.shape[1], n_local, platform,
                               quantized=isinstance(gate_up_proj, QArray)) if impl == "auto" else impl)
            ids = experts - jax.lax.axis_index("expert") * n_local
            mine = (ids >= 0) & (ids < n_local)
            # Pairs routed to other shards get weight 0 and the id one past the last local expert, which the
            # dense, loop and ragged dispatches skip (no work); gather reads a weight for every pair, so
            # there they point at local expert 0 instead (weight 0: they add exactly nothing).
            elsewhere = 0 if here == "gather" else n_local
            out = moe.dispatch(x, jnp.where(mine, weights, 0), jnp.where(mine, ids, elsewhere),
                               gate_up_proj, down_proj, impl=here, platform=platform)
            if "tensor" in reduce_over and not mlp:  # experts whole on every tensor shard: add them once
                out = jnp.where(jax.lax.axis_index("tensor") == 0, out, 0)
            if shared:
                gate, gate_s, up_s, down_s = shared
                mm = lambda a, w: product(a, w, x.dtype, platform)
                part = mm(jax.nn.silu(mm(x, gate_s)) * mm(x, up_s), down_s) * gate  # HF's Qwen2MoeMLP
                first = jax.lax.axis_index("expert") == 0
                if "tensor" in reduce_over and not shared_mlp:
                    first &= jax.lax.axis_index("tensor") == 0
                out = out + jnp.where(first, part, 0).astype(out.dtype)
            return jax.lax.psum(out, reduce_over)

        t = P(tokens)
        ws = lambda w, spec: _weight_spec(mesh, w, spec)
        specs = [t, t, t, ws(gate_up_proj, P("expert", None, mlp, None)), ws(down_proj, P("expert", None, mlp))]
        args = [x, weights, experts, gate_up_proj, down_proj]
        if shared is not None:
            specs += [t, ws(shared[1], P(shared_mlp, None)), ws(shared[2], P(shared_mlp, None)),
                      ws(shared[3], P(None, shared_mlp))]
            args += list(shared)
        return shard_map(local, mesh, in_specs=tuple(specs), out_specs=t)(*args)

    return run
