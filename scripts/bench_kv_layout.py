"""Decode step time with the KV cache in two layouts: [L, B, Hkv, S, D] (qwen2_jax.cache) and [L, B, S, Hkv, D].

    python scripts/bench_kv_layout.py [--config qwen2_jax/configs/qwen2-57b-a14b-quarter.json]
                                      [--batch 1 8] [--cache-len 4096] [--steps 16]

First, only what the layout changes (per layer: write one token's keys and values, attend over the cache), then
(unless ``--attention-only``) the whole decode step of the model with random float32 weights: ``--steps`` steps
of the jitted while-loop over a cache of ``--cache-len`` slots (compilation excluded), median of three
stretches. The other layout is patched in for the measurement only (the cache class and the two einsums).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import statistics
import time

import jax
import jax.numpy as jnp

from qwen2_jax import model as model_module
from qwen2_jax.cache import KVCache
from qwen2_jax.config import Qwen2MoeConfig
from qwen2_jax.model import apply_rope, init_random

gen = importlib.import_module("qwen2_jax.generate")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SequenceMajorCache(KVCache):
    """k, v: [L, B, S, Hkv, D]."""

    @classmethod
    def create(cls, cfg, batch, max_len, dtype=jnp.float32):
        shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self):
        return self.k.shape[2]

    def update(self, layer, k, v):  # k, v: [B, Hkv, T, D]
        start = (layer, 0, self.index, 0, 0)
        return dataclasses.replace(
            self, k=jax.lax.dynamic_update_slice(self.k, k.transpose(0, 2, 1, 3)[None].astype(self.k.dtype), start),
            v=jax.lax.dynamic_update_slice(self.v, v.transpose(0, 2, 1, 3)[None].astype(self.v.dtype), start))


def sequence_major_attention(self, x, cos, sin, mask, cache, layer):
    """model.Attention.__call__ with the einsums reading [B, S, Hkv, D] keys and values."""
    b, t, _ = x.shape
    q = apply_rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
    k = apply_rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    cache = cache.update(layer, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    keys, values = cache.layer(layer)  # [B, S, Hkv, D]
    groups = self.num_heads // self.num_kv_heads
    q = q.reshape(b, t, self.num_kv_heads, groups, self.head_dim).astype(keys.dtype)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, keys, preferred_element_type=jnp.float32) * (self.head_dim ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(jnp.any(mask, axis=-1)[:, None, None, :, None], probs, 0).astype(values.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, values).astype(x.dtype)
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), cache


def decode_step_ms(model, batch_size, cache_len, steps):
    """Median ms per decode step over three timed stretches of ``steps`` steps (after a compiling one).
    A 16-token prompt with room for ``cache_len`` slots: decode attends to all slots, so the cache length,
    not the prompt, sets the attention cost, and the prefill stays cheap."""
    prompts = [[(7 * i + j) % 1000 + 10 for j in range(16)] for i in range(batch_size)]
    batch = gen._prepare(model, prompts, max_new_tokens=cache_len - 16, temperature=0.0, top_k=0, top_p=1.0,
                         repetition_penalty=1.0, seed=0, eos_token_ids=(), truncate=False)
    assert batch.max_len == cache_len
    state = jax.block_until_ready(gen._run(batch, gen._start(batch), 2))
    times, step = [], 2
    for _ in range(3):
        start = time.perf_counter()
        step += steps
        state = jax.block_until_ready(gen._run(batch, state, step))
        times.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times)


def attention_step_ms(cfg, layout, batch_size, cache_len, steps, repeats=5):
    """Only what the layout changes: per layer, write one token's keys and values and attend over the cache
    (GQA einsums as in model.Attention), in a jitted loop of ``steps`` steps; the best of ``repeats``."""
    l, h, hkv, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = h // hkv
    shape = (l, batch_size, hkv, cache_len, d) if layout == "[L,B,Hkv,S,D]" else (l, batch_size, cache_len, hkv, d)
    qk = "btkgd,bksd->bkgts" if layout == "[L,B,Hkv,S,D]" else "btkgd,bskd->bkgts"
    pv = "bkgts,bksd->btkgd" if layout == "[L,B,Hkv,S,D]" else "bkgts,bskd->btkgd"

    def step(i, carry):
        k, v, x = carry

        def layer(carry, j):
            k, v, x = carry
            new = x.reshape(batch_size, 1, hkv, g, d)[:, :, :, 0]  # [B, 1, Hkv, D]
            new = new.transpose(0, 2, 1, 3) if layout == "[L,B,Hkv,S,D]" else new
            start = (j, 0, 0, i, 0) if layout == "[L,B,Hkv,S,D]" else (j, 0, i, 0, 0)
            k = jax.lax.dynamic_update_slice(k, new[None], start)
            v = jax.lax.dynamic_update_slice(v, new[None], start)
            q = x.reshape(batch_size, 1, hkv, g, d)
            probs = jax.nn.softmax(jnp.einsum(qk, q, k[j]) * d ** -0.5, axis=-1)
            out = jnp.einsum(pv, probs, v[j]).reshape(x.shape)
            return (k, v, x + 0.01 * out), None

        (k, v, x), _ = jax.lax.scan(layer, (k, v, x), jnp.arange(l))
        return k, v, x

    run = jax.jit(lambda k, v, x: jax.lax.fori_loop(0, steps, step, (k, v, x)), donate_argnums=(0, 1))
    k = v = None
    times = []
    for _ in range(repeats + 1):
        k, v = jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)
        x = jnp.ones((batch_size, 1, h * d), jnp.float32)
        jax.block_until_ready((k, v))
        start = time.perf_counter()
        jax.block_until_ready(run(k, v, x))
        times.append((time.perf_counter() - start) / steps * 1e3)
    return min(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="qwen2_jax/configs/qwen2-57b-a14b-quarter.json")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cache-len", type=int, default=4096, help="cache slots (a power of two)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--attention-only", action="store_true", help="skip the whole-model decode steps")
    args = parser.parse_args()
    cfg = Qwen2MoeConfig.from_json(args.config)
    print(f"attention and cache update only ({cfg.num_hidden_layers} layers, {cfg.num_key_value_heads} KV heads of "
          f"{cfg.head_dim}, {args.cache_len} slots), best of 5 x {args.steps} steps:")
    for batch_size in args.batch:
        for name in ("[L,B,Hkv,S,D]", "[L,B,S,Hkv,D]"):
            ms = attention_step_ms(cfg, name, batch_size, args.cache_len, args.steps)
            print(f"batch {batch_size:3d}  {name}  {ms:8.3f} ms/step", flush=True)
    if args.attention_only:
        return
    model = init_random(cfg, dtype=jnp.float32)
    original = (gen.KVCache, model_module.Attention.__call__)
    print(f"{jax.devices()[0].device_kind}, {cfg.num_hidden_layers} layers, {cfg.num_key_value_heads} KV heads of "
          f"{cfg.head_dim}, {args.cache_len} cache slots, {args.steps} decode steps x 3, float32")
    for batch_size in args.batch:
        for name in ("[L,B,Hkv,S,D]", "[L,B,S,Hkv,D]"):
            if name == "[L,B,S,Hkv,D]":
                gen.KVCache, model_module.Attention.__call__ = SequenceMajorCache, sequence_major_attention
            gen._prefill_jit.clear_cache()  # the prefill's arguments are the same in both layouts: retrace it
            traces = gen.TRACES["prefill"]
            try:
                ms = decode_step_ms(model, batch_size, args.cache_len, args.steps)
            finally:
                gen.KVCache, model_module.Attention.__call__ = original
            assert gen.TRACES["prefill"] == traces + 1
            print(f"batch {batch_size:3d}  {name}  {ms:8.2f} ms/step", flush=True)


if __name__ == "__main__":
    main()
