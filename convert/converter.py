"""``convert``: a Hugging Face safetensors checkpoint to an Orbax checkpoint, in bounded memory, atomically.

Output directory::

    OUT_DIR/params/          Orbax PyTree checkpoint of the parameter tree (keys: ``Param.path``)
    OUT_DIR/config.json      copied, with generation_config.json and the tokenizer files when present
    OUT_DIR/qwen2_jax.json   source files and sizes, dtypes and shapes, qwen2-jax version

Everything is validated before anything is written; the result is assembled in a temporary directory beside
OUT_DIR and renamed into place at the end, so a killed conversion never leaves a loadable OUT_DIR.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

import jax
import ml_dtypes
import numpy as np

from qwen2_jax import __version__
from qwen2_jax.model.config import Qwen2MoeConfig
from qwen2_jax.errors import InputError, Qwen2JaxError
from qwen2_jax.model.hf_files import DTYPES, CheckpointError, check_checkpoint_dir, read_tensors, weight_files
from qwen2_jax.model.params import (LAYOUT_VERSION, check_tensors, hf_names, iter_params, lookup, nest, param_dtype,
                              read_block)
from qwen2_jax.model.quant import QuantConfig

from . import orbax_io
from .layout import METADATA_FILE, ORBAX_PARAMS

OUTPUT_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


class ConvertError(Qwen2JaxError):
    """The conversion cannot write its output; the message names the path and the reason."""


def convert(hf_dir, out_dir, *, dtype: str | None = None, force: bool = False, progress: bool | None = None,
            quantize=None) -> dict:
    """Converts the HF checkpoint in ``hf_dir`` (``config.json`` + ``model.safetensors`` or the sharded form)
    into ``out_dir``; returns the metadata written to ``out_dir/qwen2_jax.json``.

    ``dtype``: "bfloat16" or "float32" casts every weight; None keeps each weight's source dtype.
    ``force``: replace an existing ``out_dir`` (only once the new one is complete).
    ``progress``: a progress bar on stderr (tensors and bytes); None shows it when stderr is a terminal.
    ``quantize``: "int8", "fp8" or "int8:BLOCK" (a ``QuantConfig``): weight-only quantization of the
    projections as the blocks stream (``qwen2_jax.model.quant``); config.json records it as its quantization_config.
    Only about one block of weights (``orbax_io.BLOCK_BYTES``, a few times over) is in memory at once.
    """
    start = time.perf_counter()
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported; expected one of {sorted(OUTPUT_DTYPES)} (or None to keep "
                         f"the source dtype)")
    check_checkpoint_dir(hf_dir)  # before abspath: a Hub id, "owner/name", gets its own message
    hf_dir, out_dir = os.path.abspath(os.fspath(hf_dir)), os.path.abspath(os.fspath(out_dir))
    if _inside(hf_dir, out_dir):  # --force would delete the source
        raise ConvertError(f"{out_dir}: the output directory contains the source checkpoint {hf_dir}")
    if os.path.lexists(out_dir) and not force:
        raise FileExistsError(f"{out_dir}: already exists (use --force to replace it)")

    # Validation: nothing is written before the config and every tensor header have been checked.
    quant = QuantConfig.parse(quantize)
    cfg = Qwen2MoeConfig.from_json(hf_dir)
    if cfg.quantization is not None:
        raise ConvertError(f"{hf_dir}: already quantized ({cfg.quantization.dtype}); convert its float checkpoint")
    if quant is not None:
        cfg = cfg.replace(quantization=quant)
    tensors = check_tensors(cfg, read_tensors(hf_dir))
    files = weight_files(hf_dir)
    bar = _Progress(sys.stderr.isatty() if progress is None else bool(progress),
                    sum(t.nbytes for t in tensors.values()), len(tensors))
    tree, shapes = _sources(cfg, tensors, dtype, bar)

    parent = os.path.dirname(out_dir)
    _remove_stale(parent, os.path.basename(out_dir))
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-{os.getpid()}-", dir=parent)
    except OSError as e:
        raise ConvertError(f"{out_dir}: cannot create the output beside it in {parent} ({e.strerror})") from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should look like any new directory
        try:
            bar.open()
            orbax_io.save(os.path.join(tmp, ORBAX_PARAMS), tree)
        except (ValueError, OSError) as e:  # TensorStore reports I/O failures (a full disk, ...) as ValueError
            raise ConvertError(f"{out_dir}: writing the Orbax checkpoint failed: {_first_line(e)}") from None
        finally:
            bar.close()
        for name in COPIED_FILES:
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tmp, name))
        if quant is not None:  # the checkpoint says how its weights are stored
            with open(os.path.join(hf_dir, "config.json")) as f:
                raw = json.load(f)
            raw["quantization_config"] = quant.to_json()
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(raw, f, indent=2)
        metadata = {
            "format": "qwen2-jax orbax checkpoint",
            "qwen2_jax_version": __version__,
            "layout_version": LAYOUT_VERSION,
            "dtype": _dtype_summary(shapes),
            "quantization": quant.to_json() if quant is not None else None,
            "source": {"directory": hf_dir, "files": [{"name": os.path.basename(f), "bytes": os.path.getsize(f)}
                                                      for f in files],
                       "tensors": len(tensors), "bytes": sum(t.nbytes for t in tensors.values()),
                       "dtypes": sorted({_dtype_name(DTYPES[t.dtype]) for t in tensors.values()})},
            "params": {"/".join(path): {"shape": list(shape), "dtype": _dtype_name(dt)}
                       for path, (shape, dt) in shapes.items()},
        }
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=2)
        _replace(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConvertError(f"{out_dir}: {e.strerror or e} ({e.filename or tmp})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    metadata["seconds"] = time.perf_counter() - start
    return metadata


# A parameter the layout lacks or does not know is what a checkpoint converted by another release looks like.
RECONVERT = f"; if another qwen2-jax version converted it, convert it again with this one ({__version__})"
RECONVERT_ALL = "; convert the Hugging Face checkpoint again (qwen2-jax convert)"
# What Orbax reads before any array: the tree's metadata and the OCDBT database's root.
ORBAX_FILES = ("_METADATA", "manifest.ocdbt")


def restore_params(path, cfg: Qwen2MoeConfig, dtype, shardings: dict | None = None) -> dict:
    """The parameter tree of the converted checkpoint at ``path`` as a nested dict of ``jax.Array`` of ``dtype``.

    Each array is restored directly into ``shardings[param path]`` (a dict as ``sharding.param_shardings``
    makes; None puts everything on the default device): every device reads only the chunks of its own
    slice, cast to ``dtype`` on the way. The stored shapes are checked against ``cfg`` first.
    """
    directory = os.path.join(os.path.abspath(os.fspath(path)), ORBAX_PARAMS)
    for name in ORBAX_FILES:  # without them Orbax fails far from the cause (a missing attribute, a closed loop)
        if not os.path.isfile(os.path.join(directory, name)):
            raise CheckpointError(f"{directory}: not a complete Orbax checkpoint: {name} is missing{RECONVERT_ALL}")
    try:
        orbax_io.check_readable(directory)
    except orbax_io.StorageError as e:
        raise CheckpointError(f"{directory}: {e}{RECONVERT_ALL}") from None
    layout = _layout_version(path)
    if layout != LAYOUT_VERSION:
        was = f" ({_EARLIER_LAYOUTS[layout]})" if layout in _EARLIER_LAYOUTS else ""
        raise CheckpointError(f"{directory}: stored in parameter layout {layout}{was}, this version reads layout "
                              f"{LAYOUT_VERSION}{RECONVERT}")
    try:
        stored = orbax_io.stored_shapes(directory)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{directory}: not a readable Orbax checkpoint ({_first_line(e)}){RECONVERT_ALL}") from None
    abstract: dict = {}
    expected = set()
    for p, shape in iter_params(cfg):
        expected.add(p.path)
        if p.path not in stored:
            raise CheckpointError(f"{directory}: missing parameter {p.name} (expected shape {list(shape)}){RECONVERT}")
        if stored[p.path][0] != shape:
            raise CheckpointError(f"{directory}: parameter {p.name} has shape {list(stored[p.path][0])}, expected "
                                  f"{list(shape)} from config.json")
        if p.quant_axis is not None and stored[p.path][1] != param_dtype(p, dtype, cfg):
            raise CheckpointError(f"{directory}: parameter {p.name} is stored as {stored[p.path][1]}, expected "
                                  f"{np.dtype(param_dtype(p, dtype, cfg))} from config.json's quantization_config")
        sharding = (shardings or {}).get(p.path) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        node = abstract
        for key in p.path[:-1]:
            node = node.setdefault(key, {})
        node[p.path[-1]] = jax.ShapeDtypeStruct(shape, param_dtype(p, dtype, cfg), sharding=sharding)
    extra = sorted(set(stored) - expected)
    if extra:
        raise CheckpointError(f"{directory}: unexpected parameter {'/'.join(extra[0])} (not used by config.json)"
                              f"{RECONVERT}")
    try:
        restored = orbax_io.restore(directory, abstract)  # keyed as stored, a layer's index a string
    except orbax_io.StorageError as e:
        raise CheckpointError(f"{directory}: {e}{RECONVERT_ALL}") from None
    return nest((p.path, lookup(restored, p.path)) for p, _ in iter_params(cfg))


# ---- planning -------------------------------------------------------------------------------------------
def _sources(cfg, tensors, dtype, bar):
    """The tree of ``orbax_io.Source`` leaves, and {path: (shape, dtype)} of what will be written."""
    tree: dict = {}
    shapes = {}
    for p, shape in iter_params(cfg):
        refs = [tensors[name] for name in hf_names(cfg, p).flat]
        src_dtype = np.result_type(*[DTYPES[r.dtype] for r in refs])
        out_dtype = np.dtype(param_dtype(p, np.dtype(OUTPUT_DTYPES[dtype]) if dtype else src_dtype, cfg))
        block, chunk = orbax_io.plan_blocks(shape, p.axes, p.num_stack_dims, max(out_dtype.itemsize, src_dtype.itemsize))
        src = orbax_io.Source(
            name="/".join(p.path), shape=shape, dtype=out_dtype, block_shape=block, read_chunk_shape=chunk,
            read=lambda index, p=p, out_dtype=out_dtype: read_block(cfg, p, tensors, index, out_dtype),
            on_written=(lambda index: None) if p.is_scale else  # the source bytes count with the values
                lambda index, n=p.num_stack_dims, shape=shape, itemsize=src_dtype.itemsize:
                    bar.written(index, n, shape, itemsize))
        node = tree
        for key in p.path[:-1]:
            node = node.setdefault(key, {})
        node[p.path[-1]] = src
        shapes[p.path] = (shape, out_dtype)
    return tree, shapes


class _Progress:
    """tqdm over source bytes, with the count of whole HF tensors written."""

    def __init__(self, enabled: bool, total_bytes: int, total_tensors: int):
        self.enabled, self.total_bytes, self.total_tensors = enabled, total_bytes, total_tensors
        self.bar, self.tensors = None, 0

    def open(self):
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="converting",
                            file=sys.stderr, dynamic_ncols=True)
            self.bar.set_postfix_str(f"tensors 0/{self.total_tensors}")

    def written(self, index, num_stack_dims, shape, itemsize):
        if self.bar is None:
            return
        counts = [s.stop - s.start for s in index]
        if all(s.stop == n for s, n in zip(index[num_stack_dims:], shape[num_stack_dims:])):
            self.tensors += math.prod(counts[:num_stack_dims])  # the block finished these tensors
        self.bar.set_postfix_str(f"tensors {self.tensors}/{self.total_tensors}", refresh=False)
        self.bar.update(math.prod(counts) * itemsize)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---- the output directory -------------------------------------------------------------------------------
def _replace(tmp: str, out_dir: str) -> None:
    """Renames the finished ``tmp`` to ``out_dir``; an existing ``out_dir`` (``force``) is moved aside first
    and deleted only after the new one is in place."""
    old = None
    if os.path.lexists(out_dir):
        old = f"{os.path.dirname(out_dir)}/.{os.path.basename(out_dir)}.old-{os.getpid()}-{os.urandom(4).hex()}"
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)


def _remove_stale(parent: str, base: str) -> None:
    """Deletes temporary directories beside OUT_DIR left by conversions that were killed (their process is gone)."""
    pattern = re.compile(rf"^\.{re.escape(base)}\.(?:tmp|old)-(\d+)-")
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        m = pattern.match(name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory + os.sep)


def _dtype_name(dt) -> str:
    return np.dtype(dt).name


def _dtype_summary(shapes) -> str:
    names = sorted({_dtype_name(dt) for _, dt in shapes.values()})
    return names[0] if len(names) == 1 else "mixed: " + ", ".join(names)


_EARLIER_LAYOUTS = {1: "the routed experts [experts, in, out]",
                    2: "the routed experts' gate_proj and up_proj in stacks of their own"}


def _layout_version(path) -> int:
    """The parameter layout the conversion at ``path`` recorded (1 where it recorded none: the releases of layout
    1 did not); where it has no readable metadata file, nothing to check (this version's own)."""
    try:
        with open(os.path.join(os.fspath(path), METADATA_FILE)) as f:
            return json.load(f).get("layout_version", 1)
    except (OSError, ValueError, AttributeError):
        return LAYOUT_VERSION


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
