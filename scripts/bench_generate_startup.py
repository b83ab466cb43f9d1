"""Start-up of ``qwen2-jax generate``: a first run with an empty compilation cache, then a second one.

    python scripts/bench_generate_startup.py CKPT [--runs 2] [--breakdown] [-- extra generate flags]

Each run is a fresh process with ``QWEN2_JAX_CACHE_DIR`` pointing at a new, initially empty, directory (the
persistent compilation cache that ``qwen2-jax`` turns on). Reported per run: seconds from the process start to
the first byte of generated text on stdout (start-up: imports, loading, compiling or reading the compiled
prefill from the cache, prefill), the whole run's wall time, and the command's own line of figures (time to
first token measured inside, tokens/s).

With ``--breakdown``, each run is instead a process that traces and lowers, compiles (or reads from the cache)
and runs the prefill, then the decode loop, greedy, and prints the seconds of each part.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time


def breakdown(checkpoint, prompt):
    """In this process: seconds to trace+lower, compile and run the prefill, and to trace+lower and compile the
    decode loop (what a persistent compilation cache can save)."""
    import importlib

    import jax
    import jax.numpy as jnp

    import qwen2_jax
    from qwen2_jax import cli

    cli.enable_compilation_cache()
    gen = importlib.import_module("qwen2_jax.generate")
    model = qwen2_jax.from_pretrained(checkpoint, dtype="float32")
    ids = qwen2_jax.load_tokenizer(checkpoint).apply_chat_template([{"role": "user", "content": prompt}], tokenize=True)
    b = gen._prepare(model, [ids], max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                     seed=0, eos_token_ids=(), truncate=False)
    args = (b.graphdef, b.params, b.input_ids, b.attention_mask, b.active, b.controls)
    t0 = time.perf_counter()
    lowered = gen._prefill_jit.trace(*args, sampler=b.sampler, max_len=b.max_len, cache_sharding=None).lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    state = jax.block_until_ready(compiled(*args[1:]))  # the graphdef is a static argument
    t3 = time.perf_counter()
    lowered = gen._decode_jit.trace(b.graphdef, b.params, state, b.controls, jnp.int32(64), sampler=b.sampler).lower()
    t4 = time.perf_counter()
    lowered.compile()
    t5 = time.perf_counter()
    print(f"prefill: trace+lower {t1 - t0:.2f} s, compile {t2 - t1:.2f} s, run {t3 - t2:.2f} s; "
          f"decode loop: trace+lower {t4 - t3:.2f} s, compile {t5 - t4:.2f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--prompt", default="Give me a short introduction to large language models.")
    parser.add_argument("--breakdown", action="store_true", help="time trace/compile/run inside instead")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # one --breakdown run
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # more flags for qwen2-jax generate
    args = parser.parse_args(argv[:len(argv) - len(extra)] if extra else [a for a in argv if a != "--"])
    if args.inside:
        return breakdown(args.checkpoint, args.prompt)
    cache = tempfile.mkdtemp(prefix="qwen2-jax-cache-")
    command = [sys.executable, "-m", "qwen2_jax.cli", "generate", args.checkpoint, "--prompt", args.prompt, *extra]
    if args.breakdown:
        command = [sys.executable, __file__, args.checkpoint, "--prompt", args.prompt, "--inside"]
    print("$ QWEN2_JAX_CACHE_DIR=<new empty dir> python " + " ".join(command[1:]))
    try:
        for run in range(1, args.runs + 1):
            start = time.perf_counter()
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                                    env={**os.environ, "QWEN2_JAX_CACHE_DIR": cache})
            head = proc.stdout.read(1)  # blocks until the first generated text arrives
            first = time.perf_counter() - start
            out, err = proc.communicate()
            wall = time.perf_counter() - start
            if proc.returncode:
                sys.exit(err.decode()[-3000:])
            if args.breakdown:
                print(f"run {run}: {(head + out).decode().strip()}", flush=True)
                continue
            figures = [line for line in err.decode().splitlines() if line.startswith(("loaded", "prompt"))]
            print(f"run {run}: first text {first:.1f} s after start, wall {wall:.1f} s; " + "; ".join(figures),
                  flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
