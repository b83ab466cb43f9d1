"""qwen2-jax: Qwen2-57B-A14B-Instruct (Hugging Face ``Qwen2MoeForCausalLM``) in JAX / Flax NNX.

Public API::

    model = qwen2_jax.from_pretrained(path, dtype="bfloat16" | "float32", mesh=None)
    logits = model(input_ids, attention_mask=None)        # [B, T, vocab] float32
    tokens = qwen2_jax.generate(model, [ids, ...], max_new_tokens=64, temperature=0.0)  # new token ids per prompt
    for new in qwen2_jax.generate_stream(model, [ids], max_new_tokens=64): ...  # streamed as they come
    tokenizer = qwen2_jax.load_tokenizer(path)  # encode, decode, apply_chat_template
"""

from .config import ConfigError, Qwen2MoeConfig
from .hf_files import CheckpointError
from .generate import generate, generate_stream  # the function shadows the module: import_module("qwen2_jax.generate")
from .loading import from_pretrained
from .model import Qwen2MoeForCausalLM, init_random
from .tokenizer import load_tokenizer
from . import training  # compute_loss, TrainConfig, init_train_state, make_train_step, save/restore_train_state

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", "from_pretrained",
           "generate", "generate_stream", "init_random", "load_tokenizer", "__version__"]
