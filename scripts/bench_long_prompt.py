"""Inter-token latency of short streams while a long prompt arrives and is prefilled beside them (issue 35's
target: "a 30,000-token prompt arriving while 8 short streams decode: their inter-token p99 at most 3x their
median").

    python scripts/bench_long_prompt.py [--config qwen2-57b-a14b-quarter] [--streams 8] [--long-prompt 30000]
        [--max-num-batched-tokens 512 | 128,256,512] [--json F]
    python scripts/bench_long_prompt.py --config tiny --long-prompt 300 --streams 2 --max-num-batched-tokens 64
        --max-model-len 512      # seconds: the tiny mode (tests/test_bench_long_prompt.py)

The real measurement: ``timeout 1500 python scripts/bench_long_prompt.py --json long_prompt.json`` (the quarter
config, 8 streams, a 30,000-token prompt, --max-num-batched-tokens 512).

In-process, no HTTP: one ``Engine`` (float32, the config's random checkpoint, seed 0, written once and reused:
``tools.bench.random_checkpoint``) with ``--max-num-seqs 16``, ``--max-model-len`` (default the config's context,
at most 32,768) and ``--max-num-batched-tokens``; its KV pool (``num_gpu_blocks_override``) holds the long prompt
and its tokens plus every stream at ``--max-model-len``, so nothing is ever preempted. ``--streams`` requests of
``--stream-prompt`` random tokens (greedy, asking for the rest of ``--max-model-len``) are sent at once; once each
has its first token and ``--before`` more, one prompt of ``--long-prompt`` random tokens is sent (asking for
``--long-max-tokens``); once it has its first token and every stream ``--after`` more tokens after that, the streams
are aborted. Each stream's token times are taken in its ``deliver`` callback (the engine's thread, as a client would
get them), and every gap between two consecutive tokens of a stream is one inter-token latency (ITL), counted in
the phase its later token falls in: *before* the long prompt arrives, *during* its prefill (arrival to its first
token), *after*. Reported per phase, over all streams' gaps: count, median, p90, p99 and max; the long prompt's
time to first token and the prefill calls it took (pieces of at most ``--max-num-batched-tokens`` less the decoding
rows, rounded down to a power of two); and three ratios:

- p99 / median over the *during* window (the gaps the long prompt can disturb, against each other);
- p99 / median over the streams' whole lives (before + during + after) - what the target, read literally, names:
  the streams' own p99 against their own median. It depends on how many undisturbed gaps surround the prefill
  (``--before``, ``--after``), so it is reported with them;
- p99 of the *during* window / median *before* it: the stall itself, against the streams' undisturbed pace.

A comma list of ``--max-num-batched-tokens`` runs the same scenario once per value (the model loaded once, an
engine compiled per value). ``--json F`` writes everything (with the date and the load average at the start and
end: a busy machine stretches every gap).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qwen2_jax.errors import InputError  # noqa: E402
from qwen2_jax.tools.bench import QUARTER, bench_config, random_checkpoint  # noqa: E402

MAX_NUM_SEQS = 16
BLOCK_SIZE = 16
TARGET = 3.0  # the bound on p99 / median
PHASES = ("before", "during", "after", "lives")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--config", default=QUARTER, help=f"'tiny', {QUARTER!r} or a config.json (default: quarter)")
    p.add_argument("--streams", type=int, default=8, help="short streams decoding (default 8)")
    p.add_argument("--stream-prompt", type=int, default=32, help="tokens of each stream's prompt (default 32)")
    p.add_argument("--long-prompt", type=int, default=30000, help="tokens of the long prompt (default 30000)")
    p.add_argument("--long-max-tokens", type=int, default=4, help="tokens the long prompt asks for (default 4)")
    p.add_argument("--before", type=int, default=16,
                   help="tokens each stream decodes after its first before the long prompt is sent (default 16)")
    p.add_argument("--after", type=int, default=16,
                   help="tokens each stream decodes after the long prompt's first token (default 16)")
    p.add_argument("--max-num-batched-tokens", default="512",
                   help="the engine's step budget; a comma list runs once per value (default 512)")
    p.add_argument("--max-model-len", type=int, help="the engine's (default: the config's context, at most 32768)")
    p.add_argument("--work-dir", help="where the random checkpoint is written (default ~/.cache/qwen2-jax/bench)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for any one phase (default 3600)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        args.budgets = [int(v) for v in args.max_num_batched_tokens.split(",")]
    except ValueError:
        p.error(f"--max-num-batched-tokens must be integers separated by commas, got {args.max_num_batched_tokens!r}")
    for flag in ("streams", "stream_prompt", "long_prompt", "long_max_tokens", "before", "after"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.streams + 1 > MAX_NUM_SEQS:
        p.error(f"--streams {args.streams} and the long prompt exceed --max-num-seqs {MAX_NUM_SEQS}")
    args.cfg = bench_config(args.config)
    args.max_model_len = args.max_model_len or min(32768, args.cfg.context_length)
    if args.long_prompt + args.long_max_tokens > args.max_model_len:
        p.error(f"--long-prompt {args.long_prompt} + --long-max-tokens {args.long_max_tokens} exceeds "
                f"--max-model-len {args.max_model_len}")
    if args.stream_prompt + args.before + args.after + 2 > args.max_model_len:
        p.error(f"--stream-prompt {args.stream_prompt} leaves no room to decode in --max-model-len {args.max_model_len}")
    from qwen2_jax.inference.serving.engine import check_settings

    try:
        for budget in args.budgets:
            check_settings(args.cfg.context_length, flags=True, max_num_seqs=MAX_NUM_SEQS,
                           max_model_len=args.max_model_len, max_num_batched_tokens=budget, block_size=BLOCK_SIZE)
    except InputError as e:
        p.error(str(e))
    return args


def kv_pages(args) -> int:
    """Pages that hold the long prompt and its tokens, and every stream up to ``--max-model-len``: no preemption."""
    pages = lambda n: -(-n // BLOCK_SIZE)
    return (pages(args.long_prompt + args.long_max_tokens) + args.streams * pages(args.max_model_len)
            + MAX_NUM_SEQS)  # a spare page per slot


def stats_ms(gaps) -> dict:
    """count, median, p90, p99, max of ``gaps`` (seconds) in milliseconds (numpy's linear percentiles)."""
    if not gaps:
        return {"count": 0, "median_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    ms = np.asarray(gaps) * 1e3
    return {"count": len(ms), "median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


def split_gaps(times_per_stream, arrival: float, first: float) -> dict:
    """Each stream's gaps between consecutive tokens, by the phase the later token falls in."""
    phases = {phase: [] for phase in PHASES}
    for times in times_per_stream:
        for prev, now in zip(times, times[1:]):
            phase = "before" if now <= arrival else "during" if now <= first else "after"
            phases[phase].append(now - prev)
            phases["lives"].append(now - prev)
    return phases


def ratio(a, b):
    return None if a is None or not b else a / b


def run_one(model, args, budget: int) -> dict:
    """The scenario on a fresh engine of step budget ``budget``."""
    from qwen2_jax.inference.serving.engine import Engine, Request, SamplingParams

    cfg = args.cfg
    rng = np.random.default_rng(args.seed)
    fresh = lambda n: rng.integers(min(100, cfg.vocab_size // 2), cfg.vocab_size, n).tolist()
    engine = Engine(model, max_num_seqs=MAX_NUM_SEQS, max_model_len=args.max_model_len,
                    max_num_batched_tokens=budget, block_size=BLOCK_SIZE, num_gpu_blocks_override=kv_pages(args),
                    eos_token_ids=())
    print(f"bench_long_prompt: --max-num-batched-tokens {budget}: {engine.summary()}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    engine.start()
    compile_s = time.perf_counter() - started
    print(f"bench_long_prompt: compiled in {compile_s:.1f} s", file=sys.stderr, flush=True)

    pieces = []  # tokens of each piece call (a long prompt's prefill, in pieces)
    prefill_piece = engine.runner.prefill_piece

    def counted_piece(*a, **k):
        out, n = prefill_piece(*a, **k)
        pieces.append(n)
        return out, n

    engine.runner.prefill_piece = counted_piece

    cond = threading.Condition()
    times = [[] for _ in range(args.streams)]
    finish = [None] * args.streams
    long_times, long_finish, long_prefills = [], [None], [None]

    def stream_deliver(i):
        def deliver(tokens, reason):
            now = time.perf_counter()
            with cond:
                times[i].extend([now] * len(tokens))
                finish[i] = reason or finish[i]
                cond.notify_all()
        return deliver

    def long_deliver(tokens, reason):
        now = time.perf_counter()
        with cond:
            if tokens and not long_times:
                long_prefills[0] = engine.prefills
            long_times.extend([now] * len(tokens))
            long_finish[0] = reason or long_finish[0]
            cond.notify_all()

    def wait(what, predicate):
        with cond:
            if not cond.wait_for(lambda: predicate() or engine.error is not None, timeout=args.timeout):
                raise RuntimeError(f"timed out after {args.timeout:.0f} s waiting for {what}")
            if engine.error is not None:
                raise RuntimeError(f"the engine failed: {engine.error!r}")
            ended = [i for i, f in enumerate(finish) if f not in (None, "abort")]
            if ended:
                raise RuntimeError(f"streams {ended} ended ({finish}) before they were aborted: raise --max-model-len")

    try:
        stream_max = args.max_model_len - args.stream_prompt
        streams = [engine.submit(Request(fresh(args.stream_prompt), SamplingParams(max_tokens=stream_max),
                                         deliver=stream_deliver(i))) for i in range(args.streams)]
        wait("the streams' first tokens and --before more", lambda: all(len(t) > args.before for t in times))
        with cond:
            counts_at_arrival = [len(t) for t in times]
            prefills_at_arrival = engine.prefills
        long = engine.submit(Request(fresh(args.long_prompt), SamplingParams(max_tokens=args.long_max_tokens),
                                     deliver=long_deliver))
        wait("the long prompt's first token", lambda: bool(long_times))
        first = long_times[0]
        wait("--after tokens of every stream after the long prompt's first token",
             lambda: all(sum(t > first for t in ts) >= args.after for ts in times))
        for r in streams:
            engine.abort(r)
        wait("the streams' ends and the long prompt's", lambda: all(finish) and long_finish[0] is not None)
    finally:
        engine.stop()
    arrival = long.submitted
    phases = split_gaps(times, arrival, first)
    result = {
        "max_num_batched_tokens": budget,
        "compile_s": compile_s,
        "kv_pages": engine.num_pages,
        "long": {"prompt_tokens": args.long_prompt, "ttft_s": long.first_token_at - long.submitted,
                 "prefill_calls": long_prefills[0] - prefills_at_arrival, "piece_tokens": sorted(set(pieces)),
                 "tokens": len(long_times), "finish": long_finish[0]},
        "streams": [{"tokens": len(t), "itl_count": len(t) - 1, "tokens_before_arrival": c, "finish": f}
                    for t, c, f in zip(times, counts_at_arrival, finish)],
        "phases": {phase: stats_ms(gaps) for phase, gaps in phases.items()},
        "preemptions": engine.stats.num_preemptions,
    }
    ph = result["phases"]
    result["ratios"] = {
        "during_p99_over_median": ratio(ph["during"]["p99_ms"], ph["during"]["median_ms"]),
        "lives_p99_over_median": ratio(ph["lives"]["p99_ms"], ph["lives"]["median_ms"]),
        "during_p99_over_before_median": ratio(ph["during"]["p99_ms"], ph["before"]["median_ms"]),
    }
    result["target_met"] = {k: v is not None and v <= TARGET for k, v in result["ratios"].items()}
    return result


def _f(x, digits=1):
    return "-" if x is None else f"{x:,.{digits}f}"


def table(result) -> str:
    lines = [(f"config {result['config']}, {result['streams']} streams of {result['stream_prompt']}-token prompts, "
             f"a {result['long_prompt']:,}-token prompt after {result['before']} tokens each, aborted "
             f"{result['after']} tokens after its first; --max-num-seqs {MAX_NUM_SEQS} --max-model-len "
             f"{result['max_model_len']}; {result['date']}, load average {result['loadavg_start'][0]:.2f} at the "
             f"start, {result['loadavg_end'][0]:.2f} at the end"),
             "",
             "| --max-num-batched-tokens | phase | gaps | median (ms) | p90 (ms) | p99 (ms) | max (ms) | p99 / median |",
             "|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        for phase in PHASES:
            s = run["phases"][phase]
            lines.append(f"| {run['max_num_batched_tokens']} | {phase} | {s['count']} | {_f(s['median_ms'])} | "
                         f"{_f(s['p90_ms'])} | {_f(s['p99_ms'])} | {_f(s['max_ms'])} | "
                         f"{_f(ratio(s['p99_ms'], s['median_ms']), 2)} |")
    lines += ["", ("| --max-num-batched-tokens | long TTFT (s) | prefill calls | piece tokens | p99/median during | "
                   "p99/median lives (target) | p99 during / median before | compile (s) |"),
              "|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        r, long = run["ratios"], run["long"]
        lines.append(f"| {run['max_num_batched_tokens']} | {long['ttft_s']:,.2f} | {long['prefill_calls']} | "
                     f"{', '.join(map(str, long['piece_tokens'])) or 'packed'} | "
                     f"{_f(r['during_p99_over_median'], 2)} | {_f(r['lives_p99_over_median'], 2)} | "
                     f"{_f(r['during_p99_over_before_median'], 2)} | {run['compile_s']:.0f} |")
    lines.append(f"target: p99 <= {TARGET:g} x median of the streams' gaps (read literally: over their lives)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import qwen2_jax

    loadavg_start = os.getloadavg()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    model = qwen2_jax.from_pretrained(random_checkpoint(args.cfg, args.work_dir), dtype="float32")
    runs = []
    for budget in args.budgets:
        runs.append(run_one(model, args, budget))
        gc.collect()  # the engine's pool, before the next one's
    result = {"config": args.config, "date": date, "cpus": os.cpu_count(), "loadavg_start": loadavg_start,
              "loadavg_end": os.getloadavg(), "streams": args.streams, "stream_prompt": args.stream_prompt,
              "long_prompt": args.long_prompt, "long_max_tokens": args.long_max_tokens, "before": args.before,
              "after": args.after, "max_num_seqs": MAX_NUM_SEQS, "max_model_len": args.max_model_len,
              "block_size": BLOCK_SIZE, "target": TARGET, "runs": runs}
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
