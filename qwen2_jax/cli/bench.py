"""``qwen2-jax bench``: the command line of ``qwen2_jax.tools.bench`` (the JAX port against transformers on the
same weights)."""

from __future__ import annotations

import os
import sys

from qwen2_jax.errors import InputError

from .common import add_quantize_argument, check_quantize

DESCRIPTIONS = {"bench": """\
Benchmarks this port against transformers on the same random float32 weights, in one run: decode tokens/s at
each --batches size, prefill tokens/s, time to first token, compile time and peak memory, with the two sides
taking turns for --rounds rounds (medians reported), and the memory bandwidth with the floor of a decode step.
Reads --checkpoint, or writes a random checkpoint of --config once into --work-dir. Prints the table to stdout
and progress to stderr; writes the results to --json and a plot to --plot. transformers runs in a separate
process (--hf-python) that needs torch; without it, --no-hf measures the JAX side only.

examples:
  qwen2-jax bench                                   # the quarter-scale config, batches 1 and 8
  qwen2-jax bench --config tiny --rounds 1 --no-hf --json /tmp/bench.json --plot ''"""}


def add_arguments(name, parser):
    from qwen2_jax.tools.bench import QUARTER

    parser.add_argument("--config", default=QUARTER, metavar="NAME|PATH",
                        help=f"an embedded config name, a config.json, or 'tiny' (a few-MB model) (default: {QUARTER})")
    parser.add_argument("--layers", type=int, default=None, metavar="N",
                        help="override num_hidden_layers (default: the config's)")
    parser.add_argument("--checkpoint", default=None, metavar="DIR",
                        help="a Hugging Face checkpoint directory to use (default: a random one of --config, written "
                             "once to --work-dir)")
    parser.add_argument("--work-dir", default=None, metavar="DIR",
                        help="where the random checkpoint is kept (default: ~/.cache/qwen2-jax/bench)")
    parser.add_argument("--batches", default="1,8", metavar="N,N",
                        help="decode batch sizes, comma-separated (default: 1,8)")
    parser.add_argument("--prompt-len", type=int, default=128, metavar="N", help="decode prompt length (default: 128)")
    parser.add_argument("--new-tokens", type=int, default=32, metavar="N",
                        help="tokens generated per decode run (default: 32)")
    parser.add_argument("--prefill-len", type=int, default=512, metavar="N",
                        help="prompt length for prefill and time to first token (default: 512)")
    parser.add_argument("--rounds", type=int, default=2, metavar="N",
                        help="alternating JAX/transformers rounds; medians reported (default: 2)")
    parser.add_argument("--no-hf", action="store_true", help="measure the JAX side only (default: both sides)")
    add_quantize_argument(parser, what="the JAX side with its weights quantized (transformers stays float32)",
                          default_text="none, float32")
    parser.add_argument("--hf-python", default=sys.executable, metavar="PYTHON",
                        help="Python interpreter with torch and transformers for the transformers side (default: "
                             "this one)")
    parser.add_argument("--json", default="bench.json", metavar="PATH", help="results file (default: bench.json)")
    parser.add_argument("--plot", default="bench.png", metavar="PATH",
                        help="tokens/s against batch size; '' for none (default: bench.png)")


def positive_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise InputError(f"{flag} must be positive integers separated by commas, got {text!r}")
    return sorted(set(values))


def check_args(args):
    for flag in ("prompt_len", "prefill_len", "rounds"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.new_tokens < 2:
        raise InputError(f"--new-tokens must be >= 2 (decode time is N tokens minus 1 token), got {args.new_tokens}")
    if args.checkpoint is not None and not os.path.isdir(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such directory")


def run(name, args) -> int:
    import jax

    from qwen2_jax.tools.bench import benchmark

    batches = positive_ints(args.batches, "--batches")
    check_args(args)
    check_quantize(args.quantize)
    # Compile time is measured cold: the persistent compilation cache (on for the other commands) stays off.
    cache_was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        return benchmark(args, batches)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was)
