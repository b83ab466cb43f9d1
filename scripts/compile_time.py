"""Compile time on XLA:CPU of the quarter config's forward and of generation's decode step, by depth. The
layers run one after another (each owns its weights, see qwen2_jax/model.py), so compile time grows with
depth; ``qwen2-jax aot`` reports the same for an accelerator (docs/accelerators.md). Nothing is allocated:
everything is lowered on abstract arguments.

    python scripts/compile_time.py [--layers 7,28] [--seq 128]     # the forward over --seq tokens
    python scripts/compile_time.py --decode --layers 7,14         # one decode step, as generation runs it
    python scripts/compile_time.py --config tiny --layers 1,2     # a few seconds (what the tests run)

``--decode``: one token against a 256-slot cache, the experts given as per-expert arrays as generation gives
them on XLA:CPU (``qwen2_jax.model.views``).
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen2_jax.tools.bench import bench_config  # noqa: E402
from qwen2_jax.model.cache import KVCache  # noqa: E402
from qwen2_jax.model.modeling import abstract_model  # noqa: E402


def compile_seconds(cfg, batch: int, seq: int, dtype, decode: bool) -> tuple[float, float]:
    """(trace and lower, compile) seconds."""
    model = abstract_model(cfg, dtype=dtype)
    graphdef, params = nnx.split(model)
    ids = jax.ShapeDtypeStruct((batch, 1 if decode else seq), jnp.int32)
    if decode:
        cache = jax.eval_shape(lambda: KVCache.create(cfg, batch, 256, dtype=dtype))
        views = tuple(tuple(tuple(jax.ShapeDtypeStruct(w.shape[1:], w.dtype) for _ in range(w.shape[0]))
                            for w in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj)) if layer.sparse else None
                      for layer in model.model.layers)

        def fn(params, views, cache, ids):
            return nnx.merge(graphdef, params).forward(ids, cache=cache, platform="cpu", expert_views=views).logits

        args = (params, views, cache, ids)
    else:
        def fn(params, ids):
            return nnx.merge(graphdef, params).forward(ids, platform="cpu").logits

        args = (params, ids)
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def main():
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--config", default="qwen2-57b-a14b-quarter", help="an embedded config, 'tiny', or a config.json")
    ap.add_argument("--layers", default="7,28")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--decode", action="store_true", help="generation's decode step instead of the forward")
    args = ap.parse_args()
    base = bench_config(args.config)
    dtype = jnp.dtype(args.dtype)
    print(f"backend={jax.default_backend()} jax={jax.__version__} batch={args.batch} "
          f"{'decode step' if args.decode else f'forward of {args.seq} tokens'} dtype={args.dtype}")
    print("| layers | trace+lower (s) | compile (s) | total (s) |\n|---:|---:|---:|---:|")
    compile_seconds(base.replace(num_hidden_layers=1), args.batch, 8, dtype, args.decode)  # warm JAX up
    totals = {}
    for n in (int(s) for s in args.layers.split(",")):
        lower, comp = compile_seconds(base.replace(num_hidden_layers=n), args.batch, args.seq, dtype, args.decode)
        totals[n] = lower + comp
        print(f"| {n} | {lower:.2f} | {comp:.2f} | {lower + comp:.2f} |", flush=True)
    first, last = min(totals), max(totals)
    print(f"ratio {last} / {first} layers: {totals[last] / totals[first]:.2f}")


if __name__ == "__main__":
    main()
