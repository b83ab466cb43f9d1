"""Peak memory of generate's prefill by prompt length on XLA:CPU, each length in a fresh process, for a small
config with the model card's static YaRN (factor 2 over 32,768 positions: 65,536 tokens).

    python scripts/long_context_memory.py                            # 8K, 16K, 32K and 64K tokens
    python scripts/long_context_memory.py --lengths 512,1024 --chunk 256 --layers 1   # seconds (the tests)

Each process builds the model (``init_random``), runs ``generate`` with one new token for one prompt of the
given length, and reports its peak RSS (``ru_maxrss``) and the time; the table adds each length's growth over
the shortest and the bytes of the KV cache that length needs.
"""

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np
import qwen2_jax
from qwen2_jax.model import init_random
args = json.loads(sys.argv[1])
cfg = qwen2_jax.Qwen2MoeConfig(**args["config"])
model = init_random(cfg, seed=0)
prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args["length"]).tolist()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
qwen2_jax.generate(model, [prompt], max_new_tokens=1, eos_token_ids=(), prefill_chunk=args["chunk"])
print(json.dumps({"seconds": time.perf_counter() - t0, "model_rss": before,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

CONFIG = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
              shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, num_experts=4, num_experts_per_tok=2, max_position_embeddings=32768, rope_type="yarn",
              rope_factor=2.0, original_max_position_embeddings=32768)


def main():
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--lengths", default="8192,16384,32768,65535")
    ap.add_argument("--chunk", type=int, default=2048, help="generate's prefill_chunk")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    config = dict(CONFIG, num_hidden_layers=args.layers)
    config["attention_factor"] = 0.1 * __import__("math").log(config["rope_factor"]) + 1.0  # YaRN's default
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(dict(config=config, length=n, chunk=args.chunk))],
                              capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"length {n}: {proc.stderr[-3000:]}")
        rows.append(dict(length=n, **json.loads(proc.stdout.strip().splitlines()[-1])))
    kv = lambda n: 2 * args.layers * config["num_key_value_heads"] * config["head_dim"] * 4 * n
    print(f"small config with YaRN ({args.layers} layers, hidden 64, 4/2 heads of 16, 4 experts), float32, "
          f"prefill chunk {args.chunk}, XLA:CPU")
    print("| prompt tokens | peak RSS (MB) | over the shortest (MB) | its KV cache (MB) | seconds |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['length']:,} | {r['peak_rss'] / 1e6:.0f} | {(r['peak_rss'] - rows[0]['peak_rss']) / 1e6:.0f} | "
              f"{kv(r['length']) / 1e6:.1f} | {r['seconds']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
