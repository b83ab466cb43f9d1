"""qwen2-jax: Qwen2-57B-A14B-Instruct (Hugging Face ``Qwen2MoeForCausalLM``) in JAX / Flax NNX.

Public API::

    model = qwen2_jax.from_pretrained(path, dtype="bfloat16" | "float32", mesh=None)
    logits = model(input_ids, attention_mask=None)        # [B, T, vocab] float32
"""

from .config import ConfigError, Qwen2MoeConfig
from .hf_files import CheckpointError
from .loading import from_pretrained
from .model import Qwen2MoeForCausalLM, init_random
from .tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", "from_pretrained",
           "init_random", "load_tokenizer", "__version__"]
