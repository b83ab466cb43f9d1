"""Past the original 32,768 positions with static YaRN (factor 2, as the model card configures it): a
40,000-token prompt's logits and greedy continuation equal transformers' (SDPA, float32, no padding), through
generate's chunked prefill and its decode over the long cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen2_jax
from hf_reference import make_hf_model, save_hf
from qwen2_jax.model.cache import KVCache

N, COMPARED, NEW = 40_000, 8_000, 8  # prompt length, last positions compared, greedy tokens
YARN = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0, "original_max_position_embeddings": 32768}


@pytest.fixture(scope="module")
def long_case(tmp_path_factory):
    import torch

    torch.set_num_threads(2)
    hf = make_hf_model(seed=1, num_hidden_layers=2, max_position_embeddings=32768, rope_parameters=YARN)
    directory = save_hf(hf, tmp_path_factory.mktemp("yarn"))
    ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, (1, N))
    with torch.no_grad():  # no mask and no padding: transformers takes SDPA's memory-efficient path
        out = hf(torch.as_tensor(ids), use_cache=True)
        logits, cache = out.logits[0, -COMPARED:].float().numpy(), out.past_key_values
        tokens, token = [], out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(NEW):  # transformers' greedy decoding over its cache
            tokens.append(int(token))
            step = hf(token, past_key_values=cache, use_cache=True)
            cache, token = step.past_key_values, step.logits[:, -1].argmax(-1, keepdim=True)
    del hf
    return directory, ids, logits, tokens


@pytest.mark.slow
def test_logits_past_the_original_context_equal_transformers_through_the_chunked_prefill(long_case):
    directory, ids, ref, _ = long_case
    model = qwen2_jax.from_pretrained(directory, dtype="float32")
    assert model.config.context_length == 65536  # 32,768 x 2, though config.json keeps 32,768
    chunk = 2048
    step = jax.jit(lambda ids, cache: (lambda out: (out.logits, out.cache))(model.forward(ids, cache=cache)))
    cache = KVCache.create(model.config, 1, -(-N // chunk) * chunk)
    parts = []
    for start in range(0, N, chunk):  # as generate's prefill takes a long prompt
        part = ids[:, start:start + chunk]
        logits, cache = step(jnp.asarray(np.pad(part, ((0, 0), (0, chunk - part.shape[1])))), cache)
        cache = dataclasses.replace(cache, index=jnp.int32(start + part.shape[1]))  # (the last chunk is padded)
        parts.append(np.asarray(logits[0, :part.shape[1]]))
    ours = np.concatenate(parts)[-COMPARED:]
    # Measured 5.8e-7 of the largest logit over these positions (one pass, 2026-12-02); a YaRN frequency or
    # attention-factor error past 32,768 positions moves the logits by orders of magnitude more.
    assert np.abs(ours - ref).max() <= 2e-6 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.slow
def test_greedy_continuation_of_a_40000_token_prompt_equals_transformers(long_case):
    directory, ids, _, tokens = long_case
    model = qwen2_jax.from_pretrained(directory, dtype="float32")
    assert qwen2_jax.generate(model, ids.tolist(), max_new_tokens=NEW, eos_token_ids=()) == [tokens]


def test_a_prompt_beyond_the_context_is_refused_in_one_line_naming_both_lengths(tmp_path):
    from qwen2_jax.model import init_random

    cfg = qwen2_jax.Qwen2MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                   max_position_embeddings=64, rope_type="yarn", rope_factor=2.0,
                                   original_max_position_embeddings=64)
    model = init_random(cfg)
    with pytest.raises(ValueError, match="prompt 0 has 200 tokens; with max_new_tokens 1 it exceeds the context of "
                                         "128 tokens") as e:
        qwen2_jax.generate(model, [[1] * 200], max_new_tokens=1)
    assert "\n" not in str(e.value)
    assert len(qwen2_jax.generate(model, [[1] * 120], max_new_tokens=4, eos_token_ids=())[0]) == 4  # past 64
