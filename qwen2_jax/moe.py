"""Routed-expert dispatch: one interface, several implementations that compute the same function.

    y[t] = sum_k weights[t, k] * down(silu(x[t] @ gate_proj[e]) * (x[t] @ up_proj[e])),   e = experts[t, k]

with expert weights stacked as ``gate_proj, up_proj: [E, H, I]`` and ``down_proj: [E, I, H]``, or, for
``loop`` and ``grouped``, given as sequences of E per-expert arrays (``views.slices`` of the stacks): each
expert is then applied by a ``lax.switch`` branch that reads its arguments in place, where XLA:CPU copies a
slice of a stack before multiplying it (the decode loop on XLA:CPU, docs/performance.md).

- ``dense``:  every token through every expert, then weighted; the reference (reads all E experts).
- ``gather``: each token gathers its own top-k experts' weights; best when tokens x k is small (decode).
- ``loop``:   a while-loop over the distinct experts the tokens chose, each applied to all tokens and
              masked; reads each used expert once (XLA:CPU decode).
- ``grouped``: (token, expert) pairs sorted by expert, cut into blocks of one expert each, a while-loop
              over the blocks; computes only the chosen pairs (XLA:CPU prefill, accelerator prefill).
- ``ragged``: the same sorted pairs through ``jax.lax.ragged_dot``. XLA:CPU, and XLA:GPU without a grouped
              GEMM, lower ragged_dot to a dense dot over all experts, so ``auto`` does not choose it.

``auto`` picks by backend and token count from the measurements in docs/moe-dispatch.md. ``loop`` and
``grouped`` have no reverse-mode derivative of their own (a while-loop); ``grouped`` borrows ``dense``'s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("dense", "gather", "loop", "grouped", "ragged")


def choose(num_tokens: int, top_k: int, num_experts: int, backend: str | None = None,
           per_expert: bool = False) -> str:
    """The implementation ``auto`` runs for this static token count (see docs/moe-dispatch.md);
    ``per_expert``: for experts given as per-expert arrays."""
    backend = backend or jax.default_backend()
    if per_expert:
        # XLA:CPU, per-expert views: one token reads its top-k experts once either way; from 2 tokens on, small
        # blocks of the pairs each expert really has beat the loop (which applies each expert to every token):
        # 1.8x for one layer at 8 tokens. Blocks of 2 rows or more: a one-row block compiles a matrix-vector
        # product per expert branch (several times the compile time of a batch-8 step) for no gain in the model.
        return "loop" if num_tokens == 1 else "grouped"
    if backend == "cpu":
        # XLA:CPU, quarter config: the loop is fastest up to 8 tokens (1.3-1.5x the grouped blocks, 3-6x
        # gather, which copies every pair's weights); from 16 tokens on the grouped blocks win (1.4x at 16,
        # 5x at 512 over the loop) and dense, 8x the work, never does.
        return "loop" if num_tokens <= 8 else "grouped"
    # Accelerators (not yet measured, see docs/moe-dispatch.md): gather while the pairs are few; then dense,
    # which reads every expert once, as the batch touches most of them anyway, while a matmul of that many
    # rows is still bound by memory; grouped blocks past that, so that the work stays top_k / E of dense's.
    if num_tokens * top_k <= 16:
        return "gather"
    return "dense" if num_tokens <= 128 else "grouped"


def dispatch(x, weights, experts, gate_proj, up_proj, down_proj, impl: str = "auto", layer=None):
    """x: [T, H]; weights, experts: [T, K] -> [T, H] in x's dtype.

    With ``layer`` (an int32 scalar), the expert weights are the stacks of all sparse layers ``[L, E, ...]``
    and this layer's are used. ``loop``, ``grouped`` and ``gather`` then read each chosen expert straight out
    of the stack; slicing the layer's ``[E, ...]`` block first would make XLA copy all of its experts (the
    block is an operand of a while-loop or of a matmul; see docs/moe-dispatch.md)."""
    per_expert = _per_expert(gate_proj)
    if impl == "auto":
        impl = choose(x.shape[0], experts.shape[1], _num_experts(gate_proj), per_expert=per_expert)
    try:
        fn = _IMPLS[impl]
    except KeyError:
        raise ValueError(f"unknown MoE implementation {impl!r}; expected 'auto' or one of {IMPLEMENTATIONS}") from None
    if per_expert:
        if impl not in ("loop", "grouped"):
            raise ValueError(f"MoE implementation {impl!r} takes stacked expert weights; per-expert arrays go "
                             "to 'loop' or 'grouped'")
        return fn(x, weights.astype(x.dtype), experts, gate_proj, up_proj, down_proj)
    w = (gate_proj, up_proj, down_proj)
    if layer is not None:
        if impl in ("loop", "grouped", "gather"):
            return fn(x, weights.astype(x.dtype), experts, *w, layer=layer)
        w = [a[layer] for a in w]
    if impl == "grouped":
        fn = _grouped_with_dense_gradient
    return fn(x, weights.astype(x.dtype), experts, *w)


def _expert(w, layer, e):
    """Expert ``e``'s matrix from a layer's ``[E, ...]`` weights, or from the stack ``[L, E, ...]`` at ``layer``."""
    return w[e] if layer is None else w[layer, e]


def _per_expert(gate_proj) -> bool:
    return isinstance(gate_proj, (tuple, list))


def _num_experts(gate_proj) -> int:
    return len(gate_proj) if _per_expert(gate_proj) else gate_proj.shape[-3]


def _expert_ffn(gate_proj, up_proj, down_proj, layer):
    """``ffn(x, e)``: expert ``e``'s SwiGLU on the rows ``x``, for a traced expert id ``e``. Stacked weights are
    sliced at ``e``; per-expert arrays are picked by a switch, whose branches multiply them in place."""
    if _per_expert(gate_proj):
        branches = [lambda x, g=g, u=u, d=d: _swiglu(x, g, u) @ d for g, u, d in zip(gate_proj, up_proj, down_proj)]
        return lambda x, e: jax.lax.switch(e, branches, x)
    return lambda x, e: _swiglu(x, _expert(gate_proj, layer, e), _expert(up_proj, layer, e)) @ _expert(down_proj, layer, e)


def _swiglu(x, gate, up):
    return jax.nn.silu(x @ gate) * (x @ up)


def dense(x, weights, experts, gate_proj, up_proj, down_proj):
    num_experts = gate_proj.shape[0]
    # combine[t, e]: the routing weight of expert e for token t (zero where e was not chosen).
    combine = jnp.einsum("tk,tke->te", weights, jax.nn.one_hot(experts, num_experts, dtype=x.dtype))
    h = jax.nn.silu(jnp.einsum("th,ehi->tei", x, gate_proj)) * jnp.einsum("th,ehi->tei", x, up_proj)
    out = jnp.einsum("tei,eih->teh", h, down_proj)
    return jnp.einsum("teh,te->th", out, combine)


def gather(x, weights, experts, gate_proj, up_proj, down_proj, layer=None):
    # With a layer index, one gather from the stack (no slice of the layer's experts for XLA to copy first).
    g, u, d = (w[experts] if layer is None else w[layer, experts] for w in (gate_proj, up_proj, down_proj))
    # g, u: [T, K, H, I]; d: [T, K, I, H]
    h = jax.nn.silu(jnp.einsum("th,tkhi->tki", x, g)) * jnp.einsum("th,tkhi->tki", x, u)
    out = jnp.einsum("tki,tkih->tkh", h, d)
    return jnp.einsum("tkh,tk->th", out, weights)


def loop(x, weights, experts, gate_proj, up_proj, down_proj, layer=None):
    num_experts = _num_experts(gate_proj)
    ffn = _expert_ffn(gate_proj, up_proj, down_proj, layer)
    combine = jnp.einsum("tk,tke->te", weights, jax.nn.one_hot(experts, num_experts, dtype=x.dtype))
    used = jnp.any(experts[..., None] == jnp.arange(num_experts), axis=(0, 1))
    # The distinct chosen experts first, in ascending order; the loop stops after the last of them.
    order = jnp.argsort(~used, stable=True)
    count = jnp.sum(used)

    def body(state):
        i, acc = state
        e = order[i]
        return i + 1, acc + ffn(x, e) * combine[:, e, None]

    _, acc = jax.lax.while_loop(lambda s: s[0] < count, body, (jnp.int32(0), jnp.zeros_like(x)))
    return acc


def grouped(x, weights, experts, gate_proj, up_proj, down_proj, layer=None, block: int | None = None,
            step: int | None = None):
    """(token, expert) pairs sorted by expert and cut into blocks of up to ``block`` rows, each block within
    one expert; a while-loop applies each block's expert to its rows. Only the chosen (token, expert) pairs
    are computed, and each expert is read once per block: the prefill path of XLA:CPU, where ``ragged_dot``
    would compute every expert for every pair.

    An expert's last block is computed on the fewest multiple of ``step`` rows that hold its pairs (a switch
    over the ``block // step`` row counts), so padding stays under ``step`` rows per expert, where a whole
    padded block wastes half a block on average (docs/moe-dispatch.md)."""
    num_tokens, top_k = experts.shape
    num_experts = _num_experts(gate_proj)
    hidden = x.shape[-1]
    ffn = _expert_ffn(gate_proj, up_proj, down_proj, layer)
    pairs = num_tokens * top_k
    block = block or group_block(num_tokens, top_k, num_experts, minimum=2 if _per_expert(gate_proj) else 8)
    step = step or group_step(block)
    if block % step:
        raise ValueError(f"grouped: step {step} does not divide block {block}")
    flat = experts.reshape(-1)
    skipped = (flat < 0) | (flat >= num_experts)  # out-of-range ids (other shards): contribute nothing
    flat = jnp.where(skipped, num_experts, flat)
    order = jnp.argsort(flat, stable=True)  # pairs grouped by expert, skipped ones last
    sizes = jnp.bincount(flat, length=num_experts + 1)[:num_experts]
    blocks = -(-sizes // block)  # per expert
    ends = jnp.cumsum(blocks)
    starts = ends - blocks
    max_blocks = -(-pairs // block) + num_experts  # sum of ceil(size / block) never exceeds it
    # Each pair's slot in the [max_blocks * block] rows: its expert's first block, plus its rank among the
    # expert's pairs. Skipped pairs get the slot past the end, which the gathers below drop or read as zero.
    expert_of_sorted = jnp.minimum(flat[order], num_experts - 1)
    rank = jnp.arange(pairs) - (jnp.cumsum(sizes) - sizes)[expert_of_sorted]
    slot_of_sorted = jnp.where(skipped[order], max_blocks * block, starts[expert_of_sorted] * block + rank)
    slot = jnp.zeros(pairs, jnp.int32).at[order].set(slot_of_sorted)
    token_of_slot = jnp.zeros(max_blocks * block, jnp.int32).at[slot].set(jnp.arange(pairs) // top_k, mode="drop")
    xs = jnp.take(x, token_of_slot, axis=0).reshape(max_blocks, block, hidden)
    j = jnp.arange(max_blocks)
    e = jnp.minimum(jnp.searchsorted(ends, j, side="right"), num_experts - 1)  # each block's expert
    rows = jnp.clip(sizes[e] - (j - starts[e]) * block, 1, block)  # pairs in each block
    row_class = (rows + step - 1) // step - 1  # index into the row counts step, 2 step, ..., block

    def rows_of(m):
        if m == block:
            return ffn
        return lambda xb, e: jnp.pad(ffn(xb[:m], e), ((0, block - m), (0, 0)))

    branches = [rows_of(m) for m in range(step, block + 1, step)]

    def body(i, buf):  # block i's outputs replace its inputs: one buffer, no zero-filled second one
        out = branches[0](buf[i], e[i]) if len(branches) == 1 else jax.lax.switch(row_class[i], branches, buf[i], e[i])
        return jax.lax.dynamic_update_index_in_dim(buf, out, i, 0)

    ys = jax.lax.fori_loop(0, ends[-1], body, xs).reshape(-1, hidden)  # blocks past ends[-1] are never read
    out = jnp.take(ys, slot, axis=0, mode="fill", fill_value=0).reshape(num_tokens, top_k, hidden)
    return jnp.einsum("tkh,tk->th", out, weights)


@jax.custom_vjp
def _grouped_with_dense_gradient(x, weights, experts, gate_proj, up_proj, down_proj):
    """``grouped`` forward, ``dense``'s derivative (the same function) backward: what training gets from ``auto``."""
    return grouped(x, weights, experts, gate_proj, up_proj, down_proj)


def _grouped_fwd(*args):
    return grouped(*args), args


def _grouped_bwd(args, cotangent):
    return jax.vjp(dense, *args)[1](cotangent)


_grouped_with_dense_gradient.defvjp(_grouped_fwd, _grouped_bwd)


def group_block(num_tokens: int, top_k: int, num_experts: int, minimum: int = 8) -> int:
    """Rows per block for ``grouped``: the mean pairs per expert rounded down to a power of two, in
    [minimum, 128]. Each block reads its expert's weights: with stacked weights XLA:CPU copies them per block, so
    blocks stay at 8 rows or more (at 512 tokens, 32 to 128 rows ran alike, 16 rows 1.3x and 8 rows 1.7x
    slower); per-expert arrays are read in place and blocks as small as the mean win (docs/moe-dispatch.md)."""
    mean = num_tokens * top_k // num_experts
    return int(min(128, max(minimum, 1 << max(mean, 1).bit_length() - 1)))


def group_step(block: int) -> int:
    """Row granularity of an expert's last ``grouped`` block: half a block from blocks of 32 rows on, else the
    whole block. On XLA:CPU an expert's first block costs about the same from 16 to 48 rows (reading its weights
    dominates), so finer steps gained nothing and each step's size compiles its own 64 expert branches."""
    return block // 2 if block >= 32 else block


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


_IMPLS = {"dense": dense, "gather": gather, "loop": loop, "grouped": grouped, "ragged": ragged}
