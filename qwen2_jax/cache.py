"""The KV cache: preallocated, static shapes, updated in place when donated to a jitted function.

Layout ``[layers, batch, kv_heads, max_len, head_dim]``: a decode step reads each head's keys as one contiguous
``[max_len, head_dim]`` block (see docs/generation.md for the layout measurement). Prompts are left-padded so
that every sequence writes its next token at the same slot ``index``; ``valid`` marks the slots holding real
tokens, which is all the padding mask needs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .config import Qwen2MoeConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, B, Hkv, S, D]
    v: jax.Array  # [L, B, Hkv, S, D]
    valid: jax.Array  # [B, S] bool: slot holds a real (non-padding) token
    index: jax.Array  # [] int32: the slot the next token is written to

    @classmethod
    def create(cls, cfg: Qwen2MoeConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def grow(self, max_len: int) -> "KVCache":
        """The same cache with ``max_len`` slots, the new ones empty (the prefill fills a cache as long as the
        prompt, so that its attention spans the prompt only, and then grows it for the decode loop)."""
        pad = max_len - self.max_len
        if pad < 0:
            raise ValueError(f"cannot shrink a KV cache of {self.max_len} slots to {max_len}")
        kv = [(0, 0)] * 3 + [(0, pad), (0, 0)]
        return dataclasses.replace(self, k=jnp.pad(self.k, kv), v=jnp.pad(self.v, kv),
                                   valid=jnp.pad(self.valid, [(0, 0), (0, pad)]))

    def update(self, layer, k, v) -> "KVCache":
        """Writes one layer's new keys and values ``[B, Hkv, T, D]`` at slots ``index .. index+T``."""
        start = (layer, 0, 0, self.index, 0)
        return dataclasses.replace(
            self,
            k=jax.lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), start),
            v=jax.lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), start))

    def layer(self, layer):
        return self.k[layer], self.v[layer]
