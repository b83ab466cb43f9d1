"""Every MoE dispatch implementation computes the same function as the dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2_jax.model import moe


def _inputs(tokens, experts=8, top_k=3, hidden=16, inner=8, seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (tokens, hidden), dtype)
    probs = jax.nn.softmax(jax.random.normal(k[1], (tokens, experts)) * 3)
    weights, idx = jax.lax.top_k(probs, top_k)
    w = [jax.random.normal(k[i], s, dtype) * 0.3 for i, s in
         zip((2, 3), ((experts, 2, inner, hidden), (experts, hidden, inner)))]  # gate_up_proj, down_proj: [out, in]
    return x, weights.astype(dtype), idx, *w


def _reference(x, weights, idx, gate_up, down):
    """HF's ``Qwen2MoeExperts`` token by token in float64 numpy: ``gate_up[e, 0]`` is expert e's gate_proj,
    ``gate_up[e, 1]`` its up_proj, each ``[out, in]``."""
    x, weights, gate_up, down = (np.asarray(a, np.float64) for a in (x, weights, gate_up, down))
    out = np.zeros_like(x)
    for t, k in np.ndindex(*idx.shape):
        e = int(idx[t, k])
        gate, up = gate_up[e, 0] @ x[t], gate_up[e, 1] @ x[t]
        out[t] += weights[t, k] * (down[e] @ (gate / (1 + np.exp(-gate)) * up))
    return out


def _per_expert(*stacks):
    """Stacked expert weights as per-expert arrays, as generation gives them on XLA:CPU."""
    return [tuple(w[e] for e in range(w.shape[0])) for w in stacks]


@pytest.mark.parametrize("impl", ["gather", "loop", "grouped", "ragged"])
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_implementation_equals_dense_reference(impl, tokens):
    args = _inputs(tokens)
    ref = moe.dispatch(*args, impl="dense")
    out = jax.jit(lambda *a: moe.dispatch(*a, impl=impl))(*args)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_dense_reference_is_hfs_experts_with_gate_then_up_on_the_stacked_axis():
    args = _inputs(6)
    np.testing.assert_allclose(np.asarray(moe.dense(*args)), _reference(*args), rtol=1e-5, atol=1e-5)


def test_loop_skips_unused_experts_but_counts_repeated_ones():
    x, weights, _, gu, d = _inputs(4, experts=8, top_k=2)
    idx = jnp.array([[3, 5], [3, 5], [5, 3], [3, 5]], jnp.int32)  # only experts 3 and 5 are used
    np.testing.assert_allclose(np.asarray(moe.loop(x, weights, idx, gu, d)),
                               np.asarray(moe.dense(x, weights, idx, gu, d)), rtol=1e-5, atol=1e-6)


def test_bfloat16_dispatch_stays_close_to_float32():
    args32 = _inputs(16)
    args16 = [a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a for a in args32]
    ref = np.asarray(moe.dispatch(*args32, impl="dense"))
    for impl in moe.IMPLEMENTATIONS:
        out = moe.dispatch(*args16, impl=impl)
        assert out.dtype == jnp.bfloat16
        assert np.abs(np.asarray(out, np.float32) - ref).max() <= 0.05 * np.abs(ref).max(), impl


def test_auto_choice_by_platform_and_token_count():
    assert moe.choose(1, 8, 64, "cpu") == "loop"
    assert moe.choose(8, 8, 64, "cpu") == "loop"
    assert moe.choose(16, 8, 64, "cpu") == "grouped"
    assert moe.choose(512, 8, 64, "cpu") == "grouped"
    assert moe.choose(1, 8, 64, "gpu") == moe.choose(7, 8, 64, "cuda") == "gather"  # fewer pairs than experts
    assert moe.choose(8, 8, 64, "gpu") == moe.choose(2048, 8, 64, "gpu") == "dense"
    assert moe.choose(1, 8, 64, "tpu") == "loop"
    assert moe.choose(64, 8, 64, "tpu") == "dense"
    assert moe.choose(2048, 8, 64, "tpu") == "ragged"
    assert moe.choose(1, 8, 64, "cpu", per_expert=True) == "loop"
    assert moe.choose(8, 8, 64, "cpu", per_expert=True) == "grouped"
    assert moe.group_block(8, 8, 64) == 8 and moe.group_block(8, 8, 64, minimum=2) == 2
    assert moe.group_block(512, 8, 64, minimum=2) == 64


@pytest.mark.parametrize("block", [1, 4, 32])
def test_grouped_blocks_of_any_size_equal_dense(block):
    args = _inputs(13)
    np.testing.assert_allclose(np.asarray(moe.grouped(*args, block=block)),
                               np.asarray(moe.dense(*args)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block,step", [(8, 2), (16, 4), (12, 3), (8, 8)])
def test_grouped_last_blocks_cut_to_a_multiple_of_step_equal_dense(block, step):
    # 40 tokens x 3 over 8 experts: experts of every size class, some with a full block and a partial one.
    args = _inputs(40, seed=1)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda *a: moe.grouped(*a, block=block, step=step))(*args)),
                               np.asarray(moe.dense(*args)), rtol=1e-5, atol=1e-5)
    per_expert = _per_expert(*args[3:])
    np.testing.assert_allclose(np.asarray(moe.grouped(*args[:3], *per_expert, block=block, step=step)),
                               np.asarray(moe.dense(*args)), rtol=1e-5, atol=1e-5)


def test_grouped_step_must_divide_the_block():
    with pytest.raises(ValueError, match="step 3 does not divide block 8"):
        moe.grouped(*_inputs(4), block=8, step=3)


def test_group_step_is_half_a_block_from_32_rows_on():
    assert [moe.group_step(b) for b in (2, 8, 16, 32, 64, 128)] == [2, 8, 16, 16, 32, 64]


def test_grouped_skips_out_of_range_experts_like_the_others():
    x, weights, idx, gu, d = _inputs(6, experts=8, top_k=2)
    idx = idx.at[0, 1].set(8).at[3, 0].set(-1)  # an expert on another shard (see sharding.expert_parallel)
    for block, step in ((None, None), (4, 2)):
        np.testing.assert_allclose(np.asarray(moe.grouped(x, weights, idx, gu, d, block=block, step=step)),
                                   np.asarray(moe.dense(x, weights, idx, gu, d)), rtol=1e-5, atol=1e-6)


def test_grouped_gradient_is_dense_gradient():
    x, weights, idx, gu, d = _inputs(9)
    loss = lambda impl: lambda *a: jnp.sum(moe.dispatch(a[0], a[1], idx, *a[2:], impl=impl) ** 2)
    want = jax.grad(loss("dense"), argnums=range(4))(x, weights, gu, d)
    got = jax.jit(jax.grad(loss("grouped"), argnums=range(4)))(x, weights, gu, d)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_auto_runs_the_choice_for_the_platform_it_is_given(monkeypatch):
    chosen = []
    for name, fn in list(moe._IMPLS.items()):
        monkeypatch.setitem(moe._IMPLS, name, lambda *a, name=name, fn=fn: chosen.append(name) or fn(*a))
    args = _inputs(1, experts=64, top_k=8)
    for platform, want in (("gpu", "gather"), ("tpu", "loop"), ("cpu", "loop")):
        moe.dispatch(*args, platform=platform)
        assert chosen[-1] == want, platform


def test_platform_of_arrays_and_abstract_arrays_is_where_they_are_placed():
    x = jnp.zeros(3)
    assert moe.platform_of({"w": x}) == "cpu"
    spec = jax.ShapeDtypeStruct((3,), jnp.float32, sharding=x.sharding)
    assert moe.platform_of([spec]) == "cpu"
    assert moe.canonical_platform("cuda") == moe.canonical_platform("rocm") == "gpu"


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="unknown MoE implementation 'fast'"):
        moe.dispatch(*_inputs(2), impl="fast")


@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_per_expert_arrays_equal_the_stacked_weights(impl, tokens):
    x, weights, idx, gu, d = _inputs(tokens)
    per_expert = _per_expert(gu, d)
    want = moe.dispatch(x, weights, idx, gu, d, impl="dense")
    got = jax.jit(lambda x, pe: moe.dispatch(x, weights, idx, *pe, impl=impl))(x, per_expert)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert moe.dispatch(x, weights, idx, *per_expert).shape == x.shape  # auto picks loop or grouped


def test_per_expert_arrays_are_refused_by_the_stacked_only_implementations():
    x, weights, idx, gu, d = _inputs(2)
    per_expert = _per_expert(gu, d)
    with pytest.raises(ValueError, match="'gather' takes stacked expert weights"):
        moe.dispatch(x, weights, idx, *per_expert, impl="gather")
    with pytest.raises(ValueError, match="unknown MoE implementation 'fast'"):
        moe.dispatch(x, weights, idx, *per_expert, impl="fast")


def _all_eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs inside it (calls, loops, switch branches)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for inner in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(inner, jax.extend.core.ClosedJaxpr):
                    yield from _all_eqns(inner.jaxpr)
                elif isinstance(inner, jax.extend.core.Jaxpr):
                    yield from _all_eqns(inner)


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_per_expert_switch_branches_share_one_traced_swiglu(impl):
    """Each of the switch's per-expert branches calls the same traced SwiGLU: tracing a step does the expert's
    work once per switch, not once per expert (the engine traces all of its steps at start-up)."""
    x, weights, idx, gu, d = _inputs(5)
    jaxpr = jax.make_jaxpr(lambda x, pe: moe.dispatch(x, weights, idx, *pe, impl=impl))(x, _per_expert(gu, d))

    (branches,) = [e.params["branches"] for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "cond"]
    assert len(branches) == gu.shape[0]
    assert all(len(b.jaxpr.eqns) == 1 for b in branches)  # a branch is one call ...
    assert len({id(b.jaxpr.eqns[0].params["jaxpr"]) for b in branches}) == 1  # ... of the same traced function


def _through_calls(jaxpr):
    """``jaxpr``'s equations, each jitted call's replaced by the equations of the function it calls."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "jit":
            yield from _through_calls(eqn.params["jaxpr"].jaxpr)
        else:
            yield eqn


def test_per_expert_dispatch_is_traced_once_for_all_layers_of_one_shape():
    """Per-expert dispatch is a jitted call, so layers whose views have the same shapes share one traced loop:
    tracing a step does the MoE's work once, not once per layer (the engine traces all of its steps at start-up)."""
    x, weights, idx, gu, d = _inputs(5)
    first, second = _per_expert(gu, d), _per_expert(gu + 1, d)
    jaxpr = jax.make_jaxpr(lambda x, a, b: moe.dispatch(moe.dispatch(x, weights, idx, *a, impl="grouped"),
                                                         weights, idx, *b, impl="grouped"))(x, first, second)
    calls = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "jit"]
    assert len(calls) == 2 and calls[0].params["jaxpr"] is calls[1].params["jaxpr"]


def test_per_expert_blocks_hold_at_least_four_rows():
    """Over per-expert views a decode batch's blocks have at least ``PER_EXPERT_MIN_BLOCK`` (4) rows, though 16
    tokens give each of 64 experts 2 pairs on average: most used experts are then read once, not twice."""
    x, weights, idx, gu, d = _inputs(16, experts=64, top_k=8)
    jaxpr = jax.make_jaxpr(lambda x, pe: moe.dispatch(x, weights, idx, *pe, impl="grouped"))(x, _per_expert(gu, d))
    (loop,) = [e for e in _through_calls(jaxpr.jaxpr) if e.primitive.name == "while"]
    (blocks,) = [v.aval.shape for v in loop.outvars if v.aval.ndim == 3]  # [blocks, rows, hidden]
    assert moe.PER_EXPERT_MIN_BLOCK == 4 and blocks[1:] == (4, x.shape[1])
    stacked = jax.make_jaxpr(lambda x: moe.grouped(x, weights, idx, gu, d))(x)  # stacked: copies, 8 rows
    (loop,) = [e for e in stacked.jaxpr.eqns if e.primitive.name == "while"]
    assert [v.aval.shape[1] for v in loop.outvars if v.aval.ndim == 3] == [8]



@pytest.mark.parametrize("per_expert", [False, True])
@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_an_experts_few_rows_are_multiplied_weight_first_on_xla_cpu_only(platform, impl, per_expert):
    """Expert weights are HF's ``[out, in]``, gate and up one weight. On XLA:CPU the loop and the grouped blocks multiply them weight
    first (``matmul.product``: the matmul library then repacks the few rows, not the weight); a TPU step keeps
    the rows first. The result is the dense reference either way."""
    x, weights, idx, gu, d = args = _inputs(5, experts=8, top_k=3, hidden=24, inner=12)
    experts = _per_expert(gu, d) if per_expert else (gu, d)
    fn = lambda x, *e: moe.dispatch(x, weights, idx, *e, impl=impl, platform=platform)
    jaxpr = jax.make_jaxpr(fn)(x, *experts)
    weight_shapes = {(2 * 12, 24), (24, 12)}  # [out, in] of gate_up_proj (gate and up, one weight) and of down_proj
    dots = [tuple(tuple(v.aval.shape) for v in e.invars) for e in _all_eqns(jaxpr.jaxpr)
            if e.primitive.name == "dot_general"]
    with_weight = [(lhs in weight_shapes, rhs in weight_shapes) for lhs, rhs in dots if {lhs, rhs} & weight_shapes]
    assert set(with_weight) == ({(True, False)} if platform == "cpu" else {(False, True)})
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(x, *experts)), np.asarray(moe.dense(*args)),
                               rtol=1e-5, atol=1e-5)


def test_ragged_on_tpu_runs_megablox_on_the_out_in_experts_as_stored_and_equals_dense():
    """On TPU ``ragged`` multiplies through megablox's grouped matmul, reading the ``[out, in]`` experts as stored
    (``transpose_rhs``; XLA:TPU's ``ragged_dot`` copied them); elsewhere, or where its 128-tiles do not divide the
    shapes, ``ragged_dot_general``. The kernel runs here in Pallas' interpreter, with and without pairs of other
    shards (ids past the last expert, weight 0), which must add nothing."""
    x, weights, idx, gu, d = _inputs(32, experts=8, top_k=4, hidden=128, inner=256)
    kinds = lambda platform, *a: {e.primitive.name for e in _all_eqns(
        jax.make_jaxpr(lambda *a: moe.ragged(*a, platform))(*a).jaxpr)}
    assert "pallas_call" in kinds("tpu", x, weights, idx, gu, d)
    assert "ragged_dot_general" not in kinds("tpu", x, weights, idx, gu, d)
    assert "ragged_dot_general" in kinds("cpu", x, weights, idx, gu, d)
    assert "pallas_call" not in kinds("tpu", *_inputs(32, experts=8, top_k=4, hidden=96, inner=256))  # 96: no tiles
    elsewhere = idx >= 6
    for w, i in ((weights, idx), (jnp.where(elsewhere, 0, weights), jnp.where(elsewhere, 8, idx))):
        ref = moe.dense(x, w, jnp.where(i == 8, 0, i), gu, d)
        out = moe.ragged(x, w, i, gu, d, "tpu", interpret=True)  # float32 sums in another order: 1e-6 of the scale
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6 * np.abs(ref).max())
