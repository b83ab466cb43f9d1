"""Routed-expert dispatch: one interface, several implementations that compute the same function.

    y[t] = sum_k weights[t, k] * down(silu(x[t] @ gate_proj[e]) * (x[t] @ up_proj[e])),   e = experts[t, k]

with expert weights stacked as ``gate_proj, up_proj: [E, H, I]`` and ``down_proj: [E, I, H]``.

- ``dense``:  every token through every expert, then weighted; the reference (reads all E experts).
- ``gather``: each token gathers its own top-k experts' weights; best when tokens x k is small (decode).
- ``loop``:   a while-loop over the distinct experts the tokens chose, each applied to all tokens and
              masked; reads each used expert once (XLA:CPU, small and medium token counts).
- ``ragged``: (token, expert) pairs sorted by expert and a grouped matmul (``jax.lax.ragged_dot``); the
              accelerator path for many tokens. On XLA:CPU ragged_dot lowers to a dense dot over all
              experts, so it is not chosen there.

``auto`` picks by backend and token count from the measurements in docs/moe-dispatch.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("dense", "gather", "loop", "ragged")


def choose(num_tokens: int, top_k: int, num_experts: int, backend: str | None = None) -> str:
    """The implementation ``auto`` runs for this static token count (see docs/moe-dispatch.md)."""
    backend = backend or jax.default_backend()
    pairs = num_tokens * top_k
    if backend == "cpu":
        # XLA:CPU: gathering copies each pair's weights, so it wins only while pairs are few; the loop reads
        # each chosen expert once; past a few hundred tokens every expert is used and dense is cheapest.
        if pairs <= 16:
            return "gather"
        return "loop" if num_tokens <= 256 else "dense"
    # Accelerators: gather for decode-sized batches, grouped matmul otherwise.
    return "gather" if pairs <= 2 * num_experts else "ragged"


def dispatch(x, weights, experts, gate_proj, up_proj, down_proj, impl: str = "auto"):
    """x: [T, H]; weights, experts: [T, K] -> [T, H] in x's dtype."""
    if impl == "auto":
        impl = choose(x.shape[0], experts.shape[1], gate_proj.shape[0])
    try:
        fn = _IMPLS[impl]
    except KeyError:
        raise ValueError(f"unknown MoE implementation {impl!r}; expected 'auto' or one of {IMPLEMENTATIONS}") from None
    return fn(x, weights.astype(x.dtype), experts, gate_proj, up_proj, down_proj)


def _swiglu(x, gate, up):
    return jax.nn.silu(x @ gate) * (x @ up)


def dense(x, weights, experts, gate_proj, up_proj, down_proj):
    num_experts = gate_proj.shape[0]
    # combine[t, e]: the routing weight of expert e for token t (zero where e was not chosen).
    combine = jnp.einsum("tk,tke->te", weights, jax.nn.one_hot(experts, num_experts, dtype=x.dtype))
    h = jax.nn.silu(jnp.einsum("th,ehi->tei", x, gate_proj)) * jnp.einsum("th,ehi->tei", x, up_proj)
    out = jnp.einsum("tei,eih->teh", h, down_proj)
    return jnp.einsum("teh,te->th", out, combine)


def gather(x, weights, experts, gate_proj, up_proj, down_proj):
    g = jnp.take(gate_proj, experts, axis=0)  # [T, K, H, I]
    u = jnp.take(up_proj, experts, axis=0)
    d = jnp.take(down_proj, experts, axis=0)  # [T, K, I, H]
    h = jax.nn.silu(jnp.einsum("th,tkhi->tki", x, g)) * jnp.einsum("th,tkhi->tki", x, u)
    out = jnp.einsum("tki,tkih->tkh", h, d)
    return jnp.einsum("tkh,tk->th", out, weights)


def loop(x, weights, experts, gate_proj, up_proj, down_proj):
    num_experts = gate_proj.shape[0]
    combine = jnp.einsum("tk,tke->te", weights, jax.nn.one_hot(experts, num_experts, dtype=x.dtype))
    used = jnp.any(experts[..., None] == jnp.arange(num_experts), axis=(0, 1))
    # The distinct chosen experts first, in ascending order; the loop stops after the last of them.
    order = jnp.argsort(~used, stable=True)
    count = jnp.sum(used)

    def body(state):
        i, acc = state
        e = order[i]
        out = _swiglu(x, gate_proj[e], up_proj[e]) @ down_proj[e]
        return i + 1, acc + out * combine[:, e, None]

    _, acc = jax.lax.while_loop(lambda s: s[0] < count, body, (jnp.int32(0), jnp.zeros_like(x)))
    return acc


def ragged(x, weights, experts, gate_proj, up_proj, down_proj):
    num_tokens, top_k = experts.shape
    num_experts = gate_proj.shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token_of = order // top_k
    xs = jnp.take(x, token_of, axis=0)  # [T*K, H], grouped by expert
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    h = jax.nn.silu(jax.lax.ragged_dot(xs, gate_proj, group_sizes)) * jax.lax.ragged_dot(xs, up_proj, group_sizes)
    out = jax.lax.ragged_dot(h, down_proj, group_sizes) * jnp.take(weights.reshape(-1), order)[:, None]
    return jnp.zeros_like(x).at[token_of].add(out)


_IMPLS = {"dense": dense, "gather": gather, "loop": loop, "ragged": ragged}
