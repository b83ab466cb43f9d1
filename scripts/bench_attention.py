"""A decode step's attention over a long cache on this machine: one pass over every slot, against a loop over the
filled blocks only (what ``qwen2_jax.model.attention`` chooses between; docs/long-context.md).

    python scripts/bench_attention.py                                   # quarter-config heads, 32K slots
    python scripts/bench_attention.py --slots 4096 --filled 512,3000 --repeats 2     # seconds (the tests)

One layer: one token's query against keys ``[1, Hkv, S, D]`` and values ``[1, Hkv, D, S]`` (float32), of which
the first ``--filled`` slots hold tokens; median of ``--repeats`` calls after a warm-up.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen2_jax.model.attention import attention  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--slots", type=int, default=32768)
    ap.add_argument("--filled", default="2048,8192,16384,30000")
    ap.add_argument("--heads", default="14,2", help="query and KV heads (default: the quarter config's)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    hq, hkv = (int(h) for h in args.heads.split(","))
    s, d = args.slots, args.head_dim
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 1, hq, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, hkv, s, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, hkv, d, s)), jnp.float32)
    one_pass = jax.jit(lambda q, k, v, valid, start: attention(q, k, v, valid, start))
    loop = jax.jit(lambda q, k, v, valid, start: attention(q, k, v, valid, start, upto=start + 1, loop_below=1.0))
    print(f"{jax.default_backend()}: one token, {hq}/{hkv} heads of {d}, {s} slots, float32, one layer")
    print("| filled slots | one pass (ms) | filled blocks (ms) |\n|---:|---:|---:|")
    for filled in (int(f) for f in args.filled.split(",")):
        valid, start = jnp.asarray(np.arange(s)[None] < filled), jnp.int32(filled - 1)
        times = {}
        for name, fn in (("one pass", one_pass), ("filled blocks", loop)):
            fn(q, k, v, valid, start).block_until_ready()
            runs = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn(q, k, v, valid, start).block_until_ready()
                runs.append(time.perf_counter() - t0)
            times[name] = 1e3 * float(np.median(runs))
        print(f"| {filled:,} | {times['one pass']:.2f} | {times['filled blocks']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
