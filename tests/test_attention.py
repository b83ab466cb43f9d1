"""Blockwise (online-softmax) attention equals the whole softmax, with left padding and causal masks built per
block, and its memory does not grow with the cache beyond one block of scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2_jax.model.attention import attention


def _reference(q, k, v, valid, start):
    """Softmax over every slot with an explicit [T, S] mask (what attention avoids building), in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, hq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    q = q.reshape(b, t, hkv, hq // hkv, d)
    scores = np.einsum("btkgd,bksd->bkgts", q, k) / np.sqrt(d)
    mask = np.asarray(valid)[:, None, :] & (np.arange(s)[None, None, :] <= (start + np.arange(t))[None, :, None])
    scores = np.where(mask[:, None, None], scores, -np.inf)
    peak = scores.max(-1, keepdims=True)
    probs = np.exp(scores - np.where(np.isfinite(peak), peak, 0))
    total = probs.sum(-1, keepdims=True)
    probs = probs / np.where(total > 0, total, 1)
    return np.einsum("bkgts,bkds->btkgd", probs, v).reshape(b, t, hq, d)


def _inputs(t, s, start, seed=0, hq=6, hkv=2, d=8, pad=(0, 3)):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((len(pad), t, hq, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((len(pad), hkv, s, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((len(pad), hkv, d, s)), jnp.float32)
    valid = np.zeros((len(pad), s), bool)
    for row, p in enumerate(pad):  # left padding: the first p slots of a row hold no token
        valid[row, p:start + t] = True
    return q, k, v, jnp.asarray(valid)


@pytest.mark.parametrize("t, s, start, block", [(1, 40, 20, 8), (1, 64, 10, 8), (5, 40, 35, 8), (16, 64, 0, 16),
                                                (7, 30, 10, 8), (12, 48, 36, 64), (40, 64, 8, 16), (20, 60, 30, 16)])
def test_blockwise_attention_equals_the_whole_softmax(t, s, start, block):
    q, k, v, valid = _inputs(t, s, start)
    want = _reference(q, k, v, valid, start)
    for upto in (None, jnp.int32(start + t)):  # every block, or only the filled ones
        got = jax.jit(lambda *a: attention(*a, block=block, upto=upto))(q, k, v, valid, jnp.int32(start))
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("block", [4, 64])  # key blocks, or all the slots at once
def test_packed_segments_attend_only_to_themselves(block):
    q, k, v, valid = _inputs(24, 24, 0, pad=(0,))
    cuts = [0, 5, 6, 17, 24]  # segments of 5, 1, 11 and 7 tokens
    segments = np.concatenate([np.full(b - a, i) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))])[None]
    got = np.asarray(attention(q, k, v, valid, 0, block=block, segments=(jnp.asarray(segments), jnp.asarray(segments))))
    for a, b in zip(cuts, cuts[1:]):
        want = _reference(q[:, a:b], k[:, :, a:b], v[:, :, :, a:b], valid[:, a:b], 0)
        np.testing.assert_allclose(got[:, a:b], want, rtol=2e-6, atol=2e-6)


def test_a_query_that_sees_no_key_outputs_zeros():
    q, k, v, valid = _inputs(4, 16, 0, pad=(0, 3))  # row 1's first three queries are padding
    for block in (4, 64):
        out = np.asarray(attention(q, k, v, valid, 0, block=block))
        assert not out[1, :3].any() and np.abs(out[1, 3:]).min() > 0 and np.abs(out[0]).min() > 0


@pytest.mark.parametrize("t, start", [(3, 10), (1, 10), (1, 30)])  # a prompt's blocks; a decode step's either path
def test_bfloat16_cache_is_attended_in_float32_scores(t, start):
    q, k, v, valid = _inputs(t, 32, start)
    want = _reference(q, k, v, valid, start)
    bf16 = lambda a: a.astype(jnp.bfloat16)
    for upto in (None, jnp.int32(start + t)):
        got = jax.jit(lambda *a: attention(*a, block=8, upto=upto))(bf16(q), bf16(k), bf16(v), valid, jnp.int32(start))
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2)


def test_blockwise_memory_holds_one_block_of_scores_not_the_whole_cache():
    """Compiled for 2,048 queries over 65,536 slots: the temporaries are about one [T, block] score array a
    head, not the [T, S] one (2,048 x 65,536 x 4 heads x 4 bytes = 2 GiB)."""
    b, t, s, hq, hkv, d = 1, 2048, 65536, 4, 1, 16
    args = (jax.ShapeDtypeStruct((b, t, hq, d), jnp.float32), jax.ShapeDtypeStruct((b, hkv, s, d), jnp.float32),
            jax.ShapeDtypeStruct((b, hkv, d, s), jnp.float32), jax.ShapeDtypeStruct((b, s), jnp.bool_),
            jax.ShapeDtypeStruct((), jnp.int32))
    temp = jax.jit(attention).lower(*args).compile().memory_analysis().temp_size_in_bytes
    one_block = t * 1024 * hq * 4
    assert temp < 4 * one_block + 2 * b * t * hq * d * 4, temp


def test_gradient_flows_through_the_blockwise_loop():
    q, k, v, valid = _inputs(6, 24, 0)
    loss = lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, valid, 0, block=8)))
    want = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, valid, 0, block=64))), (0, 1, 2))(q, k, v)
    for a, b in zip(jax.grad(loss, (0, 1, 2))(q, k, v), want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
