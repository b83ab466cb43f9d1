"""Structure and numerics of the model that parity alone does not pin."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen2_jax.model.cache import KVCache
from qwen2_jax.model.config import Qwen2MoeConfig
from qwen2_jax.model.matmul import WEIGHT_FIRST_MAX_ROWS, product
from qwen2_jax.model import init_random
from qwen2_jax.model.modeling import RMSNorm, abstract_model

TINY = Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                      shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2)


def test_every_layer_owns_its_weights_in_hugging_faces_layout():
    cfg = TINY.replace(num_hidden_layers=5, mlp_only_layers=(1, 3))
    layers = nnx.state(abstract_model(cfg))["model"]["layers"]
    assert sorted(layers) == [0, 1, 2, 3, 4]
    assert layers[0]["self_attn"]["q_proj"]["weight"].shape == (32, 32)  # [out, in], as HF's nn.Linear
    assert layers[0]["self_attn"]["k_proj"]["weight"].shape == (16, 32)
    assert layers[0]["mlp"]["gate"]["weight"].shape == (4, 32)
    assert layers[0]["mlp"]["experts"]["gate_up_proj"].shape == (4, 2, 16, 32)  # [E, 2, out, in]: gate and up stacked
    assert layers[0]["mlp"]["experts"]["down_proj"].shape == (4, 32, 16)
    assert layers[1]["mlp"]["gate_proj"]["weight"].shape == (48, 32)  # a dense (mlp_only) layer


def test_rmsnorm_normalises_in_float32_for_bfloat16_input():
    norm = RMSNorm(8, 1e-6, param_dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8)) * 300, jnp.bfloat16)
    ref = np.asarray(x, np.float32)
    ref = ref / np.sqrt((ref ** 2).mean(-1, keepdims=True) + 1e-6)
    out = norm(x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=1e-2)


def test_logits_are_float32_for_bfloat16_weights():
    model = init_random(TINY, dtype=jnp.bfloat16)
    logits = model(jnp.zeros((1, 4), jnp.int32))
    assert logits.dtype == jnp.float32 and logits.shape == (1, 4, 64)


def test_cached_forward_equals_full_forward():
    model = init_random(TINY.replace(num_hidden_layers=3, decoder_sparse_step=2), seed=1)
    ids = jax.random.randint(jax.random.key(0), (2, 9), 0, 64)
    full = model(ids)
    cache = KVCache.create(model.config, 2, 16)
    out = model.forward(ids[:, :5], cache=cache)
    logits = [out.logits]
    for t in range(5, 9):
        out = model.forward(ids[:, t:t + 1], cache=out.cache)
        logits.append(out.logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(logits, 1)), np.asarray(full), rtol=1e-5, atol=1e-5)
    assert int(out.cache.index) == 9


def test_prompts_packed_in_one_row_give_each_its_own_logits_and_keys():
    """segment_ids: three prompts in one row (and padding) attend only to themselves; logits_at picks each one's
    last token; the cache holds each prompt's keys at its tokens' slots, as a forward of that prompt alone."""
    model = init_random(TINY, seed=2)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 64, n) for n in (5, 1, 7)]
    ids = np.zeros((1, 16), np.int32)
    segments, positions = np.full((1, 16), -1, np.int32), np.zeros((1, 16), np.int32)
    ends, at = [], 0
    for i, p in enumerate(prompts):
        ids[0, at:at + len(p)], segments[0, at:at + len(p)], positions[0, at:at + len(p)] = p, i, np.arange(len(p))
        at += len(p)
        ends.append(at - 1)
    for cache in (None, KVCache.create(model.config, 1, 16)):
        out = model.forward(jnp.asarray(ids), jnp.asarray(segments >= 0), positions=jnp.asarray(positions),
                            cache=cache, segment_ids=jnp.asarray(segments), logits_at=jnp.asarray([ends]))
        assert out.logits.shape == (1, 3, 64)
        start = 0
        for i, p in enumerate(prompts):
            alone = model.forward(jnp.asarray(p[None]), cache=KVCache.create(model.config, 1, len(p)))
            np.testing.assert_allclose(np.asarray(out.logits[0, i]), np.asarray(alone.logits[0, -1]),
                                       rtol=1e-5, atol=1e-5)
            if cache is not None:
                for packed, own in zip(out.cache.k, alone.cache.k):
                    np.testing.assert_allclose(np.asarray(packed[0, :, start:start + len(p)]), np.asarray(own[0]),
                                               rtol=1e-5, atol=1e-5)
            start += len(p)


def test_random_models_have_unit_norm_scales_and_a_random_lm_head():
    from qwen2_jax.model.config import Qwen2MoeConfig
    from qwen2_jax.model import init_random

    cfg = Qwen2MoeConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                         shared_expert_intermediate_size=8)
    model = init_random(cfg, dtype=jnp.float32)
    assert np.all(np.asarray(model.model.norm.weight[...]) == 1)
    assert np.all(np.asarray(model.model.layers[0].input_layernorm.weight[...]) == 1)
    lm_head = np.asarray(model.lm_head.weight[...])
    assert lm_head.shape == (64, 16) and 0.01 < lm_head.std() < 0.03


def _dot_operands(fn, *args):
    """The shapes of the operands of each dot in ``fn``'s jaxpr, in order, and whether it holds a barrier."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    dots = [tuple(v.aval.shape for v in e.invars) for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    return dots, any(e.primitive.name == "optimization_barrier" for e in jaxpr.eqns)


def test_on_xla_cpu_a_few_rows_are_multiplied_weight_first_and_many_rows_or_other_backends_weight_last():
    """XLA:CPU multiplies up to 64 rows fastest with the weight as the left operand (the barrier keeps XLA from
    swapping them back); more rows, or a GPU or TPU step, keep the weight on the right. Either way the product is
    ``x @ w.T``."""
    w = jax.random.normal(jax.random.key(0), (48, 32), jnp.float32)  # [out, in]
    for rows, platform, weight_first in ((1, "cpu", True), (64, "cpu", True), (65, "cpu", False),
                                         (16, "gpu", False), (16, "tpu", False)):
        x = jax.random.normal(jax.random.key(rows), (1, rows, 32), jnp.float32)
        fn = lambda x, w: product(x, w, jnp.float32, platform)
        dots, barrier = _dot_operands(fn, x, w)
        assert dots == ([((48, 32), (rows, 32))] if weight_first else [((1, rows, 32), (48, 32))]), (rows, platform)
        assert barrier == weight_first
        np.testing.assert_allclose(fn(x, w), np.einsum("bri,oi->bro", x, w), rtol=1e-5, atol=1e-5)
    assert WEIGHT_FIRST_MAX_ROWS == 64
