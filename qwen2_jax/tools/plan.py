"""Memory and communication of a mesh, from the partition rules and the compiled program (docs/sharding.md).

    python -m qwen2_jax.tools.plan --devices 8 --mesh expert=2,tensor=4 [--hlo] [--batch 8]

Simulates ``--devices`` CPU devices (so that it runs anywhere) and reports, for the model of ``--config``
(default: Qwen2-57B-A14B's shapes):

- arithmetic from ``param_shardings``/``cache_shardings``: parameter bytes per device and KV-cache bytes per
  token per device;
- with ``--hlo``: the collectives of one compiled decode step (the SPMD-partitioned HLO of XLA:CPU, abstract
  inputs, nothing allocated), with how often each runs per step and the bytes each device sends under the
  ring algorithm (arithmetic: all-reduce 2(n-1)/n x size, all-gather (n-1)/n x size).
"""

from __future__ import annotations

import argparse
import math
import sys

DTYPE_BYTES = {"bfloat16": 2, "float32": 4}


def weight_bytes(cfg, mesh, itemsize: int) -> dict[str, int]:
    """Parameter bytes under ``param_shardings``: in all, per device, and per device split into the routed
    experts and the rest (attention, shared expert, router, embeddings: read at every decode step)."""
    from qwen2_jax.model.params import iter_params

    from qwen2_jax.sharding.rules import param_shardings

    shardings = param_shardings(cfg, mesh)
    out = dict(total=0, per_device=0, experts_per_device=0)
    for p, shape in iter_params(cfg):
        share = math.prod(shardings[p.path].shard_shape(shape)) * itemsize
        out["total"] += math.prod(shape) * itemsize
        out["per_device"] += share
        if "experts" in p.axes:
            out["experts_per_device"] += share
    return out


def decode_read_bytes(cfg, mesh, itemsize: int, weights: dict[str, int]) -> tuple[float, float]:
    """Weight bytes one device reads in a batch-1 decode step (arithmetic): every non-expert byte it holds,
    plus its slices of the top-k experts of each layer, (expected when the k experts spread evenly over the
    expert shards, worst case when all k are on its shard)."""
    dense = weights["per_device"] - weights["experts_per_device"]
    one_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * itemsize
    per_layer = cfg.num_experts_per_tok * one_expert / mesh.shape["tensor"] * cfg.num_sparse_layers
    return dense + per_layer / mesh.shape["expert"], dense + per_layer


def kv_bytes_per_token(cfg, mesh, itemsize: int) -> tuple[int, int]:
    """(KV-cache bytes per token of one sequence, the share of one device holding that sequence)."""
    from qwen2_jax.sharding.rules import cache_shardings

    rows = mesh.shape["data"]  # one sequence per data shard
    shape = (rows, cfg.num_key_value_heads, 1, cfg.head_dim)  # one layer's keys
    per_layer = cache_shardings(cfg, mesh).k[0].shard_shape(shape)
    total = 2 * cfg.num_hidden_layers * math.prod(shape) * itemsize // rows
    return total, 2 * cfg.num_hidden_layers * math.prod(per_layer) * itemsize


def decode_hlo(cfg, mesh, dtype, batch: int, cache_len: int) -> str:
    """The compiled HLO text of one greedy decode step (``batch`` tokens against ``cache_len`` cache slots)."""
    import jax
    from flax import nnx

    from qwen2_jax.model.cache import KVCache
    from qwen2_jax.model.modeling import abstract_model
    from qwen2_jax.model.params import iter_params, nest

    from qwen2_jax.sharding.rules import batch_sharding, cache_shardings, param_shardings

    model = abstract_model(cfg, dtype=dtype)
    model.mesh = mesh  # so that forward dispatches the experts expert-parallel
    shardings = param_shardings(cfg, mesh)
    tree = nest((p.path, jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[p.path]))
                for p, shape in iter_params(cfg))
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, tree)
    cache = jax.eval_shape(lambda: KVCache.create(cfg, batch, cache_len, dtype))
    cache = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), cache,
                         cache_shardings(cfg, mesh))
    token = jax.ShapeDtypeStruct((batch, 1), jax.numpy.int32, sharding=batch_sharding(mesh))

    def step(state, token, cache):  # a greedy decode step: the next token and the updated cache
        out = nnx.merge(graphdef, state).forward(token, cache=cache)
        return jax.numpy.argmax(out.logits[:, -1], axis=-1), out.cache

    return jax.jit(step, donate_argnums=2).lower(state, token, cache).compile().as_text()


def collectives(hlo: str) -> list[dict]:
    """Each kind of collective in the HLO with its group size, buffer bytes, runs per step (``hlo_cost``) and
    the bytes each device sends per run under the ring algorithm."""
    from . import hlo_cost

    out = []
    for c in hlo_cost.analyze(hlo).collectives:
        n = c["group"]
        factor = {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n, "reduce-scatter": (n - 1),
                  "all-to-all": (n - 1) / n}.get(c["kind"], 1.0)
        out.append(dict(c, sent=factor * c["bytes"]))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, required=True, help="how many devices to plan for (simulated)")
    parser.add_argument("--mesh", default=None, help="mesh spec (default: make_mesh's choice)")
    parser.add_argument("--config", default=None, help="config.json (default: Qwen2-57B-A14B's shapes)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    parser.add_argument("--hbm-gb", type=float, default=None, help="device memory (GB), for the KV-cache capacity")
    parser.add_argument("--hbm-gbs", type=float, default=None, help="device memory bandwidth (GB/s), for the "
                                                                   "memory-bound time of a decode step")
    parser.add_argument("--hlo", action="store_true", help="compile a decode step and list its collectives")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cache-len", type=int, default=1024)
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)
    import jax.numpy as jnp

    from qwen2_jax.model.config import Qwen2MoeConfig

    from qwen2_jax.sharding.mesh import describe_mesh, make_mesh

    cfg = Qwen2MoeConfig.from_json(args.config) if args.config else Qwen2MoeConfig()
    mesh = make_mesh(args.mesh, cfg=cfg)
    itemsize = DTYPE_BYTES[args.dtype]
    weights = weight_bytes(cfg, mesh, itemsize)
    total, per_device = weights["total"], weights["per_device"]
    kv_total, kv_device = kv_bytes_per_token(cfg, mesh, itemsize)
    expected, worst = decode_read_bytes(cfg, mesh, itemsize, weights)
    print(f"{describe_mesh(mesh)}, {args.dtype}")
    print(f"weights: {total / 1e9:.2f} GB in all, {per_device / 1e9:.2f} GB per device "
          f"({per_device / (total / mesh.size):.2f} x total/devices; routed experts "
          f"{weights['experts_per_device'] / 1e9:.2f} GB, the rest {(per_device - weights['experts_per_device']) / 1e9:.2f} GB)")
    print(f"weights read per batch-1 decode step: {expected / 1e9:.2f} GB per device with the top-k experts spread "
          f"evenly over the expert shards, {worst / 1e9:.2f} GB when they all fall on one shard")
    if args.hbm_gbs:
        print(f"  at {args.hbm_gbs:g} GB/s: {expected / args.hbm_gbs / 1e6:.2f} ms (spread) to "
              f"{worst / args.hbm_gbs / 1e6:.2f} ms (one shard), the memory-bound floor of a batch-1 step")
    print(f"KV cache per token: {kv_total:,} bytes per sequence, {kv_device:,} bytes on each device holding it")
    if args.hbm_gb:
        free = args.hbm_gb * 1e9 - per_device
        rows = mesh.shape["data"]
        print(f"with {args.hbm_gb:g} GB per device: {free / 1e9:.1f} GB left after the weights, "
              f"{max(free, 0) / kv_device:,.0f} cached tokens per data shard "
              f"({rows} shard{'s' if rows > 1 else ''}), before activations and workspace")
    if args.hlo:
        dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
        ops = collectives(decode_hlo(cfg, mesh, dtype, args.batch, args.cache_len))
        print(f"decode step, batch {args.batch}: collectives in the compiled HLO (XLA:CPU SPMD partitioner; "
              f"`qwen2-jax aot` compiles for a TPU slice)")
        for c in ops:
            print(f"  {c['kind']:<14} group {c['group']}  x{c['count']:<4g} {c['bytes']:>10,} B buffer, "
                  f"{c['sent']:>12,.0f} B sent per device per run")
        print(f"  total per decode step: {sum(c['count'] for c in ops):g} collectives, "
              f"{sum(c['count'] * c['sent'] for c in ops):,.0f} bytes sent per device (ring arithmetic)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
