"""The model core: everything a forward pass needs, and nothing about serving, training or tools.

Read bottom-up: ``config`` (config.json, both transformers schemas) and ``generation_config``; ``quant``
(int8/fp8 weights) and ``matmul`` (the one product rule); ``attention`` (blockwise, GQA); ``moe`` (the routed
experts' dispatch, chosen by platform and token count) and ``expert_parallel`` (the same under ``shard_map``);
``cache`` (the KV cache); ``modeling`` (the NNX decoder, Hugging Face's module names); ``hf_files``
(safetensors) and ``params`` (the one table from HF tensor names to the parameter tree, loading, random and
quantized trees); ``views`` (zero-copy per-expert views on XLA:CPU).
"""

from .config import ConfigError, Qwen2MoeConfig
from .generation_config import GenerationConfig
from .modeling import Qwen2MoeForCausalLM, abstract_model, is_norm_scale, rope_cos_sin
from .params import init_random, quantize_model

__all__ = ["ConfigError", "GenerationConfig", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", "abstract_model",
           "init_random", "is_norm_scale", "quantize_model", "rope_cos_sin"]
