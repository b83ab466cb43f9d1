"""Logits of this port equal transformers' Qwen2MoeForCausalLM (PyTorch, CPU, float32) on the same random weights,
on every configuration branch the real checkpoint and its variants use."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import qwen2_jax
from hf_reference import hf_logits, make_hf_model, save_hf

# name -> (HF config overrides, config.json rewrite for the 4.x schema or None, save options)
CONFIGS = {
    "default_topk2": ({}, None, {}),
    "norm_topk_prob": ({"norm_topk_prob": True, "num_experts_per_tok": 3}, None, {}),
    "top1": ({"num_experts_per_tok": 1}, None, {}),
    "mha_ratio1": ({"num_attention_heads": 4, "num_key_value_heads": 4}, None, {}),
    "gqa_ratio7": ({"hidden_size": 56, "num_attention_heads": 7, "num_key_value_heads": 1, "head_dim": 8}, None, {}),
    "mlp_only_layers": ({"mlp_only_layers": [0, 2]}, None, {}),
    "sparse_step2": ({"decoder_sparse_step": 2, "num_hidden_layers": 4}, None, {}),
    "tied_embeddings": ({"tie_word_embeddings": True}, None, {}),
    "no_qkv_bias": ({"qkv_bias": False}, None, {}),
    "yarn": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0,
                                  "original_max_position_embeddings": 32}}, None, {}),
    "hf4_schema_yarn": (
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0,
                             "original_max_position_embeddings": 32}},
        {"rope_parameters": None, "layer_types": None, "qkv_bias": None, "rope_theta": 1e6,
         "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
         "transformers_version": "4.40.1"},
        {}),
    "sharded_files": ({}, None, {"max_shard_size": "40KB"}),
}

SEQ = 48  # beyond YaRN's 32 original positions


def _batch(vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(3, SEQ))
    mask = np.ones((3, SEQ), np.int64)
    mask[1, 30:] = 0  # right padding
    mask[2, :9] = 0  # left padding
    return ids, mask


def _max_rel_diff(ours, ref, mask):
    valid = mask.astype(bool)
    return float(np.abs(ours - ref)[valid].max() / np.abs(ref[valid]).max())


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    overrides, rewrite, save_opts = CONFIGS[request.param]
    hf = make_hf_model(seed=len(request.param), **overrides)
    directory = save_hf(hf, tmp_path_factory.mktemp(request.param), config_overrides=rewrite, **save_opts)
    return request.param, hf, directory


def test_float32_logits_match_transformers_on_padded_batches(case):
    name, hf, directory = case
    ids, mask = _batch(hf.config.vocab_size)
    ref = hf_logits(hf, ids, mask)
    model = qwen2_jax.from_pretrained(directory, dtype="float32")
    ours = np.asarray(jax.jit(model.__call__)(jnp.asarray(ids), jnp.asarray(mask)))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert _max_rel_diff(ours, ref, mask) <= 1e-4, name


def test_router_probabilities_and_chosen_experts_match_hf_router_logits(tmp_path):
    import torch

    hf = make_hf_model(seed=3, num_experts_per_tok=3)
    model = qwen2_jax.from_pretrained(save_hf(hf, tmp_path), dtype="float32")
    ids, mask = _batch(hf.config.vocab_size, seed=1)
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_router_logits=True).router_logits
    out = model.forward(jnp.asarray(ids), jnp.asarray(mask), output_router_logits=True)
    assert out.router_logits.shape[0] == len(ref)
    valid = mask.reshape(-1).astype(bool)  # padding positions attend to nothing; their routing is arbitrary
    for layer in range(len(ref)):
        ref_probs = torch.softmax(ref[layer].float(), -1).numpy()[valid]
        probs = np.asarray(jax.nn.softmax(out.router_logits[layer], -1))[valid]
        np.testing.assert_allclose(probs, ref_probs, atol=1e-5)
        k = hf.config.num_experts_per_tok
        assert (np.sort(np.argsort(-probs, -1)[:, :k], -1) == np.sort(np.argsort(-ref_probs, -1)[:, :k], -1)).all()


def test_bfloat16_top1_agrees_with_hf_float32(tmp_path):
    hf = make_hf_model(seed=5)
    model = qwen2_jax.from_pretrained(save_hf(hf, tmp_path), dtype="bfloat16")
    ids, mask = _batch(hf.config.vocab_size, seed=2)
    ref = hf_logits(hf, ids, mask)
    ours = np.asarray(jax.jit(model.__call__)(jnp.asarray(ids), jnp.asarray(mask)))
    assert ours.dtype == np.float32  # logits are float32 whatever the weights
    valid = mask.astype(bool)
    agreement = (ours.argmax(-1) == ref.argmax(-1))[valid].mean()
    assert agreement >= 0.9, agreement
    assert all(getattr(leaf, "dtype", jnp.bfloat16) == jnp.bfloat16
               for leaf in jax.tree.leaves(__import__("flax").nnx.state(model)))
