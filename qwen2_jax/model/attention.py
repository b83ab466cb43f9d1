"""Causal grouped-query attention over a KV cache, in memory linear in the sequence.

    out = attention(q, k, v, valid, start)

Queries ``q [B, T, Hq, D]`` sit at slots ``start .. start + T - 1``; keys ``k [B, Hkv, S, D]`` and values
``v [B, Hkv, D, S]`` (the cache's layout, ``cache.py``) fill slots ``0 .. S - 1``. A query sees a slot at or
before its own that holds a real token (``valid [B, S]``, left padding included). Each KV head serves
``Hq / Hkv`` query heads without repeating the cache. A query that sees no key outputs zeros (a left-padding
position), as torch's SDPA does for transformers.

Scores and the softmax are float32 whatever the cache's dtype. Over a cache longer than ``block`` slots, a
prompt's queries take the keys a block at a time with an online softmax (flash attention's running maximum and
sum): no ``[T, S]`` array of scores or mask exists, only ``[T, block]`` ones, so a 2,048-token chunk of a
prefill over a 65,536-slot cache needs the memory of 2,048 x ``block`` scores. The masks are built per block
from ``valid`` and the slot numbers. A decode step's few queries take all the slots at once (their scores are
small, and the cache is read in place). ``upto`` (a traced slot count) bounds the blocks visited to the filled
part: the loop then has a data-dependent trip count, which a TPU and XLA:CPU run on the device, but which a GPU
would follow with a host round trip per block, so the caller decides (``blocks_to_visit``); a decode step then
visits the filled blocks while they are at most half the cache, and reads all of it past that (on XLA:CPU, 2K
filled slots of 32K: 0.6 against 3.2 ms a layer; 30K of 32K: 6.8 against 3.4 ms; docs/long-context.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 1024  # keys per block: scores of [T, 1024] per head at a time
FEW = 16  # queries a step (a decode step, a short prompt) attends with all the slots at once


def attention(q, k, v, valid, start, *, block: int = BLOCK, upto=None, loop_below: float = 0.5, segments=None):
    """-> [B, T, Hq, D] in q's dtype. ``upto``: visit only the key blocks below this slot count (a traced
    int32, e.g. ``start + T``), else every block; a decode step does so while ``upto`` is at most
    ``loop_below`` of the slots, and takes them all in one pass past that. ``segments``: packed sequences, as
    ids ``(of the queries [B, T], of the key slots [B, S])``: a query sees only the keys of its own segment."""
    b, t, hq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    q = q.reshape(b, t, hkv, hq // hkv, d).astype(k.dtype)
    q_slots = start + jnp.arange(t)
    scale = d ** -0.5
    if s <= block:
        out = _attend_all(q, k, v, valid, q_slots, scale, segments)
    elif t > FEW:
        out = _attend_blocks(q, k, v, valid, q_slots, scale, block, upto, segments)
    elif upto is None:
        out = _attend_all(q, k, v, valid, q_slots, scale, segments)
    else:
        out = jax.lax.cond(upto <= loop_below * s,
                           lambda: _attend_blocks(q, k, v, valid, q_slots, scale, block, upto, segments),
                           lambda: _attend_all(q, k, v, valid, q_slots, scale, segments))
    return out.reshape(b, t, hq, d).astype(q.dtype)


def _visible(valid, q_slots, k_slots, segments=None):
    """[B, 1, 1, T, K]: which key slots each query sees (causal, real, and of its segment)."""
    seen = valid[:, None, None, None, :] & (k_slots[None, :] <= q_slots[:, None])[None, None, None]
    if segments is not None:
        seen = seen & (segments[0][:, :, None] == segments[1][:, None, :])[:, None, None]
    return seen


def _attend_all(q, k, v, valid, q_slots, scale, segments=None):
    """One pass over all S slots (a decode step, a short prompt): the scores are [T, S] per head."""
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    seen = _visible(valid, q_slots, jnp.arange(k.shape[2]), segments)
    # A plain softmax (a finite fill, not -inf) is one fused kernel on a GPU; with a guarded -inf, XLA split it
    # and, short of memory at batch 64, recomputed the scores, reading the K cache twice. As HF: the softmax in
    # float32, the probabilities cast to the values' dtype for the second product.
    probs = jax.nn.softmax(jnp.where(seen, scores, jnp.finfo(jnp.float32).min), axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bkds->btkgd", probs, v)
    return jnp.where(jnp.any(seen, axis=-1).transpose(0, 3, 1, 2)[..., None], out, 0)  # no key seen: zeros


def _attend_blocks(q, k, v, valid, q_slots, scale, block, upto, segments=None):
    """An online softmax over key blocks: running maximum ``m``, sum ``l`` and output ``acc`` per query."""
    b, t, hkv, g, d = q.shape
    s = k.shape[2]
    n = -(-s // block)
    if n * block != s:  # a cache of any length: pad its last block (masked, never seen)
        k = jnp.pad(k, ((0, 0), (0, 0), (0, n * block - s), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, n * block - s)))
        valid = jnp.pad(valid, ((0, 0), (0, n * block - s)))
        if segments is not None:
            segments = (segments[0], jnp.pad(segments[1], ((0, 0), (0, n * block - s)), constant_values=-1))
    shape = (b, hkv, g, t)

    def step(j, carry):
        k_j = jax.lax.dynamic_slice_in_dim(k, j * block, block, axis=2)
        v_j = jax.lax.dynamic_slice_in_dim(v, j * block, block, axis=3)
        block_of = lambda a: jax.lax.dynamic_slice_in_dim(a, j * block, block, axis=1)
        seen = _visible(block_of(valid), q_slots, j * block + jnp.arange(block),
                        None if segments is None else (segments[0], block_of(segments[1])))
        scores = jnp.einsum("btkgd,bksd->bkgts", q, k_j, preferred_element_type=jnp.float32) * scale
        weigh = lambda p: jnp.einsum("bkgts,bkds->bkgtd", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32)
        return online_softmax(carry, scores, seen, weigh)

    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (d,), jnp.float32))
    if upto is None:
        m, l, acc = jax.lax.fori_loop(0, n, step, init)
    else:
        stop = jnp.minimum(-(-upto // block), n)
        m, l, acc = jax.lax.fori_loop(0, stop, step, init)
    out = acc / jnp.where(l > 0, l, 1)[..., None]  # [B, Hkv, G, T, D]; zeros where no key was seen
    return out.transpose(0, 3, 1, 2, 4).astype(v.dtype)  # as the one pass's second product gives it


def online_softmax(carry, scores, seen, weigh):
    """One block of flash attention's online softmax: the running maximum ``m``, sum ``l`` and output ``acc``
    (``carry``, float32) after the block's ``scores [.., K]`` (where ``seen``); ``weigh(p)``: the block's values
    weighed by the probabilities ``p``, as ``acc`` is laid out."""
    m, l, acc = carry
    scores = jnp.where(seen, scores, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
    base = jnp.where(jnp.isfinite(m_new), m_new, 0)  # no key seen yet: keep everything at zero
    p = jnp.exp(scores - base[..., None])
    rescale = jnp.exp(m - base)
    return m_new, l * rescale + jnp.sum(p, axis=-1), acc * rescale[..., None] + weigh(p)


def blocks_to_visit(platform: str) -> str:
    """Which key blocks a long attention visits on ``platform``: "filled" (a loop bounded by the filled
    slots, on the device) or "all" (a loop of a static trip count; on a GPU a data-dependent loop syncs with
    the host at every trip)."""
    return "all" if platform == "gpu" else "filled"
