"""Times each MoE dispatch implementation on one layer of the quarter config (64 experts, top-8, hidden 896,
expert size 640) across token counts, and prints the markdown table kept in docs/moe-dispatch.md.

    python scripts/bench_moe_dispatch.py [--dtype float32] [--tokens 1,8,64,512] [--repeats 20]
    python scripts/bench_moe_dispatch.py --per-expert --impls loop --blocks 1,2,4,8,16,32,64,128
    python scripts/bench_moe_dispatch.py --per-expert --impls grouped --blocks 64:64,64:32,64:16 --tokens 512

``--per-expert`` gives the experts as per-expert arrays (views of the stacks, as generation does on XLA:CPU),
which only ``loop`` and ``grouped`` take; ``--blocks`` adds a ``grouped`` column per block size (sizes far
from the mean pairs per expert, below an eighth of it or above twice it, are skipped), ``B:S`` one with
an expert's last block cut to a multiple of ``S`` rows (``moe.group_step``'s choice without it).
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax.model import moe, views
from qwen2_jax.tools.bench import bench_config

QUARTER = "qwen2-57b-a14b-quarter"  # embedded; a path to a config.json works too


def time_fn(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def computed_rows(sizes, block: int, step: int) -> int:
    """Rows ``grouped`` multiplies for experts with ``sizes`` pairs: whole blocks, the last cut to ``step``."""
    full, rest = np.divmod(sizes, block)
    return int((full * block + -(-rest // step) * step).sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=QUARTER, help="an embedded config, 'tiny', or a config.json")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64,128,256,512,2048")
    ap.add_argument("--impls", default=",".join(moe.IMPLEMENTATIONS))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--per-expert", action="store_true")
    ap.add_argument("--blocks", default="", help="grouped block sizes to time, e.g. 1,2,4,8 or 64:32 (block:step)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cfg = bench_config(args.config)
    dtype = jnp.dtype(args.dtype)
    e, h, i, k = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    key = jax.random.split(jax.random.key(0), 4)
    gate_up = (jax.random.normal(key[0], (e, 2, i, h)) * 0.02).astype(dtype)  # [E, 2, out, in], as the model stacks them
    down = (jax.random.normal(key[2], (e, h, i)) * 0.02).astype(dtype)
    if args.per_expert:
        gate_up, down = (views.slices(w) for w in (gate_up, down))
    blocks = [b for b in args.blocks.split(",") if b]
    impls = args.impls.split(",") + [f"grouped/{b}" for b in blocks]
    rows, routing = [], []
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} dtype={args.dtype} "
          f"E={e} top_k={k} H={h} I={i}")
    print("| tokens | " + " | ".join(f"{m} (ms)" for m in impls) + " | fastest | auto picks |")
    print("|---:|" + "---:|" * len(impls) + "---|---|")
    for t in (int(s) for s in args.tokens.split(",")):
        x = jax.random.normal(jax.random.fold_in(key[3], t), (t, h), dtype)
        probs = jax.nn.softmax(jax.random.normal(jax.random.fold_in(key[3], 100000 + t), (t, e)), -1)
        w, idx = jax.lax.top_k(probs, k)
        w = w.astype(dtype)
        ms = {}
        mean = t * k / e
        for m in impls:
            block, step = (int(n) for n in (m.split("/")[1] + ":0").split(":")[:2]) if "/" in m else (None, 0)
            if (m == "gather" and 3 * t * k * h * i * dtype.itemsize > 2e9) or (
                    block and not mean / 8 <= block <= max(2, 2 * mean)):
                ms[m] = float("nan")  # gather: it would materialise over 2 GB of gathered weights
                continue
            if block:
                fn = jax.jit(lambda x, w, idx, gu, d, b=block, s=step or None:
                             moe.grouped(x, w, idx, gu, d, block=b, step=s))
            else:
                fn = jax.jit(lambda *a, m=m: moe.dispatch(*a, impl=m))
            ms[m] = 1e3 * time_fn(fn, (x, w, idx, gate_up, down), args.repeats)
        best = min((m for m in ms if ms[m] == ms[m]), key=ms.get)
        auto = moe.choose(t, k, e, jax.default_backend(), per_expert=args.per_expert)
        if auto == "grouped":
            block = moe.group_block(t, k, e, minimum=2 if args.per_expert else 8)
            auto += f"/{block}:{moe.group_step(block)}"
        rows.append({"tokens": t, **ms, "fastest": best, "auto": auto})
        print(f"| {t} | " + " | ".join(f"{ms[m]:.2f}" for m in impls) + f" | {best} | {auto} |", flush=True)
        sizes = np.bincount(np.asarray(idx).reshape(-1), minlength=e)
        routing.append(f"{t} tokens: {t * k} pairs, {sizes.min()} to {sizes.max()} per expert; rows computed with "
                       + ", ".join(f"{b}:{s} blocks {computed_rows(sizes, int(b), int(s))}"
                                   for b, s in (m.split("/")[1].split(":") for m in impls if ":" in m)))
    print("\n".join(["", "routing (rows computed: pairs plus padding):"] + routing))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
