"""``qwen2-jax convert HF_DIR OUT_DIR [--dtype bfloat16|float32] [--quantize int8|fp8|int8:BLOCK] [--force]``."""

from __future__ import annotations

import argparse


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face checkpoint: config.json + safetensors")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output directory (must not exist unless --force)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="cast every weight to this dtype (default: keep the source dtype)")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT_DIR once the new one is complete")
    parser.add_argument("--quantize", default=None, metavar="TYPE",
                        help="weight-only quantization of the projections as they stream: int8, fp8, or int8:BLOCK "
                             "(scales per BLOCK inputs; default one per output channel); see docs/quantization.md")


def run(name: str, args: argparse.Namespace) -> int:
    from .converter import convert

    meta = convert(args.hf_dir, args.out_dir, dtype=args.dtype, force=args.force, quantize=args.quantize)
    size = meta["source"]["bytes"]
    print(f"converted {meta['source']['tensors']} tensors, {_bytes(size)} ({meta['dtype']}) in {meta['seconds']:.1f} s "
          f"({_bytes(size / meta['seconds'])}/s) -> {args.out_dir}")
    return 0


def _bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
