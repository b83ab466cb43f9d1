"""Zero-copy views of slices of a stacked weight, on XLA:CPU.

XLA:CPU copies a slice of a larger array into a buffer of its own before a matmul reads it, every time the
compiled function runs: a decode step that reads its layers out of ``[L, ...]`` stacks, or its experts out of
``[E, 2, I, H]`` blocks, moves each weight three times instead of once (docs/performance.md). A weight that is
an argument of its own is read in place. ``slices(stack)`` makes those arguments without copying: jax arrays
whose buffers are the rows of ``stack``'s buffer (imported through DLPack), each keeping ``stack`` alive.

Host memory only: on other devices, for sharded arrays, or where a row is not 64-byte aligned, the slices
are copies (the same values; only the memory differs).
"""

from __future__ import annotations

import atexit
import gc
import time
import weakref

import jax
import numpy as np

_ALIGN = 64  # XLA:CPU's buffer alignment; DLPack import copies what is less aligned


class _Rows:
    """A numpy-importable description of ``stack``'s host buffer that holds a reference to ``stack``."""

    def __init__(self, stack: jax.Array):
        self.stack = stack  # the views' buffers are this array's: keep it alive while any view is
        self.__array_interface__ = {"data": (stack.unsafe_buffer_pointer(), False), "shape": stack.shape,
                                    "typestr": np.dtype(stack.dtype).str, "version": 3}
        self.views: list[weakref.ref] = []
        if not _EXIT_HOOK:  # the first views made: from now on, release them before exit
            _EXIT_HOOK.append(atexit.register(_release_before_exit))
        _LIVE.add(self)


_LIVE: "weakref.WeakSet[_Rows]" = weakref.WeakSet()  # a _Rows lives until every view of it is released
_EXIT_HOOK: list = []  # registered once, when the first views are made (importing this module registers nothing)


def _release_before_exit(timeout_s: float = 5.0) -> None:
    """Releases every view while the interpreter can still run Python. A view's buffer lets go of its numpy
    rows from an XLA thread, which takes the GIL; during interpreter shutdown that thread is stopped mid-way and
    the process aborts ("terminate called without an active exception"; 2 exits in 4 of
    ``scripts/bench_moe_dispatch.py --per-expert --impls grouped --tokens 512``, whose views were already out
    of scope). So: delete the views still held, then wait, the GIL released, until the releases have run."""
    gc.collect()
    for rows in list(_LIVE):
        for ref in rows.views:
            view = ref()
            if view is not None and not view.is_deleted():
                view.delete()
    gc.collect()
    deadline = time.monotonic() + timeout_s
    while len(_LIVE) and time.monotonic() < deadline:
        time.sleep(0.001)


def can_alias(stack: jax.Array) -> bool:
    """Whether ``slices(stack)`` returns views rather than copies."""
    if isinstance(stack, jax.core.Tracer) or not isinstance(stack, jax.Array):  # under a trace: no buffer yet
        return False
    row_bytes = stack.dtype.itemsize * int(np.prod(stack.shape[1:]))
    return (stack.ndim >= 1 and len(stack.devices()) == 1
            and next(iter(stack.devices())).platform == "cpu" and row_bytes % _ALIGN == 0
            and np.dtype(stack.dtype).kind in "fiub" and not stack.is_deleted())


def slices(stack: jax.Array) -> tuple[jax.Array, ...]:
    """``(stack[0], stack[1], ...)``, sharing ``stack``'s memory where ``can_alias(stack)``."""
    if not can_alias(stack):
        return tuple(stack[i] for i in range(stack.shape[0]))
    rows = _Rows(stack)
    host = np.asarray(rows)  # a writable ndarray over the buffer, as DLPack export requires
    views = tuple(jax.dlpack.from_dlpack(host[i]) for i in range(stack.shape[0]))
    rows.views = [weakref.ref(v) for v in views]
    if views and views[0].unsafe_buffer_pointer() != stack.unsafe_buffer_pointer():  # imported as a copy
        return tuple(stack[i] for i in range(stack.shape[0]))
    return views


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def expert_views(model):
    """Per layer, the routed experts as ``(gate_up_proj, down_proj)`` tuples of per-expert views of the
    layer's stacks (None for a dense layer), where ``slices`` makes views: on XLA:CPU, for a model of one
    device; None elsewhere. Made on first use and kept, with the model, while its weights are the same arrays."""
    sparse = [layer.mlp.experts for layer in model.model.layers if layer.sparse]
    if not sparse or getattr(model, "mesh", None) is not None:
        return None
    stacks = [p[...] for e in sparse for p in (e.gate_up_proj, e.down_proj)]
    if not all(can_alias(a) for a in stacks) or stacks[0].dtype != np.dtype(sparse[0].dtype):
        return None
    cached = _CACHE.get(model)
    if cached is not None and all(r() is a for r, a in zip(cached[0], stacks)):
        return cached[1]
    it = iter(stacks)
    out = tuple((slices(next(it)), slices(next(it))) if layer.sparse else None
                for layer in model.model.layers)
    _CACHE[model] = (tuple(weakref.ref(a) for a in stacks), out)
    return out
