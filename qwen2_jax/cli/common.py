"""Flags and helpers the ``qwen2-jax`` commands share. Nothing here imports jax, numpy or the model: every
command's parser is built from these at ``--help`` time."""

from __future__ import annotations

import argparse

MESH_EXAMPLE = "data=1,expert=4,tensor=2"
# The one statement of the quantization choices, in every command that takes --quantize (and README.md's table).
QUANTIZE_CHOICES = ("int8, fp8 or int8:BLOCK (weight-only: int8 or float8 values with a scale per output channel, "
                    "with int8:BLOCK per BLOCK inputs too; docs/quantization.md)")


def add_checkpoint_argument(parser: argparse.ArgumentParser, what: str = "Hugging Face or converted Orbax",
                            metavar: str = "CKPT") -> None:
    parser.add_argument("checkpoint", metavar=metavar,
                        help=f"a local checkpoint directory ({what}): config.json with the weights beside it")


def add_dtype_argument(parser, default: str | None = None,
                       default_text: str = "float32 on CPU, bfloat16 on accelerators",
                       what: str = "the weights' and activations' dtype", choices=("float32", "bfloat16")) -> None:
    parser.add_argument("--dtype", choices=choices, default=default,
                        help=f"{what}: {' or '.join(choices)} (default: {default_text})")


def add_quantize_argument(parser, what: str = "quantize the weights as they load",
                          default_text: str = "none, the weights as the checkpoint stores them") -> None:
    parser.add_argument("--quantize", default=None, metavar="TYPE",
                        help=f"{what}: {QUANTIZE_CHOICES} (default: {default_text})")


def check_quantize(spec: str | None) -> None:
    """A ``--quantize`` value checked before anything is loaded or written: an InputError naming a bad one."""
    if spec is not None:
        from qwen2_jax.model.quant import QuantConfig

        QuantConfig.parse(spec)


def add_mesh_argument(parser, default_text: str = "one device, no mesh", over: str = "this machine's devices") -> None:
    """``--mesh``: the device mesh the model is sharded over (``qwen2_jax.sharding.mesh_from_args`` builds it)."""
    parser.add_argument("--mesh", default=None, metavar="SPEC",
                        help=f"device mesh over {over}, e.g. {MESH_EXAMPLE!r} (missing axes are 1); 'auto' "
                             f"spreads them as docs/sharding.md recommends (default: {default_text})")


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1, or argparse's one-line error naming the flag."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def human_bytes(n: float) -> str:
    """1.2 GB, or 34.5 MB below a gigabyte (1 GB = 1e9 bytes)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
