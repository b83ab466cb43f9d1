"""Attention over a paged KV cache (the serving engine's): one pool of fixed-size pages per layer, shared by all
sequences, and a page table per sequence naming its pages in order.

    cache = PagedKV(k, v, page_table, write_page, write_offset, q_positions, kv_len)
    cache = cache.update(layer, k, v)   # the step's new keys and values into their pages
    out = cache.attend(layer, q)        # each sequence's queries over its own pages

A layer's pages are two arrays, keys ``k [num_pages, page_size, Hkv * D]`` and values ``v`` alike, a position's
heads side by side in one row: a row a step writes in place and a gather reads whole on every backend. In jax's
``ragged_paged_attention`` layout (one ``[num_pages, page_size, 2 * Hkv, D]``, keys and values interleaved by head)
XLA:TPU tiled the heads and the head dim apart and copied the whole pool every decode step to write one token
(5.2x the step's roofline on a v5p-8), and with keys and values stacked in one array it copied each out before
gathering from it (docs/serving.md). The TPU kernel (``tpu_paged_attention``) reads these arrays. The KV heads
split over a mesh's tensor axis with the last dimension. A page holds ``page_size`` consecutive positions of one sequence; position ``p`` of a sequence lies in its page
``page_table[p // page_size]`` at offset ``p % page_size``. Pages are written by scatter (``update``: a token whose
``write_page`` is ``num_pages`` is dropped: padding, or an idle row) and never copied: sequences that share a prefix
share its pages (the host's ``KVCacheManager`` keeps the tables and reference counts).

The XLA path here serves every backend: queries ``q [N, T, Hq, D]`` of N sequences (a decode step: T = 1; a piece
of one prompt: N = 1) visit their pages ``block`` tokens at a time, gathered from the pool (only the pages of the
sequences in the step are read), with flash attention's online softmax in float32; a query sees the positions of
its sequence below ``kv_len`` and at or before its own (``q_positions``, -1 for padding: sees nothing, outputs
zeros). The blocks visited stop at the longest sequence's length (a loop of a data-dependent trip count on CPU and
TPU; on GPU, where such a loop syncs with the host every trip, all of the table's blocks: ``blocks_to_visit``;
the serving engine's GPU decode step cuts each row's table to a bucket of context, and its few queries then take
all those pages in one pass).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .attention import FEW, blocks_to_visit, online_softmax

BLOCK_TOKENS = 512  # positions a block of pages holds, at most: scores of [T, 512] per head at a time
# A decode step over a table cut to its context takes it in one pass up to this many positions, in blocks past it
# (the largest buckets: the one pass over 64 rows of 65,536 positions did not fit a v5e's 16 GB with the weights).
ONE_PASS_TOKENS = 8192


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKV:
    k: tuple[jax.Array, ...]  # per layer [num_pages, page_size, Hkv * D]
    v: tuple[jax.Array, ...]  # per layer [num_pages, page_size, Hkv * D]
    page_table: jax.Array  # [N, max_pages] int32: each sequence's pages (entries past its length: any page)
    write_page: jax.Array  # [N, T] int32: the page each new token goes to (num_pages: not written)
    write_offset: jax.Array  # [N, T] int32: its offset in that page
    q_positions: jax.Array  # [N, T] int32: each query's position (-1: padding)
    kv_len: jax.Array  # [N] int32: positions each sequence holds once this step's tokens are written
    # "xla" (this module), "pallas" (tpu_paged_attention's kernel, on TPU) or "pallas-interpret" (that kernel in
    # Pallas' TPU interpreter: a check on the CPU)
    kernel: str = dataclasses.field(default="xla", metadata=dict(static=True))
    # the table is cut to the pages the step reads (a decode step's bucket of context): visit all of it, in one pass
    # for a few queries
    whole_table: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]

    def update(self, layer: int, k, v) -> "PagedKV":
        """Writes the step's keys and values ``[N, T, Hkv, D]`` into their pages."""
        n, t, hkv, d = k.shape
        put = lambda pages, new: pages.at[self.write_page, self.write_offset].set(
            new.reshape(n, t, hkv * d).astype(pages.dtype), mode="drop")
        at = lambda arrays, new: arrays[:layer] + (put(arrays[layer], new),) + arrays[layer + 1:]
        return dataclasses.replace(self, k=at(self.k, k), v=at(self.v, v))

    def attend(self, layer: int, q, platform: str | None = None):
        """-> [N, T, Hq, D] in q's dtype: each sequence's queries over its pages (``paged_attention``)."""
        args = (q, self.k[layer], self.v[layer], self.page_table, self.q_positions, self.kv_len)
        if self.kernel != "xla":
            return kernel_attention(*args, interpret=self.kernel == "pallas-interpret")
        return paged_attention(*args, all_blocks=self.whole_table or (platform is not None
                                                                      and blocks_to_visit(platform) == "all"))


def paged_attention(q, k_pages, v_pages, page_table, q_positions, kv_len, *, block_tokens: int = BLOCK_TOKENS,
                    all_blocks: bool = False):
    """Causal grouped-query attention of ``q [N, T, Hq, D]`` over each sequence's pages (see the module's text).
    ``all_blocks``: visit every block of the page table (a static trip count), not only the filled ones."""
    n, t, hq, d = q.shape
    page_size, hkv = k_pages.shape[1], k_pages.shape[2] // d
    max_pages = page_table.shape[1]
    few = all_blocks and t <= FEW  # a decode step over a table cut to its context (GPU, TPU)
    if few and max_pages * page_size <= ONE_PASS_TOKENS:  # its few queries take all those pages in one pass
        return _attend_few(q, k_pages, v_pages, page_table, q_positions, kv_len)
    per_block = max(1, min(max_pages, block_tokens // page_size))  # pages a block gathers
    blocks = -(-max_pages // per_block)
    if blocks * per_block != max_pages:  # a table of any width: pad it with page 0 (past kv_len: never seen)
        page_table = jnp.pad(page_table, ((0, 0), (0, blocks * per_block - max_pages)))
    dtype = q.dtype
    q = q.reshape(n, t, hkv, hq // hkv, d).astype(jnp.float32 if few else k_pages.dtype)
    scale = d ** -0.5
    width = per_block * page_size

    def scores_of(j):
        pages = jax.lax.dynamic_slice_in_dim(page_table, j * per_block, per_block, axis=1)  # [N, per_block]
        k, v = (x[pages].reshape(n, width, hkv, d) for x in (k_pages, v_pages))  # only these pages are read
        positions = j * width + jnp.arange(width)
        seen = (positions[None, None, :] < kv_len[:, None, None]) & (positions[None, None, :]
                                                                     <= q_positions[:, :, None])  # [N, T, width]
        if few:  # multiplies and sums, each reading its pages where they lie (``_attend_few``)
            k = k.astype(jnp.float32).transpose(0, 2, 1, 3)[:, :, None, None]  # [N, Hkv, 1, 1, width, D]
            s = jnp.sum(q.transpose(0, 2, 3, 1, 4)[..., None, :] * k, axis=-1) * scale
        else:
            s = jnp.einsum("ntkgd,nlkd->nkgtl", q, k, preferred_element_type=jnp.float32) * scale
        return s, seen[:, None, None], v

    def weigh(p, v):  # [N, Hkv, G, T, width] x [N, width, Hkv, D] -> [N, Hkv, G, T, D], float32
        if few:
            return jnp.sum(p[..., None] * v.astype(jnp.float32).transpose(0, 2, 1, 3)[:, :, None, None], axis=-2)
        return jnp.einsum("nkgtl,nlkd->nkgtd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)

    if blocks == 1:  # one pass: a plain softmax, as the model's own attention over a short cache
        s, seen, v = scores_of(0)
        probs = jax.nn.softmax(jnp.where(seen, s, jnp.finfo(jnp.float32).min), axis=-1).astype(v.dtype)
        out = jnp.einsum("nkgtl,nlkd->ntkgd", probs, v)
        out = jnp.where(jnp.any(seen, axis=-1).transpose(0, 3, 1, 2)[..., None], out, 0)
        return out.reshape(n, t, hq, d).astype(dtype)

    def step(j, carry):
        s, seen, v = scores_of(j)
        return online_softmax(carry, s, seen, lambda p: weigh(p, v))

    shape = (n, hkv, hq // hkv, t)
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (d,), jnp.float32))
    stop = blocks if all_blocks else jnp.minimum(-(-jnp.max(kv_len) // width), blocks)
    m, l, acc = jax.lax.fori_loop(0, stop, step, init)
    out = acc / jnp.where(l > 0, l, 1)[..., None]  # [N, Hkv, G, T, D]; zeros where no key was seen
    return out.transpose(0, 3, 1, 2, 4).reshape(n, t, hq, d).astype(dtype)


def _attend_few(q, k_pages, v_pages, page_table, q_positions, kv_len):
    """A few queries a row (a decode step) over all the pages of ``page_table`` in one pass, the products as
    multiplies and sums rather than matrix products: each then reads its pages where they lie (the page gather
    fused into it), where a matrix product on GPU wanted them copied out and transposed first (3x the KV bytes of
    a decode step: docs/serving.md). Scores, softmax and sums in float32."""
    n, t, hq, d = q.shape
    dtype = q.dtype
    page_size, hkv = k_pages.shape[1], k_pages.shape[2] // d
    width = page_table.shape[1] * page_size
    q = q.reshape(n, t, hkv, hq // hkv, d).astype(jnp.float32)
    k, v = (x[page_table].reshape(n, width, hkv, d).astype(jnp.float32) for x in (k_pages, v_pages))
    s = jnp.sum(q[:, :, None] * k[:, None, :, :, None], axis=-1) * d ** -0.5  # [N, T, L, Hkv, G]
    positions = jnp.arange(width)
    seen = ((positions[None, None, :] < kv_len[:, None, None])
            & (positions[None, None, :] <= q_positions[:, :, None]))[..., None, None]
    probs = jax.nn.softmax(jnp.where(seen, s, jnp.finfo(jnp.float32).min), axis=2)
    probs = jnp.where(jnp.any(seen, axis=2, keepdims=True), probs, 0)  # no key seen: zeros
    out = jnp.sum(probs[..., None] * v[:, None, :, :, None], axis=2)  # [N, T, Hkv, G, D]
    return out.reshape(n, t, hq, d).astype(dtype)


def kernel_attention(q, k_pages, v_pages, page_table, q_positions, kv_len, *, interpret: bool = False):
    """``paged_attention`` through the ragged TPU kernel (``tpu_paged_attention``): the N rows of T queries laid
    end to end as N sequences of T, each sequence's length raised by its padding so that its real queries (the
    first ones of its row) sit at their positions; the padding's outputs, which see past the sequence, are zeroed
    as ``paged_attention`` gives them."""
    from .tpu_paged_attention import ragged_paged_attention

    n, t, hq, d = q.shape
    real = q_positions >= 0
    lens = kv_len + t - jnp.sum(real, axis=1, dtype=jnp.int32)
    out = ragged_paged_attention(q.reshape(n * t, hq, d).astype(k_pages.dtype), k_pages, v_pages, lens, page_table,
                                 jnp.arange(n + 1, dtype=jnp.int32) * t, jnp.array([n], jnp.int32),
                                 sm_scale=d ** -0.5, interpret=interpret)
    return jnp.where(real[..., None, None], out.reshape(n, t, hq, d), 0).astype(q.dtype)


def create_pages(cfg, num_pages: int, page_size: int, dtype) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """(keys, values): each layer's pool of ``num_pages`` empty pages."""
    shape = (num_pages, page_size, cfg.num_key_value_heads * cfg.head_dim)
    layers = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))
    return layers(), layers()


def page_bytes(cfg, page_size: int, dtype) -> int:
    """Bytes one page takes over all layers."""
    return (cfg.num_hidden_layers * 2 * page_size * cfg.num_key_value_heads * cfg.head_dim
            * jnp.dtype(dtype).itemsize)
