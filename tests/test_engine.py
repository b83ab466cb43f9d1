"""The continuous-batching engine over a paged KV cache, in-process: a request's tokens do not depend on its
neighbours, nothing compiles after start-up, each slot stops on its own, aborted requests are freed, the queue is
bounded, a prompt that begins with the tokens of cached pages shares them (prefix caching, a page at a time), a
finished request's pages stay cached until the pool needs them, and a request preempted when pages run out still
gets exactly its tokens."""

import importlib
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import qwen2_jax
from qwen2_jax.tools.bench import bench_config
from qwen2_jax.convert import write_hf_checkpoint
from qwen2_jax.inference.serving.engine import Engine, QueueFull, Request, SamplingParams
from qwen2_jax.errors import InputError
from qwen2_jax.inference.generate import generate

engine_module = importlib.import_module("qwen2_jax.inference.serving.engine")
MAX_LEN, CHUNK = 256, 64  # prefill buckets 16, 32, 64; prompts past 64 tokens go in pieces
PAGE = 16  # the engines' block size: a prefix is shared a whole page at a time


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_hf_checkpoint(bench_config("tiny"), path, dtype="float32", seed=0)
    return str(path)


@pytest.fixture(scope="module")
def model(checkpoint):
    return qwen2_jax.from_pretrained(checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def engine(model):
    engine = Engine(model, slots=16, max_len=MAX_LEN, prefill_chunk=CHUNK, eos_token_ids=()).start()
    yield engine
    engine.stop()


def prompts_of(lengths, seed=0, vocab=512):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def run_all(engine, prompts, params):
    params = params if isinstance(params, list) else [params] * len(prompts)
    requests = [engine.submit(Request(p, s)) for p, s in zip(prompts, params)]
    return [r.result(timeout=300) for r in requests]


LENGTHS = [3, 40, 70, 150, 9, 17, 1, 64, 65, 128, 33, 5, 100, 12, 27, 90]  # one bucket each side of every edge


def test_greedy_tokens_of_a_request_alone_equal_its_tokens_among_15_others_and_generates(engine, model):
    prompts = prompts_of(LENGTHS, seed=1)
    greedy = SamplingParams(max_tokens=24)
    together = run_all(engine, prompts, greedy)
    alone = [run_all(engine, [p], greedy)[0] for p in prompts]
    assert together == alone
    assert all(finish == "length" and len(tokens) == 24 for tokens, finish in together)
    assert [tokens for tokens, _ in together] == generate(model, prompts, max_new_tokens=24, eos_token_ids=())


def test_waiting_prompts_are_prefilled_together_in_one_packed_call(model):
    engine = Engine(model, slots=8, max_len=128, prefill_chunk=128, eos_token_ids=())
    prompts = prompts_of([3, 17, 1, 40, 9, 30], seed=3)  # 100 tokens: one piece of 128
    requests = [engine.submit(Request(p, SamplingParams(max_tokens=12))) for p in prompts]  # before the loop runs
    engine.start()
    try:
        results = [r.result(timeout=300) for r in requests]
    finally:
        engine.stop()
    assert engine.prefills == 1
    assert [tokens for tokens, _ in results] == generate(model, prompts, max_new_tokens=12, eos_token_ids=())


@pytest.mark.parametrize("wait_ms, calls", [(1500, 1), (0, 2)])
def test_an_idle_engine_lets_a_request_wait_for_the_rest_of_its_burst_to_share_a_packed_call(model, wait_ms, calls):
    """A request that comes to an idle engine waits up to ``batch_wait_ms`` for others; those that come meanwhile
    go in its packed prefill. With no wait the first one is prefilled alone, at once."""
    engine = Engine(model, slots=8, max_len=128, prefill_chunk=128, eos_token_ids=(), batch_wait_ms=wait_ms).start()
    prompts = prompts_of([5, 9, 7], seed=4)
    try:
        first = engine.submit(Request(prompts[0], SamplingParams(max_tokens=4)))
        time.sleep(0.3)  # the rest of the burst, later than a loop takes to start a prefill
        rest = [engine.submit(Request(p, SamplingParams(max_tokens=4))) for p in prompts[1:]]
        results = [r.result(timeout=300) for r in (first, *rest)]
    finally:
        engine.stop()
    assert engine.prefills == calls
    assert [tokens for tokens, _ in results] == generate(model, prompts, max_new_tokens=4, eos_token_ids=())


def test_the_wait_for_a_burst_ends_once_the_waiting_prompts_fill_a_prefill_call(model):
    engine = Engine(model, slots=8, max_len=128, prefill_chunk=64, eos_token_ids=(), batch_wait_ms=10_000).start()
    try:
        requests = [engine.submit(Request(p, SamplingParams(max_tokens=2))) for p in prompts_of([40, 24], seed=5)]
        assert [len(r.result(timeout=8)[0]) for r in requests] == [2, 2]  # 64 tokens: no 10 s wait
    finally:
        engine.stop()
    assert engine.prefills == 1


def test_nothing_compiles_after_start_up_under_a_mixed_load(engine):
    before = engine_module.TRACES.copy(), engine_module.COMPILATIONS.copy()
    sampled = [SamplingParams(max_tokens=n, temperature=t, top_k=k, top_p=p, repetition_penalty=r, seed=s)
               for n, t, k, p, r, s in [(5, 0.0, 0, 1.0, 1.0, None), (9, 0.7, 0, 1.0, 1.0, 1), (30, 1.2, 20, 0.9, 1.1, 2),
                                        (17, 0.5, 0, 0.8, 1.0, None), (3, 0.0, 0, 1.0, 1.3, 4), (50, 0.9, 5, 1.0, 1.0, 5)]]
    prompts = prompts_of([2, 31, 200, 64, 129, 77], seed=2)
    results = run_all(engine, prompts, sampled)
    assert [len(tokens) for tokens, _ in results] == [5, 9, 30, 17, 3, 50]
    follow = engine.submit(Request(prompts[3] + results[3][0] + [1] * 20, sampled[2]))  # 80 cached, 21 in a piece
    assert len(follow.result(timeout=300)[0]) == 30 and follow.cached_tokens == 80
    assert (engine_module.TRACES, engine_module.COMPILATIONS) == before


def test_each_slot_stops_at_its_own_end_token_and_the_others_go_on(engine):
    prompts = prompts_of([6, 13, 30], seed=3)
    free = [tokens for tokens, _ in run_all(engine, prompts, SamplingParams(max_tokens=40))]
    eos = free[0][4]
    stopped = run_all(engine, prompts, SamplingParams(max_tokens=40, eos_token_ids=(eos,)))
    for (tokens, finish), unstopped in zip(stopped, free):
        expected = unstopped[:unstopped.index(eos) + 1] if eos in unstopped else unstopped
        assert tokens == expected and finish == ("stop" if eos in unstopped else "length")
    ignored = run_all(engine, prompts[:1], SamplingParams(max_tokens=40, eos_token_ids=(eos,), ignore_eos=True))
    assert ignored[0] == (free[0], "length")


def test_a_seeded_request_samples_the_same_tokens_whatever_its_neighbours(engine):
    prompt = prompts_of([11], seed=4)[0]
    params = SamplingParams(max_tokens=20, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1, seed=7)
    alone = run_all(engine, [prompt], params)[0]
    crowd = run_all(engine, prompts_of([5, 20, 3], seed=5) + [prompt],
                    [SamplingParams(max_tokens=30, temperature=1.0, seed=i) for i in range(3)] + [params])[-1]
    assert crowd == alone
    other_seed = run_all(engine, [prompt], SamplingParams(**{**params.__dict__, "seed": 8}))[0]
    assert other_seed != alone


def test_an_aborted_request_ends_at_once_and_its_slot_serves_the_next(engine):
    long = engine.submit(Request(prompts_of([8])[0], SamplingParams(max_tokens=MAX_LEN - 8)))
    first, _ = long.events.get(timeout=60)
    engine.abort(long)
    tokens, finish = long.result(timeout=60)
    assert finish == "abort" and len(first + tokens) < MAX_LEN - 8
    assert engine.running == 0
    assert run_all(engine, prompts_of([4]), SamplingParams(max_tokens=3))[0][1] == "length"


def test_a_prompt_that_extends_a_finished_request_reuses_its_cached_tokens_and_gives_generates_tokens(engine, model):
    first = prompts_of([40], seed=6)[0]
    answer, _ = run_all(engine, [first], SamplingParams(max_tokens=10))[0]
    follow = first + answer + prompts_of([12], seed=7)[0]  # the next turn: everything so far, then a new message
    penalised = SamplingParams(max_tokens=10, repetition_penalty=1.3)  # the penalty must see the cached tokens
    request = engine.submit(Request(follow, penalised))
    tokens, _ = request.result(timeout=300)
    assert request.cached_tokens == 48  # the full pages of all but the answer's last token (never fed to a step)
    assert tokens == generate(model, [follow], max_new_tokens=10, eos_token_ids=(), repetition_penalty=1.3)[0]


def test_the_rest_of_a_prompt_after_its_cached_prefix_goes_in_pieces_when_longer_than_one(engine, model):
    first = prompts_of([90], seed=8)[0]  # itself in pieces (64 + 26)
    answer, _ = run_all(engine, [first], SamplingParams(max_tokens=10))[0]
    follow = first + answer + prompts_of([81], seed=9)[0]  # 96 cached, 84 more: a piece of 64, one of 32
    request = engine.submit(Request(follow, SamplingParams(max_tokens=8)))
    tokens, _ = request.result(timeout=300)
    assert request.cached_tokens == 96
    assert tokens == generate(model, [follow], max_new_tokens=8, eos_token_ids=())[0]


def test_a_prompt_that_begins_with_a_running_requests_prompt_shares_its_pages(engine, model):
    document = prompts_of([40], seed=17)[0]
    reader = engine.submit(Request(document, SamplingParams(max_tokens=MAX_LEN - 40)))
    read = reader.events.get(timeout=60)[0]  # a first token: its prompt is in its row, and it decodes on
    question = document + prompts_of([12], seed=18)[0]
    asker = engine.submit(Request(question, SamplingParams(max_tokens=10)))
    tokens, _ = asker.result(timeout=300)
    assert not reader.finished  # the 40 tokens came from the row of a request still decoding
    engine.abort(reader)
    read += reader.result(timeout=60)[0]
    assert asker.cached_tokens == 32  # the reader's two full pages
    assert tokens == generate(model, [question], max_new_tokens=10, eos_token_ids=())[0]
    # Sharing left the reader's pages as they were: its tokens before and after are generate's.
    assert len(read) > 10 and read == generate(model, [document], max_new_tokens=len(read), eos_token_ids=())[0]


def test_a_prompt_queued_behind_another_with_the_same_head_shares_that_head_once_it_is_written(engine, model):
    document = prompts_of([150], seed=19)[0]  # in pieces of 64, 64 and 22, one prompt a call
    question = document + prompts_of([12], seed=20)[0]
    reader = engine.submit(Request(document, SamplingParams(max_tokens=4)))
    asker = engine.submit(Request(question, SamplingParams(max_tokens=6)))  # arrives with it, prefilled after it
    tokens, _ = asker.result(timeout=300)
    assert reader.result(timeout=300)[0] == generate(model, [document], max_new_tokens=4, eos_token_ids=())[0]
    assert asker.cached_tokens == 144
    assert tokens == generate(model, [question], max_new_tokens=6, eos_token_ids=())[0]


def test_a_short_shared_head_or_less_than_half_the_prompt_is_prefilled_again(engine, model):
    head = prompts_of([12], seed=10)[0]
    first = head + prompts_of([30], seed=11)[0]
    run_all(engine, [first], SamplingParams(max_tokens=4))
    short_head = engine.submit(Request(head + prompts_of([30], seed=13)[0], SamplingParams(max_tokens=4)))
    less_than_half = engine.submit(Request(first[:20] + prompts_of([30], seed=14)[0], SamplingParams(max_tokens=6)))
    assert short_head.result(timeout=300)[1] == "length"
    tokens, _ = less_than_half.result(timeout=300)
    assert short_head.cached_tokens == less_than_half.cached_tokens == 0
    assert tokens == generate(model, [less_than_half.prompt], max_new_tokens=6, eos_token_ids=())[0]


@pytest.fixture(scope="module")
def small_pool(model):
    """Three sequences at a time over a pool of 8 pages of 16 (128 tokens): a request of 64 holds 4."""
    engine = Engine(model, max_num_seqs=3, max_model_len=64, max_num_batched_tokens=32, num_gpu_blocks_override=8,
                    eos_token_ids=()).start()
    yield engine
    engine.stop()


def conversation(engine, seed):
    """A first turn of 30 tokens answered with 4; -> (the next turn's prompt: 32 tokens in full pages, then 5)."""
    first = prompts_of([30], seed=seed)[0]
    answer, _ = run_all(engine, [first], SamplingParams(max_tokens=4))[0]
    return first + answer + prompts_of([3], seed=seed + 100)[0]


def test_a_finished_requests_pages_stay_cached_while_other_requests_come_and_go(small_pool, model):
    follow = conversation(small_pool, seed=30)
    conversation(small_pool, seed=31)  # another client's request between the two turns: free pages were enough
    request = small_pool.submit(Request(follow, SamplingParams(max_tokens=6)))
    tokens, _ = request.result(timeout=300)
    assert request.cached_tokens == 32
    assert tokens == generate(model, [follow], max_new_tokens=6, eos_token_ids=())[0]
    assert small_pool.kv_pages_used == 0


def test_when_the_pool_needs_pages_the_least_recently_freed_are_given_up(small_pool, model):
    # 3 pages each, freed after every other page (their first two cached): a's last page first, then b's
    a, b = conversation(small_pool, seed=32), conversation(small_pool, seed=33)
    run_all(small_pool, prompts_of([56], seed=34), SamplingParams(max_tokens=8))  # 4 pages: 2 older, then a's tail two
    turns = [small_pool.submit(Request(p, SamplingParams(max_tokens=4))) for p in (b, a)]
    tokens = [r.result(timeout=300)[0] for r in turns]
    assert [r.cached_tokens for r in turns] == [32, 0]
    assert tokens == [generate(model, [p], max_new_tokens=4, eos_token_ids=())[0] for p in (b, a)]


def test_under_a_random_load_of_conversations_every_request_gives_generates_tokens_whatever_was_cached(small_pool,
                                                                                                     model):
    """Five conversations taking turns, one at a time and in bursts, through three sequences and 8 pages: pages
    shared, given up and preempted, and never a wrong token."""
    rng = np.random.default_rng(40)
    history = prompts_of([16, 18, 20, 22, 24], seed=41)
    done, hits = [], small_pool.stats.prefix_cache_hits
    for _ in range(10):
        burst = []
        for c in rng.choice(5, size=rng.choice([1, 1, 2, 3]), replace=False):
            prompt = history[c] + rng.integers(0, 512, int(rng.integers(1, 6))).tolist()
            burst.append((c, small_pool.submit(Request(prompt, SamplingParams(max_tokens=int(rng.integers(2, 6)))))))
        for c, r in burst:
            tokens, _ = r.result(timeout=300)
            done.append((r.prompt, tokens))
            history[c] = (r.prompt + tokens)[-40:] if len(r.prompt) + len(tokens) > 44 else r.prompt + tokens
    assert small_pool.stats.prefix_cache_hits > hits  # some turns found their conversation cached
    assert [t for _, t in done] == [generate(model, [p], max_new_tokens=len(t), eos_token_ids=())[0] for p, t in done]
    assert small_pool.kv_pages_used == 0


def test_a_request_preempted_when_pages_run_out_finishes_with_the_tokens_it_would_have_had(small_pool, model):
    """Three requests that each grow to 4 pages over a pool of 8: the newest is preempted, prefilled again with what
    it had generated, and goes on; greedy and sampled alike."""
    prompts = prompts_of([20, 24], seed=42)
    greedy = SamplingParams(max_tokens=40)
    sampled = SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, repetition_penalty=1.1, seed=3)
    alone = [run_all(small_pool, [p], params)[0] for p, params in zip(prompts, (greedy, sampled))]
    before = small_pool.stats.num_preemptions
    squeeze = small_pool.submit(Request(prompts_of([30], seed=43)[0], SamplingParams(max_tokens=34)))
    together = run_all(small_pool, prompts, [greedy, sampled])
    squeeze.result(timeout=300)
    assert small_pool.stats.num_preemptions > before
    assert together == alone
    assert alone[0][0] == generate(model, [prompts[0]], max_new_tokens=40, eos_token_ids=())[0]
    assert small_pool.kv_pages_used == 0


def test_an_engine_whose_pool_cannot_hold_one_sequence_is_refused(model):
    with pytest.raises(InputError, match="fewer than one sequence of max_model_len 64"):
        Engine(model, max_num_seqs=2, max_model_len=64, num_gpu_blocks_override=3)


def test_an_aborted_requests_delivered_tokens_are_cached_as_its_row_holds_them(engine, model):
    prompt = prompts_of([30], seed=15)[0]
    long = engine.submit(Request(prompt, SamplingParams(max_tokens=MAX_LEN - 30)))
    delivered = []
    while len(delivered) < 5:
        delivered += long.events.get(timeout=60)[0]
    engine.abort(long)
    delivered += long.result(timeout=60)[0]
    follow = prompt + delivered + [3, 4, 5]
    request = engine.submit(Request(follow, SamplingParams(max_tokens=6)))
    tokens, _ = request.result(timeout=300)
    assert request.cached_tokens == (30 + len(delivered) - 1) // PAGE * PAGE
    assert tokens == generate(model, [follow], max_new_tokens=6, eos_token_ids=())[0]


def test_without_prefix_caching_every_prompt_is_prefilled_whole(model):
    engine = Engine(model, slots=2, max_len=64, prefill_chunk=32, eos_token_ids=(), prefix_caching=False).start()
    try:
        first = prompts_of([30], seed=16)[0]
        answer, _ = run_all(engine, [first], SamplingParams(max_tokens=5))[0]
        request = engine.submit(Request(first + answer + [1, 2], SamplingParams(max_tokens=5)))
        tokens, _ = request.result(timeout=300)
    finally:
        engine.stop()
    assert request.cached_tokens == 0 and engine.stats.prefix_cache_queries == 0
    assert tokens == generate(model, [first + answer + [1, 2]], max_new_tokens=5, eos_token_ids=())[0]


@pytest.mark.parametrize("prompt, params, message", [
    ([], SamplingParams(max_tokens=4), "prompt is empty"),
    ([1, 2, 512], SamplingParams(max_tokens=4), "token id 512 is outside the vocabulary"),
    ([1] * 200, SamplingParams(max_tokens=57), "the prompt has 200 tokens and max_tokens is 57"),
    ([1], SamplingParams(max_tokens=0), "max_tokens must be an integer >= 1"),
    ([1], SamplingParams(max_tokens=4, temperature=-1), "temperature must be >= 0"),
    ([1], SamplingParams(max_tokens=4, top_p=0), "top_p must be in (0, 1]"),
])
def test_a_request_the_engine_cannot_run_is_an_input_error(engine, prompt, params, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        engine.submit(Request(prompt, params))


def test_a_full_queue_refuses_new_requests(model):
    engine = Engine(model, slots=1, max_len=32, prefill_chunk=16, max_waiting=1, eos_token_ids=()).start()
    try:
        busy = [engine.submit(Request([1, 2, 3], SamplingParams(max_tokens=29))) for _ in range(2)]
        with pytest.raises(QueueFull):
            engine.submit(Request([1], SamplingParams(max_tokens=2)))
        assert [r.result(timeout=120)[1] for r in busy] == ["length", "length"]
    finally:
        engine.stop()


def test_the_engine_on_a_device_mesh_gives_the_tokens_of_one_device(checkpoint):
    """A data=2 x expert=2 mesh of four XLA:CPU devices, in a fresh process; a cached prefix included."""
    script = textwrap.dedent(f"""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import qwen2_jax
        from qwen2_jax.inference.serving.engine import Engine, Request, SamplingParams
        from qwen2_jax.sharding import make_mesh
        prompts = [[5, 9, 200, 3], list(range(1, 40)), [7] * 20, [300]]
        out = []
        for mesh in (None, make_mesh("data=2,expert=2")):
            model = qwen2_jax.from_pretrained({checkpoint!r}, dtype="float32", mesh=mesh)
            engine = Engine(model, slots=4, max_len=64, prefill_chunk=32, eos_token_ids=()).start()
            requests = [engine.submit(Request(p, SamplingParams(max_tokens=10))) for p in prompts]
            results = [r.result(timeout=300) for r in requests]
            # The next turn of the 39-token prompt: its 48 tokens in full pages shared.
            follow = engine.submit(Request(prompts[1] + results[1][0] + [2, 4], SamplingParams(max_tokens=6)))
            out.append((results, follow.result(timeout=300), follow.cached_tokens))
            engine.stop()
        assert out[0][2] == 48, out
        assert out[0] == out[1], out
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
