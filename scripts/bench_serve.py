"""Load test of ``qwen2-jax serve`` (the paged KV cache) and, in the same run, the engine before it (fixed rows,
from another checkout: ``--baseline-checkout``) and ``transformers serve --continuous-batching``, on the same
random checkpoint, with the official ``openai`` client.

    python scripts/bench_serve.py [--config qwen2-57b-a14b-quarter] [--concurrency 1,4,8,16,32]
        [--input-len 64 | LO:HI] [--output-len 64 | LO:HI] [--requests N] [--request-rate R]
        [--max-num-seqs N] [--max-model-len N] [--max-num-batched-tokens N] [--block-size N]
        [--kv-cache-memory BYTES | baseline] [--baseline-checkout DIR [--baseline-slots 4]]
        [--no-hf] [--no-generate] [--json F] [--plot F]
    python scripts/bench_serve.py --tiny      # a minute: the tiny config, random lengths, our server only

Issue 35's CPU target, all three servers side by side (the engine before the paged cache checked out, e.g.
``git worktree add /tmp/before 0758c05``, with the two links that layout needs, see ``--baseline-checkout``):

    python scripts/bench_serve.py --concurrency 16 --requests 32 --input-len 64:1500 --output-len 16:256 \\
        --max-num-seqs 16 --max-model-len 2048 --baseline-checkout /tmp/before --no-generate \\
        --json docs/serving-paged-c16.json --plot docs/serving-paged-c16.png

(16 clients, 2 requests each: 23,784 prompt and 4,637 output tokens per server; some 15 to 20 minutes on
2 cores, the random checkpoint's first writing included.)

The baseline runs with ``--slots 4 --max-len 2048`` (``--baseline-slots``, ``--max-model-len``): 4 rows of 2,048
positions of keys and values. Our server gets ``--kv-cache-memory`` of exactly those bytes (4 x 2,048 positions x
layers x 2 x KV heads x head_dim x the dtype's size; printed, and in the JSON as ``kv_cache_memory``), so the two
engines hold the same KV memory: the baseline in 4 rows, ours in pages shared by up to ``--max-num-seqs``.

The load: for each concurrency level C, ``--requests`` streamed ``/v1/completions`` requests (default: 2 per
client, at least 4) go to C clients that all start together, each a closed loop (it sends the next request of the
level's list as soon as its last one is answered), or, with ``--request-rate``, at Poisson arrivals of that rate
capped at C in flight. ``--input-len`` and ``--output-len`` are one length for every request, or LO:HI: each
request's prompt and output lengths drawn uniformly in [LO, HI] from the level's seed (``--seed`` + C, the same for
every server). Prompts are random words of exactly their length in tokens (tokens of one lowercase word after a
space, which the tokenizer gives back as they were); each request asks for its output length, greedy, with
``ignore_eos`` for our servers, so lengths are exact (transformers serve refuses unknown fields; a random model
meets an end token about once in 150,000 tokens). Before each level one short request of its own warms the path.

Reported per server and level: completed and failed requests, output tokens/s (all output tokens over the level's
wall time), TTFT (request to the first token's chunk), TPOT ((last - first token) / (tokens - 1), per request)
and ITL (the gaps between streamed chunks), each as mean, p50, p90 and p99; then our output tokens/s over the
baseline's and over transformers serve's, level by level. Output tokens: the usage chunk where the server sends one
(ours), else one per token's chunk (transformers serve ignores ``stream_options``). A token's chunk: one with text,
or (ours) with none yet while a character or a possible stop string is incomplete. For both of our engines each
level also records the prefill calls and decode steps it took, and for the paged one its preemptions (``/metrics``
before and after).

Before the servers, ``qwen2_jax.generate`` measures the decode tokens/s of a batch of 8 (prompts of the input
lengths' midpoint, the longest output length, at least 64, minus one token, as ``qwen2-jax bench``), to compare
with our server's decode rate at concurrency 8 (8 / mean TPOT); ``--no-generate`` skips it. Servers run one at a
time, each in its own process with every core of this machine (XLA:CPU takes them all; torch is given as many
threads through OMP_NUM_THREADS).
"""

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from qwen2_jax.tools.bench import QUARTER, bench_config, random_checkpoint  # noqa: E402
from qwen2_jax.inference.tokenizer import build_qwen2_tokenizer_files, load_tokenizer  # noqa: E402

STATS = ("mean", "p50", "p90", "p99")
SIDES = {"qwen2-jax": "qwen2-jax serve", "baseline": "qwen2-jax serve before the paged cache",
         "transformers": "transformers serve"}
# Issue 35's CPU targets at 16 streams: output tokens/s over the baseline's (same KV memory) and over transformers'.
TARGETS = {"baseline": 2.5, "transformers": 2.0}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def length_range(text: str) -> tuple[int, int]:
    """An argparse ``type``: ``N`` (every request) or ``LO:HI`` (uniform in [LO, HI])."""
    try:
        lo, _, hi = text.partition(":")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO:HI, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 1 <= LO <= HI, got {text!r}")
    return lo, hi


def kv_memory_type(text: str):
    if text == "baseline":
        return text
    from qwen2_jax.cli.serve import parse_bytes

    return parse_bytes(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=QUARTER, help=f"embedded config name or 'tiny' (default {QUARTER})")
    p.add_argument("--tiny", action="store_true",
                   help="seconds: tiny config, concurrency 1,4, prompts of 8:40 and outputs of 4:12 tokens, our server "
                        "only (and the baseline with --baseline-checkout), the KV memory of 4 rows")
    p.add_argument("--concurrency", default="1,4,8,16,32", help="concurrency levels (default 1,4,8,16,32)")
    p.add_argument("--input-len", type=length_range, default=(64, 64), metavar="N|LO:HI",
                   help="prompt tokens: N, or uniform in [LO, HI] per request (default 64)")
    p.add_argument("--output-len", type=length_range, default=(64, 64), metavar="N|LO:HI",
                   help="output tokens asked for: N, or uniform in [LO, HI] per request (default 64)")
    p.add_argument("--requests", type=int, help="requests per level (default: 2 x concurrency, at least 4)")
    p.add_argument("--request-rate", type=float, help="Poisson arrivals per second (default: all at once)")
    p.add_argument("--dtype", default="float32", choices=sorted(ITEMSIZE),
                   help="the servers' weights and KV cache (default float32)")
    g = p.add_argument_group("our server (qwen2-jax serve's flags)")
    g.add_argument("--max-num-seqs", type=int, help="default: the highest concurrency")
    g.add_argument("--max-model-len", type=int,
                   help="default: the power of two at least the longest prompt + output, at least 32; the baseline's "
                        "--max-len too")
    g.add_argument("--max-num-batched-tokens", type=int,
                   help="default 512 (--tiny: 64, fewer programs to compile); the baseline's --prefill-chunk")
    g.add_argument("--block-size", type=int, help="default: the server's (16)")
    g.add_argument("--kv-cache-memory", type=kv_memory_type, metavar="BYTES|baseline",
                   help="bytes of KV pages, or 'baseline': those of --baseline-slots rows of --max-model-len (default: "
                        "'baseline' with --baseline-checkout or --tiny, else the server's default)")
    g = p.add_argument_group("the engine before the paged cache")
    g.add_argument("--baseline-checkout", metavar="DIR",
                   help="also serve from this checkout (e.g. git worktree add /tmp/before 0758c05, then "
                        "ln -s ../convert /tmp/before/qwen2_jax/convert; "
                        "ln -s ../sharding /tmp/before/qwen2_jax/sharding) with --slots --baseline-slots "
                        "--max-len --max-model-len")
    g.add_argument("--baseline-slots", type=int, default=4, help="the baseline's rows (default 4)")
    p.add_argument("--hf", dest="hf", action="store_true", default=None, help="also transformers serve")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="not transformers serve")
    p.add_argument("--no-generate", action="store_true", help="skip the generate batch-8 reference")
    p.add_argument("--work-dir", help="where the random checkpoint is written (default ~/.cache/qwen2-jax/bench)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write a plot of throughput and p99 latency against concurrency here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        args.config = "tiny"
        if args.input_len == p.get_default("input_len"):
            args.input_len = (8, 40)
        if args.output_len == p.get_default("output_len"):
            args.output_len = (4, 12)
        args.concurrency = "1,4" if args.concurrency == p.get_default("concurrency") else args.concurrency
        args.hf = False if args.hf is None else args.hf
        args.kv_cache_memory = args.kv_cache_memory or "baseline"
        args.max_num_batched_tokens = args.max_num_batched_tokens or 64
    args.max_num_batched_tokens = args.max_num_batched_tokens or 512
    args.hf = True if args.hf is None else args.hf
    args.levels = [int(c) for c in args.concurrency.split(",")]
    if any(c < 1 for c in args.levels) or args.output_len[0] < 2:
        p.error("concurrency levels must be >= 1, --output-len >= 2")
    longest = args.input_len[1] + args.output_len[1]
    args.max_num_seqs = args.max_num_seqs or max(args.levels)
    args.max_model_len = args.max_model_len or max(32, 1 << (longest - 1).bit_length())
    if args.max_model_len < longest:
        p.error(f"--max-model-len {args.max_model_len} is shorter than the longest prompt + output ({longest})")
    if args.baseline_checkout:
        checkout = os.path.abspath(args.baseline_checkout)
        missing = [d for d in ("convert", "sharding") if not os.path.exists(os.path.join(checkout, "qwen2_jax", d))]
        if not os.path.isdir(os.path.join(checkout, "qwen2_jax")):
            p.error(f"--baseline-checkout {checkout} has no qwen2_jax package")
        if missing:
            p.error(f"--baseline-checkout {checkout} lacks qwen2_jax/{' and qwen2_jax/'.join(missing)}: "
                    + "; ".join(f"ln -s ../{d} {checkout}/qwen2_jax/{d}" for d in missing))
        args.baseline_checkout = checkout
        args.kv_cache_memory = args.kv_cache_memory or "baseline"
    return args


def kv_bytes_per_token(cfg, dtype: str) -> int:
    """Keys and values of one position over all layers: layers x 2 x KV heads x head_dim x the dtype's size."""
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * ITEMSIZE[dtype]


# ---- the checkpoint and the workload --------------------------------------------------------------------------
def prepare_checkpoint(cfg, work_dir) -> str:
    """The random checkpoint of ``cfg`` with the Qwen tokenizer files beside its weights."""
    path = random_checkpoint(cfg, work_dir)
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        build_qwen2_tokenizer_files(path)
    return path


def word_token_ids(ckpt: str, vocab_size: int) -> list[int]:
    """Ids of tokens that are one lowercase word after a space: any sequence of them encodes back to itself."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(os.path.join(ckpt, "tokenizer.json")).get_vocab()
    return sorted(i for t, i in vocab.items() if i < vocab_size and re.fullmatch("\u0120[a-z]+", t))


def make_workload(words, tokenizer, n: int, input_len, output_len, seed: int) -> list[tuple[str, int, int]]:
    """``n`` (prompt, its length in tokens, output length) triples: lengths uniform in the ranges, prompts of exactly
    their length."""
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(input_len[0], input_len[1] + 1, n)
    out_lens = rng.integers(output_len[0], output_len[1] + 1, n)
    prompts = [tokenizer.decode(rng.choice(words, int(k)).tolist()) for k in in_lens]
    assert [len(tokenizer.encode(p)) for p in prompts] == in_lens.tolist(), "prompt lengths are not exact"
    return list(zip(prompts, in_lens.tolist(), out_lens.tolist()))


# ---- the servers ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process; ``url`` once /health answers."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: str, env=None, cwd=ROOT):
        self.name, self.port, self.cmd = name, port, cmd
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, **(env or {})))
        self.url = f"http://127.0.0.1:{port}"
        self.started = time.perf_counter()

    def wait_ready(self, timeout=1800):
        while time.perf_counter() - self.started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.started
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not start in {timeout} s")

    def log_lines(self, marker: str) -> list[str]:
        """Its log's lines that hold ``marker``, each from the marker on."""
        self.log.flush()
        with open(self.log.name) as f:
            return [line[line.index(marker):].strip() for line in f if marker in line]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def start_ours(ckpt, args, port, log_dir) -> Server:
    cmd = [sys.executable, "-m", "qwen2_jax.cli", "serve", ckpt, "--port", str(port), "--dtype", args.dtype,
           "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--max-waiting", "1024",
           "--served-model-name", "bench", "--disable-log-requests"]
    if args.block_size:
        cmd += ["--block-size", str(args.block_size)]
    if args.kv_cache_memory:
        cmd += ["--kv-cache-memory", str(args.kv_cache_bytes)]
    return Server(SIDES["qwen2-jax"], cmd, port, os.path.join(log_dir, "qwen2-jax-serve.log"),
                  env={"PYTHONPATH": ROOT})


def start_baseline(ckpt, args, port, log_dir) -> Server:
    """The engine before the paged cache, from ``--baseline-checkout``: its flags, its rows of --max-len."""
    cmd = [sys.executable, "-m", "qwen2_jax.cli", "serve", ckpt, "--port", str(port), "--dtype", args.dtype,
           "--slots", str(args.baseline_slots), "--max-len", str(args.max_model_len),
           "--prefill-chunk", str(baseline_chunk(args)), "--max-waiting", "1024", "--served-model-name", "bench"]
    return Server(SIDES["baseline"], cmd, port, os.path.join(log_dir, "baseline-serve.log"),
                  env={"PYTHONPATH": args.baseline_checkout}, cwd=args.baseline_checkout)


def baseline_chunk(args) -> int:
    """Its --prefill-chunk: a power of two that divides --max-len or is at least it, at most ours."""
    chunk = 1 << (args.max_num_batched_tokens.bit_length() - 1)
    return chunk if args.max_model_len % chunk == 0 or chunk >= args.max_model_len else args.max_model_len


def start_hf(ckpt, args, port, log_dir) -> Server:
    exe = os.path.join(os.path.dirname(sys.executable), "transformers")
    threads = str(len(os.sched_getaffinity(0)))
    cmd = [exe, "serve", ckpt, "--continuous-batching", "--device", "cpu", "--dtype", args.dtype, "--port",
           str(port), "--host", "127.0.0.1", "--log-level", "warning"]
    return Server(SIDES["transformers"], cmd, port, os.path.join(log_dir, "transformers-serve.log"),
                  env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})


# ---- the load -------------------------------------------------------------------------------------------------
async def one_request(client, model, prompt, output_len, extra_body) -> dict:
    start = time.perf_counter()
    times, tokens, usage = [], 0, None
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=output_len, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=extra_body)
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            # A token's chunk: text, or none yet while a character is incomplete (ours sends one per token);
            # not a closing chunk with only the finish_reason.
            if chunk.choices and (chunk.choices[0].text or chunk.choices[0].finish_reason is None):
                times.append(time.perf_counter())
                tokens += 1
    except Exception as e:  # a failed request is counted, not fatal
        return {"ok": False, "error": repr(e)[:200]}
    end = time.perf_counter()
    n = usage if usage is not None else tokens
    if not times:
        return {"ok": False, "error": "no token chunk"}
    return {"ok": True, "ttft": times[0] - start, "latency": end - start, "tokens": n, "asked": output_len,
            "tpot": (times[-1] - times[0]) / (n - 1) if n > 1 else None, "itl": np.diff(times).tolist()}


async def run_level(url, model, work, concurrency, rate, extra_body, seed) -> dict:
    """``work``: (prompt, prompt length, output length) triples, sent by ``concurrency`` clients at once (each
    sends the next when its last is answered), or at Poisson arrivals of ``rate`` per second with at most
    ``concurrency`` in flight."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)
    gate = asyncio.Semaphore(concurrency)
    rng = np.random.default_rng(seed)

    async def limited(prompt, output_len):
        async with gate:
            return await one_request(client, model, prompt, output_len, extra_body)

    start = time.perf_counter()
    tasks = []
    for prompt, _, output_len in work:
        tasks.append(asyncio.create_task(limited(prompt, output_len)))
        if rate:
            await asyncio.sleep(rng.exponential(1 / rate))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    await client.close()
    return summarize(results, duration, concurrency)


def _stats(values) -> dict:
    if not values:
        return {k: None for k in STATS}
    a = np.asarray(values) * 1000  # ms
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def summarize(results, duration, concurrency) -> dict:
    ok = [r for r in results if r["ok"]]
    out_tokens = sum(r["tokens"] for r in ok)
    tpots = [r["tpot"] for r in ok if r["tpot"] is not None]
    return {"concurrency": concurrency, "load_average_1m": os.getloadavg()[0], "completed": len(ok),
            "failed": len(results) - len(ok),
            "errors": sorted({r["error"] for r in results if not r["ok"]})[:3], "duration_s": duration,
            "output_tokens": out_tokens, "output_tokens_asked": sum(r["asked"] for r in ok),
            "output_tokens_per_s": out_tokens / duration,
            "ttft_ms": _stats([r["ttft"] for r in ok]), "tpot_ms": _stats(tpots),
            "itl_ms": _stats([g for r in ok for g in r["itl"]]), "latency_ms": _stats([r["latency"] for r in ok]),
            "decode_tokens_per_s": concurrency / statistics.mean(tpots) if tpots else None}


COUNTERS = {"prefill_calls": "prefill_calls_total", "decode_steps": "decode_steps_total",
            "preemptions": "num_preemptions_total", "kv_pages_total": "kv_pages_total"}


def engine_counters(url) -> dict | None:
    """Our engines' prefill calls, decode steps and (the paged one's) preemptions and KV pages so far (their
    ``/metrics``); None for a server without them."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
            text = r.read().decode()
    except (OSError, ValueError):
        return None
    found = {}
    for key, metric in COUNTERS.items():
        values = [line.split()[-1] for line in text.splitlines() if line.split(" ")[0].split("{")[0].endswith(metric)]
        if values:
            found[key] = int(float(values[0]))
    return found if "decode_steps" in found else None


def bench_server(server, model, args, workload_for, extra_body) -> list[dict]:
    levels = []
    for c in args.levels:
        n = args.requests or max(4, 2 * c)
        work = workload_for(n, seed=args.seed + c)
        # Warm the path with a prompt of its own: a level's prompt sent before would find its tokens cached.
        warm = workload_for(1, seed=args.seed + 10_000 + c, input_len=(args.input_len[0],) * 2)
        asyncio.run(run_level(server.url, model, [(warm[0][0], warm[0][1], 2)], 1, None, extra_body, 0))
        before = engine_counters(server.url)
        result = asyncio.run(run_level(server.url, model, work, c, args.request_rate, extra_body, args.seed))
        after = engine_counters(server.url)
        if before and after:  # our engines: how the level's prompts were prefilled, between how many decode steps
            result.update({k: after[k] - before[k] for k in after if k != "kv_pages_total"})
            if "kv_pages_total" in after:
                result["kv_pages_total"] = after["kv_pages_total"]
        result["prompt_lens"] = [k for _, k, _ in work]
        result["output_lens"] = [o for _, _, o in work]  # asked
        print(f"  {server.name}: concurrency {c}: {result['completed']}/{n} done, "
              f"{result['output_tokens_per_s']:.1f} output tokens/s, p50 TTFT {result['ttft_ms']['p50']:.0f} ms"
              + (f", {result['prefill_calls']} prefill calls, {result['decode_steps']} decode steps"
                 if "prefill_calls" in result else "")
              + (f", {result['preemptions']} preemptions" if "preemptions" in result else ""), flush=True)
        levels.append(result)
    return levels


GENERATE = """
import json, sys, time
import numpy as np
import qwen2_jax
ckpt, batch, prompt_len, new, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
model = qwen2_jax.from_pretrained(ckpt, dtype=dtype)
rng = np.random.default_rng(0)
prompts = rng.integers(100, model.config.vocab_size, (batch, prompt_len)).tolist()
def timed(n):
    qwen2_jax.generate(model, prompts, max_new_tokens=n, eos_token_ids=())  # compiled, then timed
    best = []
    for _ in range(3):
        t = time.perf_counter(); qwen2_jax.generate(model, prompts, max_new_tokens=n, eos_token_ids=())
        best.append(time.perf_counter() - t)
    return min(best)
print(json.dumps({"decode_tokens_per_s": batch * (new - 1) / (timed(new) - timed(1))}))
"""


def generate_reference(ckpt, args, batch=8) -> float:
    # At least 64 steps: a generate call costs ~15 ms besides its steps, and the tiny config's 8 steps take less
    # than that call-to-call noise, which once made the difference negative.
    new = max(args.output_len[1], 64)
    prompt_len = sum(args.input_len) // 2
    out = subprocess.run([sys.executable, "-c", GENERATE, ckpt, str(batch), str(prompt_len), str(new), args.dtype],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["decode_tokens_per_s"]


# ---- report ---------------------------------------------------------------------------------------------------
def _f(x, digits=1):
    return "-" if x is None else f"{x:,.{digits}f}"


def _lengths(r) -> str:
    lo, hi = r
    return str(lo) if lo == hi else f"{lo} to {hi}"


def workload_line(result) -> str:
    w = result["workload"]
    how = (f"Poisson arrivals at {w['request_rate']:g}/s, at most C in flight" if w["request_rate"] else
           "C clients starting together, each a closed loop")
    return (f"{result['config']}, {result['dtype']}: prompts of {_lengths(w['input_len'])} tokens, outputs of "
            f"{_lengths(w['output_len'])} (greedy, ignore_eos for ours), {how}")


def table(result) -> str:
    rows = ["| server | concurrency | done / failed | output tok/s | TTFT mean / p50 / p90 / p99 (ms) | "
            "TPOT mean / p50 / p90 / p99 (ms) | ITL mean / p50 / p90 / p99 (ms) | load |", "|---|---|---|---|---|---|---|---|"]
    for side, levels in result["servers"].items():
        for r in levels:
            stats = lambda key: " / ".join(_f(r[key][k], 0) for k in STATS)
            rows.append(f"| {side} | {r['concurrency']} | {r['completed']} / {r['failed']} | "
                        f"{_f(r['output_tokens_per_s'])} | {stats('ttft_ms')} | {stats('tpot_ms')} | {stats('itl_ms')} | "
                        f"{_f(r.get('load_average_1m'))} |")
    return "\n".join(rows)


def ratios(result) -> dict:
    """Per level: our output tokens/s over each other server's, and its p50 TTFT and ITL over ours."""
    ours = {r["concurrency"]: r for r in result["servers"].get("qwen2-jax", [])}
    found = {}
    for side in ("baseline", "transformers"):
        for b in result["servers"].get(side, []):
            a = ours.get(b["concurrency"])
            if a is None:
                continue
            div = lambda x, y: x / y if x and y else None
            found.setdefault(side, {})[b["concurrency"]] = {
                "output_tokens_per_s": div(a["output_tokens_per_s"], b["output_tokens_per_s"]),
                "ttft_p50_lower": div(b["ttft_ms"]["p50"], a["ttft_ms"]["p50"]),
                "itl_p50_lower": div(b["itl_ms"]["p50"], a["itl_ms"]["p50"])}
    return found


def comparison(result) -> str:
    lines = []
    names = {"baseline": f"the engine before the paged cache's ({result.get('baseline', {}).get('slots')} rows, "
                         f"the same KV memory)", "transformers": "transformers serve's"}
    for side, levels in result.get("ratios", {}).items():
        for c, r in levels.items():
            target = f" (issue 35's target at 16: {TARGETS[side]}x)" if c == 16 else ""
            lines.append(f"concurrency {c}: output tokens/s {_f(r['output_tokens_per_s'], 2)}x {names[side]}{target}; "
                         f"p50 TTFT {_f(r['ttft_p50_lower'], 2)}x lower, p50 ITL {_f(r['itl_p50_lower'], 2)}x lower")
    ours = result["servers"].get("qwen2-jax")
    gen = result.get("generate_b8_decode_tokens_per_s")
    at8 = next((r for r in ours or [] if r["concurrency"] == 8), None)
    if gen and at8 and at8["decode_tokens_per_s"]:
        lines.append(f"decode at concurrency 8: {_f(at8['decode_tokens_per_s'])} tokens/s (8 / mean TPOT) = "
                     f"{at8['decode_tokens_per_s'] / gen:.0%} of generate at batch 8 ({_f(gen)} tokens/s)")
    return "\n".join(lines)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    labels = {"qwen2-jax": "qwen2-jax (paged)", "transformers": "transformers serve",
              "baseline": f"qwen2-jax before paged ({result.get('baseline', {}).get('slots')} rows)"}
    for (side, levels), color in zip(result["servers"].items(), ("C0", "C1", "C2")):
        c = [r["concurrency"] for r in levels]
        name = labels.get(side, side)
        a.plot(c, [r["output_tokens_per_s"] for r in levels], "o-", color=color, label=name)
        b.plot(c, [(r["latency_ms"]["p99"] or 0) / 1000 for r in levels], "o-", color=color,
               label=f"{name}, request p99")
        b.plot(c, [(r["ttft_ms"]["p99"] or 0) / 1000 for r in levels], "s--", color=color, label=f"{name}, TTFT p99")
    for ax, title, unit in ((a, "output tokens/s", "tokens/s"), (b, "p99 latency", "s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    kv = result.get("kv_cache_memory")
    fig.suptitle(workload_line(result) + f"\nCPU ({result['cores']} cores), {result['date']}"
                 + (f"; KV memory {kv / 2**20:,.1f} MiB for ours and the baseline" if kv else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = bench_config(args.config)
    per_token = kv_bytes_per_token(cfg, args.dtype)
    baseline_bytes = args.baseline_slots * args.max_model_len * per_token
    args.kv_cache_bytes = baseline_bytes if args.kv_cache_memory == "baseline" else args.kv_cache_memory
    print(f"KV bytes per token ({args.config}, {args.dtype}): {cfg.num_hidden_layers} layers x 2 x "
          f"{cfg.num_key_value_heads} KV heads x {cfg.head_dim} x {ITEMSIZE[args.dtype]} = {per_token:,}; "
          f"{args.baseline_slots} rows of {args.max_model_len}: {baseline_bytes:,} bytes", flush=True)
    if args.kv_cache_bytes:
        print(f"our server: --kv-cache-memory {args.kv_cache_bytes} ({args.kv_cache_bytes / per_token:,.0f} tokens), "
              f"--max-num-seqs {args.max_num_seqs} --max-model-len {args.max_model_len}", flush=True)
    ckpt = prepare_checkpoint(cfg, args.work_dir)
    tokenizer = load_tokenizer(ckpt)
    words = word_token_ids(ckpt, cfg.vocab_size)
    workload_for = lambda n, seed, input_len=args.input_len: make_workload(words, tokenizer, n, input_len,
                                                                           args.output_len, seed)
    log_dir = os.path.join(os.path.dirname(ckpt), "serve-logs")
    os.makedirs(log_dir, exist_ok=True)
    fixed = lambda r: r[0] if r[0] == r[1] else list(r)  # the JSON before ranges had one length
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
              "config": args.config, "dtype": args.dtype, "input_len": fixed(args.input_len),
              "output_len": fixed(args.output_len), "request_rate": args.request_rate,
              "workload": {"input_len": list(args.input_len), "output_len": list(args.output_len),
                           "request_rate": args.request_rate, "seed": args.seed,
                           "requests": {c: args.requests or max(4, 2 * c) for c in args.levels}},
              "cores": len(os.sched_getaffinity(0)), "kv_bytes_per_token": per_token,
              "kv_cache_memory": args.kv_cache_bytes,
              "ours": {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
                       "max_num_batched_tokens": args.max_num_batched_tokens, "block_size": args.block_size},
              "servers": {}}
    if args.baseline_checkout:
        result["baseline"] = {"checkout": args.baseline_checkout, "slots": args.baseline_slots,
                              "max_len": args.max_model_len, "prefill_chunk": baseline_chunk(args),
                              "kv_bytes": baseline_bytes, "commit": git_head(args.baseline_checkout)}
    print(workload_line(result), flush=True)
    if not args.no_generate:
        result["generate_b8_decode_tokens_per_s"] = generate_reference(ckpt, args)
        print(f"generate, batch 8: {result['generate_b8_decode_tokens_per_s']:.1f} decode tokens/s", flush=True)
    ignore_eos = {"ignore_eos": True}
    sides = [("qwen2-jax", lambda port: start_ours(ckpt, args, port, log_dir), "bench", ignore_eos)]
    if args.baseline_checkout:
        sides.append(("baseline", lambda port: start_baseline(ckpt, args, port, log_dir), "bench", ignore_eos))
    if args.hf:
        sides.append(("transformers", lambda port: start_hf(ckpt, args, port, log_dir), ckpt, None))
    for side, start, model, extra in sides:
        server = start(free_port())
        try:
            ready = server.wait_ready()
            print(f"{server.name} ready in {ready:.0f} s: {' '.join(server.cmd[1:])}", flush=True)
            result.setdefault("startup_s", {})[side] = ready
            if side == "qwen2-jax":
                result["ours"]["kv_cache_line"] = next(iter(server.log_lines("KV cache:")), None)
                print(f"  {result['ours']['kv_cache_line']}", flush=True)
            result["servers"][side] = bench_server(server, model, args, workload_for, extra)
        finally:
            server.stop()
    result["ratios"] = ratios(result)
    print()
    print(workload_line(result))
    print()
    print(table(result))
    print()
    print(comparison(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        print(f"plot: {plot(result, args.plot)}")
    return 0


def git_head(checkout: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", checkout, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
