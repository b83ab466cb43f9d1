"""``qwen2-jax demo``: one chat turn with a small random-weight Qwen2-MoE and the real Qwen tokenizer.

Nothing is downloaded. The first run builds the demo checkpoint in ``$QWEN2_JAX_HOME/demo`` (default
``~/.cache/qwen2-jax/demo``): a scaled-down Qwen2-MoE (the real 151,936-token vocabulary, 2 layers, 8 experts,
random weights) written as a Hugging Face checkpoint, converted to Orbax, with the tokenizer files built from
``qwen.tiktoken`` and Qwen2-Instruct's generation config. Later runs load it from there. The whole path is the
one a real checkpoint takes: tokenizer, chat template, ``from_pretrained``, streaming generation.
``hf_checkpoint(DIR, built)`` writes the Hugging Face checkpoint it was converted from (the same weights: they are
drawn from a fixed seed), for trying ``convert``, ``parity`` or ``serve`` on a Hugging Face directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

from qwen2_jax.errors import InputError
from qwen2_jax.model.config import Qwen2MoeConfig
from qwen2_jax.model.params import layout_digest

DEMO_VERSION = 1  # bump when the demo checkpoint changes other than in its parameter layout (see demo_dir)

DEMO_CONFIG = Qwen2MoeConfig(
    vocab_size=151936, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
    shared_expert_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, num_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
    bos_token_id=151643, eos_token_id=(151643,), pad_token_id=None)

# Qwen2-Instruct's generation defaults (../shared/configs/qwen2-57b-a14b-instruct.generation_config.json).
GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                     "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8,
                     "top_k": 20}


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
    from qwen2_jax.convert import convert
    from qwen2_jax.inference.tokenizer import build_qwen2_tokenizer_files

    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_builds(parent)
    work = tempfile.mkdtemp(prefix=f".build-{os.getpid()}-", dir=parent)
    try:
        hf = os.path.join(work, "hf")
        _write_hf(hf)
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


def _write_hf(directory: str) -> None:
    from qwen2_jax.convert import write_hf_checkpoint

    write_hf_checkpoint(DEMO_CONFIG, directory, dtype="float32", seed=0)


# What a Hugging Face checkpoint directory of the demo holds besides its weights (copied from the built one).
HF_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def is_demo_hf_checkpoint(directory: str) -> bool:
    """Whether ``directory`` is a Hugging Face checkpoint ``hf_checkpoint`` wrote for this demo model."""
    try:
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return config == json.loads(json.dumps(DEMO_CONFIG.to_hf_dict())) and all(
        os.path.isfile(os.path.join(directory, name)) for name in ("model.safetensors", *HF_SIDE_FILES))


def check_hf_dir(directory: str) -> None:
    """An InputError unless ``directory`` is where ``hf_checkpoint`` can write, or has written, the demo's
    Hugging Face checkpoint: a new or empty directory in an existing one, or that checkpoint."""
    directory = os.path.abspath(directory)
    if is_demo_hf_checkpoint(directory):
        return
    if os.path.lexists(directory) and not (os.path.isdir(directory) and not os.listdir(directory)):
        raise InputError(f"--hf-dir {directory}: already exists and is not the demo's Hugging Face checkpoint; "
                         f"give a new or empty directory")
    if not os.path.isdir(os.path.dirname(directory)):
        raise InputError(f"--hf-dir {directory}: no such directory {os.path.dirname(directory)}")


def hf_checkpoint(directory: str, built: str) -> bool:
    """The demo model as a Hugging Face checkpoint in ``directory``: the weights the built Orbax checkpoint
    ``built`` was converted from, with its tokenizer and generation config. Kept if it is there already
    (returns False), else written beside it and renamed (returns True): never half-written. Anywhere
    ``check_hf_dir`` refuses is an InputError."""
    directory = os.path.abspath(directory)
    check_hf_dir(directory)
    if is_demo_hf_checkpoint(directory):
        return False
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=os.path.dirname(directory))
    try:
        _write_hf(work)
        for name in HF_SIDE_FILES:
            shutil.copyfile(os.path.join(built, name), os.path.join(work, name))
        if os.path.isdir(directory):  # empty: replaced
            os.rmdir(directory)
        os.rename(work, directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return True
