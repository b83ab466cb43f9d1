"""Compile time of the jitted forward for the quarter config at several depths (layers are scanned, so compile
time should not grow with depth). Nothing is allocated: the forward is lowered on abstract parameters.

    python scripts/compile_time.py [--layers 7,28] [--seq 128]
    python scripts/compile_time.py --decode --layers 7,14 --batch 1    # generation's decode step on XLA:CPU
    python scripts/compile_time.py --prefill --layers 7 --seq 512      # generation's prefill on XLA:CPU

``--decode``: one decode step against a 256-slot cache as generation runs it on XLA:CPU, the layers unrolled
on per-layer and per-expert arrays (``layer_params``), which does grow with depth. ``--prefill``: the same
forward over ``--seq`` tokens into a cache as long as the prompt, with the last position's logits.
"""

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from qwen2_jax.cache import KVCache
from qwen2_jax.config import load_config
from qwen2_jax.model import abstract_model

QUARTER = "qwen2-57b-a14b-quarter"  # embedded; a path to a config.json works too


def compile_seconds(cfg, batch, seq, dtype):
    graphdef, params = nnx.split(abstract_model(cfg, dtype=dtype))

    @jax.jit
    def forward(params, ids):
        return nnx.merge(graphdef, params)(ids)

    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    t0 = time.perf_counter()
    lowered = forward.lower(params, ids)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def compile_generation_seconds(cfg, batch, tokens, slots, dtype):
    graphdef, params = nnx.split(abstract_model(cfg, dtype=dtype))
    layer_params = jax.eval_shape(lambda p: nnx.merge(graphdef, p).model.layers.per_layer_params(), params)
    cache = jax.eval_shape(lambda: KVCache.create(cfg, batch, slots, dtype=dtype))

    @jax.jit
    def step(params, layer_params, cache, ids):
        return nnx.merge(graphdef, params).forward(ids, cache=cache, last_only=True, layer_params=layer_params).logits

    ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)
    t0 = time.perf_counter()
    lowered = step.lower(params, layer_params, cache, ids)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=QUARTER)
    ap.add_argument("--layers", default="7,28")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--decoder-sparse-step", type=int, default=None, help="mix dense and sparse layers")
    ap.add_argument("--decode", action="store_true", help="generation's unrolled decode step instead")
    ap.add_argument("--prefill", action="store_true", help="generation's unrolled prefill of --seq tokens instead")
    args = ap.parse_args()
    base = load_config(args.config)
    if args.decoder_sparse_step:
        base = base.replace(decoder_sparse_step=args.decoder_sparse_step)
    print(f"backend={jax.default_backend()} jax={jax.__version__} batch={args.batch} seq={args.seq} dtype={args.dtype} decoder_sparse_step={base.decoder_sparse_step}")
    print("| layers | trace+lower (s) | compile (s) | total (s) |\n|---:|---:|---:|---:|")
    dtype = jnp.dtype(args.dtype)
    if args.decode:
        measure = lambda cfg, seq: compile_generation_seconds(cfg, args.batch, 1, 256, dtype)
    elif args.prefill:
        measure = lambda cfg, seq: compile_generation_seconds(cfg, args.batch, seq, seq, dtype)
    else:
        measure = lambda cfg, seq: compile_seconds(cfg, args.batch, seq, dtype)
    measure(base.replace(num_hidden_layers=1), 8)  # warm JAX up first
    totals = {}
    for n in (int(s) for s in args.layers.split(",")):
        lower, comp = measure(base.replace(num_hidden_layers=n), args.seq)
        totals[n] = lower + comp
        print(f"| {n} | {lower:.2f} | {comp:.2f} | {lower + comp:.2f} |", flush=True)
    first, last = min(totals), max(totals)
    print(f"ratio {last} / {first} layers: {totals[last] / totals[first]:.2f}")


if __name__ == "__main__":
    main()
