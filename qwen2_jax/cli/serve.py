"""``qwen2-jax serve``: the command line of the OpenAI-compatible server (``qwen2_jax.inference.serving.server``).
The engine's flags carry vLLM's names and meanings; the names before them are refused with the new name."""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys

from qwen2_jax.errors import InputError

from .common import (add_checkpoint_argument, add_dtype_argument, add_mesh_argument, add_quantize_argument,
                     check_quantize)

DEFAULT_MAX_LEN = 2048  # qwen2_jax.inference.serving.server.DEFAULT_MAX_LEN
DEFAULT_BATCH_WAIT_MS = 10.0  # qwen2_jax.inference.serving.engine.DEFAULT_BATCH_WAIT_MS (tests/test_cli.py checks)
MIN_BATCHED_TOKENS = 16  # qwen2_jax.inference.serving.scheduler.MIN_CALL: the shortest prefill call

DESCRIPTIONS = {"serve": """\
Serves the model in CKPT, a local checkpoint directory (Hugging Face or converted Orbax, with its
tokenizer.json), over HTTP with the OpenAI API: POST /v1/chat/completions and /v1/completions (streamed or not),
GET /v1/models, /health and /metrics (Prometheus). The flags are vLLM's: up to --max-num-seqs requests are
decoded together (continuous batching), each at most --max-model-len tokens (prompt + max_tokens); their keys
and values live in pages of --block-size tokens, as many as --kv-cache-memory (or --num-gpu-blocks-override, or
--gpu-memory-utilization of the accelerator) allows; a prompt that begins like an earlier one reuses its pages
(prefix caching). The port is taken first (a port in use is refused at once), then the model loads and every
step is compiled; stderr says what was loaded and compiled, the KV cache's size, then "serving NAME on URL"
once requests are answered, and a line per finished request. With --api-key, the /v1 endpoints want
"Authorization: Bearer KEY". Needs the serve extra (pip install 'qwen2-jax[serve]'). Runs until Ctrl-C.

example:
  qwen2-jax serve ~/models/Qwen2-57B-A14B-Instruct --max-num-seqs 16 --max-model-len 4096 --mesh auto \\
      --port 8000 --api-key "$KEY"
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -H "Authorization: Bearer $KEY" \\
      -d '{"model": "~/models/Qwen2-57B-A14B-Instruct", "messages": [{"role": "user", "content": "Hi"}]}'
  qwen2-jax serve CKPT --kv-cache-memory 2GiB --max-num-batched-tokens 1024   # on CPU: the KV pages' bytes"""}

# The flags before vLLM's names: refused in one line that names the new flag.
RENAMED = {"--slots": "--max-num-seqs", "--max-len": "--max-model-len", "--prefill-chunk": "--max-num-batched-tokens",
           "--no-prefix-caching": "--no-enable-prefix-caching"}

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """An argparse ``type``: a byte count, plain (``2147483648``) or with a unit (``2GiB``, ``512MiB``, ``4GB``,
    ``1.5G``; K/M/G/T are powers of 1000, KiB/MiB/GiB/TiB of 1024)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m and _UNITS.get(m[2].lower())
    if not unit:
        raise argparse.ArgumentTypeError(f"expected bytes, e.g. 2147483648, 2GiB, 512MiB or 4GB; got {text!r}")
    value = int(float(m[1]) * unit)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 byte, got {text!r}")
    return value


class _Renamed(argparse.Action):
    """A flag from before vLLM's names: refused, naming the one that replaced it (hidden from --help)."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.new} (vLLM's name)")


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the model name clients pass (default: CKPT as given)")
    parser.add_argument("--api-key", metavar="KEY",
                        help="answer the /v1 endpoints only with the header 'Authorization: Bearer KEY', others "
                             "401; /health and /metrics stay open, as vLLM's (default: none, no key asked)")
    parser.add_argument("--disable-log-requests", action="store_true",
                        help="no line on stderr per finished request (default: one line each: id, prompt, cached "
                             "and output tokens, time to first token, total time, finish reason)")
    g = parser.add_argument_group("engine (vLLM's names)")
    g.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help=f"tokens per request, prompt + max_tokens, at most the model's context (default: "
                        f"{DEFAULT_MAX_LEN}, or the model's context where it is shorter)")
    g.add_argument("--max-num-seqs", type=int, default=16, metavar="N",
                   help="requests decoded together (default: 16)")
    g.add_argument("--max-num-batched-tokens", type=int, default=512, metavar="N",
                   help=f"prompt tokens per prefill call, between two decode steps: whole prompts packed together, a "
                        f"longer one in pieces of this size; at least {MIN_BATCHED_TOKENS} (default: 512)")
    g.add_argument("--block-size", type=int, default=16, metavar="N",
                   help="tokens per page of the KV cache, a power of two up to --max-model-len (default: 16)")
    g.add_argument("--kv-cache-memory", "--kv-cache-memory-bytes", dest="kv_cache_memory", type=parse_bytes,
                   default=None, metavar="BYTES",
                   help="bytes for the KV cache's pages, e.g. 2GiB, 512MiB, 4GB or a plain number: the budget on "
                        "CPU, and on an accelerator in place of --gpu-memory-utilization (default: none, the engine "
                        "sizes the cache from --gpu-memory-utilization)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="F",
                   help="share of the accelerator's memory, in (0, 1], that the weights, the steps and the KV "
                        "pages may use (default: 0.9)")
    g.add_argument("--num-gpu-blocks-override", type=int, default=None, metavar="N",
                   help="exactly N pages of KV cache, whatever the memory says (default: as many as the memory "
                        "budget holds)")
    g.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action="store_true", default=True,
                   help="a prompt that begins with the tokens of a finished request (the next turn of a "
                        "conversation) or of another request's prompt reuses their pages instead of prefilling "
                        "them; the least recently used are given up when pages run out (default: on)")
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="prefill every prompt whole (default: prefix caching on)")
    g.add_argument("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS, metavar="MS",
                   help="an idle server lets a request that comes in wait this long for others, so that a burst is "
                        f"prefilled in full packed calls; 0 never waits (default: {DEFAULT_BATCH_WAIT_MS:g})")
    g.add_argument("--max-waiting", type=int, default=256, metavar="N",
                   help="requests that may wait to be scheduled; past it the server answers 503 (default: 256)")
    g.add_argument("--attention-backend", choices=("xla", "pallas"), default="xla",
                   help="the attention over KV pages: xla (every backend) or pallas (the ragged TPU kernel, checked "
                        "in Pallas' interpreter, not yet run on a TPU) (default: xla)")
    for old, new in RENAMED.items():
        g.add_argument(old, action=_Renamed, new=new)
    g = parser.add_argument_group("loading")
    add_dtype_argument(g)
    add_quantize_argument(g)
    add_mesh_argument(g)


def engine_settings(args, context_length: int) -> dict:
    """The ``engine.Engine`` keywords the flags ask for (``--max-model-len`` filled in from the model)."""
    max_model_len = args.max_model_len
    if max_model_len is None:
        max_model_len = min(DEFAULT_MAX_LEN, context_length)
    return dict(max_num_seqs=args.max_num_seqs, max_model_len=max_model_len,
                max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                num_gpu_blocks_override=args.num_gpu_blocks_override,
                gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_memory=args.kv_cache_memory,
                enable_prefix_caching=args.enable_prefix_caching, max_waiting=args.max_waiting,
                batch_wait_ms=args.batch_wait_ms, attention_backend=args.attention_backend)


def check_settings(context_length: int, settings: dict) -> None:
    """InputError, naming the flag, for engine settings the server cannot start with: this command's checks, then
    the engine's own (``engine.check_settings``)."""
    for key, low in (("max_num_seqs", 1), ("max_model_len", 2), ("max_num_batched_tokens", MIN_BATCHED_TOKENS),
                     ("block_size", 1), ("num_gpu_blocks_override", 1)):
        value = settings[key]
        if value is not None and value < low:
            raise InputError(f"--{key.replace('_', '-')} must be at least {low}, got {value}")
    util = settings["gpu_memory_utilization"]
    if not 0 < util <= 1:  # nan too
        raise InputError(f"--gpu-memory-utilization must be in (0, 1], got {util}")
    max_model_len, block = settings["max_model_len"], settings["block_size"]
    if max_model_len > context_length:
        raise InputError(f"--max-model-len {max_model_len} exceeds the model's context of {context_length} tokens")
    if block & (block - 1):
        raise InputError(f"--block-size must be a power of two, got {block}")
    if block > max_model_len:
        raise InputError(f"--block-size {block} is larger than --max-model-len {max_model_len}")
    from qwen2_jax.inference.serving import engine

    engine.check_settings(context_length, flags=True, **settings)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(name: str, args) -> int:
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"qwen2-jax serve needs {' and '.join(missing)}: pip install 'qwen2-jax[serve]'")
    from qwen2_jax.model.config import Qwen2MoeConfig
    from qwen2_jax.model.hf_files import check_checkpoint_dir

    check_checkpoint_dir(args.checkpoint)
    if not 0 <= args.port < 65536:
        raise InputError(f"--port must be in [0, 65535], got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise InputError("--api-key must not be empty")
    check_quantize(args.quantize)
    cfg = Qwen2MoeConfig.from_json(args.checkpoint)
    settings = engine_settings(args, cfg.context_length)
    check_settings(cfg.context_length, settings)

    from qwen2_jax.inference.serving.server import bind_socket, serve

    # The port before the checkpoint: one in use is refused now, not after a minute of loading and compiling; the
    # socket listens from here on (uvicorn takes it over), so nothing can take the port in between.
    sock = bind_socket(args.host, args.port)
    try:
        from qwen2_jax.inference.tokenizer import load_tokenizer

        from .generate import _default_dtype, load_model

        how = [args.dtype or _default_dtype()]
        if args.quantize:
            how.append(f"quantized to {args.quantize} as it loads")
        if args.mesh:
            how.append(f"over the mesh {args.mesh}")
        _say(f"loading {args.checkpoint} ({', '.join(how)})")
        tokenizer = load_tokenizer(args.checkpoint)
        model = load_model(args, args.checkpoint, cfg)
        serve(model, tokenizer, name=args.served_model_name or args.checkpoint, host=args.host, port=args.port,
              api_key=args.api_key, log_requests=not args.disable_log_requests, sock=sock, progress=_say,
              **settings)
    finally:
        sock.close()
    return 0
