"""The ``qwen2-jax`` command. Each subcommand's flags live in a module here (``COMMANDS``), which provides
``DESCRIPTIONS`` (its ``--help`` text), ``add_arguments(name, parser)`` and ``run(name, args) -> int``; those
modules import nothing heavy at the top, so the parser, ``--help`` and ``--version`` answer without starting jax,
and ``run`` imports the implementation. Bad input (the project's own errors, ``qwen2_jax.errors``, and the OS
errors about the user's paths) ends in one line on stderr and exit status 2; anything else is a bug and keeps
its traceback. ``QWEN2_JAX_DEBUG=1`` shows the traceback of bad input too."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from qwen2_jax import __version__
from qwen2_jax.errors import Qwen2JaxError

DESCRIPTION = """\
Qwen2-57B-A14B (Hugging Face Qwen2MoeForCausalLM) in JAX: generation, chat and an OpenAI-compatible server on
CPU, GPU or TPU, sharded over a device mesh (--mesh) and optionally quantized (--quantize int8|fp8|int8:BLOCK);
conversion to Orbax, parity against transformers, benchmarks, and ahead-of-time compiles for accelerators this
machine lacks. Checkpoints are local directories, a Hugging Face one (config.json, *.safetensors,
tokenizer.json) or one `qwen2-jax convert` wrote; to fetch the model:
  huggingface-cli download Qwen/Qwen2-57B-A14B-Instruct --local-dir DIR
Start with `qwen2-jax demo` (a small random-weight model, nothing downloaded). Bad input ends with one line on
stderr and exit status 2 (QWEN2_JAX_DEBUG=1 shows the traceback)."""

# name -> (the module with its flags, one line for the list of commands)
COMMANDS = {
    "demo": ("qwen2_jax.cli.demo", "one chat turn with a small random-weight Qwen2-MoE and the real tokenizer; "
             "nothing to download"),
    "generate": ("qwen2_jax.cli.generate", "generate text from a prompt, streamed to stdout"),
    "chat": ("qwen2_jax.cli.generate", "multi-turn terminal chat (/reset clears the history, Ctrl-C stops an answer)"),
    "serve": ("qwen2_jax.cli.serve", "an OpenAI-compatible HTTP server with continuous batching (the serve extra)"),
    "convert": ("qwen2_jax.cli.convert",
                "convert a Hugging Face safetensors checkpoint to Orbax, optionally quantized"),
    "parity": ("qwen2_jax.cli.parity", "this port against transformers on a checkpoint, op by op and layer by layer"),
    "bench": ("qwen2_jax.cli.bench", "benchmark this port against transformers on the same weights"),
    "aot": ("qwen2_jax.cli.aot", "compile a step for an H200, H100 or TPU slice without one and read what it moves"),
}


# The jax settings enable_compilation_cache changes (the directory is filled in at run time); the tests restore them.
COMPILATION_CACHE_SETTINGS = {"jax_compilation_cache_dir": None, "jax_persistent_cache_min_compile_time_secs": 0.5,
                              "jax_persistent_cache_min_entry_size_bytes": 0}


def enable_compilation_cache() -> str:
    """JAX's persistent compilation cache in a per-user directory, so a second run starts without compiling."""
    import jax

    path = os.environ.get("QWEN2_JAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qwen2-jax", "jax-compilation-cache")
    os.makedirs(path, exist_ok=True)
    for name, value in {**COMPILATION_CACHE_SETTINGS, "jax_compilation_cache_dir": path}.items():
        jax.config.update(name, value)
    return path


def choose_platforms(command: str) -> None:
    """``aot`` compiles on the CPU for devices it does not have; the other commands use an accelerator when the
    machine has one. Without one, jax is told so before it starts: with the aot extra installed, it would
    otherwise try the CUDA plugin and libtpu and print their failures."""
    import glob

    import jax

    if os.environ.get("JAX_PLATFORMS"):
        return
    devices = glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/accel[0-9]*") + glob.glob("/dev/vfio/[0-9]*")
    if command == "aot" or not devices:
        jax.config.update("jax_platforms", "cpu")


class _Parser(argparse.ArgumentParser):
    """argparse's parser with a bad flag reported in one line, as every other bad input is (``-h`` has the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; builds without importing jax (the command modules import it when they run)."""
    parser = _Parser(prog="qwen2-jax", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Run `qwen2-jax COMMAND --help` for what a command reads, writes and its flags.")
    parser.add_argument("--version", action="version", version=f"qwen2-jax {__version__}",
                        help="print the version (qwen2-jax %s) and exit" % __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, title="commands")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=module.DESCRIPTIONS[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(name, p)
    return parser


# What a user can get wrong: reported in one line. Every other exception is a bug and keeps its traceback.
USER_ERRORS = (Qwen2JaxError, FileExistsError, FileNotFoundError, PermissionError, IsADirectoryError,
               NotADirectoryError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        choose_platforms(args.command)
        if args.command not in ("convert", "aot"):
            enable_compilation_cache()
        return int(module.run(args.command, args) or 0)
    except USER_ERRORS as e:
        if os.environ.get("QWEN2_JAX_DEBUG", "") not in ("", "0"):
            raise
        print(f"qwen2-jax {args.command}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
