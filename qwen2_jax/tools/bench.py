"""``qwen2-jax bench``: the JAX port and transformers side by side, on the same weights, in one run.

    qwen2-jax bench [--config qwen2-57b-a14b-quarter] [--batches 1,8] [--rounds 2] [--json F] [--plot F]

A random float32 checkpoint of ``--config`` is written once (``qwen2_jax.convert.write_hf_checkpoint``) and
loaded by both sides: ours with ``qwen2_jax.from_pretrained``, transformers' in a separate process running
``bench_hf_runner.py`` (the package never imports torch). The two sides take turns, JAX round then HF round,
``--rounds`` times, and the table reports medians over the rounds, so that a change in the machine's load hits
both. Measured, for each side:

- decode tokens/s at each batch size: ``generate`` of ``--new-tokens`` tokens minus ``generate`` of one token
  (so time to first token is excluded) from ``--prompt-len``-token prompts, greedy, never stopping early;
- prefill tokens/s: one forward over ``--prefill-len`` tokens (logits at every position, as HF's forward);
- time to first token: ``generate`` of one token from a ``--prefill-len``-token prompt;
- compile time (JAX: first call minus a steady call, persistent compilation cache off) and peak RSS.

It also measures the memory bandwidth (a read of a 1 GiB array, larger than the caches) at each round and
prints the floor of a decode step: the bytes of weights one step reads (``decode_step_bytes``) over the
median bandwidth. Threads: XLA:CPU runs one thread per core this process may use; torch gets as many
(``torch.set_num_threads``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from qwen2_jax.errors import InputError

QUARTER = "qwen2-57b-a14b-quarter"
# A few-MB model for the tests and for trying the command out quickly.
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_experts=8, num_experts_per_tok=2, max_position_embeddings=4096)
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_hf_runner.py")
# The issue's CPU targets, as ratios JAX / transformers (time to first token: transformers / JAX).
TARGETS = {"decode_b1": 3.0, "decode_b8": 4.0, "ttft": 1.3}
FLOOR_TARGET = 2.0  # batch-1 decode step within this factor of its memory-bandwidth floor


# ---- the decode step's bytes and the machine's bandwidth ----------------------------------------------------
def expected_distinct_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts per layer that ``tokens`` tokens touch, each choosing ``top_k`` distinct experts
    uniformly (random weights route nearly uniformly): exactly ``top_k`` for one token."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def decode_step_bytes(cfg, batch: int, itemsize: int, distinct_experts: float | None = None) -> dict:
    """Bytes of weights one decode step of ``batch`` rows reads: every non-expert weight (embedding rows
    aside, lm_head in full) plus the distinct routed experts the batch touches in each sparse layer."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    attention = h * (q + 2 * kv) + q * h + (q + 2 * kv if cfg.qkv_bias else 0) + 2 * h  # with the two norms
    sparse_shared = h * cfg.num_experts + 3 * h * cfg.shared_expert_intermediate_size + h  # router, shared expert
    dense_mlp = 3 * h * cfg.intermediate_size
    n_sparse, n_dense = cfg.num_sparse_layers, cfg.num_dense_layers
    non_expert = (cfg.num_hidden_layers * attention + n_sparse * sparse_shared + n_dense * dense_mlp
                  + h + h * cfg.vocab_size)  # final norm, lm_head
    if distinct_experts is None:
        distinct_experts = expected_distinct_experts(cfg.num_experts, cfg.num_experts_per_tok, batch)
    experts = n_sparse * distinct_experts * 3 * h * cfg.moe_intermediate_size
    return {"batch": batch, "distinct_experts_per_layer": distinct_experts, "non_expert_bytes": non_expert * itemsize,
            "expert_bytes": experts * itemsize, "total_bytes": (non_expert + experts) * itemsize}


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5, threads: int | None = None) -> dict:
    """Read bandwidth in GB/s of an array larger than the caches: a jitted sum (one XLA:CPU thread) and numpy
    sums over ``threads`` parts in as many threads (numpy releases the GIL); the machine's figure is the larger."""
    import threading

    import jax
    import jax.numpy as jnp
    import numpy as np

    threads = threads or len(os.sched_getaffinity(0))
    x = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    jax.block_until_ready(total(x))
    jax_s = _median_seconds(lambda: jax.block_until_ready(total(x)), repeats)
    parts = np.array_split(np.asarray(x), threads)

    def numpy_sums():
        workers = [threading.Thread(target=p.sum) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    np_s = _median_seconds(numpy_sums, repeats)
    jax_gbs, np_gbs = nbytes / jax_s / 1e9, nbytes / np_s / 1e9
    return {"jax_sum_gbs": jax_gbs, "numpy_threads_gbs": np_gbs, "threads": threads, "gbs": max(jax_gbs, np_gbs)}


def _bandwidth_in_subprocess() -> dict:
    """The bandwidth, measured in a child process so that its 1 GiB array does not count in our peak RSS."""
    code = "import json; from qwen2_jax.tools.bench import measure_bandwidth; print(json.dumps(measure_bandwidth()))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"bandwidth measurement failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- the config and the checkpoint --------------------------------------------------------------------------
def bench_config(name: str, layers: int | None = None):
    from qwen2_jax.model.config import Qwen2MoeConfig, load_config

    cfg = Qwen2MoeConfig(**TINY) if name == "tiny" else load_config(name)
    if layers is not None:
        if layers < 1:
            raise InputError(f"--layers must be >= 1, got {layers}")
        cfg = cfg.replace(num_hidden_layers=layers, mlp_only_layers=tuple(i for i in cfg.mlp_only_layers if i < layers))
    return cfg


def random_checkpoint(cfg, work_dir: str | None) -> str:
    """A random float32 HF checkpoint for ``cfg`` (seed 0), written once and reused: its directory name is
    a hash of the config."""
    import hashlib

    from qwen2_jax.convert import write_hf_checkpoint

    work_dir = work_dir or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                        "qwen2-jax", "bench")
    digest = hashlib.sha256(json.dumps(cfg.to_hf_dict(), sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(work_dir, f"random-f32-seed0-{digest}")
    # config.json is written last, so its presence means the weights are complete.
    if not os.path.isfile(os.path.join(path, "config.json")):
        print(f"writing a random float32 checkpoint to {path} (once)", file=sys.stderr, flush=True)
        write_hf_checkpoint(cfg, path, dtype="float32", seed=0)
    return path


def prompts(vocab_size: int, batch: int, length: int, seed: int) -> list[list[int]]:
    """The same token ids for both sides (ids below 100 avoided: nothing special about them, just tidy)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(min(100, vocab_size // 2), vocab_size, size=(batch, length)).tolist()


# ---- the two sides ----------------------------------------------------------------------------------------
def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class JaxSide:
    name = "jax"

    def __init__(self, checkpoint: str, quantize: str | None = None):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from qwen2_jax import from_pretrained
        from qwen2_jax.inference.generate import generate

        t0 = time.perf_counter()
        self.model = from_pretrained(checkpoint, dtype="float32", quantize=quantize)
        jax.block_until_ready(nnx.state(self.model))
        self.load_seconds = time.perf_counter() - t0
        self._generate = generate
        graphdef, self._params = nnx.split(self.model)
        self._forward = jax.jit(lambda params, ids: nnx.merge(graphdef, params).forward(ids).logits)
        self._jnp = jnp
        self.compile_seconds: dict[str, float] = {}

    def generate(self, batch_prompts, max_new_tokens: int):
        t0 = time.perf_counter()
        out = self._generate(self.model, batch_prompts, max_new_tokens=max_new_tokens, eos_token_ids=())
        return time.perf_counter() - t0, out

    def forward(self, ids) -> float:
        x = self._jnp.asarray(ids, self._jnp.int32)
        t0 = time.perf_counter()
        self._forward(self._params, x).block_until_ready()
        return time.perf_counter() - t0

    def warm_up(self, key: str, call) -> None:
        """Compile time: the first call minus a steady one."""
        first = call()
        self.compile_seconds[key] = max(first - call(), 0.0)

    def memory(self) -> dict:
        return {"max_rss_bytes": _max_rss(), "rss_bytes": _rss_now()}


class HfUnavailable(Exception):
    pass


class HfSide:
    """transformers in a child process (``bench_hf_runner.py``), loaded once and driven request by request."""

    name = "hf"

    def __init__(self, checkpoint: str, threads: int, python: str):
        self.proc = subprocess.Popen([python, RUNNER, "--checkpoint", checkpoint, "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self._read()
        if "error" in ready:
            self.close()
            raise HfUnavailable(ready["error"])
        self.info = ready
        self.load_seconds = ready["load_seconds"]
        self.last = ready

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise HfUnavailable(f"the transformers process ({RUNNER}) exited with status {code}")
        self.last = json.loads(line)
        return self.last

    def _ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if "error" in out:
            raise RuntimeError(f"transformers process: {out['error']}")
        return out

    def generate(self, batch_prompts, max_new_tokens: int):
        out = self._ask(op="generate", prompts=batch_prompts, max_new_tokens=max_new_tokens)
        return out["seconds"], out["tokens"]

    def forward(self, ids) -> float:
        return self._ask(op="forward", ids=ids)["seconds"]

    def warm_up(self, key: str, call) -> None:
        call()

    def memory(self) -> dict:
        return {"max_rss_bytes": self.last["max_rss_bytes"]}

    def close(self):
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()


@dataclasses.dataclass
class Workload:
    batches: list[int]
    decode_prompts: dict  # batch -> prompts
    new_tokens: int
    long_prompt: list[list[int]]  # [1, prefill_len]


def warm_up(side, w: Workload) -> None:
    for b in w.batches:
        side.warm_up(f"generate b{b} (prefill {len(w.decode_prompts[b][0])} + decode)",
                     lambda b=b: side.generate(w.decode_prompts[b], 1)[0])
    side.warm_up(f"generate b1 (prefill {len(w.long_prompt[0])} + decode)", lambda: side.generate(w.long_prompt, 1)[0])
    side.warm_up(f"forward {len(w.long_prompt[0])}", lambda: side.forward(w.long_prompt))


def measure_round(side, w: Workload) -> dict:
    """One measurement of everything on one side."""
    out = {"tokens": {}}
    for b in w.batches:
        full, tokens = side.generate(w.decode_prompts[b], w.new_tokens)
        first, _ = side.generate(w.decode_prompts[b], 1)
        decode = max(full - first, 1e-9)  # (tiny models: timing noise can exceed the decode time)
        out[f"decode_b{b}_tokens_per_s"] = b * (w.new_tokens - 1) / decode
        out[f"decode_b{b}_step_ms"] = 1e3 * decode / (w.new_tokens - 1)
        out["tokens"][b] = [list(map(int, t)) for t in tokens]
    out["ttft_s"], _ = side.generate(w.long_prompt, 1)
    out["prefill_tokens_per_s"] = len(w.long_prompt[0]) / side.forward(w.long_prompt)
    return out


def _median_rounds(rounds: list[dict]) -> dict:
    keys = [k for k in rounds[0] if k != "tokens"]
    return {k: statistics.median(r[k] for r in rounds) for k in keys}


# ---- the report ---------------------------------------------------------------------------------------------
def _ratio(a, b):
    return a / b if a and b else None


def comparison_rows(jax_m: dict, hf_m: dict | None, batches: list[int]) -> list[dict]:
    """Rows of the table: what, JAX, HF, ratio (higher is better for JAX), target."""
    rows = []
    for b in batches:
        key = f"decode_b{b}_tokens_per_s"
        rows.append({"what": f"decode tokens/s, batch {b}", "key": key, "jax": jax_m[key],
                     "hf": hf_m and hf_m[key], "ratio": hf_m and _ratio(jax_m[key], hf_m[key]),
                     "target": TARGETS.get(f"decode_b{b}")})
    rows.append({"what": "prefill tokens/s", "key": "prefill_tokens_per_s", "jax": jax_m["prefill_tokens_per_s"],
                 "hf": hf_m and hf_m["prefill_tokens_per_s"],
                 "ratio": hf_m and _ratio(jax_m["prefill_tokens_per_s"], hf_m["prefill_tokens_per_s"]), "target": None})
    rows.append({"what": "time to first token (s)", "key": "ttft_s", "jax": jax_m["ttft_s"],
                 "hf": hf_m and hf_m["ttft_s"], "ratio": hf_m and _ratio(hf_m["ttft_s"], jax_m["ttft_s"]),
                 "target": TARGETS["ttft"]})
    return rows


def _fmt(x, digits=2):
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if abs(x) < 1000 else f"{x:,.0f}"


def format_table(result: dict) -> str:
    rows = result["rows"]
    lines = ["| measure | JAX | transformers | JAX advantage | target | met |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        met = "-" if r["target"] is None or r["ratio"] is None else ("yes" if r["ratio"] >= r["target"] else "no")
        target = "-" if r["target"] is None else f">= {r['target']:g}x"
        lines.append(f"| {r['what']} | {_fmt(r['jax'])} | {_fmt(r['hf'])} | "
                     f"{'-' if r['ratio'] is None else _fmt(r['ratio']) + 'x'} | {target} | {met} |")
    comp = result["jax"]["compile_seconds"]
    lines.append(f"| compile time (s, all shapes) | {sum(comp.values()):.1f} | - | - | - | - |")
    gib = 1 << 30
    hf_rss = result["hf"]["memory"]["max_rss_bytes"] / gib if result.get("hf") else None
    jax_rss = result["jax"]["memory"]["max_rss_bytes"] / gib
    lines.append(f"| peak RSS (GiB) | {jax_rss:.2f} | {_fmt(hf_rss)} | - | - | - |")
    lines.append(f"| load time (s) | {result['jax']['load_seconds']:.1f} | "
                 f"{_fmt(result['hf']['load_seconds'], 1) if result.get('hf') else '-'} | - | - | - |")
    return "\n".join(lines)


def format_floor(floor: dict) -> str:
    f = floor
    return (f"decode step floor, batch 1: {f['bytes'] / 1e9:.3f} GB of weights ({f['distinct_experts']:g} experts "
            f"per layer) / {f['bandwidth_gbs']:.1f} GB/s = {f['floor_ms']:.2f} ms; measured step "
            f"{f['step_ms']:.2f} ms = {f['ratio']:.2f}x the floor (target <= {FLOOR_TARGET:g}x: "
            f"{'met' if f['ratio'] <= FLOOR_TARGET else 'not met'})")


def plot(result: dict, path: str) -> str | None:
    """tokens/s against batch size for both sides, and the bandwidth ceiling (batch / floor of a step)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    import numpy as np

    batches = result["batches"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for side, label in (("jax", "JAX port"), ("hf", "transformers")):
        if result.get(side):
            tokens_per_s = [result[side]["median"][f"decode_b{b}_tokens_per_s"] for b in batches]
            ax.plot(batches, tokens_per_s, "o-", label=label)
    xs = np.arange(1, max(batches) + 1)
    ceiling = [b / (result["step_bytes"][str(b)]["total_bytes"] / (result["bandwidth"]["gbs"] * 1e9)) for b in xs]
    ax.plot(xs, ceiling, "--", color="gray", label=f"bandwidth ceiling ({result['bandwidth']['gbs']:.0f} GB/s)")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.set_title(f"{result['config']}, float32, {result['threads']} threads")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---- the run ----------------------------------------------------------------------------------------------
def benchmark(args, batches: list[int]) -> int:
    """The whole benchmark ``qwen2-jax bench`` runs (the module docstring), its progress on stderr, the table on
    stdout, the results to ``args.json`` (and the plot to ``args.plot``). ``args``: the command's options
    (``qwen2_jax.cli.bench``), checked; ``batches``: the decode batch sizes."""
    import jax

    cfg = bench_config(args.config, args.layers)
    if args.checkpoint:
        from qwen2_jax.model.config import Qwen2MoeConfig

        cfg = Qwen2MoeConfig.from_json(args.checkpoint)
    for n, flag in ((args.prompt_len + args.new_tokens, "--prompt-len + --new-tokens"),
                    (args.prefill_len + 1, "--prefill-len + 1")):
        if n > cfg.max_position_embeddings:
            raise InputError(f"{flag} = {n} exceeds the config's max_position_embeddings {cfg.max_position_embeddings}")
    checkpoint = args.checkpoint or random_checkpoint(cfg, args.work_dir)
    # XLA:CPU's intra-op pool has one thread per core this process may run on; torch gets the same number.
    threads = len(os.sched_getaffinity(0))
    machine = _machine()
    config_name = args.config if args.config in (QUARTER, "tiny") else os.path.basename(os.path.abspath(args.config))
    if args.layers:
        config_name += f" ({args.layers} layers)"
    print(f"bench: {config_name}, float32, {threads} threads, checkpoint {checkpoint}", file=sys.stderr, flush=True)

    w = Workload(batches=batches, new_tokens=args.new_tokens,
                 decode_prompts={b: prompts(cfg.vocab_size, b, args.prompt_len, seed=b) for b in batches},
                 long_prompt=prompts(cfg.vocab_size, 1, args.prefill_len, seed=1000))

    sides = [JaxSide(checkpoint, args.quantize)]
    hf_note = None
    if not args.no_hf:
        try:
            sides.append(HfSide(checkpoint, threads, args.hf_python))
        except HfUnavailable as e:
            hf_note = f"{e}; measuring the JAX side only"
            print(f"bench: {hf_note}", file=sys.stderr, flush=True)
    try:
        for side in sides:
            print(f"bench: warming up {side.name}", file=sys.stderr, flush=True)
            warm_up(side, w)
        rounds = {side.name: [] for side in sides}
        bandwidths = []
        for r in range(args.rounds):
            # The bandwidth too, each round: the floor is compared with steps measured under the same load.
            bandwidths.append(_bandwidth_in_subprocess())
            for side in sides:  # alternately: JAX, HF, JAX, HF, ...
                print(f"bench: round {r + 1}/{args.rounds}: {side.name}", file=sys.stderr, flush=True)
                rounds[side.name].append(measure_round(side, w))
        memory = {side.name: side.memory() for side in sides}
    finally:
        for side in sides[1:]:
            side.close()

    bandwidth = {k: statistics.median(b[k] for b in bandwidths) for k in bandwidths[0]}
    bandwidth["rounds"] = [b["gbs"] for b in bandwidths]
    jax_side = sides[0]
    step_bytes = {str(b): decode_step_bytes(cfg, b, 4) for b in range(1, max(batches) + 1)}
    jax_median = _median_rounds(rounds["jax"])
    floor_ms = 1e3 * step_bytes["1"]["total_bytes"] / (bandwidth["gbs"] * 1e9)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "config": config_name, "dtype": "float32", "threads": threads,
        "quantize": args.quantize,
        "machine": machine, "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "checkpoint": checkpoint, "batches": batches, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "prefill_len": args.prefill_len, "rounds": args.rounds, "bandwidth": bandwidth, "step_bytes": step_bytes,
        "jax": {"median": jax_median, "rounds": rounds["jax"], "compile_seconds": jax_side.compile_seconds,
                "load_seconds": jax_side.load_seconds, "memory": memory["jax"],
                "jax_version": jax.__version__, "backend": jax.default_backend()},
        "hf": None, "hf_note": hf_note,
    }
    if 1 in batches and not args.quantize:  # the floor counts float32 weights
        result["floor"] = {"bytes": step_bytes["1"]["total_bytes"],
                           "distinct_experts": step_bytes["1"]["distinct_experts_per_layer"],
                           "bandwidth_gbs": bandwidth["gbs"], "floor_ms": floor_ms,
                           "step_ms": jax_median["decode_b1_step_ms"],
                           "ratio": jax_median["decode_b1_step_ms"] / floor_ms}
    if "hf" in rounds:
        hf = sides[1]
        result["hf"] = {"median": _median_rounds(rounds["hf"]), "rounds": rounds["hf"], "load_seconds": hf.load_seconds,
                        "memory": memory["hf"], **{k: hf.info[k] for k in ("torch", "transformers", "threads",
                                                                             "experts_implementation")}}
        last_j, last_h = rounds["jax"][-1]["tokens"], rounds["hf"][-1]["tokens"]
        result["greedy_rows_equal"] = {str(b): sum(a == c for a, c in zip(last_j[b], last_h[b])) / b for b in batches}
    result["rows"] = comparison_rows(jax_median, result["hf"] and result["hf"]["median"], batches)

    print(f"\n{config_name}, float32, {threads} threads, {args.rounds} alternating rounds (medians), "
          f"jax {jax.__version__} ({jax.default_backend()})"
          + (f" vs torch {result['hf']['torch']} / transformers {result['hf']['transformers']}"
             if result["hf"] else ""))
    print(format_table(result))
    print(f"\nmemory bandwidth: {bandwidth['gbs']:.1f} GB/s (jitted sum {bandwidth['jax_sum_gbs']:.1f}, "
          f"numpy sums in {bandwidth['threads']} threads {bandwidth['numpy_threads_gbs']:.1f})")
    if "floor" in result:
        print(format_floor(result["floor"]))
    if result.get("greedy_rows_equal"):
        print("greedy tokens equal to transformers' (share of rows, last round): "
              + ", ".join(f"batch {b}: {v:.0%}" for b, v in result["greedy_rows_equal"].items()))
    print("compile (s): " + ", ".join(f"{k} {v:.1f}" for k, v in jax_side.compile_seconds.items()))
    if hf_note:
        print(f"note: {hf_note}")
    _write_json(args.json, result)
    print(f"wrote {args.json}")
    if args.plot:
        note = plot(result, args.plot)
        print(note or f"wrote {args.plot}")
    return 0


def _write_json(path: str, result: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)


def _machine() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    return f"{os.cpu_count()} cores ({cpu}), load average {load:.1f} at start"
