"""The transformers side of ``qwen2-jax bench``, run as a separate process by file path, never imported.

    python qwen2_jax/bench_hf_runner.py --checkpoint DIR --threads N

It is the only file of the package that imports torch (so the package itself never needs it). It loads the
checkpoint once (``Qwen2MoeForCausalLM.from_pretrained(dir, dtype=torch.float32)``), prints one JSON line
``{"ready": ...}``, then answers requests, one JSON line in and one out, until stdin closes:

    {"op": "generate", "prompts": [[ids...], ...], "max_new_tokens": n}  -> {"seconds": s, "tokens": [[...]]}
    {"op": "forward", "ids": [[ids...]]}                                   -> {"seconds": s}

Each request runs once (the caller repeats and warms up). ``generate`` is greedy with ``min_new_tokens =
max_new_tokens`` so that no row stops early. Every answer carries ``max_rss_bytes``, the process's peak RSS.
If torch or transformers cannot be imported it prints ``{"error": "..."}`` and exits with status 3.
"""

import argparse
import json
import resource
import sys
import time

MISSING = 3  # exit status: torch or transformers not installed


def _reply(obj):
    obj["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--threads", type=int, required=True)
    args = ap.parse_args()
    try:
        import torch
        import transformers
        from transformers import Qwen2MoeForCausalLM
    except ImportError as e:
        _reply({"error": f"torch/transformers not installed ({e})"})
        return MISSING

    # The same number of threads as XLA:CPU's intra-op pool, so that both sides use the same cores.
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = Qwen2MoeForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    model.eval()
    _reply({"ready": True, "load_seconds": time.perf_counter() - t0, "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "experts_implementation": getattr(model.config, "_experts_implementation", None)})

    for line in sys.stdin:
        req = json.loads(line)
        with torch.inference_mode():
            if req["op"] == "generate":
                ids = torch.tensor(req["prompts"], dtype=torch.long)  # equal lengths: no padding needed
                n = req["max_new_tokens"]
                t0 = time.perf_counter()
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, pad_token_id=0)
                seconds = time.perf_counter() - t0
                _reply({"seconds": seconds, "tokens": out[:, ids.shape[1]:].tolist()})
            elif req["op"] == "forward":
                ids = torch.tensor(req["ids"], dtype=torch.long)
                t0 = time.perf_counter()
                model(ids, use_cache=False)
                _reply({"seconds": time.perf_counter() - t0})
            else:
                _reply({"error": f"unknown op {req['op']!r}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
