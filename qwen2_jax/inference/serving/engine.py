"""Continuous batching over a fixed number of decode slots: the engine behind ``qwen2-jax serve``.

One KV cache of ``slots`` rows x ``max_len`` positions lives on the device, donated to every step. One thread
(``Engine``) owns it and, in a loop:

- frees the slots whose requests ended or were aborted, and admits waiting requests into free slots (idle, it first
  lets a request that just came wait up to ``batch_wait_ms`` for the rest of its burst, so that they share packed
  calls);
- prefills, one call of at most ``prefill_chunk`` prompt tokens per loop, so that the slots already decoding go
  on between calls (jitted, the state donated): ``_prefill_packed`` runs the whole prompts next in line that
  fit together, packed into one row of a power of two >= 16 tokens (each attends only to itself: the model's
  ``segment_ids``), writes each one's keys and values into its slot's row of the shared cache, chooses its
  first token and turns the slot on; one forward for many prompts, as transformers' continuous batching does.
  A prompt longer than ``prefill_chunk`` goes alone, a piece of ``prefill_chunk`` tokens a call (``_prefill``,
  the last piece left-padded), into its row;
- decodes: ``_decode`` (jitted, the state donated) feeds every slot's last token at its own position, chooses
  each slot's next token with its own sampling settings (temperature, top_k, top_p, repetition penalty, seed)
  and ends a slot at one of its end tokens, at ``max_tokens`` or at the end of its row. It runs over the first
  1, 2, 4 .. ``slots`` rows, the fewest that hold every busy slot (requests take the lowest free slot): on
  XLA:CPU an idle row would cost as much as a busy one;
- reads the tokens of the step before the one it just dispatched, so the device never waits for the host.

Prefix caching: a freed slot's row keeps the keys and values of its request's tokens (prompt and generated); a busy
row holds its request's prompt once the prefill writing it is dispatched (``Engine._held``). Just before a prompt's
first prefill call (``Engine._look_up``), a prompt that begins with enough of a row's tokens (at least
``MIN_PREFIX`` and half the prompt: a short shared head, such as a system prompt, is cheaper to prefill again packed
with other prompts) gets that row copied into its slot (``_reuse``) and prefills only the rest, in pieces attending
to the copied prefix: the next turn of a conversation prefills only the new message, and a question about a
document that another request is reading, or that one just ahead of it in the queue is prefilling, prefills only
the question. A request admitted into a row first moves that row's tokens aside (``Engine._move_aside``: copied into
the free row holding the least, which is nothing, a duplicate, or else the least recently used tokens), so the free
rows above the busy ones keep the most recent conversations while requests still take the lowest rows.

A row keeps its tokens at positions ``0 .. length - 1``: a left-padded piece is shifted onto the end of the
row's tokens after its forward (the padding's slots are then invalid and the next piece or token overwrites
them), so RoPE positions are slot numbers and a request uses exactly ``len(prompt) + max_tokens - 1`` slots.

``Engine.start`` compiles every step ahead of time (a decode step per row bucket, a packed prefill per length
16, 32 .. ``prefill_chunk``, and ``_prefill`` when ``prefill_chunk`` < ``max_len``) and the loop calls those
executables only; all per-request values are arrays, so no load compiles anything after that (``TRACES``,
``COMPILATIONS``).

The widest decode step is compiled first with the KV cache's layout left to the compiler, and every other step,
and the function that makes the state, take and return the cache in the layout it chose: XLA:TPU keeps V with
its head dimension minor, and a step handed the row-major default would lay the whole cache out again on every
call (docs/serving.md).

The model's forward writes a cache at one scalar index for the whole batch (``KVCache.index``); ``SlotCache``
writes each row at its own length instead (the decode step puts the forward's causal horizon at the last slot,
so that only ``valid`` masks, and its one-column write a no-op).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import inspect
import itertools
import os
import queue
import random
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.layout import Format, Layout

from qwen2_jax.model import moe, views
from qwen2_jax.model.cache import KVCache
from qwen2_jax.errors import InputError
from qwen2_jax.inference.generate import MIN_PROMPT_BUCKET, bucket, default_eos_token_ids
from qwen2_jax.inference.sampling import apply_repetition_penalty, apply_temperature, check_sampling_args, nucleus_threshold

MAX_EOS = 8  # end tokens per request, padded with -1
# An idle engine's wait for the rest of a burst: 10 ms gathered 16 clients' requests into two full packed calls
# on the quarter config (docs/serving.md); a lone request's first token comes that much later.
DEFAULT_BATCH_WAIT_MS = 10.0
MIN_PREFIX = MIN_PROMPT_BUCKET  # cached tokens a prompt must reuse (and half of it) to skip their prefill
# How many times each jitted function has been traced, and how many XLA compilations this process has run
# (a function compiles again without a new trace for arguments of another layout): tests and /metrics check
# that neither grows after start-up.
TRACES: collections.Counter = collections.Counter()
COMPILATIONS = collections.Counter()
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _secs, **_: COMPILATIONS.update(["backend"]) if event == "/jax/core/compile/backend_compile_duration"
    else None)

# Per-slot status a step reports to the host.
IDLE, RUNNING, STOPPED, LENGTH = 0, 1, 2, 3


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotCache:
    """``KVCache``'s arrays with a write position per row (``lengths``) for the decode step; ``index`` is what
    the model reads as the causal horizon (the last slot, so every valid slot is seen). A decode step over the
    first b rows of the slots has ``valid`` and ``lengths`` of b rows, and reads and writes those rows of
    ``k`` and ``v``."""

    k: tuple[jax.Array, ...]  # per layer [slots, Hkv, S, D]
    v: tuple[jax.Array, ...]  # per layer [slots, Hkv, D, S]
    valid: jax.Array  # [B, S] bool
    index: jax.Array  # [] int32
    lengths: jax.Array  # [B] int32: tokens in each row, the slot its next token goes to

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def update(self, layer: int, k, v) -> "SlotCache":
        """Writes one token per row, ``k [B, Hkv, 1, D]`` and ``v [B, Hkv, D, 1]``, at slot ``lengths[row]``."""
        rows = jnp.arange(k.shape[0])
        new_k = self.k[layer].at[rows, :, self.lengths, :].set(k[:, :, 0, :].astype(self.k[layer].dtype))
        new_v = self.v[layer].at[rows, :, :, self.lengths].set(v[:, :, :, 0].astype(self.v[layer].dtype))
        put = lambda arrays, new: arrays[:layer] + (new,) + arrays[layer + 1:]
        return dataclasses.replace(self, k=put(self.k, new_k), v=put(self.v, new_v))

    def layer(self, layer: int):
        b = self.lengths.shape[0]
        return self.k[layer][:b], self.v[layer][:b]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotControls:
    """Each slot's sampling settings and stopping rules ([B] arrays; one row of each for a prefill)."""

    temperature: jax.Array  # float32; 0 is greedy
    top_k: jax.Array  # int32; 0 is off
    top_p: jax.Array  # float32; 1 is off
    repetition_penalty: jax.Array  # float32; 1 is off
    keys: jax.Array  # PRNG keys
    max_tokens: jax.Array  # int32
    eos: jax.Array  # [.., MAX_EOS] int32, padded with -1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EngineState:
    cache: SlotCache
    tokens: jax.Array  # [B] int32: each slot's latest token (the next decode step's input)
    active: jax.Array  # [B] bool: the slot is decoding
    step: jax.Array  # [B] int32: tokens the slot's request has generated
    seen: jax.Array  # [B, V] bool: prompt and generated tokens (for the repetition penalty)
    controls: SlotControls


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
def _new_state(cfg, slots: int, max_len: int, dtype) -> EngineState:
    TRACES["new_state"] += 1
    cache = KVCache.create(cfg, slots, max_len, dtype=dtype)
    zeros = lambda dt: jnp.zeros((slots,), dt)
    controls = SlotControls(
        temperature=zeros(jnp.float32), top_k=zeros(jnp.int32), top_p=jnp.ones((slots,), jnp.float32),
        repetition_penalty=jnp.ones((slots,), jnp.float32), keys=jax.vmap(jax.random.key)(zeros(jnp.uint32)),
        max_tokens=jnp.ones((slots,), jnp.int32), eos=jnp.full((slots, MAX_EOS), -1, jnp.int32))
    return EngineState(cache=SlotCache(k=cache.k, v=cache.v, valid=cache.valid, index=cache.index,
                                       lengths=zeros(jnp.int32)),
                       tokens=zeros(jnp.int32), active=zeros(bool), step=zeros(jnp.int32),
                       seen=jnp.zeros((slots, cfg.vocab_size), bool), controls=controls)


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


def state_shardings(cfg, mesh, slots: int) -> EngineState:
    """How the engine's state lies on ``mesh``: slots over the data axis, the cache as ``generate``'s."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from qwen2_jax.sharding import batch_sharding, cache_shardings

    cs = cache_shardings(cfg, mesh, slots)
    rows = batch_sharding(mesh)
    rows2 = NamedSharding(mesh, P("data", None))
    return EngineState(
        cache=SlotCache(k=cs.k, v=cs.v, valid=cs.valid, index=cs.index, lengths=rows), tokens=rows, active=rows,
        step=rows, seen=rows2, controls=SlotControls(temperature=rows, top_k=rows, top_p=rows,
                                                     repetition_penalty=rows, keys=rows, max_tokens=rows, eos=rows2))


def abstract_state(cfg, slots: int, max_len: int, dtype, shardings: EngineState | None = None) -> EngineState:
    """The state's shapes and dtypes (placed by ``shardings``, from ``state_shardings``), allocating nothing."""
    state = jax.eval_shape(functools.partial(_new_state, cfg, slots, max_len, dtype))
    if shardings is None:
        return state
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def state_formats(state: EngineState, chosen: EngineState | None = None) -> EngineState:
    """How the steps take and return the state: each array placed as ``state``'s (abstract, with shardings), the
    KV cache in the layouts of ``chosen`` (a compiled step's ``input_formats``), or left to the compiler
    (``Layout.AUTO``). XLA:TPU reads the cache in a layout of its own (V with D minor); given the default
    row-major one, every step would lay the whole cache out again: 7.5 GB a chip at 16 rows of 64 of the full
    model on a v5p-8 (docs/serving.md)."""
    formats = jax.tree.map(lambda x: x.sharding, state)
    layout = lambda name, i: Layout.AUTO if chosen is None else getattr(chosen.cache, name)[i].layout
    k, v = (tuple(Format(layout(name, i), x.sharding) for i, x in enumerate(getattr(state.cache, name)))
            for name in ("k", "v"))
    return dataclasses.replace(formats, cache=dataclasses.replace(formats.cache, k=k, v=v))


def jit_step(fn, formats: EngineState, replicated=None, **static):
    """``fn`` (``_decode``, ``_prefill_packed`` or ``_prefill``) jitted with its static arguments, the state
    (its third argument) donated and taken and returned in ``formats``; its other arguments as they come."""
    rest = sum(1 for p in inspect.signature(fn).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD) - 3
    return jax.jit(functools.partial(fn, **static), donate_argnames=("state",),
                   in_shardings=(None, None, formats) + (None,) * rest, out_shardings=(formats, replicated))


# ---- requests -----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: a random one
    ignore_eos: bool = False
    eos_token_ids: tuple[int, ...] | None = None  # None: the engine's

    def check(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InputError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        check_sampling_args(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                            repetition_penalty=self.repetition_penalty)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InputError(f"seed must be an integer, got {self.seed!r}")


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its bound."""


_IDS = itertools.count()


class Request:
    """A prompt and its settings; the engine calls ``deliver(token_ids, finish_reason)`` from its thread as
    tokens come (``finish_reason`` None until the last call: "stop" or "length", or "abort"). Without
    ``deliver``, the calls go to ``events`` (a queue), e.g. for tests."""

    def __init__(self, prompt: Sequence[int], params: SamplingParams,
                 deliver: Callable[[list[int], str | None], None] | None = None):
        self.id = next(_IDS)
        self.prompt = [int(t) for t in prompt]
        self.params = params
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.deliver = deliver or (lambda tokens, finish: self.events.put((tokens, finish)))
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.output: list[int] = []  # tokens delivered so far
        self.cached_tokens = 0  # prompt tokens whose keys and values came from the prefix cache
        self.finished = False

    def result(self, timeout: float | None = None) -> tuple[list[int], str]:
        """Blocks until the request ends (``events`` only): (all its tokens, finish_reason)."""
        tokens = []
        while True:
            new, finish = self.events.get(timeout=timeout)
            tokens += new
            if finish is not None:
                return tokens, finish


@dataclasses.dataclass
class Stats:
    """What ``/metrics`` reports; histograms as (bucket bounds, counts, sum)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of them, found (their prefill skipped)
    prefix_cache_moves: int = 0  # rows' tokens moved aside for a request admitted into their row
    requests_finished: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    ttft: "Histogram" = None
    itl: "Histogram" = None

    def __post_init__(self):
        self.ttft = Histogram((0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.itl = Histogram((0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


class Histogram:
    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, x: float) -> None:
        self.counts[next((i for i, b in enumerate(self.bounds) if x <= b), len(self.bounds))] += 1
        self.sum += x


# ---- the engine ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Prefill:
    request: Request
    slot: int
    done: int = 0  # prompt tokens written
    pieces: bool = False  # in pieces into its row (a long prompt, or the rest of a cached prefix), not packed
    looked_up: bool = False  # its prompt's head has been looked for in the rows (and copied, if found)


def check_settings(context_length: int, *, flags: bool = False, **settings) -> None:
    """InputError for engine settings (``slots``, ``max_len``, ``prefill_chunk``, ``max_waiting``,
    ``batch_wait_ms``) it cannot run with, named as keywords or, with ``flags``, as the command line's ``--flags``."""
    name = (lambda key: "--" + key.replace("_", "-")) if flags else (lambda key: key)
    for key, low in (("slots", 1), ("max_len", 2), ("prefill_chunk", MIN_PROMPT_BUCKET), ("max_waiting", 0)):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name(key)} must be an integer >= {low}, got {value!r}")
    wait = settings.get("batch_wait_ms", 0)
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 10_000:
        raise InputError(f"{name('batch_wait_ms')} must be a number of milliseconds in [0, 10000], got {wait!r}")
    max_len, chunk = settings["max_len"], settings["prefill_chunk"]
    if max_len > context_length:
        raise InputError(f"{name('max_len')} {max_len} exceeds the model's context of {context_length} tokens")
    if chunk & (chunk - 1) or (chunk < max_len and max_len % chunk):
        raise InputError(f"{name('prefill_chunk')} {chunk} must be a power of two that divides {name('max_len')} "
                         f"{max_len} or is at least it (a piece of a long prompt must never run past its row)")


class Engine:
    """Continuous batching of ``slots`` requests at a time over a model (``from_pretrained``), each request
    using at most ``max_len`` positions (prompt + max_tokens). ``max_waiting``: requests that may wait for a
    slot (``submit`` raises QueueFull past it). ``prefix_caching``: reuse rows' keys and values for prompts that
    begin with their tokens. ``batch_wait_ms``: how long an idle engine lets a first request wait for others
    (``_gather_burst``). ``start()`` compiles every shape and starts the thread."""

    def __init__(self, model, *, slots: int = 16, max_len: int = 2048, prefill_chunk: int = 512,
                 max_waiting: int = 256, eos_token_ids: Sequence[int] | None = None, prefix_caching: bool = True,
                 batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS):
        cfg = model.config
        check_settings(cfg.context_length, slots=slots, max_len=max_len, prefill_chunk=prefill_chunk,
                       max_waiting=max_waiting, batch_wait_ms=batch_wait_ms)
        self.model, self.config = model, cfg
        self.slots, self.max_len, self.chunk, self.max_waiting = slots, max_len, prefill_chunk, max_waiting
        self.batch_wait = batch_wait_ms / 1000
        eos = default_eos_token_ids(model) if eos_token_ids is None else tuple(eos_token_ids)
        self.eos_token_ids = tuple(dict.fromkeys(int(e) for e in eos))
        if len(self.eos_token_ids) > MAX_EOS:
            raise InputError(f"at most {MAX_EOS} end tokens, got {len(self.eos_token_ids)}")
        self.buckets = [b for b in (MIN_PROMPT_BUCKET << i for i in range(32)) if b <= prefill_chunk]
        self.prefix_caching = bool(prefix_caching)
        # Lengths of the pieces prefilled into a row: a long prompt's prefill_chunk; with prefix caching also the
        # shorter buckets, for the rest of a prompt after its cached prefix. A piece never runs past its row.
        self.piece_sizes = [t for t in self.buckets if t <= max_len and (prefix_caching or t == prefill_chunk < max_len)]

        self._graphdef, self._params = nnx.split(model)
        self._views = views.expert_views(model)
        self._platform = moe.platform_of(self._params)
        mesh = getattr(model, "mesh", None)
        if mesh is not None and slots % mesh.shape["data"]:
            raise InputError(f"slots {slots} must be a multiple of the mesh's data axis ({mesh.shape['data']})")
        if mesh is None:
            device = next(iter(jax.tree.leaves(self._params)[0].sharding.device_set))
            self._replicated = jax.sharding.SingleDeviceSharding(device)
            self._shardings = jax.tree.map(lambda _: self._replicated,
                                           abstract_state(cfg, slots, max_len, model.dtype))
        else:
            self._replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            self._shardings = state_shardings(cfg, mesh, slots)
        self._new_state = None  # jitted by _compile, to lay the state out as the steps read it
        # Decode steps over the first 1, 2, 4 .. slots rows.
        self.rows = sorted({min(1 << i, slots) for i in range(slots.bit_length() + 1)})
        self._packed: dict[int, Callable] = {}  # piece length -> compiled step
        self._piece: dict[int, Callable] = {}  # piece length -> compiled step
        self._reuse: Callable | None = None  # compiled: a row's prefix copied into a slot
        # The tokens whose keys and values each row holds, counting only writes already dispatched (the device runs
        # them before a copy dispatched now): a finished request's prompt and output, a running one's prompt, the
        # pieces of a prompt dispatched so far, a copied prefix; a row whose new request has written nothing yet
        # still holds its last request's.
        self._held: list[np.ndarray] = [np.zeros(0, np.int64)] * slots
        # When each row's held tokens were last released or copied from: the least recently used are given up first.
        self._used = np.zeros(slots, np.int64)
        self._clock = 0
        self._decode: dict[int, Callable] = {}  # rows -> compiled step
        self._state = None
        self._lock = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._aborted: set[int] = set()
        self._slot_req: list[Request | None] = [None] * slots
        self._prefilling: collections.deque[_Prefill] = collections.deque()
        self._keep = np.zeros(slots, bool)
        self._pending: collections.deque = collections.deque()  # dispatched, not yet read: (outputs, kind, snapshot)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        self.stats = Stats()
        self.steps = 0  # decode steps dispatched
        self.prefills = 0  # prefill calls dispatched

    # ---- the public side (any thread) ----
    @property
    def running(self) -> int:
        return sum(r is not None for r in self._slot_req)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """InputError for a request this engine cannot run: bad settings, token ids, or too long for a row."""
        params.check()
        if not prompt:
            raise InputError("the prompt is empty; it needs at least one token")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        if len(prompt) + params.max_tokens > self.max_len:
            raise InputError(f"this model's maximum context length is {self.max_len} tokens; the prompt has "
                             f"{len(prompt)} tokens and max_tokens is {params.max_tokens} ({len(prompt) + params.max_tokens} "
                             "in all): shorten the prompt or lower max_tokens")
        eos = params.eos_token_ids
        if eos is not None and (len(eos) > MAX_EOS or not all(0 <= e < self.config.vocab_size for e in eos)):
            raise InputError(f"eos_token_ids must be at most {MAX_EOS} token ids in [0, {self.config.vocab_size})")

    def submit(self, request: Request) -> Request:
        self.check(request.prompt, request.params)
        with self._lock:
            if self.error is not None:
                raise RuntimeError(f"the engine has stopped: {self.error!r}")
            if self.running + len(self._waiting) >= self.slots + self.max_waiting:
                raise QueueFull(f"all {self.slots} slots are busy and {len(self._waiting)} requests are waiting")
            request.submitted = time.perf_counter()
            self._waiting.append(request)
            self._lock.notify()
        return request

    def abort(self, request: Request) -> None:
        """Ends ``request`` (e.g. its client went away): its slot is free for the next step."""
        with self._lock:
            if not request.finished:
                self._aborted.add(request.id)
                self._lock.notify()

    def start(self) -> "Engine":
        """Compiles every step (a decode step per row bucket, a packed prefill per length, the piece of a long
        prompt) and runs each once, then starts the loop thread."""
        self._compile()
        self._thread = threading.Thread(target=self._run, name="qwen2-jax-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    # ---- the engine thread ----
    def _fresh_state(self) -> EngineState:
        return self._new_state(self.config, self.slots, self.max_len, self.model.dtype)

    def _compile(self) -> None:
        """Compiles each step ahead of time (``lower().compile()``) and keeps the executables, which the loop
        calls directly: no argument's layout or commitment can make a step compile again under load. The steps are
        traced one at a time (Python holds the GIL) while those already traced compile on a thread per core (XLA
        compiles outside it), and each executable runs once as soon as it is compiled (its first run sets itself
        up, which no request should wait for): the three overlap, rather than follow one another."""
        static = dict(graphdef=self._graphdef, platform=self._platform)
        keep = np.zeros(self.slots, bool)
        # The widest decode step first, the state's layouts left to the compiler; every other step takes and
        # returns the state in the layouts it chose, and the state is made in them.
        widest = max(self.rows)
        abstract = abstract_state(self.config, self.slots, self.max_len, self.model.dtype, self._shardings)
        first = jit_step(_decode, state_formats(abstract), self._replicated, rows=widest, **static).lower(
            self._params, self._views, abstract, keep).compile()
        formats = state_formats(abstract, chosen=first.input_formats[0][2])
        self._new_state = jax.jit(_new_state, static_argnums=(0, 1, 2, 3), out_shardings=formats)
        steps = {("decode", widest): (first, (keep,))}  # (kind, size) -> (jitted step, its arguments after the state)
        for t in self.buckets:
            steps["packed", t] = (jit_step(_prefill_packed, formats, self._replicated, **static),
                                  self._packed_args([], t))
        for t in self.piece_sizes:
            steps["piece", t] = (jit_step(_prefill, formats, self._replicated, **static),
                                 self._piece_args(_Prefill(Request([0] * t, SamplingParams(max_tokens=1)), 0))[0])
        if self.prefix_caching:
            steps["reuse", None] = (jit_step(_reuse, formats, self._replicated, **static), self._reuse_args(0, 0, []))
        for b in self.rows:
            if b != widest:
                steps["decode", b] = (jit_step(_decode, formats, self._replicated, rows=b, **static), (keep,))
        compiled = {("decode", widest): first}

        def run(key, state):  # dispatched, not waited for: the state is the first runs' own, given up after them
            return compiled[key](self._params, self._views, state, *steps[key][1])[0]

        state = run(("decode", widest), self._fresh_state())
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
            compiling = {}
            for key, (step, args) in steps.items():
                if key not in compiled:
                    compiling[key] = pool.submit(step.lower(self._params, self._views, abstract, *args).compile)
                for done in [k for k, f in compiling.items() if f.done()]:
                    compiled[done] = compiling.pop(done).result()
                    state = run(done, state)
            for key, future in compiling.items():
                compiled[key] = future.result()
                state = run(key, state)
        jax.block_until_ready(state)
        del state
        self._state = self._fresh_state()
        self._packed = {t: c for (kind, t), c in compiled.items() if kind == "packed"}
        self._decode = {b: c for (kind, b), c in compiled.items() if kind == "decode"}
        self._piece = {t: c for (kind, t), c in compiled.items() if kind == "piece"}
        self._reuse = compiled.get(("reuse", None))

    def _controls(self, p: SamplingParams) -> SlotControls:
        eos = () if p.ignore_eos else (self.eos_token_ids if p.eos_token_ids is None else tuple(p.eos_token_ids))
        one = lambda x, dt: np.asarray([x], dt)
        return SlotControls(temperature=one(p.temperature, np.float32), top_k=one(p.top_k, np.int32),
                            top_p=one(p.top_p, np.float32), repetition_penalty=one(p.repetition_penalty, np.float32),
                            keys=np.zeros((1,), np.uint32),  # replaced by the key of the seed in the step
                            max_tokens=one(p.max_tokens, np.int32),
                            eos=np.asarray([list(eos) + [-1] * (MAX_EOS - len(eos))], np.int32))

    def _seed(self, p: SamplingParams) -> int:
        return random.getrandbits(32) if p.seed is None else p.seed % 2**32

    def _packed_args(self, jobs: list[_Prefill], t: int):
        """The arguments of ``_prefill_packed`` after the state: ``jobs``' whole prompts in a piece of ``t``."""
        p = self._segments(t)
        ids, positions = np.zeros((1, t), np.int32), np.zeros((1, t), np.int32)
        segment_ids = np.full((1, t), -1, np.int32)
        ends, slots = np.zeros(p, np.int32), np.full(p, self.slots, np.int32)
        controls = [self._controls(SamplingParams(max_tokens=1))] * p
        seeds = np.zeros(p, np.uint32)
        at = 0
        for i, job in enumerate(jobs):
            n = len(job.request.prompt)
            ids[0, at:at + n], positions[0, at:at + n], segment_ids[0, at:at + n] = job.request.prompt, np.arange(n), i
            ends[i], slots[i], at = at + n - 1, job.slot, at + n
            controls[i], seeds[i] = self._controls(job.request.params), self._seed(job.request.params)
        controls = jax.tree.map(lambda *rows: np.concatenate(rows), *controls)
        return ids, positions, segment_ids, ends, slots, controls, seeds

    def _segments(self, t: int) -> int:
        """Prompts a packed piece of ``t`` tokens holds at most."""
        return min(self.slots, t)

    def _piece_length(self, done: int, total: int) -> tuple[int, int]:
        """(prompt tokens, piece length) of the next piece of a prompt of ``total`` tokens with ``done`` written:
        as many as the longest piece holds, in the shortest piece that holds them."""
        n = min(total - done, self.piece_sizes[-1])
        return n, next(t for t in self.piece_sizes if t >= n)

    def _pieces_fit(self, done: int, total: int) -> bool:
        """Whether the pieces of the rest of a prompt from ``done`` stay inside the row (a piece writes its
        whole length, padding included, before it is shifted into place)."""
        while done < total:
            n, t = self._piece_length(done, total)
            if done + t > self.max_len:
                return False
            done += n
        return True

    def _piece_args(self, job: _Prefill):
        """The arguments of the prefill of ``job``'s next piece (left-padded) after the state; and the number
        of prompt tokens in it."""
        prompt = job.request.prompt
        n, t = self._piece_length(job.done, len(prompt))
        ids = np.zeros((1, t), np.int32)
        mask = np.zeros((1, t), bool)
        ids[0, t - n:], mask[0, t - n:] = prompt[job.done:job.done + n], True
        positions = np.zeros((1, t), np.int32)
        positions[0, t - n:] = np.arange(job.done, job.done + n)
        p = job.request.params
        return (np.int32(job.slot), ids, mask, positions, np.int32(job.done), np.bool_(job.done + n == len(prompt)),
                self._controls(p), np.uint32(self._seed(p))), n

    def _dispatch_prefill(self) -> None:
        """One prefill call: the next piece of a prompt longer than ``prefill_chunk`` if one is first in line,
        else the whole prompts next in line that fit in one packed piece."""
        self.prefills += 1
        job = self._look_up(self._prefilling[0])
        if job.pieces:
            args, n = self._piece_args(job)
            self._state, out = self._piece[args[1].shape[1]](self._params, self._views, self._state, *args)
            job.done += n
            self._held[job.slot] = np.asarray(job.request.prompt[:job.done])
            if job.done == len(job.request.prompt):
                self._prefilling.popleft()
                self._keep[job.slot] = True
                out.copy_to_host_async()
                self._pending.append((out, "prefill", [(job.slot, job.request)]))
            return
        jobs, total = [], 0
        while (self._prefilling and len(jobs) < self._segments(self.chunk)
               and not self._look_up(self._prefilling[0]).pieces
               and total + len(self._prefilling[0].request.prompt) <= self.chunk):
            jobs.append(self._prefilling.popleft())
            total += len(jobs[-1].request.prompt)
        t = bucket(total, MIN_PROMPT_BUCKET)  # holds min(slots, t) prompts: each has a token at least
        self._keep[[j.slot for j in jobs]] = True
        self._state, out = self._packed[t](self._params, self._views, self._state, *self._packed_args(jobs, t))
        for j in jobs:
            self._held[j.slot] = np.asarray(j.request.prompt)
        out.copy_to_host_async()
        self._pending.append((out, "prefill", [(j.slot, j.request) for j in jobs]))

    def _dispatch_decode(self, keep: np.ndarray) -> None:
        rows = next(b for b in self.rows if b > np.flatnonzero(keep)[-1])
        self._state, out = self._decode[rows](self._params, self._views, self._state, keep.copy())
        out.copy_to_host_async()
        self._pending.append((out, "decode", list(self._slot_req)))
        self.steps += 1

    def _run(self) -> None:
        try:
            while self._loop_once():
                pass
        except BaseException as e:  # a bug: fail every request rather than leave clients waiting forever
            self.error = e
            with self._lock:
                requests = [r for r in (*self._slot_req, *self._waiting) if r is not None]
            for r in requests:
                self._finish(r, "abort")
            raise

    def _loop_once(self) -> bool:
        with self._lock:
            while (not self._stopping and not self._waiting and not self._aborted and self.running == 0
                   and not self._pending):
                self._lock.wait()
            if self.batch_wait and self._waiting and self.running == 0 and not self._pending:
                self._gather_burst()
            if self._stopping:
                return False
            aborted, self._aborted = self._aborted, set()
            for slot, r in enumerate(self._slot_req):
                if r is not None and r.id in aborted:
                    self._release(slot)
                    self._finish(r, "abort")
            for r in [r for r in self._waiting if r.id in aborted]:
                self._waiting.remove(r)
                self._finish(r, "abort")
            admitted = []
            for slot in range(self.slots):
                if self._slot_req[slot] is None and self._waiting:
                    r = self._waiting.popleft()
                    self._slot_req[slot] = r
                    self._prefilling.append(_Prefill(r, slot, pieces=len(r.prompt) > self.chunk))
                    admitted.append((slot, r))
        if admitted and self.prefix_caching:
            self._move_aside(admitted)
        # One prefill call (up to prefill_chunk prompt tokens), then a decode step for the running slots.
        if self._prefilling:
            self._dispatch_prefill()
        dispatched = False
        if self._keep.any():
            self._dispatch_decode(self._keep)
            dispatched = True
        # Read everything but the step just dispatched: the device runs it meanwhile.
        while len(self._pending) > (1 if dispatched else 0):
            self._read(*self._pending.popleft())
        return True

    def _gather_burst(self) -> None:
        """Idle, with a request just in: waits (the lock released) up to ``batch_wait`` for more, until the waiting
        prompts fill a prefill call or every slot. Clients of a burst arrive a few milliseconds apart; prefilled as
        they come, the first one or two went in a call of their own (a 128-token call costs about half a 512-token
        one on XLA:CPU), and the waves after, finishing together, kept the split (docs/serving.md)."""
        deadline = time.perf_counter() + self.batch_wait
        while (not self._stopping and not self._aborted and len(self._waiting) < self.slots
               and sum(len(r.prompt) for r in self._waiting) < self.chunk
               and (left := deadline - time.perf_counter()) > 0):
            self._lock.wait(left)

    def _look_up(self, job: _Prefill) -> _Prefill:
        """Before a job's first prefill call: the longest head of its prompt that a row holds, copied into its row
        (``_reuse``) when worth it, the rest then prefilled in pieces. Looked up this late, a prompt that waited
        behind another with the same head (a burst of questions on one document) finds that head written."""
        if job.looked_up:
            return job
        job.looked_up = True
        prompt, cached = job.request.prompt, 0
        if self.prefix_caching:
            self.stats.prefix_cache_queries += len(prompt)
            source, cached = self._head(prompt)
            if cached:
                self.stats.prefix_cache_hits += cached
                self._copy(source, job.slot, prompt[:cached])
                self._touch(source)
                job.done, job.pieces = cached, True
        job.request.cached_tokens = cached
        return job

    def _head(self, prompt: list[int]) -> tuple[int, int]:
        """(row, tokens): the row whose held tokens (``_held``) begin ``prompt`` the furthest, and how many of them
        to reuse; (-1, 0) if none is worth it. The prompt's last token is always prefilled, for its logits."""
        ids, best, source = np.asarray(prompt[:-1]), 0, -1
        for slot, held in enumerate(self._held):
            n = min(len(held), len(ids))
            if n > best:
                differ = np.flatnonzero(held[:n] != ids[:n])
                if (same := int(differ[0]) if differ.size else n) > best:
                    best, source = same, slot
        if best < MIN_PREFIX or 2 * best < len(prompt) or not self._pieces_fit(best, len(prompt)):
            return -1, 0
        return source, best

    def _move_aside(self, admitted: list[tuple[int, Request]]) -> None:
        """Before new requests write over the rows they were admitted into: the tokens each of those rows holds
        copied into the free row that holds the least (nothing, tokens another row holds too, else the least
        recently used), so that a conversation's next turn finds its tokens however many requests came between,
        while the busy rows stay the lowest (the decode step stays narrow). Not moved: what a row's own new
        request will reuse, or another row holds too; never over newer tokens, nor over a row a new prompt will
        copy from."""
        source = {slot: self._head(r.prompt)[0] for slot, r in admitted}  # the row each new prompt will copy from
        taken, wanted = set(source), set(source.values())

        known = {}  # row -> spare(row), until the next move changes what the rows hold

        def spare(row: int) -> bool:  # holds nothing that a row no new request writes over does not hold too
            if row not in known:
                held, n = self._held[row], len(self._held[row])
                # The last tokens compared first: most rows differ there, and a full compare is n tokens.
                known[row] = not n or any(other != row and other not in taken and len(h) >= n and h[n - 1] == held[-1]
                                          and np.array_equal(h[:n], held) for other, h in enumerate(self._held))
            return known[row]

        for slot in source:
            if len(self._held[slot]) < MIN_PREFIX or source[slot] == slot or spare(slot):
                continue
            free = [s for s in range(self.slots) if self._slot_req[s] is None and s not in wanted]
            if not free:
                return
            target = min(free, key=lambda s: (not spare(s), self._used[s]))
            if spare(target) or self._used[target] < self._used[slot]:
                self._copy(slot, target, self._held[slot])
                self._used[target] = self._used[slot]
                self.stats.prefix_cache_moves += 1
                known.clear()

    def _copy(self, source: int, slot: int, prefix) -> None:
        """Dispatches the copy of row ``source``'s first ``len(prefix)`` tokens into row ``slot``."""
        self._state, _ = self._reuse(self._params, self._views, self._state, *self._reuse_args(source, slot, prefix))
        self._held[slot] = np.asarray(prefix)

    def _touch(self, row: int) -> None:
        self._clock += 1
        self._used[row] = self._clock

    def _reuse_args(self, source: int, slot: int, prefix: list[int]):
        ids = np.full(self.max_len, self.config.vocab_size, np.int32)
        ids[:len(prefix)] = prefix
        return np.int32(source), np.int32(slot), ids

    def _release(self, slot: int) -> None:
        r = self._slot_req[slot]
        if r is not None and r.output:
            # The row holds the prompt and every token but the last, each fed to a step already read. Idle decode
            # steps write at the row's length, past these, or at its last position when the row is full, which no
            # prompt reuses (a prompt leaves a position for max_tokens, and its last token is always prefilled).
            self._held[slot] = np.asarray(r.prompt + r.output[:-1])
            self._touch(slot)
        self._slot_req[slot] = None
        self._keep[slot] = False
        self._prefilling = collections.deque(j for j in self._prefilling if j.slot != slot)

    def _read(self, outputs, kind: str, snapshot) -> None:
        out = np.asarray(outputs)
        if kind == "prefill":
            for (slot, r), (token, status) in zip(snapshot, out.reshape(-1, 2)):
                self.stats.prompt_tokens += len(r.prompt)
                self._emit(slot, r, int(token), int(status))
            return
        for slot, r in enumerate(snapshot):
            if r is not None and out[slot, 1] != IDLE:
                self._emit(slot, r, int(out[slot, 0]), int(out[slot, 1]))

    def _emit(self, slot: int, r: Request, token: int, status: int) -> None:
        if r.finished:
            return
        now = time.perf_counter()
        if r.first_token_at is None:
            r.first_token_at = now
            self.stats.ttft.observe(now - r.submitted)
        else:
            self.stats.itl.observe(now - r.last_token_at)
        r.last_token_at = now
        r.output.append(token)
        self.stats.generation_tokens += 1
        finish = {STOPPED: "stop", LENGTH: "length"}.get(status)
        if finish is not None:
            with self._lock:
                if self._slot_req[slot] is r:
                    self._release(slot)
            self._finish(r, finish, [token])
        else:
            r.deliver([token], None)

    def _finish(self, r: Request, reason: str, tokens: list[int] | None = None) -> None:
        if r.finished:
            return
        r.finished = True
        self.stats.requests_finished[reason] += 1
        r.deliver(tokens or [], reason)
