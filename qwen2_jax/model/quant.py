"""Weight-only quantization: int8 (or float8 e4m3, for Hopper) values with a float32 scale per output channel,
or per output channel and block of the contracting axis.

Our own small type rather than qwix: qwix's PTQ provider intercepts ``dot_general``/``einsum`` calls and
finds weights by identity, while this model's experts reach ``ragged_dot``, a gathered reduction and
per-expert switch branches (``moe.py``), which it does not see. So a quantized weight is two parameters of
the same module, ``weight`` (or an expert stack) holding the values and ``<name>_scale`` holding the scales,
shaped like the weight with the contracting axis cut into ``blocks`` (1: one scale per output channel), and
the forward passes them on as a ``QArray``. Nothing is dequantized ahead of time: the product that reads a
``QArray`` multiplies ``values.astype(dtype) * scale`` as its operand, which XLA fuses into the kernel that
reads the weight, so a step reads one byte a weight and writes no float copy of it (``qwen2-jax aot``
counts the copies of the compiled step). The router (``mlp.gate``), ``shared_expert_gate``, norms, biases and
embeddings are never quantized; ``lm_head`` only when asked (``QuantConfig.lm_head``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qwen2_jax.errors import InputError

TYPES = {"int8": (jnp.int8, 127.0), "fp8": (jnp.float8_e4m3fn, float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max))}
QUANT_METHOD = "qwen2_jax"  # config.json's quantization_config.quant_method for checkpoints this port quantized


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What is quantized and how (hashable: part of the model's static structure, ``Qwen2MoeConfig.quantization``)."""

    dtype: str = "int8"  # "int8" or "fp8" (float8 e4m3)
    block: int = 0  # scales per output channel and block of this many inputs; 0: per output channel
    lm_head: bool = False  # lm_head too (it is 1.09 GB of the 27.4 a batch-1 step reads in bf16)

    def __post_init__(self):
        if self.dtype not in TYPES:
            raise InputError(f"quantization type {self.dtype!r} is not supported; expected one of {sorted(TYPES)}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 0:
            raise InputError(f"quantization block must be an integer >= 0 (0: per output channel), got {self.block!r}")
        if not isinstance(self.lm_head, bool):
            raise InputError(f"quantization lm_head must be true or false, got {self.lm_head!r}")

    @property
    def storage(self):
        return TYPES[self.dtype][0]

    def blocks(self, inputs: int) -> int:
        """Scales along a contracting axis of ``inputs`` elements (a block that does not divide it: per channel)."""
        if not self.block or self.block >= inputs or inputs % self.block:
            return 1
        return inputs // self.block

    def to_json(self) -> dict:
        return {"quant_method": QUANT_METHOD, "dtype": self.dtype, "block": self.block, "lm_head": self.lm_head}

    @classmethod
    def parse(cls, spec) -> "QuantConfig | None":
        """From ``None``, a QuantConfig, a type name ("int8", "fp8") or "int8:128" (type and block)."""
        if spec is None or isinstance(spec, QuantConfig):
            return spec
        if not isinstance(spec, str):
            raise InputError(f"quantize must be 'int8', 'fp8' or 'int8:BLOCK', got {spec!r}")
        name, _, block = spec.partition(":")
        if block and not block.isdigit():
            raise InputError(f"quantize {spec!r}: the block after ':' must be an integer, got {block!r}")
        return cls(dtype=name, block=int(block or 0))


def quantize(w, cfg: QuantConfig, axis: int):
    """(values, scale) of weight ``w`` quantized along its contracting ``axis``: symmetric, the largest |w| of
    each output channel (and block) maps to the type's largest value. Works on numpy and jax arrays (the
    converter quantizes numpy blocks as it streams; ``from_pretrained`` jax arrays on their devices)."""
    xp = np if isinstance(w, np.ndarray) else jnp
    w = w.astype(np.float32)
    axis = axis % w.ndim
    n = cfg.blocks(w.shape[axis])
    split = w.reshape(w.shape[:axis] + (n, w.shape[axis] // n) + w.shape[axis + 1:])
    peak = xp.max(xp.abs(split), axis=axis + 1, keepdims=True)
    top = TYPES[cfg.dtype][1]
    # times the reciprocal, not divided: XLA rewrites a division by a constant so, and the converter (numpy)
    # and from_pretrained (jax) must give the same scales bit for bit
    scale = xp.where(peak > 0, peak * np.float32(1 / top), 1.0).astype(np.float32)
    q = split * (np.float32(1) / scale)  # XLA turns a division by a broadcast into this: numpy does the same
    values = (xp.clip(xp.round(q), -top, top) if cfg.dtype == "int8" else q).astype(cfg.storage)
    return values.reshape(w.shape), xp.squeeze(scale, axis + 1)


def dequantize(values, scale, axis: int, dtype):
    """``values`` as ``dtype``, each element times its scale: the operand a product reads (fused, not stored)."""
    axis = axis % values.ndim
    n = scale.shape[axis]
    split = values.reshape(values.shape[:axis] + (n, values.shape[axis] // n) + values.shape[axis + 1:])
    out = split.astype(dtype) * jnp.expand_dims(scale, axis + 1).astype(dtype)
    return out.reshape(values.shape)


@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized weight as the products see it: ``values`` with ``scale`` along contracting ``axis``.
    Indexing its leading (expert) axis indexes both; ``astype(dtype)`` is the dequantized operand."""

    values: jax.Array
    scale: jax.Array
    axis: int

    @property
    def shape(self):
        return self.values.shape

    @property
    def ndim(self):
        return self.values.ndim

    @property
    def dtype(self):
        return self.values.dtype

    def __getitem__(self, index):
        """Index the leading axis only (an expert id, or an array of them), as the MoE dispatches do."""
        index = index if isinstance(index, tuple) else (index,)
        if len(index) != 1 or self.axis == 0:
            raise IndexError("a QArray is indexed on its leading axis only")
        added = jnp.ndim(index[0])
        return QArray(self.values[index], self.scale[index], self.axis - 1 + added)

    def astype(self, dtype):
        return dequantize(self.values, self.scale, self.axis, dtype)


jax.tree_util.register_dataclass(QArray, data_fields=["values", "scale"], meta_fields=["axis"])


def einsum(spec: str, x, w, dtype, out_dtype=None):
    """``jnp.einsum(spec, x, w)`` in ``dtype`` (the result in ``out_dtype``, default ``dtype``) for a weight
    ``w`` (second operand) that may be a ``QArray``.

    A ``QArray`` is multiplied as its values converted to ``dtype`` (a conversion the matmul kernel reads the
    int8 or fp8 bytes through), and its scales applied to the product's output: per output channel, one
    multiply; per block, the product keeps a blocks axis (float32 partial sums) that the scales weigh and sum.
    Scaling the operand instead makes XLA:GPU write the dequantized weight before the matmul reads it."""
    if not isinstance(w, QArray):
        return jnp.einsum(spec, x, w.astype(dtype), preferred_element_type=out_dtype)
    out_dtype = out_dtype or dtype
    inputs, out = spec.split("->")
    lhs, rhs = inputs.split(",")
    c = rhs[w.axis]  # the contracting axis
    n = next(ch for ch in "zyxwvuqp" if ch not in spec)  # a letter for the blocks
    blocks = w.scale.shape[w.axis]
    values = w.values.astype(dtype)
    if blocks == 1:
        # The product accumulated in float32 and scaled there (rounded once, to out_dtype): asked for a bf16
        # product instead, XLA:GPU copied 2.1 GB of expert weights a batch-16 step (1.19x the roofline, not 1.05x).
        y = jnp.einsum(spec, x, values, preferred_element_type=jnp.float32)
        scale = jnp.squeeze(w.scale, w.axis)
        return jnp.einsum(f"{out},{rhs.replace(c, '')}->{out}", y, scale).astype(out_dtype)
    split = lambda a, axis: a.reshape(a.shape[:axis] + (blocks, a.shape[axis] // blocks) + a.shape[axis + 1:])
    x_axis = lhs.index(c) if "..." not in lhs else x.ndim - (len(lhs) - lhs.index(c))
    x = split(x, x_axis)
    values = split(values, w.axis)
    y = jnp.einsum(f"{lhs.replace(c, n + c)},{rhs.replace(c, n + c)}->{out + n}", x, values,
                   preferred_element_type=jnp.float32)
    return jnp.einsum(f"{out + n},{rhs.replace(c, n)}->{out}", y, w.scale).astype(out_dtype)


def operand(values, scale, axis: int):
    """What a product reads: ``QArray(values, scale, axis)``, or the plain array where ``scale`` is None."""
    return values if scale is None else QArray(values, scale, axis)


def scale_shape(shape: tuple[int, ...], cfg: QuantConfig, axis: int) -> tuple[int, ...]:
    axis = axis % len(shape)
    return shape[:axis] + (cfg.blocks(shape[axis]),) + shape[axis + 1:]
