"""``qwen2-jax convert HF_DIR OUT_DIR``: the command line of ``qwen2_jax.convert.convert``."""

from __future__ import annotations

import argparse

from .common import add_dtype_argument, add_quantize_argument, human_bytes

DESCRIPTIONS = {"convert": """\
Converts the Hugging Face checkpoint in HF_DIR (config.json and *.safetensors, single or sharded) into an Orbax
checkpoint in OUT_DIR, which loads faster and straight into each device's shard (generate, chat, serve and
from_pretrained read both kinds). It streams tensor by tensor in bounded memory, optionally casting to --dtype
and quantizing the projections (--quantize), and copies config.json, generation_config.json and the tokenizer
files. OUT_DIR is written beside itself and renamed when complete: an interrupted run leaves nothing behind.
Prints the tensors, bytes and rate converted.

example:
  qwen2-jax convert ~/models/Qwen2-57B-A14B-Instruct ~/models/qwen2-57b-int8 --dtype bfloat16 --quantize int8"""}


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", metavar="HF_DIR",
                        help="a local Hugging Face checkpoint directory: config.json and *.safetensors")
    parser.add_argument("out_dir", metavar="OUT_DIR",
                        help="the Orbax checkpoint to write (must not exist unless --force)")
    add_dtype_argument(parser, default_text="keep the source dtype", what="cast every float weight to this dtype",
                       choices=("bfloat16", "float32"))
    add_quantize_argument(parser, what="quantize the projections as they stream")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing OUT_DIR once the new one is complete (default: refuse it)")


def run(name: str, args: argparse.Namespace) -> int:
    from qwen2_jax.convert import convert

    meta = convert(args.hf_dir, args.out_dir, dtype=args.dtype, force=args.force, quantize=args.quantize)
    size = meta["source"]["bytes"]
    print(f"converted {meta['source']['tensors']} tensors, {human_bytes(size)} ({meta['dtype']}) in "
          f"{meta['seconds']:.1f} s ({human_bytes(size / meta['seconds'])}/s) -> {args.out_dir}")
    return 0
