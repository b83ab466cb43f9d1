"""Time to first token of a conversation's next turn with its earlier turn in the engine's prefix cache, against a
prompt of the same length with nothing cached.

    python scripts/bench_prefix_cache.py [--config qwen2-57b-a14b-quarter] [--context 1024] [--answer 32]
        [--new 32] [--repeats 3] [--max-len 2048] [--prefill-chunk 512]
    python scripts/bench_prefix_cache.py --config tiny --context 48 --new 8 --answer 4 --repeats 1 --max-len 128

One ``qwen2_jax.engine.Engine`` (float32, the config's random checkpoint, seed 0, 2 slots). Each repeat, with the
engine otherwise idle: a first turn of ``--context`` random prompt tokens answered with ``--answer`` tokens
(greedy); the next turn, that prompt and answer followed by ``--new`` tokens, timed from submission to its first
token; then a prompt of the same length sharing nothing with anything sent before, timed the same way. Reported:
the best and median of each, and the tokens the next turn found cached.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qwen2_jax  # noqa: E402
from qwen2_jax.bench import QUARTER, bench_config, random_checkpoint  # noqa: E402
from qwen2_jax.engine import Engine, Request, SamplingParams, check_settings  # noqa: E402
from qwen2_jax.errors import InputError  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--config", default=QUARTER, help=f"'tiny', {QUARTER!r} or a config.json (default: quarter)")
    p.add_argument("--context", type=int, default=1024, help="the first turn's prompt tokens (default 1024)")
    p.add_argument("--answer", type=int, default=32, help="the first turn's answer tokens (default 32)")
    p.add_argument("--new", type=int, default=32, help="tokens the next turn adds (default 32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-len", type=int, default=2048, help="the engine's --max-len (default 2048)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="the engine's --prefill-chunk (default 512)")
    p.add_argument("--work-dir", help="where the random checkpoint is written (default ~/.cache/qwen2-jax/bench)")
    args = p.parse_args()
    for flag in ("context", "answer", "new", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if (need := args.context + args.answer + args.new + 1) > args.max_len:
        p.error(f"--context {args.context} + --answer {args.answer} + --new {args.new} + 1 (the token asked for) = "
                f"{need} exceeds --max-len {args.max_len}")

    cfg = bench_config(args.config)
    try:
        check_settings(cfg.context_length, flags=True, slots=2, max_len=args.max_len,
                       prefill_chunk=args.prefill_chunk, max_waiting=0)
    except InputError as e:
        p.error(str(e))
    model = qwen2_jax.from_pretrained(random_checkpoint(cfg, args.work_dir), dtype="float32")
    engine = Engine(model, slots=2, max_len=args.max_len, prefill_chunk=args.prefill_chunk, eos_token_ids=()).start()
    rng = np.random.default_rng(0)
    fresh = lambda n: rng.integers(100, cfg.vocab_size, n).tolist()

    def first_token(prompt, max_tokens=1):
        request = engine.submit(Request(prompt, SamplingParams(max_tokens=max_tokens)))
        tokens, _ = request.result(timeout=3600)
        return tokens, (request.first_token_at - request.submitted) * 1e3, request.cached_tokens

    cached_ms, whole_ms, cached = [], [], set()
    try:
        for _ in range(args.repeats):
            context = fresh(args.context)
            answer, _, _ = first_token(context, args.answer)
            _, ms, n = first_token(context + answer + fresh(args.new))
            cached_ms.append(ms)
            cached.add(n)
            whole_ms.append(first_token(fresh(args.context + args.answer + args.new))[1])
    finally:
        engine.stop()
    length = args.context + args.answer + args.new
    print(f"config {args.config}: next turn of {length} prompt tokens ({args.context} + {args.answer} answered + "
          f"{args.new} new), {args.repeats} repeats, --max-len {args.max_len} --prefill-chunk {args.prefill_chunk}")
    print("| prompt | tokens cached | TTFT best (ms) | TTFT median (ms) |")
    print("|---|---|---|---|")
    print(f"| next turn | {', '.join(map(str, sorted(cached)))} | {min(cached_ms):,.0f} | "
          f"{statistics.median(cached_ms):,.0f} |")
    print(f"| nothing cached | 0 | {min(whole_ms):,.0f} | {statistics.median(whole_ms):,.0f} |")
    print(f"time to first token, median: {statistics.median(whole_ms) / statistics.median(cached_ms):.1f}x shorter "
          "with the prefix cached")


if __name__ == "__main__":
    main()
