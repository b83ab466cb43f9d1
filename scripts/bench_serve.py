"""Load test of ``qwen2-jax serve`` and, in the same run, ``transformers serve --continuous-batching`` on the same
random checkpoint, with the official ``openai`` client.

    python scripts/bench_serve.py [--config qwen2-57b-a14b-quarter] [--concurrency 1,4,8,16,32]
        [--input-len 64] [--output-len 64] [--requests N] [--request-rate R] [--no-hf] [--json F] [--plot F]
    python scripts/bench_serve.py --tiny      # seconds: the tiny config, our server only

For each concurrency level, ``--requests`` streamed ``/v1/completions`` requests (default: 2 per concurrent
client, at least 4) are sent by that many clients at once, or, with ``--request-rate``, at Poisson arrivals of
that rate capped at that concurrency. Prompts are random words of exactly ``--input-len`` tokens (tokens of
one lowercase word after a space, which the tokenizer gives back as they were); every request asks for
``--output-len`` tokens, greedy, with ``ignore_eos`` for our server (transformers serve refuses unknown fields;
a random model meets an end token about once in 150,000 tokens). Reported per side and level: completed and
failed requests, output tokens/s (all output tokens over the level's wall time), TTFT (request to the first
token's chunk), TPOT ((last - first token) / (tokens - 1), per request) and ITL (the gaps between streamed
chunks), each as mean, p50, p90 and p99. Output tokens: the usage chunk where the server sends one (ours), else
one per token's chunk (transformers serve ignores ``stream_options``). A token's chunk: one with text, or (ours)
with none yet while a character or a possible stop string is incomplete.

Before the servers, ``qwen2_jax.generate`` measures the decode tokens/s of a batch of 8 (``--output-len`` tokens,
at least 64, minus one token, as ``qwen2-jax bench``), to compare with our server's decode rate at concurrency 8
(8 / mean TPOT). Servers run one at a time, each in its own process with every core of this machine (XLA:CPU
takes them all; torch is given as many threads through OMP_NUM_THREADS).
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=QUARTER, help=f"embedded config name or 'tiny' (default {QUARTER})")
    p.add_argument("--tiny", action="store_true", help="seconds: tiny config, concurrency 1,4, our server only")
    p.add_argument("--concurrency", default="1,4,8,16,32", help="concurrency levels (default 1,4,8,16,32)")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--requests", type=int, help="requests per level (default: 2 x concurrency, at least 4)")
    p.add_argument("--request-rate", type=float, help="Poisson arrivals per second (default: all at once)")
    p.add_argument("--slots", type=int, help="our server's --slots (default: the highest concurrency)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="our server's --prefill-chunk (default 512)")
    p.add_argument("--hf", dest="hf", action="store_true", default=None, help="also transformers serve")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="our server only")
    p.add_argument("--no-generate", action="store_true", help="skip the generate batch-8 reference")
    p.add_argument("--work-dir", help="where the random checkpoint is written (default ~/.cache/qwen2-jax/bench)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write a plot of throughput and p99 latency against concurrency here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        args.config, args.input_len, args.output_len = "tiny", 16, 8
        args.concurrency = "1,4" if args.concurrency == p.get_default("concurrency") else args.concurrency
        args.hf = False if args.hf is None else args.hf
    args.hf = True if args.hf is None else args.hf
    args.levels = [int(c) for c in args.concurrency.split(",")]
    if any(c < 1 for c in args.levels) or args.input_len < 1 or args.output_len < 2:
        p.error("concurrency levels and --input-len must be >= 1, --output-len >= 2")
    return args


# ---- the checkpoint and the prompts ---------------------------------------------------------------------------
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


def make_prompts(ckpt, tokenizer, vocab_size: int, n: int, length: int, seed: int) -> list[str]:
    words = word_token_ids(ckpt, vocab_size)
    rng = np.random.default_rng(seed)
    prompts = [tokenizer.decode(rng.choice(words, length).tolist()) for _ in range(n)]
    assert all(len(tokenizer.encode(p)) == length for p in prompts), "prompt lengths are not exact"
    return prompts


# ---- the servers ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process; ``url`` once /health answers."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: str, env=None):
        self.name, self.port = name, port
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
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

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def start_ours(ckpt, args, port, log_dir) -> Server:
    slots = args.slots or max(args.levels)
    max_len = 1 << (args.input_len + args.output_len - 1).bit_length()
    cmd = [sys.executable, "-m", "qwen2_jax.cli", "serve", ckpt, "--port", str(port), "--slots", str(slots),
           "--max-len", str(max(max_len, 32)), "--prefill-chunk", str(args.prefill_chunk),
           "--max-waiting", "1024", "--served-model-name", "bench"]
    return Server("qwen2-jax serve", cmd, port, os.path.join(log_dir, "qwen2-jax-serve.log"),
                  env={"PYTHONPATH": ROOT})


def start_hf(ckpt, port, log_dir) -> Server:
    exe = os.path.join(os.path.dirname(sys.executable), "transformers")
    threads = str(len(os.sched_getaffinity(0)))
    cmd = [exe, "serve", ckpt, "--continuous-batching", "--device", "cpu", "--dtype", "float32", "--port", str(port),
           "--host", "127.0.0.1", "--log-level", "warning"]
    return Server("transformers serve", cmd, port, os.path.join(log_dir, "transformers-serve.log"),
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
    return {"ok": True, "ttft": times[0] - start, "latency": end - start, "tokens": n,
            "tpot": (times[-1] - times[0]) / (n - 1) if n > 1 else None, "itl": np.diff(times).tolist()}


async def run_level(url, model, prompts, concurrency, rate, output_len, extra_body, seed) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)
    gate = asyncio.Semaphore(concurrency)
    rng = np.random.default_rng(seed)

    async def limited(prompt):
        async with gate:
            return await one_request(client, model, prompt, output_len, extra_body)

    start = time.perf_counter()
    tasks = []
    for prompt in prompts:
        tasks.append(asyncio.create_task(limited(prompt)))
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
            "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / duration,
            "ttft_ms": _stats([r["ttft"] for r in ok]), "tpot_ms": _stats(tpots),
            "itl_ms": _stats([g for r in ok for g in r["itl"]]), "latency_ms": _stats([r["latency"] for r in ok]),
            "decode_tokens_per_s": concurrency / statistics.mean(tpots) if tpots else None}


def engine_counters(url) -> dict | None:
    """Our server's prefill calls and decode steps so far (its ``/metrics``); None for a server without them."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
            text = r.read().decode()
    except (OSError, ValueError):
        return None
    found = {}
    for key, metric in (("prefill_calls", "prefill_calls_total"), ("decode_steps", "decode_steps_total")):
        values = [line.split()[-1] for line in text.splitlines() if line.split(" ")[0].split("{")[0].endswith(metric)]
        if not values:
            return None
        found[key] = int(float(values[0]))
    return found


def bench_server(server, model, args, prompts_for, extra_body) -> list[dict]:
    levels = []
    for c in args.levels:
        n = args.requests or max(4, 2 * c)
        *prompts, warm = prompts_for(n + 1, seed=args.seed + c)
        # Warm the path with a prompt of its own: a level's prompt sent before would find its tokens cached.
        asyncio.run(run_level(server.url, model, [warm], 1, None, 2, extra_body, 0))
        before = engine_counters(server.url)
        result = asyncio.run(run_level(server.url, model, prompts, c, args.request_rate, args.output_len, extra_body,
                                       args.seed))
        after = engine_counters(server.url)
        if before and after:  # our server: how the level's prompts were prefilled, between how many decode steps
            result.update({k: after[k] - before[k] for k in after})
        print(f"  {server.name}: concurrency {c}: {result['completed']}/{n} done, "
              f"{result['output_tokens_per_s']:.1f} output tokens/s, p50 TTFT {result['ttft_ms']['p50']:.0f} ms"
              + (f", {result['prefill_calls']} prefill calls, {result['decode_steps']} decode steps"
                 if "prefill_calls" in result else ""), flush=True)
        levels.append(result)
    return levels


GENERATE = """
import json, sys, time
import numpy as np
import qwen2_jax
ckpt, batch, prompt_len, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = qwen2_jax.from_pretrained(ckpt, dtype="float32")
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
    new = max(args.output_len, 64)
    out = subprocess.run([sys.executable, "-c", GENERATE, ckpt, str(batch), str(args.input_len), str(new)],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["decode_tokens_per_s"]


# ---- report ---------------------------------------------------------------------------------------------------
def _f(x, digits=1):
    return "-" if x is None else f"{x:,.{digits}f}"


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


def comparison(result) -> str:
    ours, hf = result["servers"].get("qwen2-jax"), result["servers"].get("transformers")
    lines = []
    if ours and hf:
        for a, b in zip(ours, hf):
            ratio = a["output_tokens_per_s"] / b["output_tokens_per_s"] if b["output_tokens_per_s"] else None
            ttft = (b["ttft_ms"]["p50"] / a["ttft_ms"]["p50"]) if a["ttft_ms"]["p50"] and b["ttft_ms"]["p50"] else None
            lines.append(f"concurrency {a['concurrency']}: output tokens/s {_f(ratio, 2)}x transformers serve's; "
                         f"p50 TTFT {_f(ttft, 2)}x lower")
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
    for side, levels in result["servers"].items():
        c = [r["concurrency"] for r in levels]
        a.plot(c, [r["output_tokens_per_s"] for r in levels], "o-", label=side)
        b.plot(c, [r["latency_ms"]["p99"] / 1000 for r in levels], "o-", label=f"{side}, request p99")
        b.plot(c, [r["ttft_ms"]["p99"] / 1000 for r in levels], "s--", label=f"{side}, TTFT p99")
    for ax, title, unit in ((a, "output tokens/s", "tokens/s"), (b, "p99 latency", "s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['config']}: {result['input_len']} tokens in, {result['output_len']} out, CPU "
                 f"({result['cores']} cores), {result['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = bench_config(args.config)
    ckpt = prepare_checkpoint(cfg, args.work_dir)
    tokenizer = load_tokenizer(ckpt)
    prompts_for = lambda n, seed: make_prompts(ckpt, tokenizer, cfg.vocab_size, n, args.input_len, seed)
    log_dir = os.path.join(os.path.dirname(ckpt), "serve-logs")
    os.makedirs(log_dir, exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
              "config": args.config, "input_len": args.input_len, "output_len": args.output_len,
              "request_rate": args.request_rate, "cores": len(os.sched_getaffinity(0)), "servers": {}}
    if not args.no_generate:
        result["generate_b8_decode_tokens_per_s"] = generate_reference(ckpt, args)
        print(f"generate, batch 8: {result['generate_b8_decode_tokens_per_s']:.1f} decode tokens/s", flush=True)
    sides = [("qwen2-jax", lambda port: start_ours(ckpt, args, port, log_dir), "bench", {"ignore_eos": True})]
    if args.hf:
        sides.append(("transformers", lambda port: start_hf(ckpt, port, log_dir), ckpt, None))
    for side, start, model, extra in sides:
        server = start(free_port())
        try:
            ready = server.wait_ready()
            print(f"{server.name} ready in {ready:.0f} s", flush=True)
            result.setdefault("startup_s", {})[side] = ready
            result["servers"][side] = bench_server(server, model, args, prompts_for, extra)
        finally:
            server.stop()
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


if __name__ == "__main__":
    sys.exit(main())
