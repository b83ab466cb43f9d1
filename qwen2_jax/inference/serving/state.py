"""The serving engine's state on the device: one KV cache of ``slots`` rows x ``max_len`` positions and each
slot's latest token, progress and sampling settings (``EngineState``), donated to every step (``steps``); how
it is made, how it lies on a mesh (``state_shardings``) and in which layouts the steps take it
(``state_formats``).

The model's forward writes a cache at one scalar index for the whole batch (``KVCache.index``); ``SlotCache``
writes each row at its own length instead (the decode step puts the forward's causal horizon at the last slot,
so that only ``valid`` masks, and its one-column write a no-op).

The widest decode step is compiled first with the KV cache's layout left to the compiler, and every other step,
and the function that makes the state, take and return the cache in the layout it chose: XLA:TPU keeps V with
its head dimension minor, and a step handed the row-major default would lay the whole cache out again on every
call (docs/serving.md).
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental.layout import Format, Layout

from qwen2_jax.model.cache import KVCache
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
