"""Decode speed of two checkouts of this project on XLA:CPU, measured in turns, so that a change of layout or
dispatch can be compared with the code before it on the same machine, in the same minutes.

    git worktree add /tmp/before <commit>
    python scripts/compare_checkouts.py /tmp/before . [--rounds 3] [--batches 1,8]
    python scripts/compare_checkouts.py . . --config tiny --rounds 1 --new-tokens 3    # seconds (the tests)

Each measurement is a fresh process that imports ``qwen2_jax`` from one checkout, builds the same random model
(``init_random``, seed 0, float32), and times ``generate`` of ``--new-tokens`` minus ``generate`` of one token
from ``--prompt-len``-token prompts (so the first token is excluded), after a warm-up, and the time to first
token of one ``--prefill-len``-token prompt; the checkouts take turns, ``--rounds`` times, and the table shows
each one's medians in ms.

``--engine-slots N`` times the serving engine's start-up instead (``Engine(..., slots=N).start()``: every step
traced, compiled and run once): per checkout and round, a process with an empty persistent compilation cache,
then a second one that finds it filled, as a second ``qwen2-jax serve`` of the same checkpoint does.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import importlib.util, json, os, sys, time
path = sys.argv[1]
sys.path.insert(0, path)
import qwen2_jax  # from the checkout, not the installed copy
for sub in ("sharding", "convert"):  # installed as qwen2_jax.<sub> from top-level directories
    spec = importlib.util.spec_from_file_location(f"qwen2_jax.{sub}", os.path.join(path, sub, "__init__.py"),
                                                  submodule_search_locations=[os.path.join(path, sub)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
import jax.numpy as jnp
import numpy as np
try:  # the package in layers (0.2.0 on)
    from qwen2_jax.tools.bench import bench_config
    from qwen2_jax.inference.serving.engine import Engine
except ImportError:  # a checkout from before
    from qwen2_jax.bench import bench_config
    from qwen2_jax.engine import Engine
from qwen2_jax.model import init_random
args = json.loads(sys.argv[2])
cfg = bench_config(args["config"])
model = init_random(cfg, dtype=jnp.float32, seed=0)
out = {"module": qwen2_jax.__file__}
if args["engine_slots"]:
    import jax
    jax.config.update("jax_compilation_cache_dir", args["cache_dir"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    engine = Engine(model, slots=args["engine_slots"], max_len=args["engine_max_len"],
                    prefill_chunk=args["engine_prefill_chunk"])
    t0 = time.perf_counter(); engine.start(); out["start"] = time.perf_counter() - t0
    engine.stop()
    print(json.dumps(out))
    sys.exit(0)
for batch in args["batches"]:
    prompts = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, args["prompt_len"])).tolist()
    run = lambda n: qwen2_jax.generate(model, prompts, max_new_tokens=n, eos_token_ids=())
    run(args["new_tokens"]), run(1)  # compile both
    t0 = time.perf_counter(); run(1); one = time.perf_counter() - t0
    t0 = time.perf_counter(); run(args["new_tokens"]); full = time.perf_counter() - t0
    out[str(batch)] = 1e3 * (full - one) / (args["new_tokens"] - 1)
if args["prefill_len"]:  # time to first token: a prompt's prefill and its first token
    prompt = np.random.default_rng(7).integers(0, cfg.vocab_size, (1, args["prefill_len"])).tolist()
    qwen2_jax.generate(model, prompt, max_new_tokens=1, eos_token_ids=())
    t0 = time.perf_counter(); qwen2_jax.generate(model, prompt, max_new_tokens=1, eos_token_ids=())
    out["ttft"] = 1e3 * (time.perf_counter() - t0)
print(json.dumps(out))
"""


def measure(checkout: str, args, cache_dir: str | None = None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    settings = json.dumps(dict(config=args.config, batches=args.batches, prompt_len=args.prompt_len,
                               new_tokens=args.new_tokens, prefill_len=args.prefill_len,
                               engine_slots=args.engine_slots, engine_max_len=args.engine_max_len,
                               engine_prefill_chunk=args.engine_prefill_chunk, cache_dir=cache_dir))
    proc = subprocess.run([sys.executable, "-c", CHILD, os.path.abspath(checkout), settings], capture_output=True,
                          text=True, env=env, cwd=os.path.abspath(checkout))
    if proc.returncode:
        sys.exit(f"{checkout}: the measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--config", default="qwen2-57b-a14b-quarter", help="an embedded config, 'tiny', or a config.json")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=33)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefill-len", type=int, default=512, help="prompt of the time to first token (0: none)")
    ap.add_argument("--engine-slots", type=int, default=0,
                    help="time the serving engine's start-up with this many slots instead")
    ap.add_argument("--engine-max-len", type=int, default=128, help="the engine's max_len (prefill chunk: up to 512)")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.engine_prefill_chunk = min(512, args.engine_max_len)
    if args.engine_slots:
        from qwen2_jax.tools.bench import bench_config
        from qwen2_jax.inference.serving.engine import check_settings
        from qwen2_jax.errors import InputError
        try:  # the engine's own checks, before any process starts
            check_settings(bench_config(args.config).context_length, max_num_seqs=args.engine_slots,
                           max_model_len=args.engine_max_len, max_num_batched_tokens=args.engine_prefill_chunk,
                           max_waiting=0)
        except InputError as e:
            ap.error(str(e))
        return engine_start(args)
    runs = {"before": [], "after": []}
    for r in range(args.rounds):
        for side in ("before", "after"):
            runs[side].append(measure(getattr(args, side), args))
            print(f"round {r + 1}: {side}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in runs[side][-1].items()
                                                          if k != "module"), file=sys.stderr, flush=True)
    print(f"{args.config}, float32, decode step (ms, median of {args.rounds} alternating rounds), "
          f"{args.prompt_len}-token prompts")
    print("| batch | before | after | after / before |\n|---:|---:|---:|---:|")
    for b in args.batches:
        before = statistics.median(r[str(b)] for r in runs["before"])
        after = statistics.median(r[str(b)] for r in runs["after"])
        print(f"| {b} | {before:.1f} | {after:.1f} | {after / before:.2f} |")
    if args.prefill_len:
        before, after = (statistics.median(r["ttft"] for r in runs[side]) for side in ("before", "after"))
        print(f"time to first token, {args.prefill_len}-token prompt (ms): before {before:.0f}, after {after:.0f}, "
              f"after / before {after / before:.2f}")


def engine_start(args) -> None:
    runs = {(side, cache): [] for side in ("before", "after") for cache in ("empty", "filled")}
    for r in range(args.rounds):
        for side in ("before", "after"):
            with tempfile.TemporaryDirectory(prefix="qwen2-jax-cache-") as cache_dir:
                for cache in ("empty", "filled"):
                    runs[side, cache].append(measure(getattr(args, side), args, cache_dir)["start"])
                    print(f"round {r + 1}: {side}, compilation cache {cache}: start-up {runs[side, cache][-1]:.1f} s",
                          file=sys.stderr, flush=True)
    print(f"{args.config}, float32, serving engine start-up (s, median of {args.rounds} alternating rounds), "
          f"{args.engine_slots} slots x {args.engine_max_len} positions")
    print("| compilation cache | before | after | after / before |\n|---|---:|---:|---:|")
    for cache in ("empty", "filled"):
        before, after = (statistics.median(runs[side, cache]) for side in ("before", "after"))
        print(f"| {cache} | {before:.1f} | {after:.1f} | {after / before:.2f} |")


if __name__ == "__main__":
    main()
