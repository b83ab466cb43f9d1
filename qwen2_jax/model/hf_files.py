"""Reading a Hugging Face checkpoint directory: safetensors files, lazily, with every defect named.

We parse the safetensors header ourselves (8-byte length, JSON header, raw little-endian data) so that a
tensor is a memory map: reading a slice of it touches only those bytes, and a truncated file or a corrupt
header is reported with its path before anything is loaded.
"""

from __future__ import annotations

import json
import os
import re
import struct

import ml_dtypes
import numpy as np

from qwen2_jax.errors import Qwen2JaxError


class CheckpointError(Qwen2JaxError):
    """A checkpoint that cannot be loaded; the message names the file or tensor and what is wrong."""


# owner/name, as a Hugging Face Hub repository id is written
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def check_checkpoint_dir(path) -> str:
    """``path`` as a string if it is a local directory with a config.json; else a CheckpointError saying which
    of these it is: a path that does not exist (one that looks like a Hub id, ``owner/name``, with how to
    download it: this project reads local directories only), a file, or a directory that is no checkpoint."""
    path = os.fspath(path)
    if not os.path.exists(path):
        owner = path.split("/")[0]
        if _HUB_ID.fullmatch(path) and not os.path.isdir(owner):
            raise CheckpointError(
                f"{path}: no such directory; it looks like a Hugging Face Hub id, but qwen2-jax reads local "
                f"checkpoint directories only: download it with `huggingface-cli download {path} --local-dir DIR` "
                f"and pass DIR")
        raise CheckpointError(f"{path}: does not exist (expected a checkpoint directory)")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint directory: it is a file (pass the directory that holds "
                              f"config.json and the weights)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: a directory but not a checkpoint: no config.json (expected a Hugging Face "
                              f"checkpoint, config.json and *.safetensors, or a directory qwen2-jax convert wrote)")
    return path


DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class TensorRef:
    """One tensor in one safetensors file, read on demand."""

    def __init__(self, path: str, name: str, dtype: str, shape: tuple[int, ...], offset: int):
        self.path, self.name, self.dtype, self.shape, self.offset = path, name, dtype, shape, offset

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(DTYPES[self.dtype]).itemsize

    def array(self) -> np.ndarray:
        """A read-only memory map of the tensor (nothing is read until it is indexed)."""
        if not self.shape or 0 in self.shape:
            return np.zeros(self.shape, DTYPES[self.dtype])
        return np.memmap(self.path, dtype=DTYPES[self.dtype], mode="r", offset=self.offset, shape=self.shape)


def read_header(path: str) -> dict[str, TensorRef]:
    """The tensors of one safetensors file, checked against the file's size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header (header length {n}, file {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    data_start, data_size = 8 + n, size - 8 - n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        ref = TensorRef(path, name, dtype, shape, data_start + begin)
        if end - begin != ref.nbytes or begin < 0:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} {dtype}{list(shape)} "
                                  f"needs {ref.nbytes} bytes, offsets give {end - begin}")
        if end > data_size:
            raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte {end} "
                                  f"of the data, the file has {data_size}")
        tensors[name] = ref
    return tensors


def weight_files(directory: str) -> list[str]:
    """The safetensors files of a checkpoint: sharded (``model.safetensors.index.json``) or single."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
        if missing:
            raise CheckpointError(f"{index}: names {missing[0]}, which is not in {directory}")
        return [os.path.join(directory, f) for f in files]
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def read_tensors(directory: str) -> dict[str, TensorRef]:
    """Every tensor of the checkpoint by name; a tensor stored twice is an error naming both files."""
    tensors: dict[str, TensorRef] = {}
    for path in weight_files(directory):
        for name, ref in read_header(path).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name} is stored twice: in {tensors[name].path} and {path}")
            tensors[name] = ref
    return tensors
