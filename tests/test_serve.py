"""``qwen2-jax serve`` as a client sees it: the real server in a subprocess on a tiny checkpoint with the real
Qwen tokenizer, called with the official ``openai`` client (raw HTTP where the client hides the wire)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import http.client
import urllib.parse

import openai
import pytest

import qwen2_jax
from qwen2_jax import cli
from qwen2_jax.inference.serving import engine as engine_module
from qwen2_jax.model.config import Qwen2MoeConfig
from qwen2_jax.convert import write_hf_checkpoint
from qwen2_jax.errors import InputError
from qwen2_jax.inference.serving.server import TextStream
from qwen2_jax.inference.tokenizer import build_qwen2_tokenizer_files, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The real vocabulary (so the real tokenizer's ids fit), everything else tiny.
CONFIG = Qwen2MoeConfig(
    vocab_size=151936, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
    shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, num_experts=4, num_experts_per_tok=2, max_position_embeddings=1024, eos_token_id=(151643,))
MAX_LEN = 256
SLOTS, MAX_WAITING = 8, 8  # 16 requests at a time; the 17th is refused
PAGES = 48  # KV pages of 16 positions: 3 sequences of MAX_LEN, so 8 long streams preempt one another
END_PROMPT = [{"role": "user", "content": "Say something, then stop."}]  # greedy, it meets an end token (fixture)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build_qwen2_tokenizer_files(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    """A tiny checkpoint whose generation config adds, as an end token, the 4th token greedy decoding writes
    after END_PROMPT (a random model rarely writes a real end token)."""
    path = tmp_path_factory.mktemp("ckpt")
    write_hf_checkpoint(CONFIG, path, dtype="float32", seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, path / name)
    model, tokenizer = qwen2_jax.from_pretrained(path, dtype="float32"), load_tokenizer(path)
    ids = tokenizer.apply_chat_template(END_PROMPT, tokenize=True)
    out = qwen2_jax.generate(model, [ids], max_new_tokens=12, eos_token_ids=())[0]
    end = next(t for i, t in enumerate(out) if i >= 3 and t not in out[:i] and t not in tokenizer.special_ids)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151643, 151645, end]}))
    return str(path), out[:out.index(end) + 1]


class HTTP:
    """Raw HTTP to the server (the standard library's, so the wire is what the test sees)."""

    def __init__(self, base: str):
        self.base = base
        self.netloc = urllib.parse.urlsplit(base).netloc

    def open(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection(self.netloc, timeout=120)
        if isinstance(body, (dict, list)):
            body, headers = json.dumps(body).encode(), {"content-type": "application/json"}
        conn.request(method, path, body=body, headers=headers or {})
        return conn, conn.getresponse()

    def request(self, method, path, body=None, headers=None):
        conn, r = self.open(method, path, body, headers)
        try:
            return r.status, r.getheader("content-type", ""), r.read().decode()
        finally:
            conn.close()

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, body, headers=None):
        status, _, text = self.request("POST", path, body, headers)
        return status, json.loads(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    path, _ = checkpoint
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               QWEN2_JAX_CACHE_DIR=str(tmp_path_factory.getbasetemp() / "jax-cache"))
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "qwen2_jax.cli", "serve", path, "--port", str(port),
                             "--max-num-seqs", str(SLOTS), "--max-model-len", str(MAX_LEN),
                             "--max-num-batched-tokens", "64", "--max-waiting", str(MAX_WAITING),
                             "--num-gpu-blocks-override", str(PAGES),
                             "--served-model-name", "tiny"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = HTTP(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 300
    while True:
        try:
            if base.get("/health")[0] == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            pytest.fail(f"the server did not start:\n{log.read()[-3000:]}")
        time.sleep(0.5)
    yield base
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return load_tokenizer(checkpoint[0])


def sse_events(server, path, body) -> list:
    """The raw ``data:`` payloads of a streamed response, JSON-decoded ([DONE] kept as the string)."""
    status, kind, text = server.request("POST", path, body)
    assert status == 200 and kind.startswith("text/event-stream"), text
    lines = [line for line in text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def metric(server, name) -> float:
    text = server.get("/metrics")[2]
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"qwen2_jax_{name}"))


GREEDY = dict(model="tiny", temperature=0)
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello! 你好，世界。"}]


def test_models_lists_the_served_model_and_health_answers(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert server.get("/health")[0] == 200


def test_a_chat_stream_has_the_role_first_one_finish_reason_then_usage_and_done(server, client):
    body = dict(GREEDY, messages=CHAT, max_tokens=20, stream=True, stream_options={"include_usage": True},
                ignore_eos=True)
    events = sse_events(server, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "tiny" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["length"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 20
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    whole = client.chat.completions.create(messages=CHAT, max_tokens=20, extra_body={"ignore_eos": True}, **GREEDY)
    assert whole.choices[0].message.content == text and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 20
    counts = lambda u: {k: u[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert counts(usage["usage"]) == counts(whole.usage.model_dump())  # cached_tokens differ: the 2nd reuses the 1st


def test_the_chat_template_is_the_checkpoints(client, tokenizer):
    whole = client.chat.completions.create(messages=CHAT, max_tokens=3, **GREEDY)
    assert whole.usage.prompt_tokens == len(tokenizer.apply_chat_template(CHAT, tokenize=True))


def test_an_end_token_finishes_with_stop_unless_ignore_eos(client, checkpoint, tokenizer):
    _, expected = checkpoint
    done = client.chat.completions.create(messages=END_PROMPT, max_tokens=12, **GREEDY)
    assert done.choices[0].finish_reason == "stop" and done.usage.completion_tokens == len(expected)
    assert done.choices[0].message.content == tokenizer.decode(expected[:-1])
    on = client.chat.completions.create(messages=END_PROMPT, max_tokens=12, extra_body={"ignore_eos": True}, **GREEDY)
    assert on.choices[0].finish_reason == "length" and on.usage.completion_tokens == 12


def test_completions_streamed_and_not_give_the_same_text_a_chunk_per_token_and_max_completion_tokens_counts(client):
    prompt = "The quick brown fox"
    whole = client.completions.create(prompt=prompt, max_tokens=16, **GREEDY)
    stream = list(client.completions.create(prompt=prompt, max_tokens=16, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in stream) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in stream if c.choices[0].finish_reason] == ["length"]
    assert len(stream) == 16  # a chunk per token, its text empty while a character is incomplete
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 16
    chat = client.chat.completions.create(messages=CHAT, max_completion_tokens=5, **GREEDY)
    assert chat.usage.completion_tokens == 5 and chat.choices[0].finish_reason == "length"


def test_a_stop_string_ends_the_text_before_it_and_never_leaks_into_the_stream(client):
    whole = client.completions.create(prompt="Once upon a time", max_tokens=40, **GREEDY).choices[0].text
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]  # three characters from the middle: across tokens, likely
    expected = whole[:whole.index(stop)]
    stopped = client.completions.create(prompt="Once upon a time", max_tokens=40, stop=[stop, "\u2603never"], **GREEDY)
    assert stopped.choices[0].text == expected and stopped.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(prompt="Once upon a time", max_tokens=40, stop=stop, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_a_text_stream_holds_back_a_possible_stop_string_and_never_splits_a_character(tokenizer):
    hello = tokenizer.encode("Hello world, and")
    stream = TextStream(tokenizer, ["world,"], tokenizer.special_ids)
    pieces = [stream.push([t], final=False) for t in hello]
    assert "".join(pieces) == "Hello " and stream.stopped
    # "é" as its two bytes, each a token of its own (the byte-level alphabet: 0xC3 -> "Ã", 0xA9 -> "©")
    first, second = tokenizer._hf.token_to_id("Ã"), tokenizer._hf.token_to_id("©")
    stream = TextStream(tokenizer, [], tokenizer.special_ids)
    assert stream.push([first], final=False) == "" and stream.push([second], final=False) == "é"


def test_sampling_with_a_seed_repeats_and_takes_top_k_top_p_and_repetition_penalty(client):
    kw = dict(model="tiny", messages=CHAT, max_tokens=16, temperature=0.9, top_p=0.9,
              extra_body={"top_k": 40, "repetition_penalty": 1.1})
    first = client.chat.completions.create(seed=11, **kw).choices[0].message.content
    assert client.chat.completions.create(seed=11, **kw).choices[0].message.content == first
    assert client.chat.completions.create(seed=12, **kw).choices[0].message.content != first


def test_sixteen_concurrent_streams_each_get_the_text_of_their_request_alone(client):
    prompts = [f"Story {i}: " + "once " * (i * 7) for i in range(16)]  # different lengths, some in pieces
    alone = [client.completions.create(prompt=p, max_tokens=12, **GREEDY).choices[0].text for p in prompts]
    results = [None] * 16

    def stream(i):
        chunks = client.completions.create(prompt=prompts[i], max_tokens=12, stream=True, **GREEDY)
        results[i] = "".join(c.choices[0].text for c in chunks)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == alone


def test_sixteen_clients_get_generates_tokens_under_preemption_and_with_prefix_hits(client, server, checkpoint,
                                                                                   tokenizer):
    """16 concurrent streams of 100 tokens over a pool of 48 pages (8 running need up to 80): requests are
    preempted and recomputed; half the prompts share a 48-token document (3 pages shared); each text is the text of
    ``generate``'s tokens for its prompt alone."""
    model = qwen2_jax.from_pretrained(checkpoint[0], dtype="float32")
    document = list(range(3000, 3048))
    prompts = [document + [4000 + i] * (i + 1) if i % 2 else list(range(5000 + 100 * i, 5000 + 100 * i + 10 + 3 * i))
               for i in range(16)]
    preempted, hits = metric(server, "num_preemptions_total"), metric(server, "prefix_cache_hits_total")
    results = [None] * 16

    def stream(i):
        chunks = client.completions.create(prompt=prompts[i], max_tokens=100, stream=True, extra_body={"ignore_eos": True},
                                           **GREEDY)
        results[i] = "".join(c.choices[0].text for c in chunks)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    expected = [tokenizer.decode(t) for t in qwen2_jax.generate(model, prompts, max_new_tokens=100, eos_token_ids=())]
    assert results == expected
    assert metric(server, "num_preemptions_total") > preempted
    assert metric(server, "prefix_cache_hits_total") >= hits + 48  # at least one question found the document
    assert metric(server, "kv_pages_used") == 0


def test_a_random_soak_with_disconnects_ends_with_every_page_free(server):
    """300 streamed requests of random lengths from 8 clients at once, a fifth of them dropped mid-stream: each of
    the others ends with a finish reason, and afterwards no request runs or waits and every page is free."""
    import random

    rng = random.Random(7)
    plans = [(rng.sample(range(1000, 9000), rng.randint(1, 120)), rng.randint(1, 60), rng.random() < 0.2)
             for _ in range(300)]
    finished, errors, lock = [], [], threading.Lock()

    def client_loop(k):
        for prompt, max_tokens, drop in plans[k::8]:
            body = dict(GREEDY, prompt=prompt, max_tokens=max_tokens, stream=True, ignore_eos=True)
            conn, r = server.open("POST", "/v1/completions", body)
            try:
                if r.status != 200:
                    with lock:
                        errors.append(r.status)
                    continue
                reasons = []
                for n, line in enumerate(r):
                    if drop and n >= 2:
                        break  # the client goes away mid-stream
                    if line.startswith(b"data: {"):
                        reasons += [c["finish_reason"] for c in json.loads(line[6:])["choices"] if c["finish_reason"]]
                if not drop:
                    with lock:
                        finished.append(reasons)
            finally:
                conn.close()

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not errors and len(finished) == sum(not drop for *_, drop in plans)
    assert all(reasons == ["length"] for reasons in finished)
    deadline = time.monotonic() + 60
    while metric(server, "num_requests_running") + metric(server, "num_requests_waiting") > 0 and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "num_requests_running") == metric(server, "num_requests_waiting") == 0
    assert metric(server, "kv_pages_used") == 0 and server.get("/health")[0] == 200


def test_the_next_turn_of_a_chat_reuses_the_cached_conversation_and_usage_says_how_much(client, server, tokenizer):
    system = {"role": "system", "content": "You answer in one short sentence, " + "and politely " * 20}
    first = [system, {"role": "user", "content": "Name a colour."}]
    answer = client.chat.completions.create(messages=first, max_tokens=6, extra_body={"ignore_eos": True}, **GREEDY)
    # Another client's request between the turns takes free pages; the first turn's stay cached.
    client.completions.create(prompt=list(range(2000, 2060)), max_tokens=4, **GREEDY)
    assert metric(server, "kv_pages_used") == 0
    hits = metric(server, "prefix_cache_hits_total")
    second = first + [{"role": "assistant", "content": answer.choices[0].message.content},
                      {"role": "user", "content": "Another?"}]
    reply = client.chat.completions.create(messages=second, max_tokens=6, extra_body={"ignore_eos": True}, **GREEDY)
    cached = reply.usage.prompt_tokens_details.cached_tokens
    first_len = len(tokenizer.apply_chat_template(first, tokenize=True))
    assert first_len // 16 * 16 <= cached < reply.usage.prompt_tokens and cached % 16 == 0  # whole pages of 16
    assert metric(server, "prefix_cache_hits_total") == hits + cached
    assert answer.usage.prompt_tokens_details.cached_tokens == 0


def test_a_question_on_a_document_another_stream_is_still_reading_reuses_that_streams_prompt(server, client):
    document = list(range(1000, 1040))  # token ids
    reading = dict(GREEDY, prompt=document, max_tokens=MAX_LEN - 40, stream=True, ignore_eos=True)
    conn, r = server.open("POST", "/v1/completions", reading)
    try:
        assert r.readline().startswith(b"data: ")  # the reader streams: its prompt is in its pages
        question = client.completions.create(prompt=document + [7, 8, 9], max_tokens=4, **GREEDY)
        assert metric(server, "num_requests_running") == 1  # the reader is still going
    finally:
        conn.close()
    assert question.usage.prompt_tokens_details.cached_tokens == 32  # its full pages of 16


@pytest.mark.parametrize("argv, on", [([], True), (["--no-enable-prefix-caching"], False),
                                      (["--no-enable-prefix-caching", "--enable-prefix-caching"], True)])
def test_enable_prefix_caching_reaches_the_engine(checkpoint, monkeypatch, capsys, argv, on):
    made = {}

    def engine(model, **settings):  # stands in for the engine, and stops the command before it serves
        made.update(settings)
        raise InputError("not serving in this test")

    monkeypatch.setattr(engine_module, "Engine", engine)
    assert cli.main(["serve", checkpoint[0], "--max-model-len", "64", "--port", "0", *argv]) == 2
    assert "not serving in this test" in capsys.readouterr().err and made["enable_prefix_caching"] is on


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    aborted = metric(server, 'request_success_total{finished_reason="abort"}')
    body = dict(GREEDY, prompt="Tell me everything", max_tokens=MAX_LEN - 16, stream=True, ignore_eos=True)
    conn, r = server.open("POST", "/v1/completions", body)
    assert r.readline().startswith(b"data: ")  # streaming has begun; then the client goes away
    conn.close()
    deadline = time.monotonic() + 60
    while metric(server, "num_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "num_requests_running") == 0
    assert metric(server, 'request_success_total{finished_reason="abort"}') == aborted + 1


def test_a_full_queue_answers_503_and_the_server_goes_on(server, client):
    body = dict(GREEDY, messages=CHAT, max_tokens=MAX_LEN - 64, stream=True, ignore_eos=True)
    streams = [server.open("POST", "/v1/chat/completions", body) for _ in range(SLOTS + MAX_WAITING)]
    for _, r in streams:  # the role chunk comes once a request is queued
        assert r.readline().startswith(b"data: ")
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(messages=CHAT, max_tokens=2, **GREEDY)
    assert e.value.status_code == 503 and e.value.body["type"] == "server_error"
    for conn, _ in streams:
        conn.close()
    deadline = time.monotonic() + 60
    while metric(server, "num_requests_running") + metric(server, "num_requests_waiting") > 0 and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.completions.create(prompt="ok", max_tokens=2, **GREEDY).choices[0].finish_reason == "length"


BAD = [  # (path, body, status, param, words in the message)
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages", "messages must be"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400, "messages", "messages must be"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user"}]}, 400, "messages", "content"),
    ("/v1/chat/completions", {"messages": CHAT}, 400, "model", "model is required"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": CHAT}, 404, "model", "does not exist"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature", "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature", "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p", "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_k": 1.5}, 400, "top_k", "top_k"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 2}, 400, "n", "n must be 1"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": 5}, 400, "stop", "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream_options": 1}, 400, "stream_options", "object"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt", "prompt must be"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 2}, 400, "logprobs", "not supported"),
    ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "frequency_penalty": 0.5}, 400, "frequency_penalty",
     "not supported"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 151936]}, 400, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"model": "tiny", "prompt": "x " * 200, "max_tokens": 100}, 400, "max_tokens",
     "maximum context length is 256 tokens"),
]


@pytest.mark.parametrize("path, body, status, param, words", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_request_gets_an_openai_error_and_the_server_answers_the_next(server, client, path, body, status, param,
                                                                           words):
    code, response = server.post(path, body)
    assert code == status
    error = response["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and words in error["message"]
    assert client.completions.create(prompt="ok", max_tokens=2, **GREEDY).choices[0].finish_reason == "length"


def test_a_prompt_beyond_the_context_names_both_numbers_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(prompt=list(range(1000, 1200)), max_tokens=100, **GREEDY)
    assert e.value.status_code == 400 and "200 in the prompt, 100 for the completion" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", "\"\u00e9\"".encode("latin-1")])
def test_a_body_that_is_not_a_json_object_is_a_400_not_a_422(server, raw):
    status, response = server.post("/v1/chat/completions", raw, headers={"content-type": "application/json"})
    assert status == 400 and response["error"]["type"] == "invalid_request_error"
    assert server.get("/health")[0] == 200


def test_metrics_report_requests_latencies_tokens_and_slots_and_nothing_compiles_under_load(server, client):
    compiled = metric(server, "compilations_total")
    prompts = ["a", "b " * 50, "c " * 150]
    for i, p in enumerate(prompts):
        client.completions.create(prompt=p, max_tokens=5 + i, temperature=0.5 * i, seed=i, model="tiny")
    text = server.get("/metrics")[2]
    for name in ("num_requests_running", "num_requests_waiting", "time_to_first_token_seconds_bucket",
                 "inter_token_latency_seconds_sum", "prompt_tokens_total", "generation_tokens_total", "max_num_seqs", "kv_cache_usage_perc"):
        assert f"qwen2_jax_{name}" in text
    assert metric(server, "generation_tokens_total") >= 18 and metric(server, "time_to_first_token_seconds_count") >= 3
    assert metric(server, "compilations_total") == compiled
