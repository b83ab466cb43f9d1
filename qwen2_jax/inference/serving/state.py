"""The serving engine's state on the device: the paged KV cache (one pool of pages per layer, a page table and a
length per slot: ``PageCache``) and each slot's latest token, progress and sampling settings (``EngineState``),
donated to every step (``steps``); how it is made, how it lies on a mesh (``state_shardings``) and in which
layouts the steps take it (``state_formats``).

A slot is a row of the decode step (``max_num_seqs`` of them); its KV lives in the pages its table names, taken
from the pool as its tokens arrive (the host's ``KVCacheManager`` chooses them). The pool's size is the engine's
``num_pages``, whatever the slots and ``max_model_len``.

The widest decode step is compiled first with the pages' layout left to the compiler, and every other step, and
the function that makes the state, take and return the pages in the layout it chose: a step handed another layout
would lay the whole pool out again on every call (docs/serving.md).
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental.layout import Format, Layout

from qwen2_jax.model.paged_attention import create_pages
from .request import MAX_EOS

# How many times each jitted function has been traced, and how many XLA compilations this process has run
# (a function compiles again without a new trace for arguments of another layout): tests and /metrics check
# that neither grows after start-up.
TRACES: collections.Counter = collections.Counter()
COMPILATIONS = collections.Counter()
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _secs, **_: COMPILATIONS.update(["backend"]) if event == "/jax/core/compile/backend_compile_duration"
    else None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PageCache:
    """The KV pages of every layer and, per slot, its page table and how many positions it holds."""

    k: tuple[jax.Array, ...]  # per layer [num_pages, page_size, Hkv * D] (paged_attention.PagedKV)
    v: tuple[jax.Array, ...]  # per layer [num_pages, page_size, Hkv * D]
    page_table: jax.Array  # [slots, max_pages] int32
    lengths: jax.Array  # [slots] int32: positions each slot holds, the position its next token goes to

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]


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
    cache: PageCache
    tokens: jax.Array  # [B] int32: each slot's latest token (the next decode step's input)
    active: jax.Array  # [B] bool: the slot is decoding
    step: jax.Array  # [B] int32: tokens the slot's request has generated
    seen: jax.Array  # [B, V] bool: prompt and generated tokens (for the repetition penalty)
    controls: SlotControls


def _new_state(cfg, slots: int, num_pages: int, page_size: int, max_pages: int, dtype) -> EngineState:
    TRACES["new_state"] += 1
    zeros = lambda dt: jnp.zeros((slots,), dt)
    controls = SlotControls(
        temperature=zeros(jnp.float32), top_k=zeros(jnp.int32), top_p=jnp.ones((slots,), jnp.float32),
        repetition_penalty=jnp.ones((slots,), jnp.float32), keys=jax.vmap(jax.random.key)(zeros(jnp.uint32)),
        max_tokens=jnp.ones((slots,), jnp.int32), eos=jnp.full((slots, MAX_EOS), -1, jnp.int32))
    k, v = create_pages(cfg, num_pages, page_size, dtype)
    cache = PageCache(k=k, v=v, page_table=jnp.zeros((slots, max_pages), jnp.int32), lengths=zeros(jnp.int32))
    return EngineState(cache=cache, tokens=zeros(jnp.int32), active=zeros(bool), step=zeros(jnp.int32),
                       seen=jnp.zeros((slots, cfg.vocab_size), bool), controls=controls)


def state_shardings(cfg, mesh) -> EngineState:
    """How the engine's state lies on ``mesh``: slots over the data axis; the pages' KV heads over the tensor axis
    where they divide (each device keeps its heads' keys and values together), the pool itself whole on every
    data shard (any slot may read any page)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from qwen2_jax.sharding import batch_sharding
    from qwen2_jax.sharding.rules import logical_spec

    spec = logical_spec(cfg, mesh, (None, None, "kv_heads"), (1, 1, cfg.num_key_value_heads))
    pages = NamedSharding(mesh, spec)
    rows = batch_sharding(mesh)
    rows2 = NamedSharding(mesh, P("data", None))
    return EngineState(
        cache=PageCache(k=(pages,) * cfg.num_hidden_layers, v=(pages,) * cfg.num_hidden_layers, page_table=rows2,
                        lengths=rows), tokens=rows,
        active=rows, step=rows, seen=rows2,
        controls=SlotControls(temperature=rows, top_k=rows, top_p=rows, repetition_penalty=rows, keys=rows,
                              max_tokens=rows, eos=rows2))


def abstract_state(cfg, slots: int, num_pages: int, page_size: int, max_pages: int, dtype,
                   shardings: EngineState | None = None) -> EngineState:
    """The state's shapes and dtypes (placed by ``shardings``, from ``state_shardings``), allocating nothing."""
    state = jax.eval_shape(functools.partial(_new_state, cfg, slots, num_pages, page_size, max_pages, dtype))
    if shardings is None:
        return state
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def state_formats(state: EngineState, chosen: EngineState | None = None) -> EngineState:
    """How the steps take and return the state: each array placed as ``state``'s (abstract, with shardings), the
    KV pages in the layouts of ``chosen`` (a compiled step's ``input_formats``), or left to the compiler
    (``Layout.AUTO``): given another layout than the one the compiler chose, every step would lay the whole pool
    out again (with the row cache: 7.5 GB a chip at 16 rows of 64 of the full model on a v5p-8, docs/serving.md)."""
    formats = jax.tree.map(lambda x: x.sharding, state)
    layout = lambda name, i: Layout.AUTO if chosen is None else getattr(chosen.cache, name)[i].layout
    k, v = (tuple(Format(layout(name, i), x.sharding) for i, x in enumerate(getattr(state.cache, name)))
            for name in ("k", "v"))
    return dataclasses.replace(formats, cache=dataclasses.replace(formats.cache, k=k, v=v))
