"""qwen2-jax: Qwen2-57B-A14B-Instruct (Hugging Face ``Qwen2MoeForCausalLM``) in JAX / Flax NNX.

Public API::

    model = qwen2_jax.from_pretrained(path, dtype="bfloat16" | "float32", mesh=None, quantize=None | "int8" | "fp8")
    qmodel = qwen2_jax.quantize_model(model, "int8")       # weight-only int8 (or "fp8", "int8:128": per block)
    logits = model(input_ids, attention_mask=None)        # [B, T, vocab] float32
    tokens = qwen2_jax.generate(model, [ids, ...], max_new_tokens=64, temperature=0.0)  # new token ids per prompt
    for new in qwen2_jax.generate_stream(model, [ids], max_new_tokens=64): ...  # streamed as they come
    tokenizer = qwen2_jax.load_tokenizer(path)  # encode, decode, apply_chat_template
    mesh = qwen2_jax.sharding.make_mesh("data=1,expert=4,tensor=2")  # subpackages load on first use

Bad input raises a subclass of ``qwen2_jax.Qwen2JaxError`` (a ValueError) with a one-line message.
"""

import importlib

from .config import ConfigError, Qwen2MoeConfig
from .errors import InputError, Qwen2JaxError
from .hf_files import CheckpointError
from .generate import generate, generate_stream  # the function shadows the module: import_module("qwen2_jax.generate")
from .loading import from_pretrained
from .model import Qwen2MoeForCausalLM, init_random, quantize_model
from .quant import QuantConfig
from .tokenizer import load_tokenizer
from . import training  # compute_loss, TrainConfig, init_train_state, make_train_step, save/restore_train_state

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "InputError", "Qwen2JaxError", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
           "from_pretrained", "generate", "generate_stream", "init_random", "load_tokenizer", "QuantConfig",
           "quantize_model", "__version__"]


def __getattr__(name):
    # qwen2_jax.sharding and qwen2_jax.convert after a plain ``import qwen2_jax``, imported when first used
    # (they bring in shard_map and Orbax, which most uses of the model do not need).
    if name in ("sharding", "convert"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
