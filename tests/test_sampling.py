"""Sampling: the distribution the next token is drawn from equals transformers' logits processors'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from qwen2_jax.inference import sampling
from qwen2_jax.inference.sampling import Sampler

candidates = jax.jit(sampling.candidates, static_argnums=0)


def distinct_logits(batch, vocab, seed):
    """Random float32 scores with no ties (ties are where HF's result depends on its sort order)."""
    rng = np.random.default_rng(seed)
    logits = np.stack([rng.permutation(vocab) for _ in range(batch)]).astype(np.float32) / vocab * 16 - 8
    return logits + rng.uniform(0, 0.5 / vocab, logits.shape).astype(np.float32)


def hf_probs(logits, history, *, temperature, top_k, top_p, repetition_penalty):
    """The processors transformers' generate builds for these values (its order), then softmax."""
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    scores = processors(torch.as_tensor(history), torch.as_tensor(logits))
    return torch.softmax(scores, dim=-1).numpy()


def our_probs(logits, history, *, temperature, top_k, top_p, repetition_penalty):
    b, v = logits.shape
    seen = np.zeros((b, v), bool)
    np.put_along_axis(seen, history, True, axis=1)
    rows = lambda x: jnp.full((b,), x, jnp.float32)
    sampler = Sampler.create(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    scores, ids = candidates(sampler, jnp.asarray(logits), seen=jnp.asarray(seen), temperature=rows(temperature),
                                      top_p=rows(top_p), repetition_penalty=rows(repetition_penalty))
    return np.asarray(jax.nn.softmax(sampling.full_vocab(scores, ids, v), axis=-1))


SETTINGS = [  # (temperature, top_k, top_p, repetition_penalty)
    (1.0, 0, 1.0, 1.3),
    (0.7, 0, 1.0, 1.0),
    (1.0, 50, 1.0, 1.0),
    (1.0, 0, 0.9, 1.0),
    (0.7, 20, 0.8, 1.05),  # Qwen2-Instruct's generation config
    (1.5, 0, 0.5, 0.8),
    (0.3, 300, 0.95, 1.2),
    (1.0, 5000, 1.0, 1.0),  # top_k larger than the vocabulary
    (2.0, 0, 0.05, 1.0),  # only the best token survives
]


@pytest.mark.parametrize("temperature,top_k,top_p,repetition_penalty", SETTINGS)
def test_sampling_distribution_equals_transformers_logits_processors(temperature, top_k, top_p, repetition_penalty):
    logits = distinct_logits(3, 1000, seed=top_k + int(100 * top_p))
    history = np.random.default_rng(1).integers(0, 1000, (3, 40))
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    ours, ref = our_probs(logits, history, **kw), hf_probs(logits, history, **kw)
    np.testing.assert_array_equal(ours > 0, ref > 0)  # the same tokens survive the filters
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)


def test_top_p_over_the_real_vocabulary_keeps_the_same_tokens_as_transformers():
    logits = distinct_logits(2, 151936, seed=5)
    history = np.zeros((2, 1), np.int64)
    for top_p in (0.1, 0.5, 0.9, 0.99):
        kw = dict(temperature=0.5, top_k=0, top_p=top_p, repetition_penalty=1.0)
        ours, ref = our_probs(logits, history, **kw), hf_probs(logits, history, **kw)
        np.testing.assert_array_equal(ours > 0, ref > 0)
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-9)


def test_greedy_takes_the_best_score_after_the_repetition_penalty():
    logits = np.array([[2.0, 1.9, -1.0, 0.5]], np.float32)
    seen = jnp.array([[True, False, False, False]])
    sampler = Sampler.create(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.1)
    scores, ids = candidates(sampler, jnp.asarray(logits), seen=seen, temperature=jnp.ones(1),
                                      top_p=jnp.ones(1), repetition_penalty=jnp.full((1,), 1.1))
    token = sampling.choose(sampler, scores, ids, sampling.row_keys([0]), 0)
    assert int(token[0]) == 1  # 2.0 / 1.1 < 1.9


def test_greedy_picks_the_first_of_tied_best_scores_as_argmax_does():
    scores = jnp.zeros((2, 151936)).at[:, 7].set(1.0).at[:, 90000].set(1.0)
    token = sampling.choose(Sampler(), scores, None, sampling.row_keys([0, 1]), 0)
    assert token.tolist() == [7, 7]


def draw(sampler, logits, seeds, steps, **values):
    b = logits.shape[0]
    rows = lambda x: jnp.full((b,), x, jnp.float32)
    scores, ids = candidates(sampler, jnp.asarray(logits), seen=jnp.zeros(logits.shape, bool),
                                      temperature=rows(values.get("temperature", 1.0)),
                                      top_p=rows(values.get("top_p", 1.0)), repetition_penalty=rows(1.0))
    keys = sampling.row_keys(seeds)
    pick = jax.jit(jax.vmap(lambda step: sampling.choose(sampler, scores, ids, keys, step)))
    return np.asarray(pick(jnp.arange(steps)))  # [steps, B]


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.7), (4, 0.9)])
def test_draws_follow_the_processed_distribution(top_k, top_p):
    logits = np.log(np.array([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]], np.float32))
    sampler = Sampler.create(temperature=1.0, top_k=top_k, top_p=top_p, repetition_penalty=1.0)
    tokens = draw(sampler, logits, [123], 8000, top_p=top_p)[:, 0]
    expected = our_probs(logits, np.zeros((1, 1), np.int64), temperature=1.0, top_k=top_k, top_p=top_p,
                         repetition_penalty=1.0)[0]
    frequency = np.bincount(tokens, minlength=6) / len(tokens)
    np.testing.assert_array_equal(frequency > 0, expected > 0)
    np.testing.assert_allclose(frequency, expected, atol=0.02)  # ~4 standard errors at 8000 draws


def test_a_rows_draws_depend_only_on_its_seed_and_logits_not_on_the_batch():
    logits = distinct_logits(3, 500, seed=0)
    sampler = Sampler.create(temperature=1.0, top_k=40, top_p=0.9, repetition_penalty=1.0)
    batch = draw(sampler, logits, [11, 22, 33], 20, top_p=0.9)
    alone = draw(sampler, logits[1:2], [22], 20, top_p=0.9)
    np.testing.assert_array_equal(batch[:, 1], alone[:, 0])
    assert not np.array_equal(batch[:, 0], batch[:, 2])


def test_a_seed_reproduces_its_draws_and_another_seed_does_not():
    logits = distinct_logits(1, 500, seed=0)
    sampler = Sampler.create(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    first, again, other = (draw(sampler, logits, [s], 30) for s in (5, 5, 6))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_nucleus_threshold_is_the_smallest_score_top_p_keeps():
    logits = jnp.asarray(distinct_logits(4, 20000, seed=3)) * 0.5
    top_p = jnp.array([0.05, 0.3, 0.8, 0.95])
    threshold = np.asarray(jax.jit(sampling.nucleus_threshold)(logits, top_p))
    for row, p, t in zip(np.asarray(logits, np.float64), np.asarray(top_p), threshold):
        ordered = np.sort(row)[::-1]
        probs = np.exp(ordered - ordered.max())
        probs /= probs.sum()
        kept = ordered[np.cumsum(probs) - probs < p]
        assert (row >= t).sum() == len(kept)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_k=2.5), "top_k must be an integer >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
])
def test_sampling_values_transformers_refuses_are_refused_in_one_line(kwargs, message):
    values = dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0) | kwargs
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")) as e:
        sampling.check_sampling_args(**values)
    assert "\n" not in str(e.value)
