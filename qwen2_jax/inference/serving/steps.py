"""The serving engine's steps, pure functions of its state (``state.EngineState``) that ``jit_step`` jits with
the state donated:

- ``_prefill_packed``: whole prompts packed into one row of a power of two >= 16 tokens (each attends only to
  itself: the model's ``segment_ids``) writes each one's keys and values into its slot's row of the shared cache,
  chooses its first token and turns the slot on; one forward for many prompts, as transformers' continuous
  batching does;
- ``_prefill``: a piece of a prompt longer than a packed call (or the rest of one after a cached prefix), the last
  piece left-padded, into its row, attending to the row's earlier tokens;
- ``_reuse``: a row's prefix copied into another row (prefix caching);
- ``_decode``: every slot's last token fed at its own position; each slot's next token chosen with its own
  sampling settings (temperature, top_k, top_p, repetition penalty, seed, ``sample``) and the slot ended at one
  of its end tokens, at ``max_tokens`` or at the end of its row. It runs over the first ``rows`` rows.

A row keeps its tokens at positions ``0 .. length - 1``: a left-padded piece is shifted onto the end of the
row's tokens after its forward (the padding's slots are then invalid and the next piece or token overwrites
them), so RoPE positions are slot numbers and a request uses exactly ``len(prompt) + max_tokens - 1`` slots.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
from flax import nnx

from qwen2_jax.model.cache import KVCache
from qwen2_jax.inference.sampling import apply_repetition_penalty, apply_temperature, nucleus_threshold
from .request import IDLE, LENGTH, RUNNING, STOPPED
from .state import TRACES, EngineState, SlotCache, SlotControls


# ---- choosing tokens, a setting per row ---------------------------------------------------------------------
def _kth_largest(x, k):
    """The k-th largest score per row ([B, V], k [B] >= 1) by bisection over float32 values, like
    ``sampling.nucleus_threshold`` (no sort of the vocabulary): the smallest t with fewer than k scores above it."""
    ordered = lambda f: (lambda i: jnp.where(i < 0, i ^ 0x7FFFFFFF, i))(jax.lax.bitcast_convert_type(f, jnp.int32))
    from_ordered = lambda i: jax.lax.bitcast_convert_type(jnp.where(i < 0, i ^ 0x7FFFFFFF, i), jnp.float32)

    def body(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)
        ok = jnp.sum(x > from_ordered(mid)[:, None], axis=-1) < k
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    _, hi = jax.lax.fori_loop(0, 32, body, (ordered(jnp.min(x, axis=-1)), ordered(jnp.max(x, axis=-1))))
    return from_ordered(hi)


def sample(logits, seen, c: SlotControls, step):
    """Each row's next token from its logits [B, V], in HF's order of processors: repetition penalty, then for
    rows with a temperature > 0 temperature, top-k (ties with the k-th kept, as HF) and top-p, and a draw with
    the row's key folded with its ``step``; argmax for the others. The sampling path runs only when a row
    samples, the filters only when a row asks for them."""
    logits = apply_repetition_penalty(logits.astype(jnp.float32), seen, c.repetition_penalty)
    greedy = jax.lax.top_k(logits, 1)[1][:, 0].astype(jnp.int32)  # the first maximum, as argmax
    sampling = c.temperature > 0

    def draw():
        x = apply_temperature(logits, jnp.where(sampling, c.temperature, 1.0))
        use_k, use_p = c.top_k > 0, c.top_p < 1
        x = jax.lax.cond(jnp.any(use_k), lambda: jnp.where(
            use_k[:, None] & (x < _kth_largest(x, jnp.maximum(c.top_k, 1))[:, None]), -jnp.inf, x), lambda: x)
        x = jax.lax.cond(jnp.any(use_p), lambda: jnp.where(
            use_p[:, None] & (x < nucleus_threshold(x, c.top_p)[:, None]), -jnp.inf, x), lambda: x)
        keys = jax.vmap(jax.random.fold_in)(c.keys, step)
        return jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)

    drawn = jax.lax.cond(jnp.any(sampling), draw, lambda: greedy)
    return jnp.where(sampling, drawn, greedy)


def _status(token, step, length, max_len, c: SlotControls):
    """After a slot's ``step``-th token at row length ``length``: STOPPED, LENGTH or RUNNING."""
    ended = jnp.any(token[..., None] == c.eos, axis=-1)
    full = (step >= c.max_tokens) | (length >= max_len)
    return jnp.where(ended, STOPPED, jnp.where(full, LENGTH, RUNNING)).astype(jnp.int32)


# ---- the jitted steps ---------------------------------------------------------------------------------------
def _prefill(params, expert_views, state: EngineState, slot, input_ids, attention_mask, positions, write, final,
             request: SlotControls, seed, *, graphdef, platform: str):
    """One piece ``[1, T]`` (left-padded) of a prompt longer than a piece into row ``slot`` at ``write``, with
    attention over the row's earlier pieces; the first piece (``write`` 0) clears the row. The last piece
    (``final``) also chooses the first token and turns the slot on. -> (state, [token, status])."""
    TRACES["prefill"] += 1
    model = nnx.merge(graphdef, params)
    t = input_ids.shape[1]
    c = state.cache
    first = write == 0
    row_valid = jnp.where(first, False, jax.lax.dynamic_slice_in_dim(c.valid, slot, 1, axis=0))
    row = KVCache(k=tuple(jax.lax.dynamic_slice_in_dim(a, slot, 1, axis=0) for a in c.k),
                  v=tuple(jax.lax.dynamic_slice_in_dim(a, slot, 1, axis=0) for a in c.v), valid=row_valid, index=write)
    out = model.forward(input_ids, attention_mask, positions=positions, cache=row, last_only=True,
                        platform=platform, expert_views=expert_views)
    # Shift the piece's keys and values left over its padding, onto the end of the row's tokens, and write
    # only the piece's slots back into the shared cache.
    real = jnp.sum(attention_mask, dtype=jnp.int32)
    pad = t - real
    shift = lambda a, axis: jnp.roll(jax.lax.dynamic_slice_in_dim(a, write, t, axis=axis), -pad, axis=axis)
    k = tuple(jax.lax.dynamic_update_slice(big, shift(a, 2), (slot, 0, write, 0)) for big, a in zip(c.k, out.cache.k))
    v = tuple(jax.lax.dynamic_update_slice(big, shift(a, 3), (slot, 0, 0, write)) for big, a in zip(c.v, out.cache.v))
    row_valid = jax.lax.dynamic_update_slice(row_valid, (jnp.arange(t) < real)[None], (0, write))
    length = write + real

    seen_row = jnp.where(first, False, state.seen[slot])
    seen_row = seen_row.at[jnp.where(attention_mask[0], input_ids[0], seen_row.shape[0])].set(True, mode="drop")
    request = dataclasses.replace(request, keys=jax.random.key(seed)[None])
    token = sample(out.logits[:, 0], seen_row[None], request, jnp.zeros((1,), jnp.int32))[0]
    status = _status(token, 1, length, c.max_len, jax.tree.map(lambda a: a[0], request))
    seen_row = jnp.where(final, seen_row.at[token].set(True), seen_row)

    at = lambda a, value, on=True: a.at[slot].set(jnp.where(on, value, a[slot]))
    controls = jax.tree.map(lambda a, r: a.at[slot].set(r[0]), state.controls, request)
    state = EngineState(
        cache=SlotCache(k=k, v=v, valid=jax.lax.dynamic_update_slice(c.valid, row_valid, (slot, 0)), index=c.index,
                        lengths=c.lengths.at[slot].set(length)),
        tokens=at(state.tokens, token, final), active=state.active.at[slot].set(final & (status == RUNNING)),
        step=state.step.at[slot].set(jnp.where(final, 1, 0)), seen=state.seen.at[slot].set(seen_row),
        controls=controls)
    return state, jnp.stack([jnp.where(final, token, -1), jnp.where(final, status, IDLE)])


def _prefill_packed(params, expert_views, state: EngineState, input_ids, positions, segment_ids, ends, slots,
                    request: SlotControls, seeds, *, graphdef, platform: str):
    """Whole prompts packed into one piece ``[1, T]`` (``segment_ids`` 0, 1 .. per prompt, -1 for the padding
    at the end; ``positions`` count from 0 in each prompt): one forward for all of them, over a cache of the
    piece's own T slots, each prompt attending only to itself. Each prompt's keys and values go to its slot's
    row (``slots`` [P], the number of slots for an unused segment: dropped), its first token is chosen from
    the logits at its last token (``ends`` [P]) and the slot is turned on. -> (state, [P, 2] of (token, status))."""
    TRACES["prefill_packed"] += 1
    model = nnx.merge(graphdef, params)
    c = state.cache
    n_slots, p = c.lengths.shape[0], slots.shape[0]
    real = segment_ids[0] >= 0
    seg = jnp.where(real, segment_ids[0], p)  # padding: past the last segment
    piece = KVCache.create(model.config, 1, input_ids.shape[1], dtype=c.k[0].dtype)
    out = model.forward(input_ids, real[None], positions=positions, cache=piece, segment_ids=segment_ids,
                        logits_at=ends[None], platform=platform, expert_views=expert_views)
    slot_of = jnp.append(slots, n_slots)[seg]  # each token's slot; the padding's is out of range (dropped)
    at = positions[0]
    k = tuple(big.at[slot_of, :, at, :].set(a[0].transpose(1, 0, 2), mode="drop") for big, a in zip(c.k, out.cache.k))
    v = tuple(big.at[slot_of, :, :, at].set(a[0].transpose(2, 0, 1), mode="drop") for big, a in zip(c.v, out.cache.v))
    valid = c.valid.at[slots].set(False, mode="drop").at[slot_of, at].set(True, mode="drop")
    length = at[ends] + 1

    seen = jnp.zeros((p, state.seen.shape[1]), bool).at[seg, input_ids[0]].set(True, mode="drop")
    request = dataclasses.replace(request, keys=jax.vmap(jax.random.key)(seeds))
    token = sample(out.logits[0], seen, request, jnp.zeros((p,), jnp.int32))
    status = _status(token, 1, length, c.max_len, request)
    seen = seen.at[jnp.arange(p), token].set(True)

    put = lambda a, value: a.at[slots].set(value, mode="drop")
    state = EngineState(
        cache=SlotCache(k=k, v=v, valid=valid, index=c.index, lengths=put(c.lengths, length)),
        tokens=put(state.tokens, token), active=put(state.active, status == RUNNING),
        step=put(state.step, jnp.ones((p,), jnp.int32)), seen=put(state.seen, seen),
        controls=jax.tree.map(put, state.controls, request))
    return state, jnp.stack([token, status], axis=1)


def _reuse(params, expert_views, state: EngineState, source, slot, prefix_ids, *, graphdef, platform: str):
    """Row ``source``'s keys and values copied into row ``slot`` (the same row is allowed), which then holds the
    prefix ``prefix_ids`` ([max_len], padded with ids past the vocabulary) and nothing after it: the prompt's
    other tokens follow as pieces (``_prefill``). The model's arguments are taken for ``jit_step``'s sake."""
    TRACES["reuse"] += 1
    c = state.cache
    copy = lambda big: jax.lax.dynamic_update_index_in_dim(big, jax.lax.dynamic_index_in_dim(big, source, 0), slot, 0)
    real = prefix_ids < state.seen.shape[1]
    length = jnp.sum(real, dtype=jnp.int32)
    seen = jnp.zeros(state.seen.shape[1], bool).at[prefix_ids].set(True, mode="drop")
    cache = SlotCache(k=tuple(map(copy, c.k)), v=tuple(map(copy, c.v)),
                      valid=c.valid.at[slot].set(jnp.arange(c.max_len) < length), index=c.index,
                      lengths=c.lengths.at[slot].set(length))
    return dataclasses.replace(state, cache=cache, active=state.active.at[slot].set(False),
                               seen=state.seen.at[slot].set(seen)), length


def _decode(params, expert_views, state: EngineState, keep, *, graphdef, platform: str, rows: int):
    """One token for every active slot (``state.active & keep``) among the first ``rows``; the host keeps the
    busy slots low so that a step computes few idle rows (on XLA:CPU each row costs its own expert products,
    whatever it routes to). -> (state, [slots, 2] of (token, status))."""
    TRACES["decode"] += 1
    model = nnx.merge(graphdef, params)
    c = state.cache
    s, b = c.max_len, rows
    first = lambda a: a[:b]
    active = first(state.active) & first(keep)
    r = jnp.arange(b)
    lengths = first(c.lengths)
    at = jnp.minimum(lengths, s - 1)
    valid = first(c.valid).at[r, at].set(first(c.valid)[r, at] | active)
    # Idle rows see no key and read token 0, so they all route to the same experts.
    seeing = valid & active[:, None]
    cache = SlotCache(k=c.k, v=c.v, valid=seeing, index=jnp.asarray(s - 1, jnp.int32), lengths=at)
    # The forward writes its attention mask at the causal horizon's column: give it that column's own values.
    out = model.forward(jnp.where(active, first(state.tokens), 0)[:, None], seeing[:, s - 1:], positions=at[:, None],
                        cache=cache, platform=platform, expert_views=expert_views)
    controls = jax.tree.map(first, state.controls)
    seen = first(state.seen)
    token = sample(out.logits[:, 0], seen, controls, first(state.step))
    step = first(state.step) + active
    lengths = lengths + active
    status = jnp.where(active, _status(token, step, lengths, s, controls), IDLE)
    token = jnp.where(active, token, first(state.tokens))
    put = lambda full, part: full.at[:b].set(part)
    state = EngineState(
        cache=SlotCache(k=out.cache.k, v=out.cache.v, valid=put(c.valid, valid), index=c.index,
                        lengths=put(c.lengths, lengths)),
        tokens=put(state.tokens, token), active=put(state.active, active & (status == RUNNING)),
        step=put(state.step, step), seen=put(state.seen, seen.at[r, token].set(seen[r, token] | active)),
        controls=state.controls)
    outputs = jnp.zeros((state.tokens.shape[0], 2), jnp.int32).at[:b].set(jnp.stack([token, status], axis=1))
    return state, outputs


def jit_step(fn, formats: EngineState, replicated=None, **static):
    """``fn`` (``_decode``, ``_prefill_packed`` or ``_prefill``) jitted with its static arguments, the state
    (its third argument) donated and taken and returned in ``formats``; its other arguments as they come."""
    rest = sum(1 for p in inspect.signature(fn).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD) - 3
    return jax.jit(functools.partial(fn, **static), donate_argnames=("state",),
                   in_shardings=(None, None, formats) + (None,) * rest, out_shardings=(formats, replicated))
