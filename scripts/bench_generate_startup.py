"""Start-up of ``qwen2-jax generate``: a first run with an empty compilation cache, then a second one.

    python scripts/bench_generate_startup.py CKPT [--runs 2] [-- extra generate flags]
    python scripts/bench_generate_startup.py --tiny  # the demo's small random checkpoint, 4 tokens (CI)

Each run is a fresh process with ``QWEN2_JAX_CACHE_DIR`` pointing at a new, initially empty, directory (the
persistent compilation cache that ``qwen2-jax`` turns on). Reported per run: seconds from the process start to
the first byte of generated text on stdout (start-up: imports, loading, compiling or reading the compiled
prefill from the cache, prefill), the whole run's wall time, and the command's own line of figures (time to
first token measured inside, tokens/s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time


def main():
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("checkpoint", nargs="?", help="checkpoint directory (not with --tiny)")
    parser.add_argument("--tiny", action="store_true",
                        help="build the demo's small random-weight checkpoint with the real tokenizer "
                             "(qwen2_jax.tools.demo.build) in a temporary directory and generate 4 tokens from it")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--prompt", default="Give me a short introduction to large language models.")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # more flags for qwen2-jax generate
    args = parser.parse_args(argv[:len(argv) - len(extra)] if extra else [a for a in argv if a != "--"])
    if (args.checkpoint is None) == (not args.tiny):
        parser.error("give a checkpoint directory or --tiny (not both)")
    work = tempfile.mkdtemp(prefix="bench-generate-startup-")
    cache = os.path.join(work, "jax-cache")
    os.mkdir(cache)
    try:
        checkpoint = args.checkpoint
        if args.tiny:
            from qwen2_jax.tools.demo import build

            checkpoint = build(os.path.join(work, "tiny-checkpoint"))
            extra = ["--max-new-tokens", "4", *extra]
        command = [sys.executable, "-m", "qwen2_jax.cli", "generate", checkpoint, "--prompt", args.prompt, *extra]
        print("$ QWEN2_JAX_CACHE_DIR=<new empty dir> python " + " ".join(command[1:]))
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
            figures = [line for line in err.decode().splitlines() if line.startswith(("loaded", "prompt"))]
            print(f"run {run}: first text {first:.1f} s after start, wall {wall:.1f} s; " + "; ".join(figures),
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
