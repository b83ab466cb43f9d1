"""The paged KV cache: the model over pages gives its own logits (prompt pieces at an offset, decode rows, pages
in any order, the online softmax over blocks of pages), and the host's page bookkeeping: pages taken as tokens
arrive and returned when a request ends, full pages shared by the prompts that begin with their tokens (reference
counts, no copies), the least recently freed given up first, a request's tail before its head."""


import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen2_jax.inference.serving.kv_cache_manager import MIN_PREFIX, KVCacheManager, PoolExhausted
from qwen2_jax.inference.serving.request import Request, SamplingParams, Stats
from qwen2_jax.model import paged_attention
from qwen2_jax.model.modeling import Qwen2MoeForCausalLM
from qwen2_jax.model.paged_attention import PagedKV, create_pages
from qwen2_jax.tools.bench import bench_config

PAGE, POOL = 8, 24


@pytest.fixture(scope="module")
def model():
    return Qwen2MoeForCausalLM(bench_config("tiny"), dtype=jnp.float32, rngs=nnx.Rngs(0))


def forward_paged(model, kv, table, ids, start, n, pad):
    """``kv``: (keys, values), each a tuple of the layers' pages."""
    """Tokens ``ids[start:start+n]`` of each row (right-padded by ``pad``) over its pages -> (logits, pages)."""
    rows, t = table.shape[0], n + pad
    pos = np.full((rows, t), -1)
    pos[:, :n] = start + np.arange(n)
    page = np.where(pos >= 0, np.take_along_axis(table, np.maximum(pos, 0) // PAGE, axis=1), POOL)
    x = np.zeros((rows, t), np.int64)
    x[:, :n] = ids[:, start:start + n]
    cache = PagedKV(k=kv[0], v=kv[1], page_table=jnp.asarray(table), write_page=jnp.asarray(page, jnp.int32),
                    write_offset=jnp.asarray(np.maximum(pos, 0) % PAGE, jnp.int32),
                    q_positions=jnp.asarray(pos, jnp.int32), kv_len=jnp.full((rows,), start + n, jnp.int32))
    out = model.forward(jnp.asarray(x), positions=jnp.asarray(np.maximum(pos, 0), jnp.int32), cache=cache)
    return np.asarray(out.logits[:, :n]), (out.cache.k, out.cache.v)


@pytest.mark.parametrize("block_tokens", [paged_attention.BLOCK_TOKENS, 16])  # one pass; blocks of two pages
def test_a_prompt_in_pieces_then_decode_steps_over_scrambled_pages_give_the_models_logits(model, block_tokens,
                                                                                         monkeypatch):
    monkeypatch.setattr(paged_attention, "BLOCK_TOKENS", block_tokens)
    cfg = model.config
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 44))
    full = np.asarray(model(jnp.asarray(ids)))
    table = np.array([[17, 3, 9, 1, 20, 5], [2, 11, 23, 7, 0, 14]], np.int32)  # two sequences, pages interleaved
    kv = create_pages(cfg, POOL, PAGE, jnp.float32)
    got = []
    for start, n, pad in [(0, 21, 3), (21, 19, 5)] + [(40 + i, 1, 0) for i in range(4)]:  # 2 pieces, 4 decodes
        logits, kv = forward_paged(model, kv, table, ids, start, n, pad)
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=2e-6, rtol=0)
    # Each sequence's keys and values lie in its own pages only: another row's table reads other numbers.
    wrong = table[::-1].copy()
    logits, _ = forward_paged(model, kv, wrong, ids, 43, 1, 0)
    assert np.max(np.abs(logits - full[:, 43:44])) > 1e-2


def test_padding_and_idle_rows_write_nothing(model):
    kv = create_pages(model.config, POOL, PAGE, jnp.float32)
    ids = np.ones((1, 8), np.int64)
    _, written = forward_paged(model, kv, np.array([[4, 5]], np.int32), ids, 0, 3, 5)  # 3 tokens, 5 padding
    layers = [*written[0], *written[1]]  # every layer's keys and values
    touched = {int(p) for layer in layers for p in np.flatnonzero(np.any(np.asarray(layer) != 0, axis=(1, 2)))}
    assert touched == {4}
    for layer in layers:
        page = np.asarray(layer[4])  # [positions, Hkv * D]
        assert np.all(page[3:] == 0) and np.all(np.any(page[:3] != 0, axis=1))


# ---- the host's pages ---------------------------------------------------------------------------------------
def request(tokens):
    return Request(tokens, SamplingParams(max_tokens=1))


def manager(pages=POOL, enabled=True):
    return KVCacheManager(pages, PAGE, enabled=enabled, stats=Stats())


def test_pages_are_taken_as_tokens_arrive_and_all_return_when_requests_end():
    kv = manager()
    a, b = request(list(range(20))), request(list(range(100, 105)))
    assert kv.admit(a, a.prompt) == 0 and len(kv.pages[a.id]) == 3 and kv.used == 3
    assert kv.admit(b, b.prompt) == 0 and kv.used == 4
    assert kv.grow(a, 24) is None  # position 23 is in its third page
    assert kv.grow(a, 25) == 3 and kv.used == 5
    assert len(set(kv.pages[a.id]) | set(kv.pages[b.id])) == 5
    kv.free(a)
    kv.free(b)
    assert kv.used == 0


def test_a_prompt_shares_the_cached_full_pages_it_begins_with_and_prefills_the_rest():
    kv = manager()
    first = request(list(range(40)))
    kv.admit(first, first.prompt)
    kv.commit(first, first.prompt)  # 5 full pages
    follow = request(list(range(40)) + [7, 7, 7])
    assert kv.admit(follow, follow.prompt) == 40
    assert kv.pages[follow.id][:5] == kv.pages[first.id] and kv.used == 6  # shared, one page more for the rest
    assert kv.stats.prefix_cache_hits == 40 and kv.stats.prefix_cache_queries == 40 + 43
    kv.free(first)
    assert kv.used == 6  # still the follower's
    kv.free(follow)
    assert kv.used == 0
    again = request(list(range(40)) + [9])  # cached pages outlive their requests
    assert kv.admit(again, again.prompt) == 40


def test_a_page_is_shared_only_once_full_and_never_for_the_prompts_last_token():
    kv = manager()
    first = request(list(range(20)))
    kv.admit(first, first.prompt)
    kv.commit(first, first.prompt)  # pages of 8, 8 and 4: two cached
    assert kv.lookup(list(range(20)) + [1]) == kv.pages[first.id][:2]
    assert kv.lookup(list(range(17))) == kv.pages[first.id][:2]
    assert MIN_PREFIX == 16
    assert kv.lookup(list(range(16))) == []  # its 16th token is prefilled for its logits: 8 cached, under MIN_PREFIX
    assert kv.lookup(list(range(17)) + [5] * 20) == []  # 16 cached of 37: less than half


def test_the_least_recently_freed_pages_are_given_up_first_and_a_requests_tail_before_its_head():
    kv = manager(pages=6)
    old, new = request(list(range(24))), request(list(range(50, 74)))
    for r in (old, new):
        kv.admit(r, r.prompt)
        kv.commit(r, r.prompt)
        kv.free(r)
    assert kv.used == 0
    taker = request([1000] * 8)  # needs one page: the least recently freed is old's last
    kv.admit(taker, taker.prompt)
    assert kv.lookup(list(range(24)) + [0]) == kv_pages_before(kv, old)[:2]  # old's head still cached
    assert len(kv.lookup(list(range(50, 74)) + [0])) == 3  # new's untouched


def kv_pages_before(kv, r):
    return [kv.pool.page_of[k] for k in kv._key_chain(r.prompt, []) if k in kv.pool.page_of]


def test_admission_waits_for_pages_and_growth_says_when_the_pool_is_empty():
    kv = manager(pages=3)
    a = request(list(range(20)))
    assert kv.admit(a, a.prompt) == 0 and kv.used == 3
    b = request([1, 2])
    assert kv.admit(b, b.prompt) is None and b.id not in kv.pages and kv.used == 3
    with pytest.raises(PoolExhausted):
        kv.grow(a, 25)


def test_without_prefix_caching_nothing_is_shared():
    kv = manager(enabled=False)
    first = request(list(range(40)))
    kv.admit(first, first.prompt)
    kv.commit(first, first.prompt)
    assert kv.admit(request(list(range(41))), list(range(41))) == 0 and kv.stats.prefix_cache_queries == 0


def test_the_tpu_kernel_in_pallas_interpret_mode_gives_the_models_logits(model, monkeypatch):
    """The ragged TPU kernel (``tpu_paged_attention``) as the model's attention over pages, run in Pallas' TPU
    interpreter: a prompt in two right-padded pieces, then decode steps, against the model's own forward."""
    import qwen2_jax.model.paged_attention as pa

    cfg = model.config
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 36))
    full = np.asarray(model(jnp.asarray(ids)))
    table = np.array([[17, 3, 9, 1, 20], [2, 11, 23, 7, 0]], np.int32)
    monkeypatch.setattr(pa.PagedKV, "__init__", _with_kernel(pa.PagedKV.__init__, "pallas-interpret"))
    kv = create_pages(cfg, POOL, PAGE, jnp.float32)
    got = []
    for start, n, pad in [(0, 20, 4), (20, 15, 1), (35, 1, 0)]:
        logits, kv = forward_paged(model, kv, table, ids, start, n, pad)
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=2e-5, rtol=0)


def _with_kernel(init, kernel):
    def wrapped(self, *args, **kw):
        init(self, *args, **{**kw, "kernel": kernel})
    return wrapped


def test_the_one_pass_decode_attention_gpu_steps_take_gives_the_blockwise_attentions_output():
    """What a GPU decode step runs (``all_blocks``: the table cut to its context, the few queries in one pass of
    multiplies and sums) against the blockwise loop of matrix products, on ragged rows, an idle row included."""
    rng = np.random.default_rng(3)
    k_pages, v_pages = (jnp.asarray(rng.normal(size=(POOL, PAGE, 2 * 16)), jnp.float32) for _ in "kv")  # 2 heads
    q = jnp.asarray(rng.normal(size=(3, 1, 4, 16)), jnp.float32)  # 3 rows, a query each, 4 query heads
    table = jnp.asarray(rng.permutation(POOL)[:15].reshape(3, 5), jnp.int32)
    kv_len = jnp.asarray([37, 9, 0], jnp.int32)
    positions = jnp.asarray([[36], [8], [-1]], jnp.int32)
    one_pass = paged_attention.paged_attention(q, k_pages, v_pages, table, positions, kv_len, all_blocks=True)
    blocks = paged_attention.paged_attention(q, k_pages, v_pages, table, positions, kv_len, block_tokens=16)
    np.testing.assert_allclose(np.asarray(one_pass), np.asarray(blocks), atol=1e-5, rtol=0)
    assert np.all(np.asarray(one_pass)[2] == 0) and np.abs(np.asarray(one_pass)[:2]).min() > 0


def test_a_prompt_admitted_before_its_head_was_written_shares_it_once_it_is():
    kv = manager()
    reader, asker = request(list(range(40))), request(list(range(40)) + [5, 6])
    kv.admit(reader, reader.prompt)
    assert kv.admit(asker, asker.prompt) == 0 and kv.used == 5 + 6  # nothing cached yet: pages of its own
    kv.commit(reader, reader.prompt)  # the reader's prefill is dispatched
    assert kv.reshare(asker, asker.prompt, 0) == 40
    assert kv.pages[asker.id][:5] == kv.pages[reader.id] and kv.used == 5 + 1
    assert kv.reshare(asker, asker.prompt, 40) == 40  # nothing more


def test_a_long_context_decode_on_a_cut_table_goes_in_blocks_and_gives_the_one_pass_output(monkeypatch):
    """Past ``ONE_PASS_TOKENS`` a decode step over a cut table (GPU, TPU) takes its pages in blocks, with the same
    multiplies and sums, an online softmax between them."""
    rng = np.random.default_rng(4)
    k_pages, v_pages = (jnp.asarray(rng.normal(size=(POOL, PAGE, 2 * 16)), jnp.float32) for _ in "kv")
    q = jnp.asarray(rng.normal(size=(2, 1, 4, 16)), jnp.float32)
    table = jnp.asarray(rng.permutation(POOL)[:12].reshape(2, 6), jnp.int32)
    kv_len, positions = jnp.asarray([45, 20], jnp.int32), jnp.asarray([[44], [19]], jnp.int32)
    one_pass = paged_attention.paged_attention(q, k_pages, v_pages, table, positions, kv_len, all_blocks=True)
    monkeypatch.setattr(paged_attention, "ONE_PASS_TOKENS", 16)
    blocks = paged_attention.paged_attention(q, k_pages, v_pages, table, positions, kv_len, all_blocks=True,
                                             block_tokens=16)
    np.testing.assert_allclose(np.asarray(blocks), np.asarray(one_pass), atol=1e-5, rtol=0)
