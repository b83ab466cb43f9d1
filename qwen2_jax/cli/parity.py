"""``qwen2-jax parity``: the command line of ``qwen2_jax.tools.parity`` (this port against transformers on a
checkpoint, op by op and layer by layer)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

from qwen2_jax.errors import InputError

from .common import add_checkpoint_argument, add_dtype_argument

DESCRIPTIONS = {"parity": """\
Runs this port and transformers (the reference, in float64 by default) on the same token ids from the Hugging
Face checkpoint in HF_DIR, and compares them op by op: for each decoder layer the relative error of the
attention output, router logits, routed experts, shared expert, MLP block and residual stream, and the router's
top-k agreement; then the logits' error, KL divergence and top-1 agreement. Marks the first op whose error
jumps, where a bug or a corrupted weight first shows. Prints the table to stdout; --json writes the results,
--plot the error against depth. Needs torch and transformers (pip install -e '.[test]'). --layers N checks the
first N layers only, reading only their tensors, for a checkpoint larger than memory.

example:
  qwen2-jax parity ~/models/Qwen2-57B-A14B-Instruct --layers 2 --prompts prompts.txt --json parity.json"""}


def add_arguments(name, parser):
    add_checkpoint_argument(parser, what="Hugging Face, safetensors: transformers reads it too", metavar="HF_DIR")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="one prompt per line, tokenized with the checkpoint's tokenizer.json; without one, "
                             "each line is space-separated token ids (default: random ids, see --length)")
    parser.add_argument("--length", type=int, default=32, metavar="N",
                        help="tokens of the longest random prompt (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default: 0)")
    add_dtype_argument(parser, default="float32", default_text="float32", what="this port's weights and activations")
    parser.add_argument("--reference", choices=("float64", "float32"), default="float64",
                        help="transformers' precision: float64 or float32 (default: float64)")
    parser.add_argument("--layers", type=int, default=None, metavar="N",
                        help="check only the first N decoder layers (default: all)")
    parser.add_argument("--json", default=None, metavar="PATH|-",
                        help="write the results as JSON; '-' prints them to stdout and the table to stderr "
                             "(default: none)")
    parser.add_argument("--plot", default=None, metavar="PATH",
                        help="plot the error against depth, needs matplotlib (default: none)")


def run(name, args) -> int:
    from qwen2_jax.tools import parity

    directory = args.checkpoint
    cfg, total = parity.read_config(directory, args.layers)
    # Fail before the work, not after it.
    needed = ["torch", "transformers"] + (["matplotlib"] if args.plot else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"qwen2-jax parity{' --plot' if missing == ['matplotlib'] else ''} needs {missing[0]}, "
                         f"which is not installed (pip install -e '.[test]')")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path not in (None, "-") and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise InputError(f"{flag} {path}: no such directory {os.path.dirname(os.path.abspath(path))}")
    prompts = parity.read_prompts(args, directory, cfg.vocab_size)
    result = parity.report(directory, cfg, prompts, dtype=args.dtype, reference=args.reference,
                           checkpoint_layers=total)
    print(parity.table(result), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        out = json.dumps(result, indent=2)
        if args.json == "-":
            print(out)
        else:
            with open(args.json, "w") as f:
                f.write(out + "\n")
    if args.plot:
        parity.plot(result, args.plot)
    return 0
