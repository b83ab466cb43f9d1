"""Full-scale GPU benchmark of the JAX port (see docs/performance.md); run it through scripts/gpu_bench.sh.

    scripts/gpu_bench.sh            # Qwen2-57B-A14B, random bf16 weights made on the GPU (~115 GB; one H200)
    scripts/gpu_bench.sh --tiny     # the same code path on CPU with a tiny config (what the tests run)

Three phases, each in its own process so that the JAX process (which preallocates most of the GPU memory) and
the torch process never hold the GPU at the same time; this process only orchestrates and reports:

1. ``--phase jax``: the full config with random bf16 weights created on the device by one jitted function
   per parameter (never on the host): decode tokens/s at each ``--batches`` (``generate`` of ``--new-tokens``
   minus ``generate`` of one token, from ``--prompt-len``-token prompts), prefill tokens/s over
   ``--prefill-len`` tokens, time to first token from a ``--prefill-len`` prompt; each decode figure with its
   share of the HBM roofline (bytes of weights a step reads / ``--hbm-gbs``). Then the same at a truncated
   depth (``--compare-layers``) for the comparison with transformers. Between the two, the serving engine
   (``qwen2-jax serve``'s, without HTTP): ``--serve-slots`` requests of ``--prompt-len`` tokens at once into as
   many slots, its decode tokens/s while every slot is busy against ``generate``'s at that batch, its start-up
   (compiling every step) and time to first token.
2. ``--phase hf``: transformers at the truncated depth, random bf16 weights, the same workloads.
3. the report: one table, the targets, and one JSON file (``--json``).

A time budget (``--budget-s``) is shared by the phases; a measurement that would start past it is skipped
and reported as skipped, so the run always ends with a report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = "qwen2-57b-a14b-instruct"
HBM_GBS = 4800.0  # H200
TARGETS = {1: 120.0, 64: 1900.0}  # decode tokens/s at these batch sizes (full config)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--tiny", action="store_true", help="tiny config on CPU (the test of this script)")
    ap.add_argument("--phase", choices=("all", "jax", "hf"), default="all")
    ap.add_argument("--batches", default=None, help="decode batch sizes (default 1,16,64; tiny 1,2)")
    ap.add_argument("--prompt-len", type=int, default=None, help="decode prompt length (default 128; tiny 8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per decode run (default 32; tiny 3)")
    ap.add_argument("--prefill-len", type=int, default=None,
                    help="prefill / first-token prompt length (default 2048; tiny 16)")
    ap.add_argument("--compare-layers", type=int, default=None, help="depth of the HF comparison (default 8; tiny 1)")
    ap.add_argument("--serve-slots", type=int, default=None,
                    help="the serving engine's slots and concurrent requests (default 16; tiny 2; 0: skip it)")
    ap.add_argument("--hbm-gbs", type=float, default=HBM_GBS, help="memory bandwidth for the roofline (GB/s)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="time budget of the whole run (seconds)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers phase")
    ap.add_argument("--json", default=None, help="results file (default gpu_bench.json; tiny: gpu_bench_tiny.json)")
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # set by the orchestrator
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)  # a phase's JSON, set by the orchestrator
    args = ap.parse_args(argv)
    tiny = args.tiny
    defaults = dict(batches="1,2" if tiny else "1,16,64", prompt_len=8 if tiny else 128, new_tokens=3 if tiny else 32,
                    serve_slots=2 if tiny else 16,
                    prefill_len=16 if tiny else 2048, compare_layers=1 if tiny else 8,
                    json="gpu_bench_tiny.json" if tiny else "gpu_bench.json")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.batches = [int(b) for b in str(args.batches).split(",")]
    return args


def config(args, layers=None):
    sys.path.insert(0, ROOT)
    from qwen2_jax.tools.bench import bench_config

    return bench_config("tiny" if args.tiny else FULL, layers)


def prompts(vocab, batch, length, seed):
    import numpy as np

    return np.random.default_rng(seed).integers(100, vocab, size=(batch, length)).tolist()


def log(msg):
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- phase jax ------------------------------------------------------------------------------------------
def measure_jax(args, cfg, label, deadline, results, with_ttft=True, with_engine=False):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qwen2_jax import init_random
    from qwen2_jax.inference.generate import generate
    from qwen2_jax.tools.bench import decode_step_bytes

    out = {"label": label, "layers": cfg.num_hidden_layers, "decode": {}, "skipped": []}
    results.append(out)
    params = None
    t0 = time.perf_counter()
    model = init_random(cfg, dtype=jnp.bfloat16)  # on an accelerator, drawn on the device, weight by weight
    out["init_seconds"] = time.perf_counter() - t0
    out["param_bytes"] = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    log(f"{label}: {out['param_bytes'] / 1e9:.1f} GB of bf16 weights made on {jax.devices()[0].device_kind} "
        f"in {out['init_seconds']:.1f} s")

    def timed_generate(p, n):
        t = time.perf_counter()
        generate(model, p, max_new_tokens=n, eos_token_ids=())  # returns host lists: synchronised
        return time.perf_counter() - t

    for b in args.batches:
        if time.time() > deadline:
            out["skipped"].append(f"decode batch {b}")
            continue
        p = prompts(cfg.vocab_size, b, args.prompt_len, seed=b)
        t = time.perf_counter()
        timed_generate(p, 1)  # compiles prefill and decode for this batch
        compile_s = time.perf_counter() - t
        first = min(timed_generate(p, 1) for _ in range(2))
        full = min(timed_generate(p, args.new_tokens) for _ in range(2))
        step = max(full - first, 1e-9) / (args.new_tokens - 1)
        nbytes = decode_step_bytes(cfg, b, 2)
        out["decode"][str(b)] = {"tokens_per_s": b / step, "step_ms": 1e3 * step, "first_call_s": compile_s,
                                 "bytes_per_step": nbytes["total_bytes"],
                                 "distinct_experts_per_layer": nbytes["distinct_experts_per_layer"],
                                 "roofline_share": nbytes["total_bytes"] / (args.hbm_gbs * 1e9) / step}
        d = out["decode"][str(b)]
        log(f"{label}: decode batch {b}: {d['tokens_per_s']:.1f} tokens/s, {d['step_ms']:.2f} ms/step, "
            f"{100 * d['roofline_share']:.0f}% of the HBM roofline")
    if time.time() < deadline:
        graphdef, params = nnx.split(model)
        fwd = jax.jit(lambda params, ids: nnx.merge(graphdef, params).forward(ids).logits)
        ids = jnp.asarray(prompts(cfg.vocab_size, 1, args.prefill_len, seed=1000), jnp.int32)
        fwd(params, ids).block_until_ready()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fwd(params, ids).block_until_ready()
            times.append(time.perf_counter() - t)
        out["prefill_tokens_per_s"] = args.prefill_len / min(times)
        log(f"{label}: prefill {args.prefill_len}: {out['prefill_tokens_per_s']:.0f} tokens/s")
    else:
        out["skipped"].append("prefill")
    if with_ttft and time.time() < deadline:
        p = prompts(cfg.vocab_size, 1, args.prefill_len, seed=1000)
        timed_generate(p, 1)
        out["ttft_s"] = min(timed_generate(p, 1) for _ in range(2))
        log(f"{label}: time to first token ({args.prefill_len}-token prompt): {out['ttft_s'] * 1e3:.1f} ms")
    elif with_ttft:
        out["skipped"].append("time to first token")
    # The engine compiles ten programs before its first request: it starts only with that time left, since a
    # phase killed past its deadline would lose every figure.
    if with_engine and args.serve_slots and time.time() < deadline - (0 if args.tiny else 150):
        out["engine"] = measure_engine(args, model, cfg)
    elif with_engine and args.serve_slots:
        out["skipped"].append("serving engine")
    stats = jax.devices()[0].memory_stats() or {}
    out["peak_device_bytes"] = stats.get("peak_bytes_in_use")
    del model, params
    return out


def measure_engine(args, model, cfg):
    """The serving engine with ``--serve-slots`` requests submitted at once (greedy, no end token, twice
    ``--new-tokens`` each): decode tokens/s over the window in which every slot is busy (from the last first
    token to the first finish), start-up and time to first token."""
    from qwen2_jax.inference.serving.engine import Engine, Request, SamplingParams

    slots, new = args.serve_slots, 2 * args.new_tokens
    max_len = 1 << (args.prompt_len + new - 1).bit_length()
    t = time.perf_counter()
    engine = Engine(model, slots=slots, max_len=max_len, prefill_chunk=max_len, eos_token_ids=()).start()
    out = {"slots": slots, "max_len": max_len, "prompt_len": args.prompt_len, "new_tokens": new,
           "start_s": time.perf_counter() - t}
    log(f"engine: {slots} slots x {max_len} positions compiled and warmed up in {out['start_s']:.1f} s")
    try:
        arrivals = [[] for _ in range(slots)]  # per request: (time, tokens delivered)

        def deliver(i):
            return lambda tokens, finish: arrivals[i].append((time.perf_counter(), len(tokens), finish))

        t0 = time.perf_counter()
        requests = [engine.submit(Request(p, SamplingParams(max_tokens=new, ignore_eos=True), deliver(i)))
                    for i, p in enumerate(prompts(cfg.vocab_size, slots, args.prompt_len, seed=2000))]
        while any(not a or a[-1][2] is None for a in arrivals):
            time.sleep(0.01)
        wall = time.perf_counter() - t0
    finally:
        engine.stop()
    if any(sum(n for _, n, _ in a) != new for a in arrivals) or any(a[-1][2] != "length" for a in arrivals):
        raise RuntimeError(f"engine: a request did not end with {new} tokens: {[a[-1] for a in arrivals]}")
    begin = max(a[0][0] for a in arrivals)  # every slot busy from here ...
    end = min(a[-1][0] for a in arrivals)  # ... to the first finish
    busy = sum(n for a in arrivals for at, n, _ in a if begin < at <= end)
    out.update(wall_s=wall, ttft_s=[a[0][0] - t0 for a in arrivals],
               decode_tokens_per_s=busy / (end - begin) if end > begin and busy else None, requests=len(requests))
    log(f"engine: {slots} requests in {wall:.1f} s, decode {_fmt(out['decode_tokens_per_s'])} tokens/s with every "
        f"slot busy, time to first token {1e3 * min(out['ttft_s']):.0f} to {1e3 * max(out['ttft_s']):.0f} ms")
    return out


def phase_jax(args):
    import jax

    deadline = args.deadline or time.time() + args.budget_s
    results = []
    info = {"jax": jax.__version__, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "results": results}
    try:
        measure_jax(args, config(args), "full", deadline, results, with_engine=True)
        if time.time() < deadline:
            measure_jax(args, config(args, args.compare_layers), f"{args.compare_layers} layers", deadline, results)
        else:
            info["skipped"] = [f"{args.compare_layers}-layer comparison"]
    finally:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)


# ---- phase hf -------------------------------------------------------------------------------------------
def phase_hf(args):
    deadline = args.deadline or time.time() + args.budget_s
    out = {"label": f"{args.compare_layers} layers", "decode": {}, "skipped": []}
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, Qwen2MoeConfig
    except ImportError as e:
        out["error"] = f"torch/transformers not installed ({e})"
        with open(args.out, "w") as f:
            json.dump(out, f)
        return
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    cfg = config(args, args.compare_layers)
    hf_cfg = Qwen2MoeConfig.from_dict(cfg.to_hf_dict())
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    out.update(init_seconds=time.perf_counter() - t0, torch=torch.__version__, transformers=transformers.__version__,
               device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
               experts_implementation=getattr(model.config, "_experts_implementation", None))
    log(f"hf {out['label']}: model made on {out['device']} in {out['init_seconds']:.1f} s")

    def timed_generate(p, n):
        ids = torch.tensor(p, device=device)
        sync()
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - t

    try:
        with torch.inference_mode():
            for b in args.batches:
                if time.time() > deadline:
                    out["skipped"].append(f"decode batch {b}")
                    continue
                p = prompts(cfg.vocab_size, b, args.prompt_len, seed=b)
                timed_generate(p, 2)  # warm-up
                first = min(timed_generate(p, 1) for _ in range(2))
                full = min(timed_generate(p, args.new_tokens) for _ in range(2))
                step = max(full - first, 1e-9) / (args.new_tokens - 1)
                out["decode"][str(b)] = {"tokens_per_s": b / step, "step_ms": 1e3 * step}
                log(f"hf {out['label']}: decode batch {b}: {b / step:.1f} tokens/s")
            if time.time() < deadline:
                ids = torch.tensor(prompts(cfg.vocab_size, 1, args.prefill_len, seed=1000), device=device)
                model(ids, use_cache=False)
                times = []
                for _ in range(3):
                    sync()
                    t = time.perf_counter()
                    model(ids, use_cache=False)
                    sync()
                    times.append(time.perf_counter() - t)
                out["prefill_tokens_per_s"] = args.prefill_len / min(times)
                p = prompts(cfg.vocab_size, 1, args.prefill_len, seed=1000)
                timed_generate(p, 1)
                out["ttft_s"] = min(timed_generate(p, 1) for _ in range(2))
                log(f"hf {out['label']}: prefill {out['prefill_tokens_per_s']:.0f} tokens/s, "
                    f"first token {out['ttft_s'] * 1e3:.1f} ms")
            else:
                out["skipped"] += ["prefill", "time to first token"]
    finally:
        if device == "cuda":
            out["peak_device_bytes"] = torch.cuda.max_memory_allocated()
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


# ---- the orchestrator and the report ----------------------------------------------------------------------
def run_phase(args, phase, out, deadline) -> str | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--out", out, "--deadline", str(deadline),
           "--batches", ",".join(map(str, args.batches)), "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--prefill-len", str(args.prefill_len),
           "--compare-layers", str(args.compare_layers), "--hbm-gbs", str(args.hbm_gbs),
           "--serve-slots", str(args.serve_slots)]
    cmd += ["--tiny"] if args.tiny else []
    # A phase may overrun the deadline by one measurement; past that it is stopped and reported as such.
    timeout = max(deadline - time.time(), 0) + (60 if args.tiny else 90)
    try:
        code = subprocess.run(cmd, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return f"phase {phase} stopped after the time budget"
    return None if code == 0 else f"phase {phase} exited with status {code}"


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def report(args, jax_info, hf_info, notes) -> dict:
    lines = []
    device = jax_info.get("device", "?")
    lines.append(f"device: {device}, jax {jax_info.get('jax', '?')} ({jax_info.get('backend', '?')}), bf16 weights, "
                 f"HBM roofline at {args.hbm_gbs:g} GB/s")
    results = {r["label"]: r for r in jax_info.get("results", [])}
    full = results.get("full")
    met = {}
    if full:
        lines.append(f"\nfull config ({full['layers']} layers, {full['param_bytes'] / 1e9:.1f} GB of weights, "
                     f"made on the device in {full['init_seconds']:.0f} s):")
        lines.append("| batch | tokens/s | ms/step | GB read/step | roofline tokens/s | share of roofline | target |")
        lines.append("|---:|---:|---:|---:|---:|---:|---|")
        for b, d in full["decode"].items():
            ceiling = int(b) * args.hbm_gbs * 1e9 / d["bytes_per_step"]
            target = TARGETS.get(int(b)) if not args.tiny else None
            ok = None if target is None else d["tokens_per_s"] >= target
            met[b] = ok
            lines.append(f"| {b} | {d['tokens_per_s']:.1f} | {d['step_ms']:.2f} | {d['bytes_per_step'] / 1e9:.1f} | "
                         f"{ceiling:.0f} | {100 * d['roofline_share']:.0f}% | "
                         f"{'-' if target is None else ('>= %g: %s' % (target, 'met' if ok else 'NOT met'))} |")
        lines.append(f"prefill {args.prefill_len} tokens: {_fmt(full.get('prefill_tokens_per_s'), '.0f')} tokens/s; "
                     f"time to first token ({args.prefill_len}-token prompt): "
                     f"{_fmt(full.get('ttft_s') and full['ttft_s'] * 1e3)} ms; "
                     f"peak device memory {_fmt(full.get('peak_device_bytes') and full['peak_device_bytes'] / 1e9)} GB")
    eng = full and full.get("engine")
    if eng:
        gen = full["decode"].get(str(eng["slots"]), {}).get("tokens_per_s")
        rate = eng["decode_tokens_per_s"]
        lines.append(f"serving engine, {eng['slots']} requests of {eng['prompt_len']} + {eng['new_tokens']} tokens at "
                     f"once: decode {_fmt(rate)} tokens/s with every slot busy"
                     + (f" ({_fmt(rate and 100 * rate / gen, '.0f')}% of generate at batch {eng['slots']})" if gen else "")
                     + f"; time to first token {1e3 * min(eng['ttft_s']):.0f} to {1e3 * max(eng['ttft_s']):.0f} ms; "
                     f"start-up (every step compiled) {eng['start_s']:.0f} s")
    cmp_ = results.get(f"{args.compare_layers} layers")
    if cmp_:
        hf = hf_info if hf_info and "error" not in hf_info else {}
        lines.append(f"\n{args.compare_layers} layers, JAX port against transformers {hf.get('transformers', '-')} "
                     f"(torch {hf.get('torch', '-')}, experts implementation {hf.get('experts_implementation', '-')}):")
        lines.append("| measure | JAX | transformers | JAX / transformers |")
        lines.append("|---|---:|---:|---:|")
        for b, d in cmp_["decode"].items():
            h = hf.get("decode", {}).get(b, {}).get("tokens_per_s")
            lines.append(f"| decode tokens/s, batch {b} | {d['tokens_per_s']:.1f} | {_fmt(h)} | "
                         f"{_fmt(h and d['tokens_per_s'] / h, '.2f')}x |")
        j, h = cmp_.get("prefill_tokens_per_s"), hf.get("prefill_tokens_per_s")
        lines.append(f"| prefill tokens/s ({args.prefill_len}) | {_fmt(j, '.0f')} | {_fmt(h, '.0f')} | "
                     f"{_fmt(j and h and j / h, '.2f')}x |")
        j, h = cmp_.get("ttft_s"), hf.get("ttft_s")
        lines.append(f"| time to first token (ms) | {_fmt(j and j * 1e3)} | {_fmt(h and h * 1e3)} | "
                     f"{_fmt(j and h and h / j, '.2f')}x |")
    for r in jax_info.get("results", []):
        if r.get("skipped"):
            notes.append(f"skipped ({r['label']}, time budget): {', '.join(r['skipped'])}")
    if hf_info and hf_info.get("error"):
        notes.append(f"transformers side: {hf_info['error']}")
    elif hf_info and hf_info.get("skipped"):
        notes.append(f"skipped (transformers, time budget): {', '.join(hf_info['skipped'])}")
    lines += [f"note: {n}" for n in notes]
    print("\n".join(lines))
    return {"args": {k: v for k, v in vars(args).items() if k not in ("deadline", "out")}, "jax": jax_info,
            "hf": hf_info, "targets_met": met, "notes": notes, "date": time.strftime("%Y-%m-%d %H:%M")}


def main(argv=None):
    args = parse_args(argv)
    if args.phase == "jax":
        return phase_jax(args)
    if args.phase == "hf":
        return phase_hf(args)
    start = time.time()
    deadline = start + args.budget_s
    notes = []
    work = os.path.abspath(args.json) + ".parts"
    os.makedirs(work, exist_ok=True)
    jax_out, hf_out = os.path.join(work, "jax.json"), os.path.join(work, "hf.json")
    for f in (jax_out, hf_out):
        if os.path.exists(f):
            os.remove(f)
    # The HF phase gets what is left after the JAX phase, at least a fifth of the budget.
    note = run_phase(args, "jax", jax_out, deadline - 0.2 * args.budget_s if not args.no_hf else deadline)
    if note:
        notes.append(note)
    if not args.no_hf:
        note = run_phase(args, "hf", hf_out, max(deadline, time.time() + 0.2 * args.budget_s))
        if note:
            notes.append(note)
    load = lambda f: json.load(open(f)) if os.path.exists(f) else {}
    result = report(args, load(jax_out), load(hf_out) if not args.no_hf else None, notes)
    result["wall_seconds"] = time.time() - start
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json} ({result['wall_seconds']:.0f} s)")
    return 0 if load(jax_out).get("results") else 1


if __name__ == "__main__":
    sys.exit(main())
