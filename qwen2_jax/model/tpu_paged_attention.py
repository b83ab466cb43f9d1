"""Ragged paged attention for TPU: prefill chunks and decode rows over a paged KV cache in one Pallas call.

The cache of one layer is two arrays, keys ``k_pages [num_pages, page_size, num_kv_heads * head_dim]`` and values
``v_pages`` alike, kv head ``h`` in the columns ``[h * D, (h + 1) * D)``. It is the serving engine's pool layout:
scattering a step's new keys and values into jax's ``[num_pages, page_size, 2 * Hkv, D]`` (keys at even heads,
values at odd) made XLA:TPU copy the whole pool every step. Sequence ``s`` owns the pages
``page_indices[s, :cdiv(kv_lens[s], page_size)]`` in order, and its ``q_len = cu_q_lens[s + 1] - cu_q_lens[s]``
queries are the rows ``cu_q_lens[s]:cu_q_lens[s + 1]`` of ``q [T, Hq, D]``. Query ``i`` of sequence ``s`` sits at
position ``kv_lens[s] - q_len + i`` and sees the kv positions up to its own. Query head ``h`` reads kv head ``h //
(Hq // Hkv)`` (GQA). The softmax is in float32; the output is ``[T, Hq, D]`` in q's dtype, its rows past
``cu_q_lens[num_seqs]`` zero (callers must treat them as undefined). These are the semantics of
``jax.experimental.pallas.ops.tpu.ragged_paged_attention`` (without its sliding window, soft cap and kv scales),
over the layout above instead of jax's.

Which kernel, and why our own (path b of issue 35): jax's kernel cannot be checked on a CPU with jax 0.10.2.
Its TPU interpreter (``pltpu.force_tpu_interpret_mode()``, ``interpret=pltpu.InterpretParams()``) indexes
buffers by NDIndexer ranges only (``jax/_src/pallas/mosaic/interpret/utils.py:to_range``) and fails on the
kernel's ``ref.reshape`` of its VMEM buffer (``'ReshapeTransform' object has no attribute 'indices'``); its
``ref.bitcast`` for bfloat16 pages is another such transform. No ``InterpretParams`` field (DMA execution mode,
random seed, grid-point recorder, HBM allocation, buffer bounds, uninitialized-memory fill, ...) changes how
transforms are read. The older HLO interpreter (``pallas_tpu_interpret_mode_context_manager`` set to True)
fails while discharging the kernel's stores (``'TypedInt' object has no attribute 'shape'``,
``jax/_src/pallas/primitives.py:_swap_discharge_rule``). Running jax's kernel would need patching jax's
private interpreter; so this module has a small kernel of its own that uses only what both the interpreter
and Mosaic handle: static column slices of one head from a page buffer (``buf[..., h * D:(h + 1) * D]``), DMAs
of a whole page's keys and values (``k_pages[page]`` and ``v_pages[page]``, each contiguous), and
reshapes of values (never of refs). It is checked against ``reference_ragged_paged_attention`` in the
interpreter (tests/test_tpu_paged_attention.py) and compiled for TPU without a device there and in
docs/serving.md; it has not run on a TPU.

The kernel: a grid over blocks of ``num_queries_per_block`` query rows (BlockSpec-pipelined, independent, so
"parallel"). A block walks the sequences whose rows it holds; for each it reads the sequence's kv in blocks of
``num_kv_pages_per_block`` pages, each page's keys and values DMA'd from HBM into a double buffer (the next block's
pages copy while this one computes), up to the last position its rows see, and keeps an online softmax (running
max, sum and output, float32 VMEM) per kv head over the ``Hq // Hkv`` query heads it serves, stacked as one
``[G * rows, D]`` matrix. Rows of other sequences keep their state (a row mask).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qwen2_jax.errors import InputError

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # jax's: finite, so a fully masked row has no NaN
LANES = 128  # the running max and sum are kept 128 lanes wide (Mosaic's vector width), every lane the same


def _kernel(kv_lens_ref, page_indices_ref, cu_q_lens_ref, num_seqs_ref,  # scalar prefetch (SMEM)
            q_ref, k_hbm, v_hbm, o_ref,  # q and output blocks [bq, Hq, D] (VMEM); the pages stay in HBM
            q_scr, kv_buf, sems, m_scr, l_scr, acc_scr, *, sm_scale, pages_per_block):
    bq, num_q_heads, head_dim = q_ref.shape
    _, _, _, page_size, kv_width = kv_buf.shape  # [slot, keys / values, page, position, Hkv * D]
    num_kv_heads = kv_width // head_dim
    group = num_q_heads // num_kv_heads
    kv_per_block = pages_per_block * page_size
    pages_per_seq = page_indices_ref.shape[1]
    row_lo = pl.program_id(0) * bq
    row_hi = row_lo + bq

    # The block's queries, regrouped per kv head: q_scr[h, g * bq + r] = q[row_lo + r, h * group + g].
    for h in range(num_kv_heads):
        for g in range(group):
            q_scr[h, g * bq:(g + 1) * bq, :] = q_ref[:, h * group + g, :]
    m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    num_seqs = num_seqs_ref[0]
    # Row r of the stacked [group * bq, ...] matrices is query row row_lo + r % bq.
    stacked_row = row_lo + jax.lax.rem(jax.lax.broadcasted_iota(jnp.int32, (group * bq, 1), 0), bq)

    def copies(seq, block, slot, num_pages):
        """The DMAs of kv block ``block`` of ``seq`` into buffer ``slot``, two a page (its keys, its values); pages
        past the sequence's last repeat its last (in bounds; their positions are masked)."""
        out = []
        for i in range(pages_per_block):
            page = page_indices_ref[seq, jnp.minimum(block * pages_per_block + i, num_pages - 1)]
            for kv, hbm in enumerate((k_hbm, v_hbm)):
                out.append(pltpu.make_async_copy(hbm.at[page], kv_buf.at[slot, kv, i], sems.at[slot]))
        return out

    def attend(seq):
        q_lo, q_hi, kv_len = cu_q_lens_ref[seq], cu_q_lens_ref[seq + 1], kv_lens_ref[seq]
        first_pos = kv_len - (q_hi - q_lo)  # the position of the sequence's first query row
        last_pos = first_pos + jnp.minimum(q_hi, row_hi) - 1 - q_lo  # of its last row in this block
        num_blocks = pl.cdiv(last_pos + 1, kv_per_block)  # later kv blocks are masked for every row here
        num_pages = jnp.minimum(pl.cdiv(kv_len, page_size), pages_per_seq)
        in_seq = (stacked_row >= q_lo) & (stacked_row < q_hi)  # [group * bq, 1]
        row_pos = first_pos + stacked_row - q_lo

        @pl.when(num_blocks > 0)  # always, for valid input (kv_len >= q_len): every DMA started is waited for
        def _first():
            for c in copies(seq, 0, 0, num_pages):
                c.start()

        def kv_block(j, carry):
            slot = jax.lax.rem(j, 2)

            @pl.when(j + 1 < num_blocks)
            def _prefetch():
                for c in copies(seq, j + 1, 1 - slot, num_pages):
                    c.start()

            for c in copies(seq, j, slot, num_pages):
                c.wait()
            col = j * kv_per_block + jax.lax.broadcasted_iota(jnp.int32, (group * bq, kv_per_block), 1)
            visible = in_seq & (col <= row_pos)
            for h in range(num_kv_heads):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                k = kv_buf[slot, 0, :, :, cols].reshape(kv_per_block, head_dim)
                v = kv_buf[slot, 1, :, :, cols].reshape(kv_per_block, head_dim)
                s = jax.lax.dot_general(q_scr[h], k, (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32) * sm_scale
                s = jnp.where(visible, s, MASK_VALUE)
                m_prev, l_prev = m_scr[h], l_scr[h]  # [group * bq, LANES]
                m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
                alpha = jnp.exp(m_prev - m_next)
                p = jnp.exp(s - m_next[:, :1])
                l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
                pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
                acc_next = alpha[:, :1] * acc_scr[h] + pv
                m_scr[h] = jnp.where(in_seq, m_next, m_prev)
                l_scr[h] = jnp.where(in_seq, l_next, l_prev)
                acc_scr[h] = jnp.where(in_seq, acc_next, acc_scr[h])
            return carry

        jax.lax.fori_loop(0, num_blocks, kv_block, 0)

    # The sequences holding rows of this block: from the first that ends past row_lo, while they start before row_hi.
    # (Both operands of & are evaluated: the index is clamped so that s == num_seqs reads in bounds.)
    last = cu_q_lens_ref.shape[0] - 1
    first = jax.lax.while_loop(lambda s: (s < num_seqs) & (cu_q_lens_ref[jnp.minimum(s + 1, last)] <= row_lo),
                               lambda s: s + 1, 0)

    def next_seq(seq):
        pl.when(cu_q_lens_ref[seq + 1] > cu_q_lens_ref[seq])(lambda: attend(seq))
        return seq + 1

    jax.lax.while_loop(lambda s: (s < num_seqs) & (cu_q_lens_ref[s] < row_hi), next_seq, first)

    for h in range(num_kv_heads):
        l = l_scr[h][:, :1]
        out = acc_scr[h] / jnp.where(l > 0, l, 1.0)  # rows of no sequence: 0
        for g in range(group):
            o_ref[:, h * group + g, :] = out[g * bq:(g + 1) * bq].astype(o_ref.dtype)


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale,
                           interpret=False, num_kv_pages_per_block=None, num_queries_per_block=None):
    """Attention of the ragged query rows ``q [T, Hq, D]`` over the paged cache ``k_pages``, ``v_pages
    [num_pages, page_size, Hkv * D]`` (module docstring): ``[T, Hq, D]`` in q's dtype. ``kv_lens [S]``, ``page_indices
    [S, pages_per_seq]``, ``cu_q_lens [S + 1]``, ``num_seqs [1]`` int32; only the first ``num_seqs`` sequences
    count. ``interpret``: run in Pallas' TPU interpreter (a check on the CPU). Blocks: ``num_kv_pages_per_block``
    pages of kv (default: 256 positions' worth, at most a sequence's pages) and ``num_queries_per_block`` query
    rows (default 32; a multiple of 16 so that bfloat16 rows stack in whole tiles)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs_max, pages_per_seq = page_indices.shape
    num_kv_heads, odd_columns = divmod(k_pages.shape[-1], head_dim)
    if (k_pages.ndim != 3 or v_pages.shape != k_pages.shape or v_pages.dtype != k_pages.dtype or odd_columns
            or not num_kv_heads or num_q_heads % num_kv_heads):
        raise InputError(f"k_pages {k_pages.shape}, v_pages {v_pages.shape}: expected both [num_pages, page_size, "
                         f"Hkv * {head_dim}] of one dtype, Hkv dividing the {num_q_heads} query heads")
    _, page_size, kv_width = k_pages.shape  # kv_width = num_kv_heads * head_dim
    if kv_lens.shape != (num_seqs_max,) or cu_q_lens.shape != (num_seqs_max + 1,) or num_seqs.shape != (1,):
        raise InputError(f"kv_lens {kv_lens.shape}, cu_q_lens {cu_q_lens.shape}, num_seqs {num_seqs.shape}: "
                         f"expected ({num_seqs_max},), ({num_seqs_max + 1},) and (1,) for page_indices "
                         f"{page_indices.shape}")
    pages_per_block = num_kv_pages_per_block or max(1, min(256 // page_size, pages_per_seq))
    bq = num_queries_per_block or 32
    if bq % 16:
        raise InputError(f"num_queries_per_block {bq}: expected a multiple of 16")
    group = num_q_heads // num_kv_heads
    q_block = pl.BlockSpec((bq, num_q_heads, head_dim), lambda i, *_: (i, 0, 0))
    lanes = pltpu.VMEM((num_kv_heads, group * bq, LANES), jnp.float32)
    call = pl.pallas_call(
        functools.partial(_kernel, sm_scale=float(sm_scale), pages_per_block=pages_per_block),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(pl.cdiv(num_tokens, bq),),  # a last partial block's rows past T: read undefined, never written
            in_specs=[q_block, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=q_block,
            scratch_shapes=[
                pltpu.VMEM((num_kv_heads, group * bq, head_dim), q.dtype),  # q_scr
                pltpu.VMEM((2, 2, pages_per_block, page_size, kv_width), k_pages.dtype),  # kv_buf
                pltpu.SemaphoreType.DMA((2,)),
                lanes, lanes,  # m_scr, l_scr
                pltpu.VMEM((num_kv_heads, group * bq, head_dim), jnp.float32),  # acc_scr
            ]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="qwen2_ragged_paged_attention",
    )
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    return call(i32(kv_lens), i32(page_indices), i32(cu_q_lens), i32(num_seqs), q, k_pages, v_pages)


def reference_ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale,
                                     interpret=False, num_kv_pages_per_block=None, num_queries_per_block=None):
    """The same function in plain jnp (jittable; the block and interpret arguments are ignored): each query row
    gathers its sequence's whole page list, ``[T, pages_per_seq * page_size, Hkv, D]`` of keys and of values, so it
    is for tests and small shapes. Rows past ``cu_q_lens[num_seqs]`` are zero."""
    del interpret, num_kv_pages_per_block, num_queries_per_block
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, _, kv_width = k_pages.shape
    num_seqs_max = page_indices.shape[0]
    row = jnp.arange(num_tokens)
    counted = jnp.arange(num_seqs_max) < num_seqs[0]
    seq = jnp.minimum(jnp.sum(counted[None, :] & (cu_q_lens[None, 1:] <= row[:, None]), axis=1), num_seqs_max - 1)
    valid = row < cu_q_lens[num_seqs[0]]
    pos = kv_lens[seq] - (cu_q_lens[seq + 1] - cu_q_lens[seq]) + row - cu_q_lens[seq]  # [T]
    pages = jnp.clip(page_indices[seq], 0, num_pages - 1)  # [T, pages_per_seq]
    group = num_q_heads // (kv_width // head_dim)
    k, v = (jnp.repeat(x[pages].reshape(num_tokens, -1, kv_width // head_dim, head_dim).astype(jnp.float32), group,
                       axis=2) for x in (k_pages, v_pages))  # [T, L, Hq, D]
    scores = jnp.einsum("thd,tlhd->thl", q.astype(jnp.float32), k) * sm_scale
    visible = jnp.arange(k.shape[1])[None, None, :] <= pos[:, None, None]
    probs = jax.nn.softmax(jnp.where(visible, scores, MASK_VALUE), axis=-1)
    out = jnp.einsum("thl,tlhd->thd", probs, v)
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)
