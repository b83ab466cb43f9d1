"""``qwen2-jax serve``: the command line of the OpenAI-compatible server (``qwen2_jax.inference.serving.server``)."""

from __future__ import annotations

import argparse
import importlib.util

from qwen2_jax.errors import InputError

from .common import (add_checkpoint_argument, add_dtype_argument, add_mesh_argument, add_quantize_argument,
                     check_quantize)

DEFAULT_MAX_LEN = 2048  # qwen2_jax.inference.serving.server.DEFAULT_MAX_LEN
DEFAULT_BATCH_WAIT_MS = 10.0  # qwen2_jax.inference.serving.engine.DEFAULT_BATCH_WAIT_MS (tests/test_cli.py checks)

DESCRIPTIONS = {"serve": """\
Serves the model in CKPT, a local checkpoint directory (Hugging Face or converted Orbax, with its
tokenizer.json), over HTTP with the OpenAI API: POST /v1/chat/completions and /v1/completions (streamed or not),
GET /v1/models, /health and /metrics (Prometheus). Requests are decoded together in --slots rows (continuous
batching); a prompt that begins like an earlier one reuses its keys and values (prefix caching). Every step is
compiled before the server listens; stderr says what was loaded and compiled, then the address. Needs the
serve extra (pip install 'qwen2-jax[serve]'). Runs until Ctrl-C.

example:
  qwen2-jax serve ~/models/Qwen2-57B-A14B-Instruct --slots 16 --max-len 4096 --mesh auto --port 8000
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "~/models/Qwen2-57B-A14B-Instruct", "messages": [{"role": "user", "content": "Hi"}]}'"""}


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the model name clients pass (default: CKPT as given)")
    g = parser.add_argument_group("engine")
    g.add_argument("--slots", type=int, default=16, metavar="N", help="requests decoded together (default: 16)")
    g.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN, metavar="N",
                   help=f"positions per request, prompt + max_tokens, at most the model's context (default: "
                        f"{DEFAULT_MAX_LEN})")
    g.add_argument("--prefill-chunk", type=int, default=512, metavar="N",
                   help="prompt tokens per prefill call, between two decode steps: whole prompts packed together, "
                        "a longer one in pieces of this size; a power of two that divides --max-len or is at least "
                        "it (default: 512)")
    g.add_argument("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS, metavar="MS",
                   help="an idle server lets a request that comes in wait this long for others, so that a burst is "
                        f"prefilled in full packed calls; 0 never waits (default: {DEFAULT_BATCH_WAIT_MS:g})")
    g.add_argument("--max-waiting", type=int, default=256, metavar="N",
                   help="requests that may wait for a slot; past it the server answers 503 (default: 256)")
    g.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="prefill every prompt whole (default: a prompt that begins with the tokens of a finished "
                        "request, such as the next turn of a conversation, or with another request's prompt reuses "
                        "their keys and values, kept in the free rows until the least recently used are given up)")
    g = parser.add_argument_group("loading")
    add_dtype_argument(g)
    add_quantize_argument(g)
    add_mesh_argument(g)


def run(name: str, args) -> int:
    from qwen2_jax.inference.serving.engine import check_settings
    from qwen2_jax.inference.serving.server import serve
    from qwen2_jax.inference.tokenizer import load_tokenizer
    from qwen2_jax.model.config import Qwen2MoeConfig
    from qwen2_jax.model.hf_files import check_checkpoint_dir

    from .generate import load_model

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"qwen2-jax serve needs {' and '.join(missing)}: pip install 'qwen2-jax[serve]'")
    check_checkpoint_dir(args.checkpoint)
    if not 0 <= args.port < 65536:
        raise InputError(f"--port must be in [0, 65535], got {args.port}")
    check_quantize(args.quantize)
    cfg = Qwen2MoeConfig.from_json(args.checkpoint)
    check_settings(cfg.context_length, flags=True, slots=args.slots, max_len=args.max_len,
                   prefill_chunk=args.prefill_chunk, max_waiting=args.max_waiting, batch_wait_ms=args.batch_wait_ms)
    tokenizer = load_tokenizer(args.checkpoint)
    model = load_model(args, args.checkpoint, cfg)
    serve(model, tokenizer, name=args.served_model_name or args.checkpoint, host=args.host, port=args.port,
          slots=args.slots, max_len=args.max_len, prefill_chunk=args.prefill_chunk, max_waiting=args.max_waiting,
          prefix_caching=args.prefix_caching, batch_wait_ms=args.batch_wait_ms)
    return 0
