"""``qwen2-jax demo``: the command line of ``qwen2_jax.tools.demo`` (one chat turn with a small random-weight
Qwen2-MoE and the real Qwen tokenizer, nothing downloaded)."""

from __future__ import annotations

import os
import shutil
import sys

from .generate import add_generation_arguments

DEFAULT_PROMPT = "Give me a short introduction to large language models."
DEFAULT_MAX_NEW_TOKENS = 32

DESCRIPTIONS = {"demo": """\
Builds, once, a small Qwen2-MoE with random weights (2 layers, 8 experts, the real 151,936-token vocabulary and
Qwen tokenizer) as a checkpoint in ~/.cache/qwen2-jax/demo ($QWEN2_JAX_HOME/demo), then answers one chat turn
with it: the prompt goes through the chat template, the model is loaded with from_pretrained and the answer is
streamed to stdout (gibberish: the weights are random). Nothing is downloaded. stderr says what was built and
loaded, then the checkpoint paths to pass to the other commands: the Orbax one (generate, chat, serve) and,
with --hf-dir, the Hugging Face one it was converted from (convert, parity, serve).

examples:
  qwen2-jax demo
  qwen2-jax demo --prompt "Hello" --hf-dir /tmp/demo-hf && qwen2-jax parity /tmp/demo-hf --layers 1"""}


def add_arguments(name: str, parser) -> None:
    parser.add_argument("--prompt", help=f"the user message (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--system", help="a system message (default: none, the chat template's own)")
    add_generation_arguments(parser, max_new_tokens=str(DEFAULT_MAX_NEW_TOKENS))
    g = parser.add_argument_group("the demo checkpoint")
    g.add_argument("--rebuild", action="store_true", help="build the cached demo checkpoint again (default: reuse it)")
    g.add_argument("--hf-dir", metavar="DIR",
                   help="also keep the demo model as a Hugging Face checkpoint in DIR (written once, kept after), "
                        "to try convert, parity or serve on (default: the Orbax checkpoint only)")


def run(name: str, args) -> int:
    from qwen2_jax.tools import demo

    from .generate import check_flags, load_model, prepare, say_if_compiling, stream_answer

    check_flags(args)
    if args.hf_dir:
        demo.check_hf_dir(args.hf_dir)
    directory = demo.demo_dir()
    if args.rebuild and os.path.isdir(directory):
        shutil.rmtree(directory)
    if not os.path.isdir(directory):
        print(f"building the demo checkpoint in {directory} (once) ...", file=sys.stderr)
        demo.build(directory)
    hf_dir = None
    if args.hf_dir:
        hf_dir = os.path.abspath(args.hf_dir)
        wrote = demo.hf_checkpoint(hf_dir, directory)
        print(f"{'wrote' if wrote else 'kept'} the demo's Hugging Face checkpoint in {hf_dir}", file=sys.stderr)
    args.dtype, args.mesh, args.quantize = "float32", None, None
    if args.max_new_tokens is None:
        args.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    cfg, tokenizer, settings = prepare(args, directory)
    model = load_model(args, directory, cfg)
    print("NOTE: this demo model has RANDOM weights (a scaled-down Qwen2-MoE: 2 layers, 8 experts, the real "
          "151,936-token vocabulary and tokenizer), so its answer is gibberish. It shows the whole path a real "
          "checkpoint takes: tokenizer, chat template, loading, streaming generation.", file=sys.stderr)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt or DEFAULT_PROMPT}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    compiled: set[int] = set()  # said before the answer starts, not in the middle of its line
    say_if_compiling(len(prompt_ids), settings, compiled, sys.stderr)
    print(f"user: {messages[-1]['content']}\nassistant: ", end="", flush=True)
    stream_answer(model, tokenizer, prompt_ids, settings, compiled=compiled)
    print(f"the demo checkpoints, to pass to the other commands:\n"
          f"  Orbax:        {directory}   (generate, chat, serve)\n" + (
              f"  Hugging Face: {hf_dir}   (convert, parity, serve)" if hf_dir else
              "  Hugging Face: none kept; `qwen2-jax demo --hf-dir DIR` writes one (for convert, parity, serve)"),
          file=sys.stderr)
    return 0
