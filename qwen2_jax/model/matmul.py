"""Rows times a weight stored ``[out, in]`` (HF's layout, every weight of the model): the product in the form
each backend runs fastest.

XLA:CPU multiplies 2 to 64 rows by a weight up to 2.7x faster with the weight as the product's left operand:
its matmul library repacks its right operand, which is then the few rows rather than the weight. At one row
and at 128 the two forms are level, beyond that weight last is faster (``scripts/bench_product.py``,
docs/performance.md). GPU and TPU programs, and quantized weights, keep the plain product.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from . import quant

WEIGHT_FIRST_MAX_ROWS = 64


def product(x, w, dtype, platform: str | None = None, out_dtype=None, weight_first: bool | None = None):
    """``x [..., in]`` times a weight ``w [out, in]`` (an array or a ``QArray``): ``[..., out]`` in ``out_dtype``
    (default ``dtype``). Weight first, ``[out, in] x [rows, in] -> [out, rows]`` and the small result transposed
    (the barrier keeps XLA from folding the transpose back into the product, which would swap its operands again):
    by default on XLA:CPU for up to ``WEIGHT_FIRST_MAX_ROWS`` rows of an unquantized weight."""
    rows = math.prod(x.shape[:-1])
    if weight_first is None:
        weight_first = ((platform or jax.default_backend()) == "cpu" and rows <= WEIGHT_FIRST_MAX_ROWS
                        and not isinstance(w, quant.QArray))
    if weight_first:
        y = jnp.einsum("oi,ri->or", w.astype(dtype), x.reshape(rows, x.shape[-1]), preferred_element_type=out_dtype)
        return jax.lax.optimization_barrier(y).T.reshape(*x.shape[:-1], w.shape[0])
    return quant.einsum("...i,oi->...o", x, w, dtype, out_dtype=out_dtype)
