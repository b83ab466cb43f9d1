"""The KV cache: preallocated, static shapes, one key and one value array per layer, updated in place when
donated to a jitted function.

Each layer's keys are ``[batch, kv_heads, max_len, head_dim]`` and its values ``[batch, kv_heads, head_dim,
max_len]``: the decode step's two attention products are batched over (batch, KV head) and contract the minor
axis of each (the head dim of the keys, the slots of the values), the layout XLA:GPU's kernels read in place.
With the values stored like the keys, XLA transposed every layer's values into that layout on entry to the
decode loop and back on exit (docs/accelerators.md). Prompts are left-padded so that every sequence writes
its next token at the same slot ``index``; ``valid`` marks the slots holding real tokens, which is all the
padding mask needs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .config import Qwen2MoeConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, Hkv, S, D]
    v: tuple[jax.Array, ...]  # per layer [B, Hkv, D, S]
    valid: jax.Array  # [B, S] bool: slot holds a real (non-padding) token
    index: jax.Array  # [] int32: the slot the next token is written to

    @classmethod
    def create(cls, cfg: Qwen2MoeConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        k = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        v = (batch, cfg.num_key_value_heads, cfg.head_dim, max_len)
        zeros = lambda shape: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))
        return cls(k=zeros(k), v=zeros(v), valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def grow(self, max_len: int) -> "KVCache":
        """The same cache with ``max_len`` slots, the new ones empty (the prefill fills a cache as long as the
        prompt, so that its attention spans the prompt only, and then grows it for the decode loop)."""
        pad = max_len - self.max_len
        if pad < 0:
            raise ValueError(f"cannot shrink a KV cache of {self.max_len} slots to {max_len}")
        k_pad, v_pad = [(0, 0), (0, 0), (0, pad), (0, 0)], [(0, 0), (0, 0), (0, 0), (0, pad)]
        return dataclasses.replace(self, k=tuple(jnp.pad(a, k_pad) for a in self.k),
                                   v=tuple(jnp.pad(a, v_pad) for a in self.v),
                                   valid=jnp.pad(self.valid, [(0, 0), (0, pad)]))

    def update(self, layer: int, k, v) -> "KVCache":
        """Writes layer ``layer``'s new keys ``[B, Hkv, T, D]`` and values ``[B, Hkv, D, T]`` at slots
        ``index .. index+T``."""
        put = lambda arrays, new, start: arrays[:layer] + (
            jax.lax.dynamic_update_slice(arrays[layer], new.astype(arrays[layer].dtype), start),) + arrays[layer + 1:]
        return dataclasses.replace(self, k=put(self.k, k, (0, 0, self.index, 0)),
                                   v=put(self.v, v, (0, 0, 0, self.index)))

    def layer(self, layer: int):
        return self.k[layer], self.v[layer]
