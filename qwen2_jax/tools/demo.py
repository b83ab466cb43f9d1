"""``qwen2-jax demo``: one chat turn with a small random-weight Qwen2-MoE and the real Qwen tokenizer.

Nothing is downloaded. The first run builds the demo checkpoint in ``$QWEN2_JAX_HOME/demo`` (default
``~/.cache/qwen2-jax/demo``): a scaled-down Qwen2-MoE (the real 151,936-token vocabulary, 2 layers, 8 experts,
random weights) written as a Hugging Face checkpoint, converted to Orbax, with the tokenizer files built from
``qwen.tiktoken`` and Qwen2-Instruct's generation config. Later runs load it from there. The whole path is the
one a real checkpoint takes: tokenizer, chat template, ``from_pretrained``, streaming generation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile

from qwen2_jax.cli import generate as cli_generate
from qwen2_jax.model.config import Qwen2MoeConfig
from qwen2_jax.model.params import layout_digest

DEMO_VERSION = 1  # bump when the demo checkpoint changes other than in its parameter layout (see demo_dir)
DEFAULT_PROMPT = "Give me a short introduction to large language models."
DEFAULT_MAX_NEW_TOKENS = 32

DEMO_CONFIG = Qwen2MoeConfig(
    vocab_size=151936, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
    shared_expert_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, num_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
    bos_token_id=151643, eos_token_id=(151643,), pad_token_id=None)

# Qwen2-Instruct's generation defaults (../shared/configs/qwen2-57b-a14b-instruct.generation_config.json).
GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                     "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8,
                     "top_k": 20}


def add_arguments(name: str, parser) -> None:
    cli_generate.add_arguments(name, parser)
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached demo checkpoint")


def home() -> str:
    return os.environ.get("QWEN2_JAX_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qwen2-jax")


def demo_dir() -> str:
    """The cached checkpoint's directory, named by the demo's version and a digest of the model's parameter
    layout: a release that stores a parameter differently builds a fresh copy instead of failing to load the
    old one."""
    return os.path.join(home(), "demo", f"v{DEMO_VERSION}-{layout_digest(DEMO_CONFIG)}")


def build(directory: str) -> str:
    """Builds the demo checkpoint into ``directory`` (beside it first, then renamed: never half-written)."""
    from qwen2_jax.convert import convert, write_hf_checkpoint
    from qwen2_jax.inference.tokenizer import build_qwen2_tokenizer_files

    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_builds(parent)
    work = tempfile.mkdtemp(prefix=f".build-{os.getpid()}-", dir=parent)
    try:
        hf = os.path.join(work, "hf")
        write_hf_checkpoint(DEMO_CONFIG, hf, dtype="float32", seed=0)
        build_qwen2_tokenizer_files(hf)
        with open(os.path.join(hf, "generation_config.json"), "w") as f:
            json.dump(GENERATION_CONFIG, f, indent=2)
        out = os.path.join(work, "orbax")
        convert(hf, out, dtype="float32", progress=False)  # copies the tokenizer and generation config too
        try:
            os.rename(out, directory)
        except OSError:  # another run finished first: use its copy
            if not os.path.isdir(directory):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return directory


def _remove_stale_builds(parent: str) -> None:
    """Deletes the work directories of builds that were killed (their process is gone)."""
    for name in os.listdir(parent):
        m = re.match(r"^\.build-(\d+)-", name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True


def run(name: str, args) -> int:
    cli_generate.check_flags(args)
    directory = demo_dir()
    if args.rebuild and os.path.isdir(directory):
        shutil.rmtree(directory)
    if not os.path.isdir(directory):
        print(f"building the demo checkpoint in {directory} (once) ...", file=sys.stderr)
        build(directory)
    args.dtype, args.mesh = "float32", None
    if args.max_new_tokens is None:
        args.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    cfg, tokenizer, settings = cli_generate.prepare(args, directory)
    model = cli_generate.load_model(args, directory, cfg)
    print("NOTE: this demo model has RANDOM weights (a scaled-down Qwen2-MoE: 2 layers, 8 experts, the real "
          "151,936-token vocabulary and tokenizer), so its answer is gibberish. It shows the whole path a real "
          "checkpoint takes: tokenizer, chat template, loading, streaming generation.", file=sys.stderr)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt or DEFAULT_PROMPT}]
    print(f"user: {messages[-1]['content']}\nassistant: ", end="", flush=True)
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    cli_generate.stream_answer(model, tokenizer, prompt_ids, settings)
    return 0
