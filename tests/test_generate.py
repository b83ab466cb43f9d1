"""Generation: token-identical to transformers' greedy generate, batching, streaming, compilations, bad input."""

import importlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hf_reference import make_hf_model, save_hf

import qwen2_jax
from qwen2_jax.errors import InputError
from qwen2_jax.inference.generate import GenerationConfig, generate, generate_stream

gen = importlib.import_module("qwen2_jax.inference.generate")

SHARED_CONFIGS = os.path.join(os.path.dirname(__file__), "..", "qwen2_jax", "configs")  # embedded copies of shared/configs

# Random configurations: all-sparse GQA; mixed dense/sparse layers with normalised top-k; multi-query attention
# with a head_dim that is not hidden / heads and tied embeddings.
CONFIGS = {
    "sparse": dict(eos_token_id=71),
    "mixed": dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=True,
                  num_experts=6, num_experts_per_tok=3),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24, tie_word_embeddings=True,
                rope_theta=10000.0),
}


def varied_hf_model(seed, **overrides):
    """A random HF model whose weights are wide enough that greedy text does not collapse into one repeated
    token after a few steps (HF's std 0.02 init does), so 64 tokens really exercise the cache."""
    model = make_hf_model(seed, **overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight") or "embed_tokens" in name or "lm_head" in name:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: (hf_model, our_model)} for each configuration, float32."""
    out = {}
    for i, (name, overrides) in enumerate(CONFIGS.items()):
        hf = varied_hf_model(i, **overrides)
        path = save_hf(hf, tmp_path_factory.mktemp(name))
        out[name] = hf, qwen2_jax.from_pretrained(path, dtype="float32")
    return out


def prompts_of(lengths, seed=0, vocab=128):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def left_padded(prompts):
    t = max(map(len, prompts))
    ids, mask = np.zeros((len(prompts), t), np.int64), np.zeros((len(prompts), t), np.int64)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):], mask[i, t - len(p):] = p, 1
    return ids, mask


def hf_generate(hf, prompts, max_new_tokens, **kwargs):
    """transformers' greedy generate on the left-padded batch; each row's new tokens, cut after its end token."""
    ids, mask = left_padded(prompts)
    eos = kwargs.pop("eos_token_id", None)
    with torch.no_grad():
        out = hf.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=max_new_tokens,
                          do_sample=False, eos_token_id=eos, pad_token_id=0, **kwargs)
    rows = out[:, ids.shape[1]:].tolist()
    if eos is not None:
        rows = [r[:r.index(eos) + 1] if eos in r else r for r in rows]
    return rows


def first_difference_report(hf, prompt, ours, ref):
    """Where our greedy tokens leave HF's: the step and HF's logit gap between the two choices there."""
    step = next(i for i, (a, b) in enumerate(zip(ours, ref)) if a != b)
    with torch.no_grad():
        logits = hf(torch.as_tensor([prompt + ref[:step]])).logits[0, -1]
    return (f"first difference at step {step}: ours {ours[step]}, HF {ref[step]}, HF logit gap "
            f"{float(logits[ref[step]] - logits[ours[step]]):.3g}")


# Most tests use batches of <= 4 prompts of <= 16 tokens and 48..112 new tokens: batch bucket 4, prompt bucket 16,
# cache 128, so that they share compilations (each costs seconds on XLA:CPU).
@pytest.mark.parametrize("name,repetition_penalty", [("sparse", 1.0), ("mixed", 1.0), ("mqa", 1.3)])
def test_greedy_generation_is_token_identical_to_transformers_for_64_tokens(models, name, repetition_penalty):
    hf, model = models[name]
    prompts = prompts_of([7, 16, 1, 12], seed=len(name))
    ours = generate(model, prompts, max_new_tokens=64, repetition_penalty=repetition_penalty, eos_token_ids=())
    ref = hf_generate(hf, prompts, 64, repetition_penalty=repetition_penalty, min_new_tokens=64)
    for prompt, a, b in zip(prompts, ours, ref):
        assert len(a) == 64
        assert a == b, first_difference_report(hf, prompt, a, b)


def test_each_row_stops_after_its_end_token_and_the_others_go_on(models):
    hf, model = models["sparse"]
    prompts = prompts_of([5, 11, 8], seed=3)
    free = generate(model, prompts, max_new_tokens=48, eos_token_ids=())
    eos = free[0][5]  # a token the first row produces, so at least that row ends early
    ours = generate(model, prompts, max_new_tokens=48, eos_token_ids=[eos])
    # as transformers: the end token is the row's last (HF pads after it), and every row keeps its own tokens
    for row, unstopped in zip(ours, free):
        assert row == (unstopped[:unstopped.index(eos) + 1] if eos in unstopped else unstopped)
    assert ours[0][-1] == eos and len(ours[0]) <= 6


def test_a_batch_of_different_lengths_gives_each_prompt_its_result_alone(models):
    _, model = models["sparse"]
    prompts = prompts_of([3, 16, 9, 1], seed=11)
    batch = generate(model, prompts, max_new_tokens=64, eos_token_ids=())
    assert batch == [generate(model, [p], max_new_tokens=64, eos_token_ids=())[0] for p in prompts]


SAMPLED = dict(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.1)


@pytest.mark.parametrize("sampling", [dict(), SAMPLED | dict(seed=4)])
@pytest.mark.parametrize("steps_per_yield", [1, 5])
def test_streaming_yields_the_same_tokens_as_the_while_loop(models, sampling, steps_per_yield):
    _, model = models["sparse"]
    prompts = prompts_of([6, 13, 2], seed=2)
    eos = generate(model, prompts, max_new_tokens=50, eos_token_ids=(), **sampling)[1][12]
    whole = generate(model, prompts, max_new_tokens=50, eos_token_ids=[eos], **sampling)
    chunks = list(generate_stream(model, prompts, max_new_tokens=50, eos_token_ids=[eos],
                                  steps_per_yield=steps_per_yield, **sampling))
    assert [sum((c[i] for c in chunks), []) for i in range(3)] == whole
    assert whole[1][-1] == eos and len(whole[1]) <= 13
    assert all(len(c[i]) <= steps_per_yield for c in chunks[1:] for i in range(3))
    assert [len(c) for c in chunks[0]] == [1, 1, 1]  # the first yield is the prefill's token: time to first token


def test_a_seeded_sampling_run_is_reproducible_and_the_seed_matters(models):
    _, model = models["sparse"]
    prompts = prompts_of([6, 13, 2], seed=2)
    kw = SAMPLED | dict(max_new_tokens=50, eos_token_ids=())
    first = generate(model, prompts, seed=123, **kw)
    assert generate(model, prompts, seed=123, **kw) == first
    assert generate(model, prompts, seed=124, **kw) != first
    # a row's tokens depend on its own seed, not on its neighbours: row i uses seed + i, or seed[i]
    assert generate(model, prompts[1:2], seed=[124], **kw)[0] == first[1]


def test_compilations_are_bounded_by_the_length_buckets(models):
    _, model = models["sparse"]
    gen.TRACES.clear()
    for n in [1, 2, 3, 5, 8, 11, 15, 16, 17, 20, 24, 29, 31, 32, 33, 40, 47, 50, 64]:
        generate(model, prompts_of([n], seed=n), max_new_tokens=50, eos_token_ids=())
    # prompt buckets 16, 32, 64 -> at most one prefill each; all fit a 128-slot cache -> at most one decode loop
    # (fewer when an earlier test compiled them already)
    assert gen.TRACES["prefill"] <= 3 and gen.TRACES["decode"] <= 1
    seen = gen.TRACES.copy()
    # other max_new_tokens in the same cache bucket, sampling values and seeds reuse them
    for n, max_new, t, seed in [(5, 50, 0.5, 0), (9, 60, 0.8, 1), (14, 100, 1.2, 2)]:
        generate(model, prompts_of([n]), max_new_tokens=max_new, seed=seed, temperature=0.0, repetition_penalty=t)
    for n, t, p, seed in [(5, 0.5, 0.9, 0), (9, 0.8, 0.95, 1), (14, 1.2, 0.5, 2)]:
        generate(model, prompts_of([n]), max_new_tokens=40, seed=seed, top_k=20, temperature=t, top_p=p,
                 repetition_penalty=1.1)
    assert gen.TRACES["prefill"] <= seen["prefill"] + 2 and gen.TRACES["decode"] <= seen["decode"] + 2


def test_the_decode_loop_updates_the_cache_in_place(models):
    _, model = models["sparse"]
    batch = gen._prepare(model, prompts_of([5]), max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
                         repetition_penalty=1.0, seed=0, eos_token_ids=(), truncate=False)
    state = gen._start(batch)
    after = gen._run(batch, state, 8)
    assert all(a.is_deleted() for a in state.cache.k + state.cache.v)  # donated: XLA wrote into its buffers
    assert int(after.step) == 8 and int(after.cache.index) == 16 + 7


def test_prompts_longer_than_a_chunk_give_the_tokens_of_one_pass_from_one_compiled_chunk_step(models):
    _, model = models["sparse"]
    prompts = prompts_of([70, 33, 5], seed=11)
    whole = generate(model, prompts, max_new_tokens=12, eos_token_ids=())
    seen = dict(gen.TRACES)
    assert generate(model, prompts, max_new_tokens=12, eos_token_ids=(), prefill_chunk=64) == whole  # 16 a row
    assert gen.TRACES["prefill_chunk"] == seen.get("prefill_chunk", 0) + 1
    longer = prompts_of([100, 9, 50], seed=12)  # more chunks, the same batch and cache buckets: the same step
    assert (generate(model, longer, max_new_tokens=12, eos_token_ids=(), prefill_chunk=64)
            == generate(model, longer, max_new_tokens=12, eos_token_ids=()))
    assert gen.TRACES["prefill_chunk"] == seen.get("prefill_chunk", 0) + 1


def test_chunked_prefill_counts_prompt_tokens_for_the_repetition_penalty(models):
    _, model = models["sparse"]
    prompts = prompts_of([90, 40], seed=13)
    kw = dict(max_new_tokens=10, eos_token_ids=(), repetition_penalty=1.5)
    assert generate(model, prompts, prefill_chunk=32, **kw) == generate(model, prompts, **kw)


def test_end_tokens_default_to_the_generation_config_then_config_json(models):
    _, model = models["sparse"]
    assert gen.default_eos_token_ids(model) == model.config.eos_token_id == (71,)  # from config.json
    prompts = prompts_of([5, 9], seed=3)
    assert (generate(model, prompts, max_new_tokens=64)
            == generate(model, prompts, max_new_tokens=64, eos_token_ids=model.config.eos_token_id))
    model.generation_config = GenerationConfig(eos_token_id=(5, 6))  # as from_pretrained may attach it
    try:
        assert gen.default_eos_token_ids(model) == (5, 6)
    finally:
        vars(model).pop("generation_config")


def test_generation_config_json_supplies_end_tokens_and_sampling_defaults(tmp_path):
    path = os.path.join(SHARED_CONFIGS, "qwen2-57b-a14b-instruct.generation_config.json")
    (tmp_path / "generation_config.json").write_text(open(path).read())
    cfg = GenerationConfig.from_pretrained(tmp_path)
    assert cfg.eos_token_id == (151645, 151643) and cfg.pad_token_id == 151643
    assert (cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty) == (True, 0.7, 20, 0.8, 1.05)
    assert GenerationConfig.from_pretrained(tmp_path / "nowhere") is None
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 7}')
    assert GenerationConfig.from_pretrained(tmp_path) == GenerationConfig(eos_token_id=(7,))


def test_a_prompt_too_long_for_the_context_is_refused_unless_truncation_is_asked(models):
    _, model = models["sparse"]  # max_position_embeddings 256
    long = prompts_of([250], seed=9)[0]
    with pytest.raises(ValueError, match="prompt 0 has 250 tokens; with max_new_tokens 10 it exceeds the context "
                                         "of 256 tokens") as e:
        generate(model, [long], max_new_tokens=10)
    assert "\n" not in str(e.value)
    assert (generate(model, [long], max_new_tokens=10, truncate=True, eos_token_ids=())
            == generate(model, [long[-246:]], max_new_tokens=10, eos_token_ids=()))


@pytest.mark.parametrize("prompts,kwargs,message", [
    ([], {}, "prompts is empty"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ("hello", {}, "got a string"),
    ([1, 2, 3], {}, "got a flat list of ints"),
    ([[1, 128]], {}, r"prompt 0 has token id 128 outside \[0, 128\)"),
    ([[1, -1]], {}, r"prompt 0 has token id -1 outside"),
    ([[1]], dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
    ([[1]], dict(max_new_tokens=256), "max_new_tokens 256 leaves no room for a prompt"),
    ([[1]], dict(temperature=-1.0), "temperature must be >= 0"),
    ([[1]], dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    ([[1]], dict(top_p=1.01), r"top_p must be in \(0, 1\]"),
    ([[1]], dict(top_k=-3), "top_k must be an integer >= 0"),
    ([[1], [2]], dict(seed=[1]), "seed must be an int or a list of 2 ints"),
    ([[1]], dict(seed=1.5), "seed must be an int or a list of 1 ints"),
    (None, {}, r"prompts must be a list of prompts \(each a list of token ids\), got NoneType"),
    (5, {}, "got int"),
    ([[1]], dict(eos_token_ids=[2**40]), r"eos_token_ids must be token ids in \[0, 128\)"),
    ([[1]], dict(eos_token_ids=["x"]), r"eos_token_ids must be token ids in \[0, 128\) \(vocab_size\), got \['x'\]"),
    ([[1]], dict(eos_token_ids=128), r"eos_token_ids must be token ids in \[0, 128\)"),
    ([[1]], dict(prefill_chunk=0), "prefill_chunk must be an integer >= 1, got 0"),
])
def test_bad_input_is_a_one_line_input_error(models, prompts, kwargs, message):
    _, model = models["sparse"]
    with pytest.raises(InputError, match=message) as e:
        generate(model, prompts, **({"max_new_tokens": 4} | kwargs))
    assert "\n" not in str(e.value)


def test_bfloat16_generation_keeps_a_bfloat16_cache_and_starts_as_float32_does(models, tmp_path):
    hf, model = models["sparse"]
    bf16 = qwen2_jax.from_pretrained(save_hf(hf, tmp_path), dtype="bfloat16")
    prompts = prompts_of([7, 16, 1, 12], seed=6)
    batch = gen._prepare(bf16, prompts, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
                         repetition_penalty=1.0, seed=0, eos_token_ids=(), truncate=False)
    assert {str(a.dtype) for a in gen._start(batch).cache.k} == {"bfloat16"}
    # bf16 rounding changes later tokens of a random model, but not the first choices of these prompts
    first = lambda m: [row[:2] for row in generate(m, prompts, max_new_tokens=64, eos_token_ids=())]
    assert first(bf16) == first(model)


def test_the_public_api_is_exported_from_the_package():
    assert qwen2_jax.generate is generate and qwen2_jax.generate_stream is generate_stream
    assert callable(qwen2_jax.load_tokenizer)


@pytest.mark.slow
def test_generation_under_a_device_mesh_gives_the_same_tokens(models, tmp_path):
    """Two-by-two mesh of four XLA:CPU devices (data and expert parallel), in a fresh process."""
    hf, _ = models["sparse"]
    path = save_hf(hf, tmp_path / "ckpt")
    script = textwrap.dedent(f"""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import json, qwen2_jax
        from qwen2_jax.sharding import make_mesh
        prompts = {json.dumps(prompts_of([5, 17, 9]))}
        kw = dict(max_new_tokens=12, eos_token_ids=())
        alone = qwen2_jax.from_pretrained({str(path)!r}, dtype="float32")
        sharded = qwen2_jax.from_pretrained({str(path)!r}, dtype="float32", mesh=make_mesh("data=2,expert=2"))
        import importlib
        gen = importlib.import_module("qwen2_jax.inference.generate")
        batch = gen._prepare(sharded, prompts, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=0,
                             eos_token_ids=(), truncate=False, max_new_tokens=12)
        assert not gen._start(batch).cache.k[0].sharding.is_fully_replicated
        assert qwen2_jax.generate(sharded, prompts, **kw) == qwen2_jax.generate(alone, prompts, **kw)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_a_grown_cache_keeps_its_slots_and_adds_empty_ones():
    import dataclasses

    import jax.numpy as jnp
    from qwen2_jax.model.cache import KVCache
    from qwen2_jax.model.config import Qwen2MoeConfig

    cfg = Qwen2MoeConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, num_experts=4, num_experts_per_tok=2)
    cache = KVCache.create(cfg, 2, 3)
    cache = cache.update(1, jnp.ones((2, 1, 3, cfg.head_dim)), 2 * jnp.ones((2, 1, cfg.head_dim, 3)))
    cache = dataclasses.replace(cache, valid=cache.valid.at[:, 1:].set(True), index=jnp.int32(3))
    grown = cache.grow(8)
    assert grown.max_len == 8 and int(grown.index) == 3
    for layer in range(2):  # keys [B, Hkv, S, D], values [B, Hkv, D, S]
        np.testing.assert_array_equal(np.asarray(grown.k[layer][:, :, :3]), np.asarray(cache.k[layer]))
        np.testing.assert_array_equal(np.asarray(grown.v[layer][..., :3]), np.asarray(cache.v[layer]))
        assert not np.asarray(grown.k[layer][:, :, 3:]).any() and not np.asarray(grown.v[layer][..., 3:]).any()
    assert np.asarray(grown.v[1][..., :3]).min() == 2 and not np.asarray(grown.valid[:, 3:]).any()
    np.testing.assert_array_equal(np.asarray(grown.valid[:, :3]), np.asarray(cache.valid))
    with pytest.raises(ValueError, match="cannot shrink a KV cache of 3 slots to 2"):
        cache.grow(2)


def test_new_weights_are_used_after_an_update_not_the_cached_expert_views(tmp_path):
    """Generation on XLA:CPU keeps per-expert views of a model's experts; after the weights change (a training
    step, ``nnx.update``), it must generate from the new ones."""
    import jax
    from flax import nnx

    from qwen2_jax.model.config import Qwen2MoeConfig
    from qwen2_jax.model import init_random

    cfg = Qwen2MoeConfig(vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=8, num_experts_per_tok=2)
    model, other = init_random(cfg, seed=0), init_random(cfg, seed=1)
    prompt = [[3, 14, 15, 92, 65]]
    first = generate(model, prompt, max_new_tokens=12, eos_token_ids=())
    from qwen2_jax.model import views

    assert views.expert_views(model) is views.expert_views(model) is not None  # cached for this model
    nnx.update(model, jax.tree.map(lambda a: a.copy(), nnx.state(other)))
    assert generate(model, prompt, max_new_tokens=12, eos_token_ids=()) == generate(
        other, prompt, max_new_tokens=12, eos_token_ids=()) != first
