"""Writing Hugging Face checkpoints without torch: ``config.json`` plus safetensors, tensor by tensor.

For synthetic checkpoints (benchmarks, the demo, tests) and for exporting a model's parameters in HF layout.
We write the safetensors format ourselves (8-byte little-endian header length, JSON header, raw
little-endian data) so that bfloat16 works with plain numpy and nothing bigger than one tensor chunk is ever
in memory.
"""

from __future__ import annotations

import json
import os
import struct
import zlib

import ml_dtypes
import numpy as np

from qwen2_jax.model.config import Qwen2MoeConfig
from qwen2_jax.errors import InputError
from qwen2_jax.model.params import hf_names, hf_shape, lookup, param_table

_CODES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16"}
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_CHUNK_BYTES = 64 << 20  # random tensors are generated and written in row chunks of at most this size


def write_hf_checkpoint(cfg: Qwen2MoeConfig, directory, *, dtype="float32", seed: int = 0, params: dict | None = None,
                        max_shard_bytes: int | None = None) -> list[str]:
    """Writes ``config.json`` and HF-named safetensors for ``cfg`` into ``directory``; returns the weight files.

    Weights come from ``params`` (a nested dict in this port's layout, such as
    ``nnx.to_pure_dict(nnx.state(model))``, the experts sliced out of their stacks) or,
    without it, are random: normal with std 0.02, norm weights one, drawn per tensor from ``seed`` and the tensor's name (so sharding does not
    change them). With ``max_shard_bytes`` the tensors are split over ``model-0000k-of-0000n.safetensors``
    files plus ``model.safetensors.index.json``, as ``save_pretrained`` does. Every file is written to a
    temporary name and renamed, so a killed run leaves no half-written file under a real name.
    """
    if dtype not in _DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported; expected one of {sorted(_DTYPES)}")
    np_dtype = np.dtype(_DTYPES[dtype])
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)

    entries = _entries(cfg)
    itemsize = np_dtype.itemsize
    nbytes = [int(np.prod(hf_shape(cfg, p))) * itemsize for _, p, _ in entries]
    groups = _shard(entries, nbytes, max_shard_bytes)
    files = (["model.safetensors"] if len(groups) == 1 and not max_shard_bytes else
             [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))])
    for name, group in zip(files, groups):
        _write_safetensors(os.path.join(directory, name), cfg, [entries[k] for k in group], np_dtype,
                           lambda entry: _tensor_chunks(cfg, entry, np_dtype, seed, params))
    if max_shard_bytes:
        weight_map = {entries[k][0]: name for name, group in zip(files, groups) for k in group}
        _atomic_write_text(os.path.join(directory, "model.safetensors.index.json"), json.dumps(
            {"metadata": {"total_size": sum(nbytes)}, "weight_map": weight_map}, indent=2))
    _atomic_write_text(os.path.join(directory, "config.json"), json.dumps(cfg.to_hf_dict(), indent=2))
    return [os.path.join(directory, f) for f in files]


def _entries(cfg: Qwen2MoeConfig) -> list[tuple[str, object, tuple[int, ...]]]:
    """(HF name, Param, index into the stack dims) for every tensor, in HF's order (the table's): embeddings,
    layer by layer, final norm, lm_head."""
    out = []
    for p in param_table(cfg):
        names = hf_names(cfg, p)
        out += [(str(names[idx]), p, idx) for idx in np.ndindex(names.shape)]
    return out


def _shard(entries, nbytes, max_shard_bytes):
    """Greedy packing in order, as ``save_pretrained``: a new file when the next tensor would overflow."""
    if not max_shard_bytes:
        return [list(range(len(entries)))]
    groups, size = [[]], 0
    for k, n in enumerate(nbytes):
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    return groups


def _tensor_chunks(cfg, entry, dtype, seed, params):
    """The HF tensor ``entry`` as consecutive row chunks (C order), cast to ``dtype``."""
    name, p, idx = entry
    shape = hf_shape(cfg, p)
    if params is not None:
        node = lookup(params, p.path)
        t = np.asarray(node[idx] if idx else node)
        yield np.asarray(t, dtype=dtype)
        return
    if "norm" in p.path[-2]:  # RMSNorm weights start at one
        yield np.ones(shape, dtype)
        return
    rows = max(1, _CHUNK_BYTES // max(int(np.prod(shape[1:])) * 4, 1))
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    for start in range(0, shape[0], rows):
        n = min(rows, shape[0] - start)
        yield (rng.standard_normal((n, *shape[1:]), dtype=np.float32) * np.float32(0.02)).astype(dtype, copy=False)


def _write_safetensors(path, cfg, entries, dtype, chunks):
    header, offset = {}, 0
    for name, p, _ in entries:
        shape = hf_shape(cfg, p)
        n = int(np.prod(shape)) * dtype.itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer does
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for entry in entries:
                for chunk in chunks(entry):
                    f.write(np.ascontiguousarray(chunk).tobytes())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _atomic_write_text(path, text):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
