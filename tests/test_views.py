"""Per-expert views of a layer's expert stacks on XLA:CPU share the stack's memory and keep it alive."""

import gc
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax.model import views
from qwen2_jax.model.config import Qwen2MoeConfig
from qwen2_jax.model import init_random


def test_slices_of_an_aligned_stack_share_its_buffer_and_hold_its_values():
    stack = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 16)), jnp.float32)  # rows of 256 bytes
    assert views.can_alias(stack)
    rows = views.slices(stack)
    row_bytes = 4 * 16 * 4
    assert [r.unsafe_buffer_pointer() - stack.unsafe_buffer_pointer() for r in rows] == [0, row_bytes, 2 * row_bytes]
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(np.asarray(r), np.asarray(stack[i]))
    assert float(jax.jit(lambda a: a.sum())(rows[2])) == float(stack[2].sum())


def test_a_view_keeps_the_stack_alive_after_the_stack_is_dropped():
    stack = jnp.arange(2 * 64, dtype=jnp.float32).reshape(2, 64)
    want = np.asarray(stack[1]).copy()
    row = views.slices(stack)[1]
    del stack
    gc.collect()
    _ = [jnp.full((2, 64), -1.0) for _ in range(8)]  # allocations that would reuse a freed buffer
    np.testing.assert_array_equal(np.asarray(row), want)


def test_unaligned_rows_are_copies_with_the_same_values():
    stack = jnp.arange(15, dtype=jnp.float32).reshape(3, 5)  # 20-byte rows
    assert not views.can_alias(stack)
    rows = views.slices(stack)
    assert [np.asarray(r).tolist() for r in rows] == np.asarray(stack).tolist()


def test_expert_views_alias_each_layers_experts_and_give_the_same_forward():
    cfg = Qwen2MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         shared_expert_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, mlp_only_layers=(1,))
    model = init_random(cfg, dtype=jnp.float32)
    per_layer = views.expert_views(model)
    assert per_layer[1] is None  # a dense layer has no experts
    gate_up = model.model.layers[2].mlp.experts.gate_up_proj[...]  # [8, 2, 16, 32]
    np.testing.assert_array_equal(np.asarray(per_layer[2][0][3]), np.asarray(gate_up[3]))
    assert per_layer[2][0][3].unsafe_buffer_pointer() - gate_up.unsafe_buffer_pointer() == 3 * 2 * 16 * 32 * 4
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 6)), jnp.int32)
    want = model.forward(ids).logits
    for impl in ("loop", "grouped"):
        got = jax.jit(lambda ids, v: model.forward(ids, moe_impl=impl, expert_views=v).logits)(ids, per_layer)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_no_expert_views_for_weights_in_another_dtype_than_the_compute_dtype():
    cfg = Qwen2MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                         shared_expert_intermediate_size=16)
    from flax import nnx

    from qwen2_jax.model.modeling import Qwen2MoeForCausalLM

    mixed = Qwen2MoeForCausalLM(cfg, dtype=jnp.float32, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert views.expert_views(mixed) is None  # the dispatch casts the stacks instead


def test_views_are_released_before_the_interpreter_shuts_down():
    # A view's release takes the GIL from an XLA thread; left to interpreter shutdown it aborted the process
    # now and then (a 512-token expert dispatch on views). The exit handler deletes the views still held and
    # waits until every release has run. In a subprocess: it deletes every view of the process.
    script = textwrap.dedent("""
        import sys
        import jax.numpy as jnp
        from qwen2_jax.model import views

        held = views.slices(jnp.ones((4, 16), jnp.float32))
        dropped = views.slices(jnp.ones((4, 16), jnp.float32))
        del dropped
        assert len(views._LIVE) >= 1
        views._release_before_exit()
        assert all(v.is_deleted() for v in held) and len(views._LIVE) == 0, len(views._LIVE)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
