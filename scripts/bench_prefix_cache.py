"""Time to first token of a prompt whose head is in the engine's prefix cache, against a prompt of the same length
with nothing cached: a conversation's next turn after its earlier turn finished (and after another client's request
came between), a question about a document that another request is still reading, and one sent together with the
document's first request.

    python scripts/bench_prefix_cache.py [--config qwen2-57b-a14b-quarter] [--context 1024] [--answer 32]
        [--new 32] [--repeats 3] [--max-model-len 2048] [--max-num-batched-tokens 512]
    python scripts/bench_prefix_cache.py --config tiny --context 48 --new 8 --answer 4 --repeats 1 --max-model-len 128

One ``qwen2_jax.inference.serving.engine.Engine`` (float32, the config's random checkpoint, seed 0, 2 slots). Each repeat, with the
engine otherwise idle: a first turn of ``--context`` random prompt tokens answered with ``--answer`` tokens
(greedy); the next turn, that prompt and answer followed by ``--new`` tokens, timed from submission to its first
token; the same again with another request of ``--context`` tokens (one token asked for) between the two turns,
which takes free pages (the first turn's stay cached); then a prompt of the same length sharing nothing with
anything sent before, timed the same way. Then, with
a reader decoding in the other slot (``--context`` tokens of a document, asking for the rest of ``--max-model-len``): a
question of the same length, that document followed by ``--answer`` + ``--new`` tokens, sent after the reader's
first token; and, beside another reader, a prompt of that length sharing nothing. Each reader is aborted once the
prompt timed beside it has its first token. Then the same question sent together with a first request of its
document (one token asked for), queued behind that request's prefill; and a prompt sharing nothing sent together
with an unrelated one. Reported: the best and median of each, and the tokens found cached.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qwen2_jax  # noqa: E402
from qwen2_jax.tools.bench import QUARTER, bench_config, random_checkpoint  # noqa: E402
from qwen2_jax.inference.serving.engine import Engine, Request, SamplingParams, check_settings  # noqa: E402
from qwen2_jax.errors import InputError  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--config", default=QUARTER, help=f"'tiny', {QUARTER!r} or a config.json (default: quarter)")
    p.add_argument("--context", type=int, default=1024, help="the first turn's prompt tokens (default 1024)")
    p.add_argument("--answer", type=int, default=32, help="the first turn's answer tokens (default 32)")
    p.add_argument("--new", type=int, default=32, help="tokens the next turn adds (default 32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-model-len", type=int, default=2048, help="the engine's --max-model-len (default 2048)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="the engine's --max-num-batched-tokens (default 512)")
    p.add_argument("--work-dir", help="where the random checkpoint is written (default ~/.cache/qwen2-jax/bench)")
    args = p.parse_args()
    for flag in ("context", "answer", "new", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if (need := args.context + args.answer + args.new + 1) > args.max_model_len:
        p.error(f"--context {args.context} + --answer {args.answer} + --new {args.new} + 1 (the token asked for) = "
                f"{need} exceeds --max-model-len {args.max_model_len}")

    cfg = bench_config(args.config)
    try:
        check_settings(cfg.context_length, flags=True, max_num_seqs=2, max_model_len=args.max_model_len,
                       max_num_batched_tokens=args.max_num_batched_tokens, max_waiting=0)
    except InputError as e:
        p.error(str(e))
    model = qwen2_jax.from_pretrained(random_checkpoint(cfg, args.work_dir), dtype="float32")
    engine = Engine(model, max_num_seqs=2, max_model_len=args.max_model_len,
                    max_num_batched_tokens=args.max_num_batched_tokens, eos_token_ids=()).start()
    rng = np.random.default_rng(0)
    fresh = lambda n: rng.integers(100, cfg.vocab_size, n).tolist()

    def first_token(prompt, max_tokens=1):
        request = engine.submit(Request(prompt, SamplingParams(max_tokens=max_tokens)))
        tokens, _ = request.result(timeout=3600)
        return tokens, (request.first_token_at - request.submitted) * 1e3, request.cached_tokens

    def beside_a_reader(document, prompt):
        reader = engine.submit(Request(document, SamplingParams(max_tokens=args.max_model_len - args.context)))
        reader.events.get(timeout=3600)  # its first token: the document is in its row, and it decodes on
        timed = first_token(prompt)
        if reader.finished:
            sys.exit("the reader finished before the prompt timed beside it: raise --max-model-len")
        engine.abort(reader)
        reader.result(timeout=3600)
        return timed

    def behind(first, prompt):
        ahead = engine.submit(Request(first, SamplingParams(max_tokens=1)))
        timed = first_token(prompt)
        ahead.result(timeout=3600)
        return timed

    length = args.context + args.answer + args.new
    situation = {"next turn": "alone", "next turn, another request between": "alone", "nothing cached": "alone",
                 "question on a read document": "beside a reader",
                 "nothing shared": "beside a reader", "question behind its document": "sent with another",
                 "behind an unrelated prompt": "sent with another"}
    times = {kind: [] for kind in situation}
    cached = {kind: set() for kind in times}

    def record(kind, timed):
        times[kind].append(timed[1])
        cached[kind].add(timed[2])

    try:
        for _ in range(args.repeats):
            context = fresh(args.context)
            answer, _, _ = first_token(context, args.answer)
            record("next turn", first_token(context + answer + fresh(args.new)))
            context = fresh(args.context)
            answer, _, _ = first_token(context, args.answer)
            first_token(fresh(args.context))  # another client's request, into the row the first turn used
            record("next turn, another request between", first_token(context + answer + fresh(args.new)))
            record("nothing cached", first_token(fresh(length)))
            document = fresh(args.context)
            record("question on a read document", beside_a_reader(document, document + fresh(length - args.context)))
            record("nothing shared", beside_a_reader(fresh(args.context), fresh(length)))
            document = fresh(args.context)
            record("question behind its document", behind(document, document + fresh(length - args.context)))
            record("behind an unrelated prompt", behind(fresh(args.context), fresh(length)))
    finally:
        engine.stop()
    print(f"config {args.config}: prompts of {length} tokens ({args.context} + {args.answer} answered + {args.new} "
          f"new), {args.repeats} repeats, --max-model-len {args.max_model_len} --max-num-batched-tokens {args.max_num_batched_tokens}")
    print("| prompt | sent | tokens cached | TTFT best (ms) | TTFT median (ms) |")
    print("|---|---|---|---|---|")
    for kind, ms in times.items():
        print(f"| {kind} | {situation[kind]} | {', '.join(map(str, sorted(cached[kind])))} | {min(ms):,.0f} | "
              f"{statistics.median(ms):,.0f} |")
    median = {kind: statistics.median(ms) for kind, ms in times.items()}
    print(f"time to first token, median: {median['nothing cached'] / median['next turn']:.1f}x shorter for the next "
          f"turn ({median['nothing cached'] / median['next turn, another request between']:.1f}x with another "
          f"request between), {median['nothing shared'] / median['question on a read document']:.1f}x beside a reader, "
          f"{median['behind an unrelated prompt'] / median['question behind its document']:.1f}x behind its document")


if __name__ == "__main__":
    main()
