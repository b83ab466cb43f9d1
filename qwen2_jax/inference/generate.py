"""Generation: prefill, then one jitted ``lax.while_loop`` of decode steps, on a preallocated KV cache.

Shapes are bucketed so that compilations stay few: prompts are LEFT-padded to a power of two (at least
``MIN_PROMPT_BUCKET``), the batch is padded to a power of two, and the cache holds ``bucket(prompt bucket +
max_new_tokens)`` slots. ``max_new_tokens``, the sampling values and the seeds are arrays, so changing them
does not recompile either; only which processors run (``sampling.Sampler``) is static.

- ``_prefill`` (jitted) runs the padded prompts with positions ``cumsum(mask) - 1`` (as HF generate does for
  left padding), computes logits only at the last position and chooses the first token. A prompt longer than
  ``prefill_chunk`` tokens (2,048) is padded to whole chunks, and ``_prefill_chunk`` (jitted, the cache
  donated) writes all but the last chunk into a cache of the final length first, one call per chunk: one
  compiled chunk step for any length, and activations of one chunk's size.
- ``_decode`` (jitted, the state DONATED so the cache is updated in place) is one ``lax.while_loop`` that feeds
  each row's last token, chooses the next one and stops when every row has produced an end token or reached
  its budget, or at ``stop_at`` steps. ``generate`` runs it once to the end; ``generate_stream`` runs it a few
  steps at a time and yields the tokens in between. It is the same compiled function, so both give the same
  tokens for the same seed.

Both take the parameters as a plain array pytree (``nnx.split`` once per call of ``generate``) and the
platform they run on (static: it picks the MoE dispatch, ``moe.choose``), so that ``qwen2-jax aot`` compiles
exactly these functions for a device this machine does not have.

Outputs follow HF: the new tokens only, up to and including the end token that stopped the row.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen2_jax.model import moe, views
from qwen2_jax.model.cache import KVCache
from qwen2_jax.errors import InputError
from qwen2_jax.model.generation_config import GenerationConfig, is_int  # noqa: F401 (GenerationConfig re-exported)
from .sampling import Sampler, candidates, check_sampling_args, choose, row_keys

MIN_PROMPT_BUCKET = 16
PREFILL_CHUNK = 2048  # tokens a prefill step takes at a time: prompts beyond it go through in chunks
# How many times each jitted function has been traced, i.e. compiled (tests check it stays bounded).
TRACES: collections.Counter = collections.Counter()


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


def chunk_length(prefill_chunk: int, batch: int) -> int:
    """A prefill chunk's length per row: ``prefill_chunk`` tokens a step in all, so that neither a longer
    prompt nor a larger batch makes a step's activations larger (a power of two, at least 16)."""
    return max(MIN_PROMPT_BUCKET, 1 << (max(prefill_chunk // batch, 1).bit_length() - 1))


def padded_prompt_length(longest: int, chunk: int) -> int:
    """The length a batch's prompts are left-padded to when the longest has ``longest`` tokens: a power of two
    (at least ``MIN_PROMPT_BUCKET``), or past one chunk of ``chunk`` tokens (``chunk_length``) whole chunks.
    The compiled prefill and decode programs are one per such length (for given batch and max_new_tokens)."""
    if bucket(longest, MIN_PROMPT_BUCKET) > chunk:
        return -(-longest // chunk) * chunk
    return bucket(longest, MIN_PROMPT_BUCKET)


def cache_length(n: int, context: int, chunk: int) -> int:
    """Slots for ``n`` tokens (prompt bucket + new tokens): a power of two, but past the context rounded up to
    whole chunks only (a 65,536-token context does not get a cache of 131,072 slots for a few more)."""
    return bucket(n) if bucket(n) <= max(context, chunk) else -(-n // chunk) * chunk


def default_eos_token_ids(model) -> tuple[int, ...]:
    """End tokens when the caller gives none: the model's generation config if it carries one, else config.json's."""
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.eos_token_id:
        return tuple(generation_config.eos_token_id)
    return tuple(model.config.eos_token_id)


# ---- the state the jitted functions pass around -----------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Controls:
    """Per-call values the loop reads but never changes (not donated)."""

    temperature: jax.Array  # [B] float32
    top_p: jax.Array  # [B] float32
    repetition_penalty: jax.Array  # [B] float32
    keys: jax.Array  # [B] PRNG keys, one per row
    eos_token_ids: jax.Array  # [E] int32, padded with -1
    max_new_tokens: jax.Array  # [] int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    cache: KVCache
    tokens: jax.Array  # [B, S] int32: the generated tokens (0 after a row is done); S, the cache length, bounds them
    positions: jax.Array  # [B] int32: the position of each row's latest token
    done: jax.Array  # [B] bool
    step: jax.Array  # [] int32: tokens generated so far (tokens[:, :step] are set)
    seen: jax.Array  # [B, V] bool: tokens in the prompt or generated (for the repetition penalty)


def _append(sampler: Sampler, state: DecodeState, logits, controls: Controls) -> DecodeState:
    """Chooses each row's next token from its logits [B, V] and records it."""
    scores, ids = candidates(sampler, logits, seen=state.seen, temperature=controls.temperature,
                             top_p=controls.top_p, repetition_penalty=controls.repetition_penalty)
    token = jnp.where(state.done, 0, choose(sampler, scores, ids, controls.keys, state.step))
    ended = jnp.any(token[:, None] == controls.eos_token_ids[None, :], axis=-1)
    return dataclasses.replace(
        state,
        tokens=jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step)),
        positions=state.positions + 1,
        done=state.done | ended | (state.step + 1 >= controls.max_new_tokens),
        step=state.step + 1,
        seen=state.seen.at[jnp.arange(token.shape[0]), token].set(True))


def _seen(input_ids, attention_mask, seen, vocab_size: int):
    """``seen`` with the prompt tokens of ``input_ids`` set (for the repetition penalty; padding does not count,
    as in HF). Padding goes to the out-of-range id V, which the scatter drops; a negative id would wrap."""
    ids = jnp.where(attention_mask, input_ids, vocab_size)
    return seen.at[jnp.arange(ids.shape[0])[:, None], ids].set(True, mode="drop")


def _prefill_chunk(graphdef, params, views, cache: KVCache, seen, input_ids, attention_mask, positions, *,
                   platform: str):
    """One chunk ``[B, C]`` of long prompts written into the cache (donated) at its index; -> (cache, seen)."""
    TRACES["prefill_chunk"] += 1
    model = nnx.merge(graphdef, params)
    out = model.forward(input_ids, attention_mask, positions=positions, cache=cache, last_only=True,
                        platform=platform, expert_views=views)
    return out.cache, _seen(input_ids, attention_mask, seen, model.config.vocab_size)


def _prefill(graphdef, params, views, input_ids, attention_mask, positions, active, controls: Controls, cache, seen,
             *, sampler: Sampler, max_len: int, platform: str, cache_sharding=None) -> DecodeState:
    """The last (or only) chunk of left-padded prompts [B, T] -> the state after the first generated token.
    ``cache`` and ``seen``: after the chunks before it, in a cache of ``max_len`` slots; or None for prompts of
    one chunk, which go into a cache as long as they are, grown afterwards (their attention spans their own
    slots, not max_len's)."""
    TRACES["prefill"] += 1
    model = nnx.merge(graphdef, params)
    cfg = model.config
    b = input_ids.shape[0]

    def constrain(cache):
        return cache if cache_sharding is None else jax.lax.with_sharding_constraint(cache, cache_sharding)

    if cache is None:
        cache = constrain(KVCache.create(cfg, b, input_ids.shape[1], dtype=model.dtype))
        seen = jnp.zeros((b, cfg.vocab_size), bool)
    out = model.forward(input_ids, attention_mask, positions=positions, cache=cache, last_only=True,
                        platform=platform, expert_views=views)
    cache = constrain(out.cache.grow(max_len) if out.cache.max_len < max_len else out.cache)
    # The token buffer is as long as the cache (not max_len - t), so the decode loop's shapes, and so its
    # compilations, do not depend on the prompt bucket.
    state = DecodeState(cache=cache, tokens=jnp.zeros((b, max_len), jnp.int32), positions=positions[:, -1],
                        done=~active, step=jnp.zeros((), jnp.int32),
                        seen=_seen(input_ids, attention_mask, seen, cfg.vocab_size))
    return _append(sampler, state, out.logits[:, 0], controls)


def _new_cache(cfg, batch: int, max_len: int, dtype, cache_sharding=None):
    """An empty cache of ``max_len`` slots and no token seen, for prompts prefilled chunk by chunk."""
    cache = KVCache.create(cfg, batch, max_len, dtype=dtype)
    if cache_sharding is not None:
        cache = jax.lax.with_sharding_constraint(cache, cache_sharding)
    return cache, jnp.zeros((batch, cfg.vocab_size), bool)


def _decode(graphdef, params, views, state: DecodeState, controls: Controls, stop_at, *, sampler: Sampler,
            platform: str) -> DecodeState:
    """Decode steps until every row is done, or ``step`` reaches ``stop_at`` or ``max_new_tokens``; the body
    of the loop is one step (what ``qwen2-jax aot`` reports)."""
    TRACES["decode"] += 1
    stop = jnp.minimum(stop_at, controls.max_new_tokens)

    def cond(s: DecodeState):
        return (s.step < stop) & ~jnp.all(s.done)

    def body(s: DecodeState):
        model = nnx.merge(graphdef, params)
        last = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=1)  # [B, 1]
        out = model.forward(last, positions=s.positions[:, None], cache=s.cache, platform=platform,
                            expert_views=views)
        return _append(sampler, dataclasses.replace(s, cache=out.cache), out.logits[:, 0], controls)

    return jax.lax.while_loop(cond, body, state)


_prefill_jit = jax.jit(_prefill, static_argnames=("graphdef", "sampler", "max_len", "platform", "cache_sharding"),
                       donate_argnames=("cache", "seen"))
_prefill_chunk_jit = jax.jit(_prefill_chunk, static_argnames=("graphdef", "platform"), donate_argnames=("cache", "seen"),
                             keep_unused=True)  # lm_head goes unused: keep the weights the first parameters
_new_cache_jit = jax.jit(_new_cache, static_argnames=("cfg", "batch", "max_len", "dtype", "cache_sharding"))
_decode_jit = jax.jit(_decode, static_argnames=("graphdef", "sampler", "platform"), donate_argnames=("state",))


# ---- host side: checking the arguments and padding the batch ------------------------------------------------
@dataclasses.dataclass
class _Batch:
    graphdef: object
    params: object
    input_ids: jax.Array  # [B, T]: the prompts, left-padded
    attention_mask: jax.Array  # [B, T]
    positions: jax.Array  # [B, T]
    active: jax.Array  # [B]: False for the rows that only pad the batch to its bucket
    controls: Controls
    sampler: Sampler
    max_len: int
    cache_sharding: object
    num_prompts: int
    eos: frozenset[int]
    max_new_tokens: int
    platform: str = "cpu"
    views: object = None
    chunk: int = 0  # prefill chunk length when T is several chunks, else 0 (one pass)


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)):
        raise InputError("prompts must be lists of token ids, got a string (encode it with the tokenizer first)")
    if not isinstance(prompts, (Sequence, np.ndarray, jax.Array)):
        raise InputError(f"prompts must be a list of prompts (each a list of token ids), got {type(prompts).__name__}")
    prompts = [np.asarray(p).tolist() if isinstance(p, (np.ndarray, jax.Array)) else p for p in prompts]
    if not prompts:
        raise InputError("prompts is empty; expected at least one prompt (a list of token ids)")
    if all(isinstance(p, (int, np.integer)) for p in prompts):
        raise InputError("prompts must be a list of prompts (each a list of token ids), got a flat list of ints")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise InputError(f"prompt {i} must be a list of token ids, got {type(p).__name__}")
        if len(p) == 0:
            raise InputError(f"prompt {i} is empty; a prompt needs at least one token")
        bad = [t for t in p if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab_size]
        if bad:
            raise InputError(f"prompt {i} has token id {bad[0]!r} outside [0, {vocab_size}) (vocab_size)")
        out.append([int(t) for t in p])
    return out


def fit_context(prompts: list[list[int]], max_new_tokens: int, context: int, truncate: bool) -> list[list[int]]:
    """The prompts, each with room for ``max_new_tokens`` in the context: a ValueError for one too long, or,
    with ``truncate``, its last tokens."""
    if max_new_tokens >= context:
        raise InputError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the context of {context} "
                         "tokens")
    room = context - max_new_tokens
    for i, p in enumerate(prompts):
        if len(p) > room and not truncate:
            raise InputError(f"prompt {i} has {len(p)} tokens; with max_new_tokens {max_new_tokens} it exceeds the "
                             f"context of {context} tokens; shorten it or ask for "
                             f"truncation (truncate=True, --truncate) to keep its last {room} tokens")
    return [p[-room:] for p in prompts]


def _seeds(seed, n: int) -> list[int]:
    """Row i's seed: ``seed + i`` for an int, else the i-th of a list (so a row's draws never depend on the others)."""
    if is_int(seed):
        return [(int(seed) + i) % 2**32 for i in range(n)]
    seeds = list(seed) if isinstance(seed, (Sequence, np.ndarray)) and not isinstance(seed, (str, bytes)) else []
    if len(seeds) != n or not all(is_int(s) for s in seeds):
        raise InputError(f"seed must be an int or a list of {n} ints (one per prompt), got {seed!r}")
    return [int(s) % 2**32 for s in seeds]


def _placement(model, num_prompts: int):
    """The padded batch size, and under a mesh (``model.mesh``, set by ``from_pretrained(mesh=...)``) where the
    cache and the batch live: ``(batch, cache_sharding or None, batch_sharding or None)``.

    The one place generation meets ``qwen2_jax.sharding``: prefill constrains the cache it creates to
    ``cache_shardings`` (the decode loop keeps the sharding it is given), the prompts are placed with
    ``batch_sharding``, and the batch is padded to a multiple of the data-parallel shards."""
    batch = bucket(num_prompts)
    mesh = getattr(model, "mesh", None)
    if mesh is None:
        return batch, None, None
    from qwen2_jax.sharding import batch_sharding, cache_shardings

    by_batch = batch_sharding(mesh)
    axes = by_batch.spec[0] if len(by_batch.spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    shards = math.prod(mesh.shape[a] for a in axes)
    batch = -(-batch // shards) * shards
    return batch, cache_shardings(model.config, mesh, batch), by_batch


def _prepare(model, prompts, *, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
             eos_token_ids, truncate, prefill_chunk: int = PREFILL_CHUNK) -> _Batch:
    cfg = model.config
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    check_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    prompts = fit_context(_check_prompts(prompts, cfg.vocab_size), int(max_new_tokens), cfg.context_length, truncate)
    if eos_token_ids is None:
        eos_token_ids = default_eos_token_ids(model)
    else:
        eos_token_ids = (eos_token_ids,) if is_int(eos_token_ids) else eos_token_ids
        if isinstance(eos_token_ids, (str, bytes)) or not isinstance(eos_token_ids, (Sequence, np.ndarray)) or not all(
                is_int(e) and 0 <= e < cfg.vocab_size for e in eos_token_ids):
            raise InputError(f"eos_token_ids must be token ids in [0, {cfg.vocab_size}) (vocab_size), "
                             f"got {eos_token_ids!r}")
    eos = tuple(int(e) for e in eos_token_ids)
    seeds = _seeds(seed, len(prompts))

    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, (int, np.integer)) or prefill_chunk < 1:
        raise InputError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
    n = len(prompts)
    b, cache_sharding, batch_sharding = _placement(model, n)
    longest = max(len(p) for p in prompts)
    # A prompt of one chunk is padded to a power of two; a longer one to whole chunks, which go through the
    # same compiled chunk step one after another.
    chunk = chunk_length(prefill_chunk, b)
    chunked = bucket(longest, MIN_PROMPT_BUCKET) > chunk
    t = padded_prompt_length(longest, chunk)
    ids = np.zeros((b, t), np.int32)
    mask = np.zeros((b, t), bool)
    for i, p in enumerate(prompts):  # left padding: every row's last token sits at slot t - 1
        ids[i, t - len(p):], mask[i, t - len(p):] = p, True
    mask[n:, -1] = True  # a one-token dummy prompt for the padding rows
    seeds += [0] * (b - n)
    positions = np.maximum(np.cumsum(mask, axis=1, dtype=np.int32) - 1, 0)  # as HF's generate, left padding

    rows = lambda value: jnp.full((b,), value, jnp.float32)
    controls = Controls(
        temperature=rows(temperature if temperature > 0 else 1.0), top_p=rows(top_p),
        repetition_penalty=rows(repetition_penalty), keys=row_keys(seeds),
        eos_token_ids=jnp.asarray(list(eos) + [-1] * (bucket(len(eos), 2) - len(eos)), jnp.int32),
        max_new_tokens=jnp.asarray(max_new_tokens, jnp.int32))
    put = (lambda x: jax.device_put(x, batch_sharding)) if batch_sharding is not None else jnp.asarray
    graphdef, params = nnx.split(model)
    return _Batch(graphdef=graphdef, params=params, input_ids=put(ids), attention_mask=put(mask),
                  positions=put(positions), active=put(np.arange(b) < n), controls=controls,
                  sampler=Sampler.create(temperature=temperature, top_k=top_k, top_p=top_p,
                                         repetition_penalty=repetition_penalty),
                  max_len=cache_length(t + int(max_new_tokens), cfg.context_length, chunk),
                  cache_sharding=cache_sharding, num_prompts=n, eos=frozenset(eos),
                  max_new_tokens=int(max_new_tokens), platform=moe.platform_of(params),
                  views=views.expert_views(model), chunk=chunk if chunked else 0)


def _start(batch: _Batch) -> DecodeState:
    """The prefill: in one pass, or chunk by chunk into a cache of the final length."""
    cache = seen = None
    ids, mask, positions = batch.input_ids, batch.attention_mask, batch.positions
    if batch.chunk:
        model = nnx.merge(batch.graphdef, batch.params)
        cache, seen = _new_cache_jit(model.config, ids.shape[0], batch.max_len, model.dtype,
                                     cache_sharding=batch.cache_sharding)
        for start in range(0, ids.shape[1] - batch.chunk, batch.chunk):
            part = lambda a: a[:, start:start + batch.chunk]
            cache, seen = _prefill_chunk_jit(batch.graphdef, batch.params, batch.views, cache, seen, part(ids),
                                             part(mask), part(positions), platform=batch.platform)
        ids, mask, positions = (a[:, -batch.chunk:] for a in (ids, mask, positions))
    return _prefill_jit(batch.graphdef, batch.params, batch.views, ids, mask, positions, batch.active,
                        batch.controls, cache, seen, sampler=batch.sampler, max_len=batch.max_len,
                        platform=batch.platform, cache_sharding=batch.cache_sharding)


def _run(batch: _Batch, state: DecodeState, stop_at: int) -> DecodeState:
    return _decode_jit(batch.graphdef, batch.params, batch.views, state, batch.controls, jnp.asarray(stop_at, jnp.int32),
                       sampler=batch.sampler, platform=batch.platform)


def _to_host(x) -> np.ndarray:
    """``x`` on the host; under a multi-host mesh, gathered from every process (rows live on other hosts)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from qwen2_jax.sharding import to_host

    return to_host(x)


def _until_end(tokens: Sequence[int], eos: frozenset[int]) -> list[int]:
    """The tokens up to and including the first end token."""
    out = []
    for t in tokens:
        out.append(int(t))
        if t in eos:
            break
    return out


# ---- the public API ---------------------------------------------------------------------------------------
def generate(model, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, seed=0, eos_token_ids=None, truncate: bool = False,
             prefill_chunk: int = PREFILL_CHUNK) -> list[list[int]]:
    """New tokens for each prompt (lists of token ids), with Hugging Face ``generate``'s semantics.

    temperature 0 is greedy (HF's ``do_sample=False``); top_k 0 and top_p 1 are off; the repetition penalty
    applies in both modes, to the prompt's and the generated tokens. ``seed``: an int (row i uses ``seed + i``)
    or one int per prompt. ``eos_token_ids``: the end tokens (None: the model's generation config, else its
    config.json; ``()``: none). Each result stops after the end token that ended it, or at ``max_new_tokens``.
    A prompt that does not fit the context with ``max_new_tokens`` is refused unless ``truncate`` (which keeps
    its last tokens). The prefill takes about ``prefill_chunk`` tokens of the batch at a time (longer prompts go
    through in chunks), so its memory does not grow with the prompts (the KV cache does).
    """
    batch = _prepare(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, eos_token_ids=eos_token_ids,
                     truncate=truncate, prefill_chunk=prefill_chunk)
    state = _run(batch, _start(batch), batch.max_new_tokens)
    tokens = _to_host(state.tokens)
    return [_until_end(tokens[i, :batch.max_new_tokens], batch.eos) for i in range(batch.num_prompts)]


def generate_stream(model, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, repetition_penalty: float = 1.0, seed=0, eos_token_ids=None,
                    truncate: bool = False, steps_per_yield: int = 1,
                    prefill_chunk: int = PREFILL_CHUNK) -> Iterator[list[list[int]]]:
    """Like ``generate``, yielding as tokens come: after the prefill, then every ``steps_per_yield`` decode
    steps, one list per prompt with its new tokens since the last yield (empty once it has ended).
    The concatenated yields equal ``generate``'s result for the same arguments."""
    if isinstance(steps_per_yield, bool) or not isinstance(steps_per_yield, int) or steps_per_yield < 1:
        raise InputError(f"steps_per_yield must be an integer >= 1, got {steps_per_yield!r}")
    batch = _prepare(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, eos_token_ids=eos_token_ids,
                     truncate=truncate, prefill_chunk=prefill_chunk)
    return _stream(batch, steps_per_yield)


def _stream(batch: _Batch, steps_per_yield: int) -> Iterator[list[list[int]]]:
    state = _start(batch)
    n = batch.num_prompts
    emitted, ended = 0, [False] * n
    while True:
        step, done, tokens = (_to_host(a) for a in (state.step, state.done, state.tokens))
        step = int(step)
        new = []
        for i in range(n):
            row = [] if ended[i] else _until_end(tokens[i, emitted:step], batch.eos)
            ended[i] = ended[i] or bool(done[i])
            new.append(row)
        emitted = step
        yield new
        if step >= batch.max_new_tokens or all(done[:n]):
            return
        state = _run(batch, state, step + steps_per_yield)
