"""The TPU ragged paged attention kernel (``qwen2_jax.model.tpu_paged_attention``) in Pallas' TPU interpreter
against the plain reference, at tiny shapes (head_dim 128, as Mosaic's layouts want), and its deviceless TPU
compile at a serving shape. The pages are the serving engine's layout, ``k_pages`` and ``v_pages [num_pages,
page_size, Hkv * D]`` (kv head ``h`` in the columns ``[h * D, (h + 1) * D)``)."""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from qwen2_jax.model.tpu_paged_attention import ragged_paged_attention, reference_ragged_paged_attention

D = 128
PAGE = 16
BLOCKS = dict(num_kv_pages_per_block=2, num_queries_per_block=16)  # 32 kv positions a block, 16 query rows
F32_TOL = 2e-5  # float32 sums in another order: ~1e-6 here
BF16_TOL = 3e-2  # bfloat16 inputs, probabilities and output: ~1e-2 here


TOKENS, SLOTS, PAGES_PER_SEQ = 32, 6, 6  # one set of shapes for every case (a compile each head layout and dtype)


def case(q_lens, kv_lens, *, hq=4, hkv=2, dtype=jnp.float32, seed=0):
    """Arguments for sequences with these query and kv lengths: their pages in scrambled order among spare ones,
    sequence slots past ``len(q_lens)`` filled with garbage the kernel must not read, query rows past the
    sequences' (padding) random."""
    rng = np.random.default_rng(seed)
    assert len(q_lens) <= SLOTS and sum(q_lens) <= TOKENS and max(kv_lens) <= PAGE * (PAGES_PER_SEQ - 1)
    num_pages = SLOTS * PAGES_PER_SEQ + 3
    page_indices = rng.permutation(num_pages)[:SLOTS * PAGES_PER_SEQ].reshape(SLOTS, PAGES_PER_SEQ)
    page_indices[len(q_lens):] = 10**6
    pad = SLOTS - len(q_lens)
    return (jnp.asarray(rng.standard_normal((TOKENS, hq, D)), dtype),
            jnp.asarray(rng.standard_normal((num_pages, PAGE, hkv * D)), dtype),
            jnp.asarray(rng.standard_normal((num_pages, PAGE, hkv * D)), dtype),
            jnp.asarray(list(kv_lens) + [10**6] * pad, jnp.int32),
            jnp.asarray(page_indices, jnp.int32),
            jnp.asarray(list(np.cumsum([0] + list(q_lens))) + [10**6] * pad, jnp.int32),
            jnp.asarray([len(q_lens)], jnp.int32))


@functools.partial(jax.jit, static_argnames="interpret")
def kernel(*args, interpret=True):
    return ragged_paged_attention(*args, sm_scale=D ** -0.5, interpret=interpret, **BLOCKS)


@jax.jit
def reference(*args):
    return reference_ragged_paged_attention(*args, sm_scale=D ** -0.5)


def run_both(args):
    """The kernel's and the reference's rows of the sequences, as float32 arrays."""
    out = kernel(*args)
    ref = reference(*args)
    rows = int(args[5][int(args[6][0])])
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    assert not np.any(np.asarray(out[rows:], np.float32)), "rows of no sequence: zero"
    return np.asarray(out[:rows], np.float32), np.asarray(ref[:rows], np.float32)


def err(a, b):
    return float(np.max(np.abs(a - b)))


def test_decode_rows_only_over_several_kv_blocks_and_partial_pages():
    # 5 rows in the first 16-row block; kv of 1 to 70 positions: 1 to 3 blocks of 32, last pages partly filled.
    out, ref = run_both(case([1] * 5, [1, 16, 17, 33, 70], hq=4, hkv=2))
    assert err(out, ref) < F32_TOL


def test_a_prefill_chunk_at_an_offset_across_two_query_blocks():
    # 20 new rows after 25 cached positions (kv_len 45 > q_len 20), and a decode row after it.
    args = case([20, 1], [45, 9], hq=4, hkv=2)
    out, ref = run_both(args)
    assert err(out, ref) < F32_TOL
    # A kernel without the causal mask would be far off: the same rows, each as a decode row over all 45.
    noncausal = reference_ragged_paged_attention(
        *args[:3], jnp.asarray([45] * 20, jnp.int32), jnp.repeat(args[4][:1], 20, axis=0),
        jnp.arange(21, dtype=jnp.int32), jnp.asarray([20], jnp.int32), sm_scale=D ** -0.5)
    assert err(out[:20], np.asarray(noncausal[:20])) > 100 * F32_TOL


@pytest.mark.parametrize("q_lens, kv_lens", [([1, 18, 0, 1], [30, 50, 12, 1]),  # 2 slots unused
                                              ([1, 18, 0, 1, 3, 9], [30, 50, 12, 1, 3, 80])])  # all 6 used
def test_a_mix_with_scrambled_pages_an_idle_sequence_and_unused_slots(q_lens, kv_lens):
    # decode rows, a prefill chunk across both query blocks, a sequence with no query this step (q_len 0), a
    # decode row at position 0, a whole prompt (q_len == kv_len); padding rows past them; slots past num_seqs
    # hold garbage.
    args = case(q_lens, kv_lens, hq=4, hkv=2)
    out, ref = run_both(args)
    assert err(out, ref) < F32_TOL


@pytest.mark.parametrize("hq, hkv", [(4, 2), (8, 2)])
def test_grouped_query_heads_read_their_kv_head(hq, hkv):
    args = case([1, 12, 1], [20, 40, 3], hq=hq, hkv=hkv, seed=hq)  # 2 and 4 query heads a kv head
    out, ref = run_both(args)
    assert err(out, ref) < F32_TOL
    # Query head h reads kv head h // (hq // hkv): with the two kv heads' columns swapped, far off.
    swapped = reference(args[0], *(jnp.roll(x, D, axis=2) for x in args[1:3]), *args[3:])
    assert err(out, np.asarray(swapped[:out.shape[0]])) > 100 * F32_TOL


def test_bfloat16_pages_and_queries():
    args = case([1, 18, 0, 1], [30, 50, 12, 1], hq=4, hkv=2, dtype=jnp.bfloat16)
    out, ref = run_both(args)
    assert err(out, ref) < BF16_TOL


def test_a_wrong_page_table_gives_a_large_difference():
    args = case([1, 18, 1], [30, 50, 7], hq=4, hkv=2)
    out, ref = run_both(args)
    assert err(out, ref) < F32_TOL
    pages = np.asarray(args[4]).copy()
    pages[1, 1] = pages[0, 0]  # the prefill sequence's second page: the first sequence's first instead
    wrong, ref_wrong = run_both(args[:4] + (jnp.asarray(pages),) + args[5:])
    assert err(wrong, ref_wrong) < F32_TOL  # the kernel reads the pages the table names
    assert err(wrong, ref) > 0.1 > 100 * F32_TOL


def test_force_tpu_interpret_mode_runs_the_kernel_interpreted():
    args = case([1, 5], [20, 37], hq=4, hkv=2)
    with pltpu.force_tpu_interpret_mode():
        out = kernel(*args, interpret=False)
    ref = reference(*args)
    assert err(np.asarray(out[:6]), np.asarray(ref[:6])) < F32_TOL


COMPILE = textwrap.dedent("""
    import functools, json, time
    import jax, jax.numpy as jnp
    from qwen2_jax.tools import aot
    from qwen2_jax.model.tpu_paged_attention import ragged_paged_attention
    try:
        device = aot.devices(aot.TARGETS["v5e-8"])[0]  # one chip of a compile-only v5e slice
    except aot.AotError as e:
        print(json.dumps({"skip": str(e)})); raise SystemExit(0)
    sharding = jax.sharding.SingleDeviceSharding(device)
    A = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    seqs, kv_len, chunk, page, hq, hkv, d = 64, 2048, 512, 16, 28, 4, 128
    tokens, pages_per_seq = seqs - 1 + chunk, (kv_len + chunk) // page  # 63 decode rows, one prefill chunk
    kv = A((seqs * pages_per_seq, page, hkv * d), jnp.bfloat16)
    args = (A((tokens, hq, d), jnp.bfloat16), kv, kv,
            A((seqs,), jnp.int32), A((seqs, pages_per_seq), jnp.int32), A((seqs + 1,), jnp.int32),
            A((1,), jnp.int32))
    t = time.time()
    compiled = jax.jit(functools.partial(ragged_paged_attention, sm_scale=d ** -0.5)).lower(*args).compile()
    m = compiled.memory_analysis()
    print(json.dumps({"compile_s": time.time() - t, "kv_bytes": 2 * kv.size * 2, "q_bytes": args[0].size * 2,
                      "argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
                      "temp_bytes": m.temp_size_in_bytes,
                      "kernel": "qwen2_ragged_paged_attention" in compiled.as_text()}))
""")


def test_compiles_for_a_tpu_chip_without_one_at_a_serving_shape():
    """Mosaic lowers and libtpu compiles the kernel for a v5e chip (64 sequences of 2,048 cached positions:
    63 decode rows and a 512-row prefill chunk; Hq 28, Hkv 4, bfloat16 pages of 16), in a process of its own
    with a time limit; the pages are read in place (no temporary the size of the cache)."""
    proc = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in r:
        pytest.skip(r["skip"])
    assert r["kernel"], r
    assert r["kv_bytes"] + r["q_bytes"] <= r["argument_bytes"] < 1.01 * (r["kv_bytes"] + r["q_bytes"]), r
    assert r["q_bytes"] <= r["output_bytes"] < 1.01 * r["q_bytes"] and r["temp_bytes"] < 0.01 * r["kv_bytes"], r


def test_shapes_it_cannot_run_are_refused_in_one_line():
    from qwen2_jax.errors import InputError

    args = case([1], [5])
    with pytest.raises(InputError, match="num_queries_per_block 24"):
        ragged_paged_attention(*args, sm_scale=1.0, num_queries_per_block=24)
    with pytest.raises(InputError, match="k_pages"):
        ragged_paged_attention(args[0][:, :3], *args[1:], sm_scale=1.0)  # 3 query heads over 2 kv heads
    old = jnp.stack([x.reshape(-1, PAGE, 2, D) for x in args[1:3]], axis=3).reshape(-1, PAGE, 4, D)  # jax's layout
    with pytest.raises(InputError, match="k_pages"):
        ragged_paged_attention(args[0], old, old, *args[3:], sm_scale=1.0)
