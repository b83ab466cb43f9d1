"""A few rows times a weight on XLA:CPU, weight first or weight last (``qwen2_jax.model.matmul.product``), for each
kind of Linear weight of a config: what ``matmul.WEIGHT_FIRST_MAX_ROWS`` is set from (docs/performance.md).

    python scripts/bench_product.py                                       # quarter config, 1 to 512 rows
    python scripts/bench_product.py --config tiny --rows 1,4 --repeats 2  # seconds (the tests)

Each timing is one jitted call that multiplies the rows by that weight of every layer (each layer's own array,
as in the model; lm_head once), float32, median of ``--repeats`` calls after a warm-up.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax.tools.bench import QUARTER, bench_config
from qwen2_jax.model.matmul import WEIGHT_FIRST_MAX_ROWS, product


def weights(cfg) -> dict[str, tuple[tuple[int, int], int]]:
    """Name -> ([out, in], how many: one per layer, lm_head one)."""
    h, d, layers = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    return {"q_proj": ((cfg.num_attention_heads * d, h), layers),
            "k_proj, v_proj": ((cfg.num_key_value_heads * d, h), layers),
            "o_proj": ((h, cfg.num_attention_heads * d), layers),
            "shared_expert gate_proj, up_proj": ((cfg.shared_expert_intermediate_size, h), layers),
            "shared_expert down_proj": ((h, cfg.shared_expert_intermediate_size), layers),
            "lm_head": ((cfg.vocab_size, h), 1)}


def time_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=QUARTER, help=f"an embedded config, 'tiny', or a config.json (default {QUARTER})")
    ap.add_argument("--rows", default="1,2,8,32,64,128,256,512", help="row counts (default 1,2,8,32,64,128,256,512)")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    try:
        row_counts = [int(r) for r in args.rows.split(",")]
    except ValueError:
        ap.error(f"--rows must be comma-separated integers, got {args.rows!r}")
    if any(r < 1 for r in row_counts) or args.repeats < 1:
        ap.error("--rows and --repeats must be >= 1")
    cfg = bench_config(args.config)
    rng = np.random.default_rng(0)
    print(f"{args.config}, float32, jax {jax.__version__} on {jax.default_backend()}, median of {args.repeats} "
          f"calls; WEIGHT_FIRST_MAX_ROWS = {WEIGHT_FIRST_MAX_ROWS}")
    print("| weight [out, in] x count | rows | weight last (ms) | weight first (ms) | first / last |")
    print("|---|---:|---:|---:|---:|")
    for name, ((out, n_in), count) in weights(cfg).items():
        ws = [jnp.asarray(rng.standard_normal((out, n_in), np.float32)) for _ in range(count)]
        for rows in row_counts:
            x = jnp.asarray(rng.standard_normal((rows, n_in), np.float32))
            ms = {}
            for first in (False, True):
                fn = jax.jit(lambda x, ws, first=first: [product(x, w, jnp.float32, weight_first=first) for w in ws])
                ms[first] = time_ms(fn, x, ws, repeats=args.repeats)
            print(f"| {name} [{out}, {n_in}] x {count} | {rows} | {ms[False]:.2f} | {ms[True]:.2f} | "
                  f"{ms[True] / ms[False]:.2f} |", flush=True)
        del ws


if __name__ == "__main__":
    main()
