"""Choosing the next token, with Hugging Face ``generate``'s semantics.

The logits go through the processors in the order transformers 5 builds them (``_get_logits_processor``):
repetition penalty (greedy or not), then, only when sampling, temperature, top-k and top-p; then the argmax
(greedy) or a draw from the softmax. Filtered-out tokens get ``-inf`` as in transformers.

What the processors do is static (``Sampler``: a few booleans and ``top_k``, so a jitted loop compiles once per
combination); their values (temperature, top-p, penalty) are arrays, one per row, so changing them does not
recompile. Each row draws with its own PRNG key folded with the step number, so a row's tokens depend only on
its seed and its logits, never on the rest of the batch.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from qwen2_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Which processors run (hashable: a static argument of the jitted loop)."""

    do_sample: bool = False  # False: greedy (argmax), as HF's do_sample=False
    top_k: int = 0  # 0: off
    top_p: bool = False  # whether top-p filtering runs (the value is an array)
    repetition_penalty: bool = False  # whether the penalty runs (the value is an array)

    @classmethod
    def create(cls, *, temperature: float, top_k: int, top_p: float, repetition_penalty: float) -> "Sampler":
        do_sample = temperature > 0
        return cls(do_sample=do_sample, top_k=int(top_k) if do_sample else 0,
                   top_p=do_sample and top_p < 1.0, repetition_penalty=repetition_penalty != 1.0)


def check_sampling_args(*, temperature, top_k, top_p, repetition_penalty) -> None:
    """InputError with a one-line message for values transformers would also refuse, and for values that are
    not finite numbers (an infinite temperature or penalty turns every score into nan)."""
    t, k, p, r = (_finite(v) for v in (temperature, top_k, top_p, repetition_penalty))
    if t is None or t < 0:
        raise InputError(f"temperature must be >= 0 and finite (0 means greedy), got {temperature!r}")
    if k is None or not k.is_integer() or k < 0:
        raise InputError(f"top_k must be an integer >= 0 (0 means off), got {top_k!r}")
    if p is None or not 0 < p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
    if r is None or r <= 0:
        raise InputError(f"repetition_penalty must be > 0 and finite (1 means off), got {repetition_penalty!r}")


def _finite(value) -> float | None:
    """``value`` as a finite float, or None for anything else (a string, a bool, inf, nan)."""
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


# ---- the processors (logits [B, V] float32; per-row values [B]) --------------------------------------------
def apply_repetition_penalty(logits, seen, penalty):
    """HF's ``RepetitionPenaltyLogitsProcessor``: for tokens already seen (prompt and generated),
    ``score < 0 ? score * penalty : score / penalty``."""
    p = penalty[:, None]
    return jnp.where(seen, jnp.where(logits < 0, logits * p, logits / p), logits)


def apply_temperature(logits, temperature):
    return logits / temperature[:, None]


def nucleus_mask(scores, top_p, log_total):
    """HF's ``TopPLogitsWarper`` rule on scores sorted in DESCENDING order [B, K]: a token is kept while the
    probability of the tokens above it is < top_p (HF: dropped while its ascending cumulative probability is
    <= 1 - top_p); the best is always kept. ``log_total``: log of the softmax normaliser over all tokens."""
    probs = jnp.exp(scores - log_total[:, None])
    above = jnp.cumsum(probs, axis=-1) - probs
    return above < top_p[:, None]


def _ordered(x):
    """float32 -> int32 with the same order (for bisection over float values)."""
    i = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(i < 0, i ^ 0x7FFFFFFF, i)


def _from_ordered(i):
    return jax.lax.bitcast_convert_type(jnp.where(i < 0, i ^ 0x7FFFFFFF, i), jnp.float32)


def nucleus_threshold(logits, top_p):
    """The smallest score HF's top-p keeps, per row, over the whole vocabulary without sorting it (a sort of
    the 151,936 scores takes ~100 ms on XLA:CPU): bisection over float32 values for the smallest t whose
    "probability strictly above t" is < top_p. 32 masked sums instead of a sort; exact, ties included."""
    log_total = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    probs = jnp.exp(logits - log_total)

    def body(_, bounds):  # invariant: the answer is in [lo, hi]
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without int32 overflow
        above = jnp.sum(jnp.where(logits > _from_ordered(mid)[:, None], probs, 0), axis=-1)
        ok = above < top_p
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo = _ordered(jnp.min(logits, axis=-1))
    hi = _ordered(jnp.max(logits, axis=-1))
    _, hi = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return _from_ordered(hi)


def candidates(sampler: Sampler, logits, *, seen, temperature, top_p, repetition_penalty):
    """The processed scores the next token is drawn from, in HF's order: ``(scores [B, K], ids [B, K])`` where
    filtered-out tokens score -inf; ``ids`` is None when ``scores`` covers the whole vocabulary in order.

    With top-k only the k best survive, so they are all that is kept (top-p then runs on them: the others carry
    no probability); HF keeps every token tied with the k-th score, this keeps exactly k (ties of float scores
    aside, the same). Without top-k, top-p thresholds the whole vocabulary (``nucleus_threshold``)."""
    logits = logits.astype(jnp.float32)
    if sampler.repetition_penalty:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if not sampler.do_sample:
        return logits, None
    logits = apply_temperature(logits, temperature)
    if sampler.top_k:
        scores, ids = jax.lax.top_k(logits, min(sampler.top_k, logits.shape[-1]))
        if sampler.top_p:
            keep = nucleus_mask(scores, top_p, jax.nn.logsumexp(scores, axis=-1))
            scores = jnp.where(keep, scores, -jnp.inf)
        return scores, ids
    if sampler.top_p:
        logits = jnp.where(logits < nucleus_threshold(logits, top_p)[:, None], -jnp.inf, logits)
    return logits, None


def choose(sampler: Sampler, scores, ids, keys, step):
    """The next token per row: argmax, or a draw with the row's key folded with ``step``."""
    if not sampler.do_sample:
        return jax.lax.top_k(scores, 1)[1][:, 0].astype(jnp.int32)  # the first maximum, as argmax; faster on XLA:CPU
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
    choice = jax.vmap(jax.random.categorical)(step_keys, scores)
    if ids is not None:
        choice = jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
    return choice.astype(jnp.int32)


def full_vocab(scores, ids, vocab_size: int):
    """``candidates``' scores as a [B, V] array (-inf where not a candidate), e.g. to compare with HF."""
    if ids is None:
        return scores
    rows = jnp.arange(scores.shape[0])[:, None]
    return jnp.full((scores.shape[0], vocab_size), -jnp.inf, scores.dtype).at[rows, ids].set(scores)


def row_keys(seeds) -> jax.Array:
    """One PRNG key per row from integer seeds ``[B]``."""
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
