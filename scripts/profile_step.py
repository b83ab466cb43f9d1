"""Where a jitted forward's time goes on XLA:CPU: a `jax.profiler` trace of generation's forward (the experts
as per-expert views, into a KV cache), summed by kind of XLA operation; the sections of docs/performance.md
"Where the time goes now" come from it.

    python scripts/profile_step.py --batch 1 --tokens 1      # a decode step against a 256-slot cache
    python scripts/profile_step.py --batch 8 --tokens 1
    python scripts/profile_step.py --batch 1 --tokens 512    # a prefill into a prompt-length cache

Rows: the expert dispatch loops (``while`` thunks, with everything inside them), the largest single matmul
(lm_head, for a decode step), and every other operation kind outside the loops (``ynn_fusion``: matmuls).
"""

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen2_jax.model.cache import KVCache
from qwen2_jax.tools.bench import bench_config
from qwen2_jax.model.views import expert_views
from qwen2_jax.model import init_random


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="qwen2-57b-a14b-quarter", help="an embedded config, 'tiny', or a config.json")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=1, help="1: a decode step after a 128-token prompt")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--no-views", action="store_true", help="the experts' stacks instead of per-expert views")
    args = ap.parse_args()
    cfg = bench_config(args.config)
    model = init_random(cfg, dtype=jnp.float32)
    graphdef, params = nnx.split(model)
    views = None if args.no_views else expert_views(model)
    b, t = args.batch, args.tokens
    ids = jnp.asarray(np.random.default_rng(0).integers(100, cfg.vocab_size, (b, t)), jnp.int32)

    @jax.jit
    def forward(params, views, ids):
        cache = KVCache.create(cfg, b, 256 if t == 1 else t)
        if t == 1:
            cache = dataclasses.replace(cache, valid=cache.valid.at[:, :129].set(True), index=jnp.int32(128))
        out = nnx.merge(graphdef, params).forward(ids, cache=cache, last_only=True, platform="cpu",
                                                  expert_views=views)
        return out.logits, out.cache

    for _ in range(2):
        jax.block_until_ready(forward(params, views, ids))
    trace_dir = tempfile.mkdtemp(prefix="qwen2-jax-profile-")
    jax.profiler.start_trace(trace_dir)
    t0 = time.perf_counter()
    for _ in range(args.calls):
        jax.block_until_ready(forward(params, views, ids))
    per_call = (time.perf_counter() - t0) / args.calls
    jax.profiler.stop_trace()
    events = json.load(gzip.open(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]))["traceEvents"]
    timed = [e for e in events if e.get("ph") == "X" and "dur" in e]
    loops = sorted((e["ts"], e["ts"] + e["dur"]) for e in timed if e["name"].startswith("while"))
    inside = lambda e: any(start <= e["ts"] and e["ts"] + e["dur"] <= end for start, end in loops)
    kinds, largest = collections.Counter(), 0.0
    for e in timed:
        name = e["name"]
        if name.startswith(("while", "cond", "Thunk", "$", "Slinky", "end:", "PjitFunction", "ParseArguments")):
            continue
        if not inside(e):
            kinds[re.sub(r"[.\d]+(\.clone)?$", "", name)] += e["dur"] / 1e3 / args.calls
            if name.startswith("ynn_fusion"):
                largest = max(largest, e["dur"] / 1e3)
    loop_ms = sum(end - start for start, end in loops) / 1e3 / args.calls
    print(f"{args.config}, batch {b}, {t} token(s), {'stacked experts' if views is None else 'per-expert views'}, "
          f"jax {jax.__version__}, under the profiler {1e3 * per_call:.1f} ms "
          f"a call, load average {open('/proc/loadavg').read().split()[0]}")
    print(f"  {loop_ms:8.1f} ms  expert dispatch loops (everything inside them)")
    print(f"  {largest:8.1f} ms  the largest single matmul outside them (lm_head in a decode step)")
    for kind, ms in kinds.most_common(8):
        print(f"  {ms:8.1f} ms  {kind} (outside the loops)")


if __name__ == "__main__":
    main()
