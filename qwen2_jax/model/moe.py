"""Routed-expert dispatch: one interface, several implementations that compute the same function.

    y[t] = sum_k weights[t, k] * down(silu(x[t] @ gate[e]) * (x[t] @ up[e])),   e = experts[t, k]

with one layer's expert weights stacked as transformers holds them, each expert ``[out, in]``:
``gate_up_proj: [E, 2, I, H]`` (gate and up, multiplied as one ``[2I, H]`` weight) and ``down_proj: [E, H, I]`` (or,
for ``loop`` and ``grouped``, sequences of E per-expert arrays, each applied by a ``lax.switch`` branch). Each
implementation also takes the ``platform`` the step runs on, for the form of its products (``matmul.product``, the
grouped matmul of ``ragged``).

- ``dense``:   every token through every expert as one product batched over the expert axis
               (``eth,eih->eti``: the weights are read in place, once each); the reference, and what a batch
               that touches most experts does anyway.
- ``gather``:  each (token, expert) pair reads its expert's weights in place, as a gather fused into a
               reduction: the decode step on GPUs (XLA:GPU would copy a gathered or sliced matmul operand).
- ``loop``:    a while-loop over the distinct experts the tokens chose, each applied to all tokens and
               masked; reads each used expert once (XLA:CPU and TPU decode; a GPU would sync with the host
               at every trip).
- ``grouped``: (token, expert) pairs sorted by expert, cut into blocks of one expert each, a while-loop
               over the blocks; computes only the chosen pairs (XLA:CPU prefill).
- ``ragged``:  the same sorted pairs through a grouped matmul (``grouped_product``): megablox's Pallas kernel
               on TPU, reading the ``[out, in]`` experts in place; ``jax.lax.ragged_dot_general`` elsewhere
               (XLA:CPU and XLA:GPU lower it to a dense product over all experts).

``choose`` picks one by the platform the step runs on and its token count, from the compiled programs of
``qwen2-jax aot`` (docs/accelerators.md) and CPU measurements (docs/moe-dispatch.md). ``loop`` and
``grouped`` have no reverse-mode derivative of their own (a while-loop); ``grouped`` borrows ``dense``'s.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import quant
from qwen2_jax.errors import InputError
from .matmul import product

IMPLEMENTATIONS = ("dense", "gather", "loop", "grouped", "ragged")


def platform_of(tree) -> str:
    """The platform ("cpu", "gpu" or "tpu") of the devices holding the arrays of ``tree`` (jax arrays or
    ``ShapeDtypeStruct``s with a sharding); the default backend when they say nothing."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            return canonical_platform(next(iter(sharding.device_set)).platform)
    return canonical_platform(jax.default_backend())


def canonical_platform(name: str) -> str:
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


def choose(num_tokens: int, top_k: int, num_experts: int, platform: str, per_expert: bool = False,
           quantized: bool = False) -> str:
    """The implementation ``auto`` runs for this static token count on ``platform``; ``per_expert``: for
    experts given as per-expert arrays; ``quantized``: for ``quant.QArray`` weights."""
    pairs = num_tokens * top_k
    platform = canonical_platform(platform)
    if platform == "cpu":
        if per_expert:
            # Per-expert views (read in place): one token reads its top-k experts once either way; from 2
            # tokens on, small blocks of the pairs each expert really has beat the loop (a batch-8 step of the
            # quarter config 272 ms against 329), in blocks of PER_EXPERT_MIN_BLOCK rows or more (one-row blocks
            # would compile a matrix-vector product per expert branch).
            return "loop" if num_tokens == 1 else "grouped"
        # XLA:CPU: the loop is fastest up to 8 tokens; from 16 tokens on the grouped blocks win (1.4x at 16,
        # 5x at 512 over the loop) and dense, E / top_k times the work, never does (docs/moe-dispatch.md).
        return "loop" if num_tokens <= 8 else "grouped"
    if platform == "gpu":
        # XLA:GPU (compiled for an H200, docs/accelerators.md): the gathered reduction reads exactly the pairs'
        # experts while they are fewer than all of them; from there the batched product reads each expert once.
        # A prefill takes the batched product too: it computes E / top_k times the pairs' work, but a grouped
        # loop would sync with the host at every block and copy each block's weights.
        return "gather" if pairs < num_experts else "dense"
    # XLA:TPU: the loop reads the distinct experts in place (a device-side while-loop, no host sync);
    # the batched product once they are all touched; the grouped-matmul kernel for a long prefill.
    if pairs < num_experts:
        return "loop"
    # The grouped-matmul kernel takes its weight operand as it is: a quantized one would be dequantized into a copy.
    return "dense" if num_tokens <= 256 or quantized else "ragged"


def dispatch(x, weights, experts, gate_up_proj, down_proj, impl: str = "auto", platform: str | None = None):
    """x: [T, H]; weights, experts: [T, K] -> [T, H] in x's dtype. ``platform`` (for ``auto``): where the
    step runs (default: the default backend)."""
    per_expert = _per_expert(gate_up_proj)
    platform = canonical_platform(platform or jax.default_backend())
    if impl == "auto":
        impl = choose(x.shape[0], experts.shape[1], _num_experts(gate_up_proj),
                      platform, per_expert=per_expert, quantized=hasattr(gate_up_proj, "scale"))
    try:
        fn = _IMPLS[impl]
    except KeyError:
        raise InputError(f"unknown MoE implementation {impl!r}; expected 'auto' or one of {IMPLEMENTATIONS}") from None
    if per_expert and impl not in ("loop", "grouped"):
        raise InputError(f"MoE implementation {impl!r} takes stacked expert weights; per-expert arrays go "
                         "to 'loop' or 'grouped'")
    if impl == "grouped" and not per_expert:
        fn = _grouped_with_dense_gradient
    elif per_expert:
        # A jitted call: every layer whose views have the same shapes shares one traced loop (XLA inlines it, the
        # compiled step is the same), so tracing a step does the loop once, not once per layer.
        fn = _PER_EXPERT_TRACED_ONCE[impl]
    return fn(x, weights.astype(x.dtype), experts, gate_up_proj, down_proj, platform)


def _per_expert(gate_up_proj) -> bool:
    return isinstance(gate_up_proj, (tuple, list))


def _num_experts(gate_up_proj) -> int:
    return len(gate_up_proj) if _per_expert(gate_up_proj) else gate_up_proj.shape[0]


def _expert_ffn(gate_up_proj, down_proj, platform):
    """``ffn(x, e)``: expert ``e``'s SwiGLU on the rows ``x``, for a traced expert id ``e``. Stacked weights are
    sliced at ``e``; per-expert arrays are picked by a switch, whose branches multiply them in place."""
    if _per_expert(gate_up_proj):
        # The branches differ only in their weights, so each calls one jitted SwiGLU: traced once for all of them
        # (tracing a CPU step took twice as long with a trace per expert); XLA inlines the calls.
        branches = [lambda x, gu=gu, d=d: _swiglu_traced_once(x, gu, d, platform)
                    for gu, d in zip(gate_up_proj, down_proj)]
        return lambda x, e: jax.lax.switch(e, branches, x)
    return lambda x, e: swiglu(x, gate_up_proj[e], down_proj[e], platform)


def swiglu(x, gate_up, down, platform: str | None = None):
    """An expert's SwiGLU on rows ``x`` [T, H], ``gate_up [2, I, H]`` (gate, then up) and ``down [H, I]``: HF's
    ``Qwen2MoeExperts`` for one expert. Every weight is an array or a ``quant.QArray``; ``platform`` decides the
    products' form (``matmul.product``)."""
    mm = lambda a, w: product(a, w, x.dtype, platform)
    return mm(_gated(mm(x, _merged(gate_up))), down)


def _merged(gate_up):
    """``gate_up_proj [..., 2, I, H]`` as HF's ``[..., 2I, H]`` (a ``QArray``'s values and scales alike): one
    product for gate and up, whose ``[..., 2I]`` output ``_gated`` cuts in halves. A reshape of the stored bytes,
    no copy; its products keep a plain ``[rows, 2I]`` output (a ``[rows, 2, I]`` one is tiled with its 2 padded
    to 8 on TPU)."""
    merge = lambda a: a.reshape(*a.shape[:-3], -1, a.shape[-1])
    if isinstance(gate_up, quant.QArray):
        return quant.QArray(merge(gate_up.values), merge(gate_up.scale), gate_up.ndim - 2)
    return merge(gate_up)


def _gated(y):
    """silu(gate) * up from a ``[..., 2I]`` product of ``_merged(gate_up_proj)``."""
    half = y.shape[-1] // 2
    return jax.nn.silu(y[..., :half]) * y[..., half:]


_swiglu_traced_once = jax.jit(swiglu, static_argnames="platform")


def _combine(weights, experts, num_experts, dtype):
    """[T, E]: the routing weight of expert e for token t (zero where e was not chosen)."""
    return jnp.einsum("tk,tke->te", weights, jax.nn.one_hot(experts, num_experts, dtype=dtype))


def dense(x, weights, experts, gate_up_proj, down_proj, platform: str | None = None):
    # ``platform`` (every implementation takes it): unused, one program for every backend
    num_experts = gate_up_proj.shape[0]
    xe = jnp.broadcast_to(x, (num_experts,) + x.shape)  # [E, T, H]: batched over experts, nothing transposed
    mm = lambda spec, a, w: quant.einsum(spec, a, w, x.dtype)
    # gate and up as one [E, 2I, H] weight: XLA:GPU copied the [E, 2, I, H] operand of an "ecih" product
    h = _gated(mm("eth,eoh->eto", xe, _merged(gate_up_proj)))
    out = mm("eti,ehi->eth", h, down_proj)
    return jnp.einsum("eth,te->th", out, _combine(weights, experts, num_experts, x.dtype))


def gather(x, weights, experts, gate_up_proj, down_proj, platform: str | None = None):
    # Each product is written as a float32 multiply-and-sum over the gathered weights, which XLA:GPU fuses into
    # one reduction reading the T x K experts in place; the matmul of a gathered operand copies it first.
    f32 = jnp.float32

    def matvec(rows, w):  # rows [T, K, n], w [E, m, n] -> [T, K, m], rounded as a matmul's output
        return jnp.sum(rows.astype(f32)[..., None, :] * w[experts].astype(f32), axis=-1).astype(x.dtype)

    xk = jnp.broadcast_to(x[:, None], (x.shape[0], experts.shape[1], x.shape[1]))
    return jnp.einsum("tkh,tk->th", matvec(_gated(matvec(xk, _merged(gate_up_proj))), down_proj), weights)


def loop(x, weights, experts, gate_up_proj, down_proj, platform: str | None = None):
    num_experts = _num_experts(gate_up_proj)
    ffn = _expert_ffn(gate_up_proj, down_proj, platform)
    combine = _combine(weights, experts, num_experts, x.dtype)
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


def grouped(x, weights, experts, gate_up_proj, down_proj, platform: str | None = None, block: int | None = None,
            step: int | None = None):
    """(token, expert) pairs sorted by expert and cut into blocks of up to ``block`` rows, each block within
    one expert; a while-loop applies each block's expert to its rows. Only the chosen (token, expert) pairs
    are computed, and each expert is read once per block: the prefill path of XLA:CPU, where ``ragged_dot``
    would compute every expert for every pair.

    An expert's last block is computed on the fewest multiple of ``step`` rows that hold its pairs (a switch
    over the ``block // step`` row counts), so padding stays under ``step`` rows per expert, where a whole
    padded block wastes half a block on average (docs/moe-dispatch.md)."""
    num_tokens, top_k = experts.shape
    num_experts = _num_experts(gate_up_proj)
    hidden = x.shape[-1]
    ffn = _expert_ffn(gate_up_proj, down_proj, platform)
    pairs = num_tokens * top_k
    block = block or group_block(num_tokens, top_k, num_experts,
                                 minimum=PER_EXPERT_MIN_BLOCK if _per_expert(gate_up_proj) else 8)
    step = step or group_step(block)
    if block % step:
        raise ValueError(f"grouped: step {step} does not divide block {block}")
    flat, skipped, order, sizes = _sorted_pairs(experts, num_experts)
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


def _sorted_pairs(experts, num_experts):
    """The (token, expert) pairs of ``experts [T, K]``, flattened, sorted by expert: ``(ids, skipped, order,
    sizes)``, each pair's expert id (``num_experts`` for an id out of range: another shard's expert, which
    contributes nothing), whether it is skipped so, the stable order that groups the pairs by id (skipped ones
    last), and each expert's pair count."""
    flat = experts.reshape(-1)
    skipped = (flat < 0) | (flat >= num_experts)
    ids = jnp.where(skipped, num_experts, flat)
    return ids, skipped, jnp.argsort(ids, stable=True), jnp.bincount(ids, length=num_experts + 1)[:num_experts]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _grouped_with_dense_gradient(x, weights, experts, gate_up_proj, down_proj, platform):
    """``grouped`` forward, ``dense``'s derivative (the same function) backward: what training gets from ``auto``."""
    return grouped(x, weights, experts, gate_up_proj, down_proj, platform)


def _grouped_fwd(*args):
    return grouped(*args), args[:5]


def _grouped_bwd(platform, args, cotangent):
    return jax.vjp(dense, *args)[1](cotangent)


_grouped_with_dense_gradient.defvjp(_grouped_fwd, _grouped_bwd)


# Smallest block over per-expert views. At 2 to 16 tokens an expert gets 0 to about 6 pairs (2 on average at 16):
# 4-row blocks read most used experts once where 2-row blocks read many twice, and a product of 4 rows costs
# about what one of 2 does. Whole decode steps on the 2-core AMD EPYC machine the serving tables come from ran
# 10% faster at 4 and 8 tokens and 16% at 16 (docs/moe-dispatch.md). On the Intel Xeon machine of the earlier
# tables 2-row blocks had been the faster; the rule follows the machine the tables are measured on.
PER_EXPERT_MIN_BLOCK = 4


def group_block(num_tokens: int, top_k: int, num_experts: int, minimum: int = 8) -> int:
    """Rows per block for ``grouped``: the mean pairs per expert rounded down to a power of two, in
    [minimum, 128]. Each block reads its expert's weights: with stacked weights XLA:CPU copies them per block, so
    blocks stay at 8 rows or more (at 512 tokens, 32 to 128 rows ran alike, 16 rows 1.3x and 8 rows 1.7x
    slower); per-expert arrays are read in place and blocks of the mean win, from ``PER_EXPERT_MIN_BLOCK``
    rows (docs/moe-dispatch.md)."""
    mean = num_tokens * top_k // num_experts
    return int(min(128, max(minimum, 1 << max(mean, 1).bit_length() - 1)))


def group_step(block: int) -> int:
    """Row granularity of an expert's last ``grouped`` block: half a block from blocks of 32 rows on, else the
    whole block. On XLA:CPU an expert's first block costs about the same from 16 to 48 rows (reading its weights
    dominates), so finer steps gained nothing and each step's size compiles its own 64 expert branches."""
    return block // 2 if block >= 32 else block


def ragged(x, weights, experts, gate_up_proj, down_proj, platform: str | None = None, interpret: bool = False):
    """The pairs sorted by expert, each expert's rows one group of a grouped matmul (``grouped_product``);
    ``interpret``: run the TPU kernel in Pallas' interpreter (a check on the CPU)."""
    num_tokens, top_k = experts.shape
    num_experts = gate_up_proj.shape[0]
    _, _, order, group_sizes = _sorted_pairs(experts, num_experts)  # other shards' pairs: last, in no group
    token_of = order // top_k
    xs = jnp.take(x, token_of, axis=0)  # [T*K, H], grouped by expert
    group_sizes = group_sizes.astype(jnp.int32)
    mm = lambda a, w: grouped_product(a, w, group_sizes, x.dtype, platform, interpret)
    h = _gated(mm(xs, _merged(gate_up_proj)))
    grouped_rows = jnp.arange(xs.shape[0]) < jnp.sum(group_sizes)  # the rest (other shards' pairs): no group
    out = jnp.where(grouped_rows[:, None], mm(h, down_proj), 0) * jnp.take(weights.reshape(-1), order)[:, None]
    return jnp.zeros_like(x).at[token_of].add(out)


GMM_TILE = 128  # megablox's default tiles: rows, inputs and outputs each a multiple of them


def grouped_product(rows, w, group_sizes, dtype, platform: str | None = None, interpret: bool = False):
    """``rows [M, in]``, sorted into consecutive groups of ``group_sizes``, each times its group's ``w[g]
    [out, in]``: ``[M, out]`` (rows past the groups undefined). On TPU, megablox's grouped matmul (Pallas) reads
    the ``[out, in]`` weights in place (``transpose_rhs``); ``jax.lax.ragged_dot`` there copied every expert into
    ``[in, out]`` first (24.7 GB a 2,048-token prefill on v5p-8, docs/accelerators.md). Elsewhere, or where its
    tiles do not divide the shapes, ``ragged_dot_general`` (XLA:CPU and XLA:GPU: a dense product over all groups)."""
    if platform == "tpu" and not (rows.shape[0] % GMM_TILE or w.shape[1] % GMM_TILE or w.shape[2] % GMM_TILE):
        from jax.experimental.pallas.ops.tpu.megablox import gmm

        return gmm(rows, w.astype(dtype), group_sizes, preferred_element_type=dtype, transpose_rhs=True,
                   interpret=interpret)
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
    return jax.lax.ragged_dot_general(rows, w.astype(dtype), group_sizes, dims)


_IMPLS = {"dense": dense, "gather": gather, "loop": loop, "grouped": grouped, "ragged": ragged}
_PER_EXPERT_TRACED_ONCE = {"loop": jax.jit(loop, static_argnums=5), "grouped": jax.jit(grouped, static_argnums=5)}
