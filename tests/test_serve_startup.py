"""``qwen2-jax serve`` as an operator starts it: vLLM's flag names (the old ones refused naming the new), bad flags
and a port in use refused in one line before anything loads, what stderr says while it starts and per request,
``--api-key``, and the KV cache's names in /metrics. Two tiny servers run as subprocesses (one with an API key,
one with --disable-log-requests on port 0); the rest runs the command in-process up to the engine."""

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest

from qwen2_jax import cli
from qwen2_jax.cli import serve as cli_serve
from qwen2_jax.convert import write_hf_checkpoint
from qwen2_jax.errors import InputError
from qwen2_jax.inference.serving import engine as engine_module
from qwen2_jax.inference.tokenizer import build_qwen2_tokenizer_files
from qwen2_jax.model.config import Qwen2MoeConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTEXT = 256
CONFIG = Qwen2MoeConfig(
    vocab_size=151936, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
    shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, num_experts=4, num_experts_per_tok=2, max_position_embeddings=CONTEXT, eos_token_id=(151643,))
KEY = "sk-test-0123456789"
MAX_MODEL_LEN = 64
# The smallest engine that serves: few programs to compile.
SMALL = ["--max-num-seqs", "2", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-batched-tokens", "32",
         "--served-model-name", "tiny"]
CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer = build_qwen2_tokenizer_files(tmp_path_factory.mktemp("tokenizer"))
    path = tmp_path_factory.mktemp("ckpt")
    write_hf_checkpoint(CONFIG, path, dtype="float32", seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, path / name)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(*argv) -> list[str]:
    return [sys.executable, "-m", "qwen2_jax.cli", "serve", *map(str, argv)]


def environment(tmp_path_factory) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
                QWEN2_JAX_CACHE_DIR=str(tmp_path_factory.getbasetemp() / "jax-cache"))


def get(port: int, path: str, key: str | None = None, body=None, timeout: float = 120):
    """(status, JSON body) of GET ``path`` (POST with ``body``), with ``Authorization: Bearer key`` if given."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"content-type": "application/json"} if body is not None else {}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    try:
        conn.request("GET" if body is None else "POST", path, body=None if body is None else json.dumps(body),
                     headers=headers)
        r = conn.getresponse()
        text = r.read().decode()
        return r.status, (json.loads(text) if r.getheader("content-type", "").startswith("application/json")
                          else text)
    finally:
        conn.close()


class Server:
    """``qwen2-jax serve`` in a subprocess, its stderr read line by line as it comes (with when each came)."""

    def __init__(self, argv, env, on_line=None):
        self.proc = subprocess.Popen(command(*argv), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, str]] = []
        self.changed = threading.Condition()
        self.on_line = on_line
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            with self.changed:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self.changed.notify_all()
            if self.on_line:
                self.on_line(line)
        with self.changed:
            self.changed.notify_all()

    def text(self) -> str:
        with self.changed:
            return "\n".join(line for _, line in self.lines)

    def wait_for(self, pattern: str, timeout: float = 300) -> tuple[float, re.Match]:
        """(when it came, the match) of the first stderr line that matches ``pattern``."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for t, line in self.lines:
                    m = re.search(pattern, line)
                    if m:
                        return t, m
                if self.proc.poll() is not None and not self.reader.is_alive():
                    pytest.fail(f"the server exited ({self.proc.returncode}) before {pattern!r}:\n{self.text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no {pattern!r} on stderr in {timeout} s:\n{self.text()[-3000:]}")
                self.changed.wait(1)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def keyed(checkpoint, tmp_path_factory):
    """A server with --api-key on a port chosen here. A request sent as soon as stderr says "loading" (the port is
    already held then) is recorded with when it was answered; and so is the first request after "serving"."""
    port = free_port()
    early = {}

    def probe():
        early["status"] = get(port, "/health", timeout=300)[0]
        early["at"] = time.monotonic()

    def on_line(line):
        if line.startswith("loading ") and "thread" not in early:
            early["thread"] = threading.Thread(target=probe, daemon=True)
            early["thread"].start()

    server = Server([checkpoint, "--port", port, "--api-key", KEY, *SMALL], environment(tmp_path_factory), on_line)
    try:
        server.serving_at, m = server.wait_for(r"^serving 'tiny' on (\S+)")
        started = time.monotonic()
        server.first = get(port, "/health", timeout=10)[0], time.monotonic() - started
        server.url, server.port, server.early = m[1], port, early
        if "thread" in early:
            early["thread"].join(timeout=60)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def quiet(checkpoint, tmp_path_factory):
    """A server with --disable-log-requests, no API key, on port 0 (its address read from "serving")."""
    server = Server([checkpoint, "--port", "0", "--disable-log-requests", *SMALL], environment(tmp_path_factory))
    try:
        _, m = server.wait_for(r"^serving 'tiny' on http://127\.0\.0\.1:(\d+)/v1$")
        server.port = int(m[1])
        yield server
    finally:
        server.stop()


# ---- start-up ------------------------------------------------------------------------------------------------
def test_a_port_in_use_is_refused_in_one_line_before_anything_loads(checkpoint, tmp_path_factory):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        proc = subprocess.run(command(checkpoint, "--port", port, *SMALL), cwd=ROOT, env=environment(tmp_path_factory),
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"qwen2-jax serve: error: cannot listen on 127.0.0.1:{port}: the port is in use (is "
                           "another server running there?)\n")
    assert time.monotonic() - start < 60  # the imports only: nothing loaded (no "loading" line), nothing compiled


def test_a_second_server_on_the_port_of_a_running_one_is_refused(keyed, checkpoint, tmp_path_factory):
    proc = subprocess.run(command(checkpoint, "--port", keyed.port, *SMALL), cwd=ROOT,
                          env=environment(tmp_path_factory), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"cannot listen on 127.0.0.1:{keyed.port}: the port is in use" in proc.stderr
    assert get(keyed.port, "/health")[0] == 200  # the running one goes on


def test_stderr_says_what_loads_and_compiles_then_serving_once_requests_are_answered(keyed, checkpoint):
    lines = keyed.text().splitlines()
    order = [next(i for i, line in enumerate(lines) if re.search(pattern, line)) for pattern in (
        rf"^loading {re.escape(checkpoint)} \(float32\)$",
        rf"^loaded {re.escape(checkpoint)} \(float32, [0-9.]+ MB on the device\) in [0-9.]+ s$",
        r"^compiling ",
        r"^engine ready in [0-9.]+ s: ",
        rf"^serving 'tiny' on http://127\.0\.0\.1:{keyed.port}/v1 \(API key required\)$")]
    assert order == sorted(order), lines
    assert keyed.url == f"http://127.0.0.1:{keyed.port}/v1"
    status, took = keyed.first
    assert status == 200 and took < 5  # the first request after "serving" is answered at once
    # A request sent while the model loaded was not refused (the port was held) and was answered once the
    # engine was ready, not before.
    ready_at, _ = keyed.wait_for(r"^engine ready in ")
    assert keyed.early["status"] == 200 and keyed.early["at"] > ready_at


# ---- --api-key -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, body", [("/v1/models", None),
                                        ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 2})])
def test_the_v1_endpoints_want_the_api_key(keyed, path, body):
    for key in (None, "wrong", KEY.upper(), ""):
        status, response = get(keyed.port, path, key, body)
        assert status == 401, (key, response)
        assert set(response["error"]) == {"message", "type", "param", "code"}
        assert response["error"]["code"] == "invalid_api_key" and KEY not in json.dumps(response)
    status, response = get(keyed.port, path, KEY, body)
    assert status == 200, response


def test_health_and_metrics_answer_without_the_key_as_vllms(keyed):
    assert get(keyed.port, "/health") == (200, {"status": "ok"})
    assert get(keyed.port, "/metrics")[0] == 200
    assert get(keyed.port, "/nowhere")[0] == 401  # every path but those two wants the key


def test_the_openai_client_with_the_key_is_served_and_without_it_gets_an_authentication_error(keyed):
    good = openai.OpenAI(base_url=keyed.url, api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in good.models.list().data] == ["tiny"]
    bad = openai.OpenAI(base_url=keyed.url, api_key="nope", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)


# ---- the request log -----------------------------------------------------------------------------------------
LOG_LINE = (r"^request {id} finished: prompt_tokens=(\d+) cached_tokens=(\d+) output_tokens=(\d+) "
            r"ttft=([0-9.]+)s total=([0-9.]+)s finish_reason=(\w+)$")


def test_a_finished_request_logs_one_line_with_its_tokens_times_and_finish_reason(keyed):
    client = openai.OpenAI(base_url=keyed.url, api_key=KEY, max_retries=0, timeout=120)
    done = client.completions.create(model="tiny", prompt="Hello there", max_tokens=3, temperature=0,
                                     extra_body={"ignore_eos": True})
    _, m = keyed.wait_for(LOG_LINE.format(id=re.escape(done.id)), timeout=30)
    assert (int(m[1]), int(m[3]), m[6]) == (done.usage.prompt_tokens, 3, "length")
    assert int(m[2]) == done.usage.prompt_tokens_details.cached_tokens
    assert 0 <= float(m[4]) <= float(m[5])
    stream = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, stream=True,
                                                 extra_body={"ignore_eos": True}))
    _, m = keyed.wait_for(LOG_LINE.format(id=re.escape(stream[0].id)), timeout=30)
    assert (int(m[3]), m[6]) == (2, "length")
    assert keyed.text().count(done.id) == 1 and keyed.text().count(stream[0].id) == 1


def test_disable_log_requests_logs_none_and_without_a_key_nothing_is_asked(quiet):
    status, response = get(quiet.port, "/v1/completions",
                           body={"model": "tiny", "prompt": "Hello", "max_tokens": 2, "ignore_eos": True})
    assert status == 200 and response["usage"]["completion_tokens"] == 2
    assert get(quiet.port, "/v1/models")[0] == 200
    time.sleep(0.5)
    assert "finished:" not in quiet.text() and response["id"] not in quiet.text()


# ---- /metrics and the max model len --------------------------------------------------------------------------
def test_metrics_name_the_kv_cache_pages_preemptions_and_prefix_cache(keyed):
    text = get(keyed.port, "/metrics")[1]
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    for name in ("kv_pages_used", "kv_pages_total", "kv_cache_usage_perc", "num_preemptions_total",
                 "prefix_cache_queries_total", "prefix_cache_hits_total", "num_requests_running",
                 "num_requests_waiting", "max_num_seqs"):
        assert f"qwen2_jax_{name}" in values, name
    assert re.search(r"^# TYPE qwen2_jax_kv_cache_usage_perc gauge$", text, re.MULTILINE)
    assert re.search(r"^# TYPE qwen2_jax_num_preemptions_total counter$", text, re.MULTILINE)
    assert float(values["qwen2_jax_max_num_seqs"]) == 2
    assert 0 <= float(values["qwen2_jax_kv_cache_usage_perc"]) <= 1
    assert "qwen2_jax_slots " not in text and "qwen2_jax_slot_usage" not in text


def test_a_prompt_beyond_the_max_model_len_is_a_400_naming_both_numbers(keyed):
    status, response = get(keyed.port, "/v1/completions", KEY,
                           {"model": "tiny", "prompt": list(range(1000, 1050)), "max_tokens": 20})
    assert status == 400 and response["error"]["code"] == "context_length_exceeded"
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in response["error"]["message"]
    assert "70 tokens (50 in the prompt, 20 for the completion)" in response["error"]["message"]


# ---- flags, in-process up to the engine ---------------------------------------------------------------------
def refused(capsys, *argv) -> str:
    try:
        code = cli.main(["serve", *map(str, argv)])
    except SystemExit as e:  # argparse's refusals (a renamed flag, a bad value)
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and err.startswith("qwen2-jax serve: error: "), (code, err)
    return err


@pytest.mark.parametrize("argv, message", [
    (["--block-size", "24"], "--block-size must be a power of two, got 24"),
    (["--block-size", "0"], "--block-size must be at least 1, got 0"),
    (["--block-size", "128", "--max-model-len", "64"], "--block-size 128 is larger than --max-model-len 64"),
    (["--max-num-seqs", "0"], "--max-num-seqs must be at least 1, got 0"),
    (["--max-model-len", "1"], "--max-model-len must be at least 2, got 1"),
    (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization must be in (0, 1], got 0.0"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in (0, 1], got 1.5"),
    (["--gpu-memory-utilization", "nan"], "--gpu-memory-utilization must be in (0, 1], got nan"),
    (["--max-model-len", str(CONTEXT + 1)], f"--max-model-len {CONTEXT + 1} exceeds the model's context of {CONTEXT}"),
    (["--num-gpu-blocks-override", "0"], "--num-gpu-blocks-override must be at least 1, got 0"),
    (["--max-num-batched-tokens", "8"], "--max-num-batched-tokens must be at least 16, got 8"),
    (["--kv-cache-memory", "2XB"], "expected bytes, e.g. 2147483648, 2GiB, 512MiB or 4GB; got '2XB'"),
    (["--port", "65536"], "--port must be in [0, 65535], got 65536"),
    (["--api-key", ""], "--api-key must not be empty"),
    (["--slots", "4"], "--slots is now --max-num-seqs (vLLM's name)"),
    (["--max-len", "64"], "--max-len is now --max-model-len (vLLM's name)"),
    (["--prefill-chunk", "64"], "--prefill-chunk is now --max-num-batched-tokens (vLLM's name)"),
    (["--no-prefix-caching"], "--no-prefix-caching is now --no-enable-prefix-caching (vLLM's name)"),
])
def test_a_bad_or_renamed_flag_is_refused_in_one_line_before_anything_loads(checkpoint, capsys, monkeypatch, argv,
                                                                          message):
    from qwen2_jax.inference.serving import server

    monkeypatch.setattr(server, "bind_socket", lambda *a: pytest.fail("the port was taken before the flags' checks"))
    assert message in refused(capsys, checkpoint, *argv)


def test_a_renamed_flag_is_refused_by_the_process_without_a_traceback():
    proc = subprocess.run(command("/nonexistent", "--slots", "4"), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "qwen2-jax serve: error: --slots is now --max-num-seqs (vLLM's name)\n"


def test_the_flags_reach_the_engine_under_vllms_names(checkpoint, capsys, monkeypatch):
    made = {}

    def engine(model, **settings):  # stands in for the engine, and stops the command before it serves
        made.update(settings)
        raise InputError("not serving in this test")

    monkeypatch.setattr(engine_module, "Engine", engine)
    assert cli.main(["serve", checkpoint, "--port", "0", "--max-num-seqs", "3", "--max-num-batched-tokens", "64",
                     "--block-size", "32", "--kv-cache-memory", "2GiB", "--num-gpu-blocks-override", "7",
                     "--gpu-memory-utilization", "0.5", "--no-enable-prefix-caching", "--max-waiting", "5",
                     "--attention-backend", "pallas"]) == 2
    assert capsys.readouterr().err.endswith("qwen2-jax serve: error: not serving in this test\n")
    made.pop("eos_token_ids")
    assert made == dict(max_num_seqs=3, max_model_len=CONTEXT, max_num_batched_tokens=64, block_size=32,
                        num_gpu_blocks_override=7, gpu_memory_utilization=0.5, kv_cache_memory=2**31,
                        enable_prefix_caching=False, max_waiting=5, batch_wait_ms=cli_serve.DEFAULT_BATCH_WAIT_MS,
                        attention_backend="pallas")
    # --max-model-len's default is 2048, or the model's context where it is shorter (CONTEXT here)
    assert cli_serve.DEFAULT_MAX_LEN > CONTEXT


@pytest.mark.parametrize("text, value", [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("4GB", 4 * 10**9),
                                         ("123", 123), ("1.5G", 1_500_000_000), ("64 kib", 65536)])
def test_kv_cache_memory_takes_bytes_with_units(text, value):
    assert cli_serve.parse_bytes(text) == value


def test_the_shortest_batch_is_the_engines_shortest_prefill_call():
    from qwen2_jax.inference.serving import scheduler

    assert cli_serve.MIN_BATCHED_TOKENS == scheduler.MIN_CALL
