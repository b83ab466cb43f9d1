"""What each CPU optimisation of docs/performance.md gained, measured in one process with the variants taking
turns (so that a change in the machine's load hits them all): one decode step at batch 1 and 8 (the jitted
forward of one token against a 256-slot cache) and a 512-token prefill (the forward with last-position logits).

    python scripts/bench_ablation.py [--config qwen2-57b-a14b-quarter] [--rounds 7]

Variants, each adding one change to the previous:
  before     the MoE dispatch as first written (gather for <= 2 tokens, loop to 256, dense beyond) and the layer
             weights sliced by the scan
  dispatch   the measured dispatch (loop to 8 tokens, grouped blocks beyond), expert stacks whole in the scan
  per-layer  decode only: the layers unrolled on per-layer copies of their weights (generate's decode loop)
"""

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen2_jax.cache import KVCache
from qwen2_jax.config import load_config
from qwen2_jax.model import init_random


def before_impl(tokens):
    return "gather" if tokens * 8 <= 16 else "loop" if tokens <= 256 else "dense"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="qwen2-57b-a14b-quarter")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    cfg = load_config(args.config)
    model = init_random(cfg, dtype=jnp.float32)
    graphdef, params = nnx.split(model)
    layer_params = model.model.layers.per_layer_params()
    rng = np.random.default_rng(0)

    def decode_fn(batch, impl, stacked, per_layer):
        @jax.jit
        def step(params, layer_params, cache, tokens):
            out = nnx.merge(graphdef, params).forward(
                tokens, cache=cache, positions=jnp.full((batch, 1), 128), moe_impl=impl, stacked_experts=stacked,
                layer_params=layer_params if per_layer else None)
            return out.logits
        cache = KVCache.create(cfg, batch, 256)
        cache = dataclasses.replace(cache, valid=cache.valid.at[:, :129].set(True), index=jnp.int32(128))
        tokens = jnp.asarray(rng.integers(100, cfg.vocab_size, (batch, 1)), jnp.int32)
        return lambda: step(params, layer_params, cache, tokens).block_until_ready()

    def prefill_fn(impl, stacked):
        ids = jnp.asarray(rng.integers(100, cfg.vocab_size, (1, 512)), jnp.int32)
        f = jax.jit(lambda p, ids: nnx.merge(graphdef, p).forward(ids, moe_impl=impl, stacked_experts=stacked,
                                                                   last_only=True).logits)
        return lambda: f(params, ids).block_until_ready()

    cases = {}
    for b in (1, 8):
        cases[f"decode batch {b}"] = {"before": decode_fn(b, before_impl(b), False, False),
                                      "dispatch": decode_fn(b, "auto", True, False),
                                      "per-layer": decode_fn(b, "auto", True, True)}
    cases["prefill 512"] = {"before": prefill_fn(before_impl(512), False), "dispatch": prefill_fn("auto", True)}
    for variants in cases.values():
        for fn in variants.values():
            fn()  # compile
    times = {(c, v): [] for c, variants in cases.items() for v in variants}
    for _ in range(args.rounds):
        for c, variants in cases.items():
            for v, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[c, v].append(time.perf_counter() - t0)
    print(f"{args.config}, float32, jax {jax.__version__}, {args.rounds} interleaved rounds (medians), "
          f"load average {open('/proc/loadavg').read().split()[0]}")
    print("| measure | before (ms) | dispatch (ms, gain over before) | per-layer (ms, gain over before) | total gain |\n|---|---:|---:|---:|---:|")
    for c, variants in cases.items():
        ms = {v: 1e3 * statistics.median(times[c, v]) for v in variants}
        cells = [f"{ms[v]:.0f} ({ms['before'] / ms[v]:.2f}x)" if v in ms else "-" for v in ("dispatch", "per-layer")]
        last = ms.get("per-layer", ms["dispatch"])
        print(f"| {c} | {ms['before']:.0f} | {cells[0]} | {cells[1]} | {ms['before'] / last:.2f}x |")


if __name__ == "__main__":
    main()
