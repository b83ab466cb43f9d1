"""What each CPU optimisation of docs/performance.md gained, measured in one process with the variants taking
turns (so that a change in the machine's load hits them all): one decode step at batch 1 and 8 (the jitted
forward of one token against a 256-slot cache), the prefill of a 512-token prompt as generate runs it (the
forward with last-position logits, into a KV cache), and the lm_head product of a batch-8 step.

    python scripts/bench_ablation.py [--config qwen2-57b-a14b-quarter] [--rounds 7]

Variants, each adding one change to the previous:
  before        the MoE dispatch as first written (gather for <= 2 tokens, loop to 256, dense beyond), the layer
                weights sliced by the scan, the prefill into a cache of generate's full length (1024 slots)
  dispatch      the measured dispatch (loop to 8 tokens, grouped blocks beyond), expert stacks whole in the scan
  per-layer     the layers unrolled on per-layer arrays (views of the stacks); the experts still sliced
  expert views  each expert an array of its own (a view), applied by a lax.switch branch
  prompt cache  prefill only: into a cache as long as the prompt, grown afterwards (attention over 512 slots)
  last blocks   prefill only: an expert's last grouped block cut to 32 rows where its pairs fit, instead of a
                whole block of 64 (``moe.group_step``); every variant before it pads whole blocks
lm_head: the [8, 896] rows times the weight kept as a [896, vocab] kernel, or as HF's [vocab, 896].
"""

import argparse
import contextlib
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen2_jax import moe
from qwen2_jax.cache import KVCache
from qwen2_jax.config import load_config
from qwen2_jax.model import init_random

VARIANTS = ("before", "dispatch", "per-layer", "expert views", "prompt cache", "last blocks")


@contextlib.contextmanager
def whole_blocks(on: bool):
    """Traces ``grouped`` as it was before ``moe.group_step``: every block padded to the whole block."""
    step = moe.group_step
    if on:
        moe.group_step = lambda block: block
    try:
        yield
    finally:
        moe.group_step = step


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
    views = model.model.layers.per_layer_params()
    sliced = tuple(p[:4] + (None,) for p in views)  # the same per-layer arrays without the per-expert ones
    rng = np.random.default_rng(0)

    def forward_fn(batch, tokens, slots, impl, stacked, layer_params, padded=True):
        @jax.jit
        def run(params, layer_params, cache, ids):
            out = nnx.merge(graphdef, params).forward(ids, cache=cache, last_only=True, moe_impl=impl,
                                                      stacked_experts=stacked, layer_params=layer_params)
            return out.logits, out.cache

        cache = KVCache.create(cfg, batch, slots)
        if tokens == 1:  # a decode step after a 128-token prompt
            cache = dataclasses.replace(cache, valid=cache.valid.at[:, :129].set(True), index=jnp.int32(128))
        ids = jnp.asarray(rng.integers(100, cfg.vocab_size, (batch, tokens)), jnp.int32)
        def call():
            with whole_blocks(padded):  # matters only while run traces (its first call)
                return jax.block_until_ready(run(params, layer_params, cache, ids))

        return call

    cases = {}
    for b in (1, 8):
        step = lambda impl, stacked, lp: forward_fn(b, 1, 256, impl, stacked, lp)
        cases[f"decode step, batch {b}"] = {"before": step(before_impl(b), False, None),
                                            "dispatch": step("auto", True, None), "per-layer": step("auto", True, sliced),
                                            "expert views": step("auto", True, views)}
    prefill = lambda slots, impl, stacked, lp, padded=True: forward_fn(1, 512, slots, impl, stacked, lp, padded)
    cases["prefill, 512 tokens"] = {"before": prefill(1024, before_impl(512), False, None),
                                    "dispatch": prefill(1024, "auto", True, None),
                                    "per-layer": prefill(1024, "auto", True, sliced),
                                    "expert views": prefill(1024, "auto", True, views),
                                    "prompt cache": prefill(512, "auto", True, views),
                                    "last blocks": prefill(512, "auto", True, views, padded=False)}
    x = jnp.asarray(rng.standard_normal((8, cfg.hidden_size)), jnp.float32)
    weight = model.lm_head.weight[...]
    kernel = jnp.asarray(np.ascontiguousarray(np.asarray(weight).T))
    matmul = jax.jit(lambda x, w, spec: jnp.einsum(spec, x, w), static_argnums=2)
    lm_head = {"[hidden, vocab] kernel": lambda: matmul(x, kernel, "bh,hv->bv").block_until_ready(),
               "[vocab, hidden] weight": lambda: matmul(x, weight, "bh,vh->bv").block_until_ready()}
    all_cases = {**cases, "lm_head, batch 8": lm_head}
    for variants in all_cases.values():
        for fn in variants.values():
            fn()  # compile
    times = {(c, v): [] for c, variants in all_cases.items() for v in variants}
    for _ in range(args.rounds):
        for c, variants in all_cases.items():
            for v, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[c, v].append(time.perf_counter() - t0)
    ms = {key: 1e3 * statistics.median(t) for key, t in times.items()}
    print(f"{args.config}, float32, jax {jax.__version__}, {args.rounds} interleaved rounds (medians), "
          f"load average {open('/proc/loadavg').read().split()[0]}")
    print("| measure | " + " | ".join(f"{v} (ms)" for v in VARIANTS) + " | total gain |")
    print("|---|" + "---:|" * (len(VARIANTS) + 1))
    for c, variants in cases.items():
        first, last = ms[c, "before"], ms[c, list(variants)[-1]]
        cells = [f"{ms[c, v]:.0f}" + (f" ({ms[c, prev]/ms[c, v]:.2f}x)" if prev else "") if v in variants else "-"
                 for prev, v in zip((None,) + VARIANTS, VARIANTS)]
        print(f"| {c} | " + " | ".join(cells) + f" | **{first / last:.2f}x** |")
    a, b = (ms["lm_head, batch 8", v] for v in lm_head)
    print(f"\nlm_head, batch 8: {list(lm_head)[0]} {a:.1f} ms, {list(lm_head)[1]} {b:.1f} ms ({a / b:.2f}x)")


if __name__ == "__main__":
    main()
