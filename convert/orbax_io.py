"""The Orbax checkpoint of the parameter tree: written block by block, restored straight into shardings.

Orbax saves a ``jax.Array`` from device memory in one piece; the converter must never hold a whole large
weight (a layer's 64 experts, the embedding). So it saves a tree of ``Source`` leaves, each knowing its shape and how to
read any block of itself, through a ``TypeHandler`` that writes the array's TensorStore (zarr3 in OCDBT, the
layout ``ArrayHandler`` uses) one block at a time. The handler reports itself as ``jax.Array``, so the result
is an ordinary Orbax PyTree checkpoint: ``StandardCheckpointer`` restores it, each device reading its slice.

Chunking: a zarr3 "shard" (what one write fills) is one write block (at most ``BLOCK_BYTES``: a weight, a
few experts of one layer, or a row range of one big tensor); inside it, read chunks of at most
``READ_CHUNK_BYTES`` (one expert, halved further along the axes that get sharded), so a device restoring its
part of a sharded weight reads little more than that part.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import deque
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
# Private in orbax-checkpoint 0.12.x, but the same helpers ArrayHandler itself uses to lay out an array.
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

BLOCK_BYTES = 16 << 20
READ_CHUNK_BYTES = 4 << 20
MAX_WRITES_IN_FLIGHT = 2  # reading the next block overlaps writing the previous ones
USE_COMPRESSION = False  # see save(); scripts/bench_convert.py --compression measures the alternative


@dataclasses.dataclass
class Source:
    """One parameter to write: ``read(index)`` returns the block at ``index`` (a tuple of slices)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    block_shape: tuple[int, ...]
    read_chunk_shape: tuple[int, ...]
    read: Callable[[tuple[slice, ...]], np.ndarray]
    on_written: Callable[[tuple[slice, ...]], None] = lambda index: None

    @property
    def size(self) -> int:  # Orbax checks values for zero-size arrays
        return math.prod(self.shape)

    def blocks(self):
        grid = [range(0, n, b) for n, b in zip(self.shape, self.block_shape)]
        for starts in np.ndindex(*(len(g) for g in grid)):
            yield tuple(slice(g[s], min(g[s] + b, n)) for g, s, b, n in zip(grid, starts, self.block_shape, self.shape))


def plan_blocks(shape, axes, num_stack_dims: int, itemsize: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(write block shape, read chunk shape) for a parameter of our ``shape`` with logical ``axes``
    (``Param.axes``), of which the first ``num_stack_dims`` stack HF tensors (the experts, and gate and up).

    Per-expert parameters are written several whole experts at a time; a tensor bigger than a block is split
    into ranges of its rows (HF's layout is ours), so every read from the safetensors file is sequential.
    """
    n = num_stack_dims
    inner = tuple(shape[n:])
    tensor_bytes = math.prod(inner) * itemsize
    if tensor_bytes <= BLOCK_BYTES:
        block = list((1,) * n + inner)
        fit = BLOCK_BYTES // max(tensor_bytes, 1)
        for a in reversed(range(n)):  # several whole tensors: every part of an expert, then several experts
            block[a] = _divisor_at_most(shape[a], fit)
            if block[a] < shape[a]:
                break
            fit //= shape[a]
    else:
        axis = n
        row_bytes = tensor_bytes // shape[axis]
        block = list(shape)
        block[:n] = [1] * n
        block[axis] = _divisor_at_most(shape[axis], BLOCK_BYTES // row_bytes)
    chunk = list(block)
    chunk[:n] = [1] * n
    # Halve the widest axis until a chunk is small enough: the axes that get sharded (heads, vocab, the MLP
    # widths) before "embed", which stays whole on every device, so that chunks tile the devices' slices.
    while math.prod(chunk) * itemsize > READ_CHUNK_BYTES:
        even = [a for a in range(n, len(chunk)) if chunk[a] % 2 == 0]
        if not even:
            break
        a = max(even, key=lambda a: (axes[a] != "embed", chunk[a]))
        chunk[a] //= 2
    return tuple(block), tuple(chunk)


def _divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is <= ``limit`` (so blocks tile the axis), unless that is much
    smaller than ``limit`` (n prime, say): then ``limit`` itself, with a shorter last block."""
    limit = max(1, min(n, limit))
    best = max(d for d in range(1, limit + 1) if n % d == 0)
    return best if 2 * best >= limit else limit


class _StreamingArrayHandler(ocp.type_handlers.ArrayHandler):
    """Writes ``Source`` leaves block by block; reads back as plain ``jax.Array`` (its typestr is theirs)."""

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        metadatas = []
        for src, info, arg in zip(values, infos, args):
            await info.await_path_creation()
            spec = ts_utils.build_array_write_spec(
                info, arg, global_shape=src.shape, local_shape=src.block_shape, dtype=src.dtype,
                use_ocdbt=info.is_ocdbt_checkpoint,
                process_index=ocdbt_utils.get_process_index_for_subdir(info.is_ocdbt_checkpoint))
            tspec = spec.json
            # Orbax makes a zarr3 shard one chunk; split it into read chunks (see the module docstring).
            tspec["metadata"]["codecs"][0]["configuration"]["chunk_shape"] = list(src.read_chunk_shape)
            metadatas.append(dataclasses.replace(spec.metadata, chunk_shape=src.read_chunk_shape))
            store = await ts.open(ts.Spec(tspec), create=True, open=True, context=info.ts_context)
            pending: deque = deque()
            for index in src.blocks():
                block = src.read(index)
                pending.append((index, store[index].write(block, can_reference_source_data_indefinitely=True)))
                del block
                while len(pending) > MAX_WRITES_IN_FLIGHT:
                    await self._finish(src, *pending.popleft())
            while pending:
                await self._finish(src, *pending.popleft())
        if self._array_metadata_store is not None:
            await self._array_metadata_store.write(checkpoint_dir=infos[0].parent_dir, array_metadatas=metadatas,
                                                   process_index=jax.process_index())
        return []

    @staticmethod
    async def _finish(src, index, write):
        await write
        src.on_written(index)


def save(directory: str, tree: dict) -> None:
    """Saves a nested dict of ``Source`` leaves as an Orbax PyTree checkpoint at ``directory``.

    Uncompressed by default: zstd saves about a fifth of bf16 bytes but costs CPU time on every save and
    every restore (figures in docs/converter.md)."""
    handler = _StreamingArrayHandler(array_metadata_store=array_metadata_store.Store())
    # Also under jax.Array: that is where the PyTree handler looks for the ArrayMetadata store.
    registry = ocp.type_handlers.create_type_handler_registry((Source, handler), (jax.Array, handler))
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
            use_ocdbt=True, use_zarr3=True, use_compression=USE_COMPRESSION, type_handler_registry=registry)) as ckptr:
        ckptr.save(directory, tree)


class StorageError(Exception):
    """A file of the checkpoint is missing, cut short or unreadable; the message is one line."""


def check_readable(directory: str) -> None:
    """A ``StorageError`` if a file of the checkpoint is missing or cut short: its OCDBT index, or the data of
    any array. Orbax, restoring such a checkpoint, fails in one of many concurrent reads and leaves the others
    to report themselves on stderr ("Event loop is closed", "Exception ignored in: <coroutine ...>") long after
    its exception. So this reads the index and the last byte of every stored value first: the data files'
    presence and length, not their contents."""
    try:  # TensorStore's errors are ValueErrors: NOT_FOUND, OUT_OF_RANGE (a file cut short), ...
        kvstore = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{os.path.abspath(directory)}/"}).result()
        keys = kvstore.list().result()
    except ValueError as e:
        raise StorageError(f"its OCDBT index cannot be read ({_first_line(e)})") from None
    reads = [(key, kvstore.read(key, byte_range=slice(-1, None))) for key in keys]
    for key, read in reads:
        name, _, chunk = key.decode().partition("/")
        try:
            value = read.result().value
        except ValueError as e:
            raise StorageError(f"the data file of {name} ({chunk}) is cut short or unreadable ({_first_line(e)})") from None
        if len(value) != 1:  # what OCDBT returns for a value whose data file is gone
            raise StorageError(f"the data file of {name} ({chunk}) is missing")


def _first_line(e: BaseException) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0]


def stored_shapes(directory: str) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """{path: (shape, dtype)} of the arrays in the checkpoint at ``directory``, from its metadata alone."""
    tree = ocp.StandardCheckpointer().metadata(directory).item_metadata.tree
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {tuple(str(k.key) for k in path): (tuple(m.shape), np.dtype(m.dtype)) for path, m in flat}


def restore(directory: str, abstract: dict) -> dict:
    """Restores the checkpoint into ``abstract`` (a nested dict of ``jax.ShapeDtypeStruct`` with shardings):
    every array is read slice by slice into its own sharding, cast to its dtype by TensorStore.
    A data file that cannot be read is a ``StorageError`` (``check_readable`` finds most such files first)."""
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(directory, abstract)
    except Exception as e:  # noqa: BLE001 - Orbax raises a bare Exception around TensorStore's error
        message = storage_error(e)
        if message is None:
            raise
    raise StorageError(f"the stored arrays cannot be read ({message})")


# The status codes TensorStore starts its errors with when a file is missing, cut short, corrupt or unreadable.
_STATUS = re.compile(r"^(NOT_FOUND|DATA_LOSS|OUT_OF_RANGE|INVALID_ARGUMENT|FAILED_PRECONDITION|PERMISSION_DENIED): ")


def storage_error(e: BaseException) -> str | None:
    """The first line of the TensorStore error (a missing, truncated or corrupt file) behind ``e``, which Orbax
    wraps in a bare ``Exception`` with the whole TensorStore spec; None when no storage error caused ``e``."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).strip()
        if isinstance(e, (ValueError, OSError)) and _STATUS.match(text):
            return text.splitlines()[0]
        e = e.__cause__ or e.__context__
    return None
