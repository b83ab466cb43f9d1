"""The serving engine's steps, pure functions of its state (``state.EngineState``) that ``jit_step`` jits with
the state donated:

- ``_prefill_packed``: whole prompts packed into one row of a power of two >= 16 tokens (each attends only to
  itself: the model's ``segment_ids``) writes each one's keys and values into its slot's pages, chooses its first
  token and turns the slot on; one forward for many prompts, as transformers' continuous batching does;
- ``_prefill``: a piece of a prompt (a long prompt's chunk, or the rest of one after a cached prefix) into its
  slot's pages, attending to the pages written before it;
- ``_decode``: every slot's last token fed at its own position; each slot's next token chosen with its own
  sampling settings (temperature, top_k, top_p, repetition penalty, seed, ``sample``) and the slot ended at one
  of its end tokens, at ``max_tokens`` or at ``max_model_len``. It runs over the first ``rows`` rows.

A slot's position ``p`` lies in page ``page_table[slot, p // page_size]``; the host hands each step the page-table
rows it writes (a prefill) or the one new page a row may need (a decode). A request resumed after a preemption is
prefilled with its prompt and the tokens it had generated, and goes on from its ``step``: its next tokens are
those it would have had (a sampled one's key is folded with the step, as ever).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
from flax import nnx

from qwen2_jax.model.cache import KVCache
from qwen2_jax.model.paged_attention import PagedKV
from qwen2_jax.inference.sampling import apply_repetition_penalty, apply_temperature, nucleus_threshold
from .request import IDLE, LENGTH, RUNNING, STOPPED
from .state import TRACES, EngineState, PageCache, SlotControls


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
def _token_pages(page_rows, seq, positions, page_size: int, num_pages: int):
    """(page, offset) of each token (its sequence's row of ``page_rows [S, max_pages]``, or ``seq`` S: none, the
    write dropped)."""
    rows = jnp.concatenate([page_rows, jnp.full((1, page_rows.shape[1]), num_pages, jnp.int32)])
    index = jnp.clip(positions // page_size, 0, page_rows.shape[1] - 1)
    return rows[seq, index], positions % page_size


def _prefill(params, expert_views, state: EngineState, slot, input_ids, real, positions, page_row, final, step0,
             seen_row, request: SlotControls, seed, *, graphdef, platform: str, max_len: int, attention: str = "xla"):
    """One piece ``[1, T]`` of a prompt, its first ``real`` tokens at ``positions`` (right-padded), into slot
    ``slot``'s pages (``page_row [max_pages]``, which becomes its table), attending to the positions before it.
    ``seen_row [V]``: the prompt's tokens up to the piece's end (for the repetition penalty). The last piece
    (``final``) also chooses the request's token number ``step0 + 1`` and turns the slot on.
    -> (state, [token, status])."""
    TRACES["prefill"] += 1
    model = nnx.merge(graphdef, params)
    c = state.cache
    t = input_ids.shape[1]
    is_real = jnp.arange(t) < real
    page, offset = _token_pages(page_row[None], jnp.where(is_real, 0, 1), positions[0], c.page_size, c.num_pages)
    length = positions[0, 0] + real
    paged = PagedKV(k=c.k, v=c.v, page_table=page_row[None], write_page=page[None], write_offset=offset[None],
                    q_positions=jnp.where(is_real, positions[0], -1)[None], kv_len=length[None], kernel=attention)
    out = model.forward(input_ids, is_real[None], positions=positions, cache=paged, logits_at=(real - 1)[None, None],
                        platform=platform, expert_views=expert_views)
    request = dataclasses.replace(request, keys=jax.random.key(seed)[None])
    token = sample(out.logits[:, 0], seen_row[None], request, step0[None])[0]
    status = _status(token, step0 + 1, length, max_len, jax.tree.map(lambda a: a[0], request))
    seen_row = jnp.where(final, seen_row.at[token].set(True), seen_row)

    at = lambda a, value, on=True: a.at[slot].set(jnp.where(on, value, a[slot]))
    controls = jax.tree.map(lambda a, r: a.at[slot].set(r[0]), state.controls, request)
    state = EngineState(
        cache=PageCache(k=out.cache.k, v=out.cache.v, page_table=c.page_table.at[slot].set(page_row),
                        lengths=c.lengths.at[slot].set(length)),
        tokens=at(state.tokens, token, final), active=state.active.at[slot].set(final & (status == RUNNING)),
        step=state.step.at[slot].set(jnp.where(final, step0 + 1, 0)), seen=state.seen.at[slot].set(seen_row),
        controls=controls)
    return state, jnp.stack([jnp.where(final, token, -1), jnp.where(final, status, IDLE)])


def _prefill_packed(params, expert_views, state: EngineState, input_ids, positions, segment_ids, ends, slots,
                    page_rows, steps0, request: SlotControls, seeds, *, graphdef, platform: str, max_len: int,
                    attention: str = "xla"):
    """Whole prompts packed into one piece ``[1, T]`` (``segment_ids`` 0, 1 .. per prompt, -1 for the padding
    at the end; ``positions`` count from 0 in each prompt): one forward for all of them, over a cache of the
    piece's own T slots, each prompt attending only to itself. Each prompt's keys and values go to its slot's
    pages (``page_rows [P, max_pages]``, its table from now; ``slots`` [P], the number of slots for an unused
    segment: dropped), its token number ``steps0 + 1`` is chosen from the logits at its last token (``ends`` [P])
    and the slot is turned on (``attention``: unused, the piece attends to itself). -> (state, [P, 2] of (token,
    status))."""
    TRACES["prefill_packed"] += 1
    model = nnx.merge(graphdef, params)
    c = state.cache
    p = slots.shape[0]
    real = segment_ids[0] >= 0
    seg = jnp.where(real, segment_ids[0], p)  # padding: past the last segment
    piece = KVCache.create(model.config, 1, input_ids.shape[1], dtype=c.k[0].dtype)
    out = model.forward(input_ids, real[None], positions=positions, cache=piece, segment_ids=segment_ids,
                        logits_at=ends[None], platform=platform, expert_views=expert_views)
    page, offset = _token_pages(page_rows, seg, positions[0], c.page_size, c.num_pages)
    t = input_ids.shape[1]
    write = lambda pages, rows: pages.at[page, offset].set(rows.reshape(t, -1).astype(pages.dtype), mode="drop")
    k = tuple(write(pages, a[0].transpose(1, 0, 2)) for pages, a in zip(c.k, out.cache.k))  # [T, Hkv * D] rows
    v = tuple(write(pages, a[0].transpose(2, 0, 1)) for pages, a in zip(c.v, out.cache.v))
    length = positions[0][ends] + 1

    seen = jnp.zeros((p, state.seen.shape[1]), bool).at[seg, input_ids[0]].set(True, mode="drop")
    request = dataclasses.replace(request, keys=jax.vmap(jax.random.key)(seeds))
    token = sample(out.logits[0], seen, request, steps0)
    status = _status(token, steps0 + 1, length, max_len, request)
    seen = seen.at[jnp.arange(p), token].set(True)

    put = lambda a, value: a.at[slots].set(value, mode="drop")
    state = EngineState(
        cache=PageCache(k=k, v=v, page_table=put(c.page_table, page_rows), lengths=put(c.lengths, length)),
        tokens=put(state.tokens, token), active=put(state.active, status == RUNNING),
        step=put(state.step, steps0 + 1), seen=put(state.seen, seen), controls=jax.tree.map(put, state.controls, request))
    return state, jnp.stack([token, status], axis=1)


def _decode(params, expert_views, state: EngineState, keep, new_pages, *, graphdef, platform: str, rows: int,
            max_len: int, ctx_pages: int | None = None, attention: str = "xla"):
    """One token for every active slot (``state.active & keep``) among the first ``rows``, after the pages the
    host took for them are put in their tables (``new_pages [slots, 2]``: (index, page), index ``max_pages`` for
    none); the host keeps the busy slots low so that a step computes few idle rows (on XLA:CPU each row costs its
    own expert products, whatever it routes to). An idle row writes nothing and reads nothing: its pages may be
    another request's by now. ``ctx_pages``: the rows' tables are read only that far (every row's next position
    lies within them), the attention then taking those pages in one pass (on GPU, where a data-dependent loop syncs
    with the host on every trip, and on TPU, the runner compiles a step per bucket of context).
    -> (state, [slots, 2] of (token, status))."""
    TRACES["decode"] += 1
    model = nnx.merge(graphdef, params)
    c = state.cache
    b = rows
    first = lambda a: a[:b]
    table = c.page_table.at[jnp.arange(c.page_table.shape[0]), new_pages[:, 0]].set(new_pages[:, 1], mode="drop")
    active = first(state.active) & first(keep)
    lengths = first(c.lengths)
    page, offset = _token_pages(first(table), jnp.where(active, jnp.arange(b), b), lengths, c.page_size, c.num_pages)
    read = first(table) if ctx_pages is None else first(table)[:, :ctx_pages]
    paged = PagedKV(k=c.k, v=c.v, page_table=read, write_page=page[:, None], write_offset=offset[:, None],
                    q_positions=jnp.where(active, lengths, -1)[:, None], kv_len=jnp.where(active, lengths + 1, 0),
                    kernel=attention, whole_table=ctx_pages is not None)
    # Idle rows see no key and read token 0, so they all route to the same experts.
    out = model.forward(jnp.where(active, first(state.tokens), 0)[:, None], active[:, None], positions=lengths[:, None],
                        cache=paged, platform=platform, expert_views=expert_views)
    controls = jax.tree.map(first, state.controls)
    seen = first(state.seen)
    token = sample(out.logits[:, 0], seen, controls, first(state.step))
    step = first(state.step) + active
    lengths = lengths + active
    r = jnp.arange(b)
    status = jnp.where(active, _status(token, step, lengths, max_len, controls), IDLE)
    token = jnp.where(active, token, first(state.tokens))
    put = lambda full, part: full.at[:b].set(part)
    state = EngineState(
        cache=PageCache(k=out.cache.k, v=out.cache.v, page_table=table, lengths=put(c.lengths, lengths)),
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
