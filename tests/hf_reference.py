"""Small random Hugging Face checkpoints (written with ``save_pretrained``) and their reference outputs.

Tests only: this is where torch and transformers are imported, never in the package.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    shared_expert_intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    num_experts=8, num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=256,
)


def make_hf_model(seed: int = 0, *, router_std: float = 1.0, **overrides) -> Qwen2MoeForCausalLM:
    """A random float32 HF model; the router weights are drawn wider than HF's init so that routing is decisive
    (near-uniform router logits would make top-k depend on rounding noise)."""
    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(**{**TINY, **overrides})
    model = Qwen2MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, router_std)
            elif "norm" in name:
                p.normal_(1.0, 0.1)  # not all ones, so a wrong norm weight would show
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def save_hf(model, directory, *, max_shard_size=None, config_overrides: dict | None = None) -> str:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    if config_overrides is not None:  # e.g. rewrite config.json in the transformers 4.x schema
        path = os.path.join(directory, "config.json")
        with open(path) as f:
            raw = json.load(f)
        for k, v in config_overrides.items():
            if v is None:
                raw.pop(k, None)
            else:
                raw[k] = v
        with open(path, "w") as f:
            json.dump(raw, f)
    return str(directory)


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        mask = None if attention_mask is None else torch.as_tensor(attention_mask)
        return model(torch.as_tensor(input_ids), attention_mask=mask).logits.float().numpy()


def hf_greedy(model, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """transformers' greedy ``generate`` (left-padded batch); returns only the new tokens."""
    with torch.no_grad():
        out = model.generate(torch.as_tensor(input_ids), attention_mask=torch.as_tensor(attention_mask),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                             min_new_tokens=max_new_tokens)
    return out[:, input_ids.shape[1]:].numpy()
