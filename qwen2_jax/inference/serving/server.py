"""``qwen2-jax serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching
``engine.Engine``.

    qwen2-jax serve CKPT [--host 127.0.0.1] [--port 8000] [--max-num-seqs 16] [--max-model-len 2048]
                         [--max-num-batched-tokens 512] [--block-size 16] [--kv-cache-memory BYTES]
                         [--api-key KEY] [--disable-log-requests] [--mesh SPEC] [--dtype ..] [--quantize ..]

Endpoints: ``POST /v1/chat/completions`` and ``/v1/completions`` (streamed or not), ``GET /v1/models``,
``/health`` and ``/metrics`` (Prometheus text). The semantics are vLLM's, and so are the flags' names:

- a stream's first chat chunk carries the role; exactly one chunk carries ``finish_reason`` ("stop" for an end
  token or a stop string, "length" for max_tokens or the context); with ``stream_options.include_usage`` a last
  chunk with ``choices: []`` carries the usage; then ``data: [DONE]``. The streamed texts joined equal the
  text of the same request not streamed;
- text is detokenised incrementally (``tokenizer.StreamDecoder``: a multi-byte character is never split), and
  text that could still become a stop string is held back until it cannot; the stop string is not returned;
- bad requests get ``{"error": {"message", "type", "param", "code"}}`` with 400 (never 422), an unknown model
  404, a full queue 503, a prompt plus max_tokens beyond the max model len 400 naming both numbers. A stream whose
  client goes away aborts its request: its KV pages are free the next step;
- ``usage.prompt_tokens_details.cached_tokens``: the prompt tokens found in the engine's prefix cache;
- with an API key (``--api-key``), the /v1 endpoints answer 401 (an OpenAI-shaped error, code
  "invalid_api_key") without ``Authorization: Bearer KEY``; /health and /metrics stay open, as vLLM's;
- a line on stderr per finished request (``--disable-log-requests``: none): its id, prompt, cached and output
  tokens, time to first token, total time and finish reason;
- /metrics: requests running and waiting, KV pages used and in all (``kv_cache_usage_perc``: their ratio, 0 to
  1, as vLLM's), preemptions, prefix cache queries and hits, tokens, finish reasons, latency histograms.

Start-up (``serve``): the socket is bound and listening first (``bind_socket``: the command line does it before it
loads the checkpoint, so a port in use is refused at once and nothing can take it meanwhile; connections that
come meanwhile wait in its backlog), then the engine compiles its steps, saying which on stderr, prints its
summary, and uvicorn takes the socket over; "serving NAME on http://HOST:PORT/v1" is printed once uvicorn
answers on it.

Sampling defaults are the checkpoint's ``generation_config.json`` (OpenAI's where it says nothing); beyond
OpenAI's fields the server takes ``top_k``, ``repetition_penalty`` and ``ignore_eos`` (vLLM's extras).
fastapi and uvicorn are the ``serve`` extra, imported only by ``serve`` and ``create_app``. The command line is
``qwen2_jax.cli.serve``.
"""

# No ``from __future__ import annotations``: FastAPI reads the handlers' annotations (``request: Request``,
# imported inside ``create_app``) as objects.
import asyncio
import errno
import hashlib
import json
import secrets
import socket
import sys
import time
import uuid

from qwen2_jax.errors import InputError

DEFAULT_MAX_LEN = 2048


class APIError(Exception):
    """An OpenAI-shaped error response."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- reading a request's fields -------------------------------------------------------------------------------
def _field(body: dict, name: str, kind, default=None, *, check=None, expect: str = ""):
    """``body[name]`` (None or absent: ``default``) when it is of ``kind`` and passes ``check``; else a 400
    naming the field."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if ok and kind in (int, float) and isinstance(value, float) and not value == value:  # nan
        ok = False
    if ok and check is not None:
        ok = check(value)
    if not ok:
        raise APIError(f"{name} must be {expect}, got {json.dumps(value)[:80]}", param=name)
    return value


# Fields this server does not implement, with the values that mean "off".
UNSUPPORTED = {"logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,), "best_of": (1,), "suffix": ("",),
               "logit_bias": ({},), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "tools": ([],),
               "response_format": ({"type": "text"},)}


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError("stop must be a non-empty string or a list of them", param="stop")
    return stop


class Protocol:
    """What the two completion endpoints share: turning a request body into an engine request, and the engine's
    tokens into OpenAI responses."""

    def __init__(self, engine, tokenizer, model_name: str, generation_config=None):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        gen = generation_config
        # vLLM's defaults: the checkpoint's generation config, else OpenAI's (temperature 1, top_p 1)
        self.defaults = dict(temperature=(gen.temperature if gen.do_sample else 0.0) if gen else 1.0,
                             top_p=gen.top_p if gen else 1.0, top_k=gen.top_k if gen and gen.do_sample else 0,
                             repetition_penalty=gen.repetition_penalty if gen else 1.0)
        self.special_ids = tokenizer.special_ids

    def sampling(self, body: dict, prompt_len: int):
        from .engine import SamplingParams

        if not isinstance(body.get("model"), str):
            raise APIError("model is required: a string (GET /v1/models lists it)", param="model")
        if body["model"] != self.model_name:
            raise APIError(f"The model `{body['model']}` does not exist.", status=404, param="model",
                           code="model_not_found")
        _field(body, "n", int, 1, check=lambda v: v == 1, expect="1 (one choice per request)")
        for name, default in UNSUPPORTED.items():  # refused rather than silently ignored
            if body.get(name) not in (None, *default):
                raise APIError(f"{name} is not supported by this server", param=name)
        _field(body, "stream", bool, False, expect="a boolean")
        number = (int, float)
        max_tokens = None
        for name in ("max_completion_tokens", "max_tokens"):
            value = _field(body, name, int, None, check=lambda v: v >= 1, expect="an integer >= 1")
            max_tokens = value if max_tokens is None else max_tokens
        max_model_len = self.engine.max_model_len
        room = max_model_len - prompt_len
        if max_tokens is None:
            if room < 1:
                raise APIError(f"This model's maximum context length is {max_model_len} tokens. However, "
                               f"your prompt has {prompt_len} tokens, which leaves no room for a completion.",
                               param="messages", code="context_length_exceeded")
            max_tokens = room
        elif prompt_len + max_tokens > max_model_len:
            raise APIError(f"This model's maximum context length is {max_model_len} tokens. However, you "
                           f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} "
                           "for the completion). Please reduce the length of the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        seed = _field(body, "seed", int, None, check=lambda v: -2**63 <= v < 2**64, expect="an integer")
        top_k = _field(body, "top_k", int, self.defaults["top_k"], check=lambda v: v >= -1,
                       expect="an integer >= 0 (0 or -1: off)")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=float(_field(body, "temperature", number, self.defaults["temperature"],
                                     check=lambda v: 0 <= v <= 2, expect="a number in [0, 2]")),
            top_k=max(top_k, 0),
            top_p=float(_field(body, "top_p", number, self.defaults["top_p"], check=lambda v: 0 < v <= 1,
                               expect="a number in (0, 1]")),
            repetition_penalty=float(_field(body, "repetition_penalty", number, self.defaults["repetition_penalty"],
                                            check=lambda v: 0 < v <= 10, expect="a number in (0, 10]")),
            seed=None if seed is None else seed % 2**32,
            ignore_eos=_field(body, "ignore_eos", bool, False, expect="a boolean"))
        options = _field(body, "stream_options", dict, {}, expect="an object")
        include_usage = _field(options, "include_usage", bool, False, expect="a boolean")
        return params, _stop_strings(body), include_usage

    def chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError("messages must be a non-empty list of {role, content} objects", param="messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise APIError(f"messages[{i}] must be an object with a string role", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise APIError(f"messages[{i}].content: only text parts are supported", param="messages")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise APIError(f"messages[{i}].content must be a string or a list of text parts", param="messages")
            out.append({"role": m["role"], "content": content})
        try:
            return self.tokenizer.apply_chat_template(out, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # the checkpoint's template refused them (raise_exception, a missing key)
            raise APIError(f"messages: the chat template cannot render them: {e}", param="messages") from None

    def completion_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str) and prompt:
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.engine.config.vocab_size]
            if bad:
                raise APIError(f"prompt: token id {bad[0]} is outside the vocabulary", param="prompt")
            return prompt
        raise APIError("prompt must be a non-empty string, or a list of token ids (one prompt per request)",
                       param="prompt")


class TextStream:
    """The engine's tokens as text: incremental detokenisation, stop strings found and never leaked (text that
    could still become one is held back), special tokens left out of the text."""

    def __init__(self, tokenizer, stop: list[str], special_ids):
        from qwen2_jax.inference.tokenizer import StreamDecoder

        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
        self.stop, self.special_ids = stop, special_ids
        self.text, self.sent = "", 0
        self.stopped = False  # a stop string was found: the text ends before it

    def push(self, tokens: list[int], final: bool) -> str:
        """The text that can be sent after ``tokens`` (all of it when ``final``)."""
        if self.stopped:
            return ""
        for t in tokens:
            if t not in self.special_ids:
                self.text += self.decoder.push(t)
        if final:
            self.text += self.decoder.flush()
        hold = 0
        if self.stop:
            start = max(0, self.sent - max(len(s) for s in self.stop) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
            elif not final:  # the longest end of the text that begins a stop string
                hold = max((k for s in self.stop for k in range(min(len(s) - 1, len(self.text)), 0, -1)
                            if s.startswith(self.text[-k:])), default=0)
        new = self.text[self.sent:len(self.text) - hold]
        self.sent += len(new)
        return new


# ---- the app --------------------------------------------------------------------------------------------------
class RequireAPIKey:
    """ASGI middleware: a request without ``Authorization: Bearer KEY`` gets a 401 with an OpenAI-shaped error.

    Which paths: vLLM checks the key on the paths under /v1 only, leaving /health and /metrics (and its other
    routes) open, so that load balancers and Prometheus need no key; this server does the same. It keeps open by
    name the only two routes it has outside /v1, and asks the key of every other path (an unknown one included),
    read from the ASGI scope's path: not from a URL rebuilt with the Host header, which a client controls. A pure
    ASGI middleware (not FastAPI's ``@app.middleware``, a BaseHTTPMiddleware), so that it stays out of a stream's
    way and of the disconnect a handler waits for. The key is compared as vLLM's is: SHA-256 digests, in constant
    time. CORS preflights (OPTIONS) carry no key and pass, as in vLLM."""

    OPEN = ("/health", "/metrics")

    def __init__(self, app, api_key: str):
        self.app, self.digest = app, hashlib.sha256(api_key.encode()).digest()

    def authorized(self, scope) -> bool:
        value = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = value.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(
            hashlib.sha256(key.strip().encode("latin-1")).digest(), self.digest)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] != "OPTIONS":  # the app has no websocket routes
            path, root = scope.get("path", ""), scope.get("root_path", "")
            path = path[len(root):] if root and path.startswith(root) else path
            if path not in self.OPEN and not self.authorized(scope):
                from starlette.responses import JSONResponse

                given = any(k == b"authorization" for k, _ in scope.get("headers") or ())
                error = APIError("Incorrect API key provided." if given else
                                 "You didn't provide an API key: send it in an Authorization header using Bearer "
                                 "auth (Authorization: Bearer KEY).", status=401, code="invalid_api_key")
                response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine, tokenizer, model_name: str, generation_config=None, *, api_key: str | None = None,
               log_requests: bool = False):
    """The FastAPI app over a started ``engine``. ``api_key``: the /v1 endpoints want it (``RequireAPIKey``);
    ``log_requests``: a line on stderr per finished request (``request_line``)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from .engine import QueueFull, Request as EngineRequest

    protocol = Protocol(engine, tokenizer, model_name, generation_config)
    app = FastAPI(title="qwen2-jax", docs_url=None, redoc_url=None, openapi_url=None)
    if api_key is not None:
        app.add_middleware(RequireAPIKey, api_key=api_key)
    created = int(time.time())

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):  # FastAPI's 422: OpenAI says 400
        return error_response(APIError(f"invalid request: {e.errors()[:1]}"))

    @app.exception_handler(HTTPException)
    async def _http_error(request, e):
        return error_response(APIError(str(e.detail), status=e.status_code,
                                       type="not_found_error" if e.status_code == 404 else "invalid_request_error"))

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return error_response(APIError(f"the engine stopped: {engine.error!r}", status=503, type="server_error"))
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "qwen2-jax", "max_model_len": engine.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine), media_type="text/plain; version=0.0.4")

    async def complete(request: Request, chat: bool):
        body = await read_body(request)
        prompt = protocol.chat_prompt(body) if chat else protocol.completion_prompt(body)
        params, stop, include_usage = protocol.sampling(body, len(prompt))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req = EngineRequest(prompt, params, deliver=lambda t, f: loop.call_soon_threadsafe(events.put_nowait, (t, f)))
        try:
            engine.submit(req)
        except QueueFull as e:
            raise APIError(f"the server is busy: {e}; retry later", status=503, type="server_error",
                           code="overloaded") from None
        except InputError as e:
            raise APIError(str(e)) from None
        kind = "chat.completion" if chat else "text_completion"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        text = TextStream(tokenizer, stop, protocol.special_ids)
        state = {"generated": 0, "finish": None, "logged": False}

        def ended():
            """Frees the request's pages (nothing when it has ended) and logs it, once."""
            engine.abort(req)
            if log_requests and not state["logged"]:
                state["logged"] = True
                print(request_line(rid, req, state["generated"], state["finish"] or "abort"), file=sys.stderr,
                      flush=True)

        async def pieces():
            """(text, finish_reason or None) as tokens come; aborts the engine request on a stop string."""
            while state["finish"] is None:
                tokens, finish = await events.get()
                state["generated"] += len(tokens)
                if finish == "stop":  # the end token that stopped it is counted, not written (as vLLM)
                    tokens = tokens[:-1]
                new = text.push(tokens, final=finish is not None)
                if text.stopped and finish is None:
                    engine.abort(req)
                    finish = "stop"
                if finish is not None:
                    state["finish"] = "stop" if finish == "abort" else finish
                yield new, state["finish"]

        def usage():
            n = state["generated"]
            return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n,
                    "prompt_tokens_details": {"cached_tokens": req.cached_tokens}}

        if not body.get("stream"):
            out = []
            try:
                async for new, _ in _until_disconnected(pieces(), request):
                    out.append(new)
            finally:
                ended()  # also frees the pages of a client that went away
            content = "".join(out)
            choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                       "finish_reason": state["finish"]} if chat else
                      {"index": 0, "text": content, "logprobs": None, "finish_reason": state["finish"]})
            return {"id": rid, "object": kind, "created": int(time.time()), "model": model_name,
                    "choices": [choice], "usage": usage()}

        def chunk(choices, **extra):
            data = {"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": int(time.time()),
                    "model": model_name, "choices": choices, **extra}
            if include_usage and "usage" not in extra:
                data["usage"] = None
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        def choice(new: str, finish, role: bool = False):
            if chat:
                delta = {"role": "assistant", "content": new} if role else ({"content": new} if new else {})
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": new, "logprobs": None, "finish_reason": finish}

        async def sse():
            try:
                if chat:
                    yield chunk([choice("", None, role=True)])
                async for new, finish in pieces():  # a chunk per token, as vLLM's: its text may be empty
                    yield chunk([choice(new, finish)])      # while a character or a stop string is incomplete
                if include_usage:
                    yield chunk([], usage=usage())
                yield "data: [DONE]\n\n"
            finally:  # the client went away (the task is cancelled), or it ended: free the pages either way
                ended()

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return app


async def _until_disconnected(pieces, request, poll_s: float = 0.5):
    """``pieces`` until it ends or the client of ``request`` disconnects (a non-streamed request's client
    can go away while it waits)."""
    it = pieces.__aiter__()
    while True:
        step = asyncio.ensure_future(it.__anext__())
        while True:
            done, _ = await asyncio.wait({step}, timeout=poll_s)
            if done:
                break
            if await request.is_disconnected():
                step.cancel()
                return
        try:
            yield step.result()
        except StopAsyncIteration:
            return


def request_line(rid: str, req, output_tokens: int, finish_reason: str) -> str:
    """The log line of a finished request: one line, ``key=value`` after the id."""
    now = time.perf_counter()
    ttft = "-" if req.first_token_at is None else f"{req.first_token_at - req.submitted:.3f}s"
    return (f"request {rid} finished: prompt_tokens={len(req.prompt)} cached_tokens={req.cached_tokens} "
            f"output_tokens={output_tokens} ttft={ttft} total={now - req.submitted:.3f}s "
            f"finish_reason={finish_reason}")


def prometheus_text(engine) -> str:
    from .engine import COMPILATIONS

    s = engine.stats
    lines = []

    def metric(name, kind, help_text, samples):
        lines.extend([f"# HELP qwen2_jax_{name} {help_text}", f"# TYPE qwen2_jax_{name} {kind}"])
        lines.extend(f"qwen2_jax_{name}{labels} {value}" for labels, value in samples)

    def histogram(name, help_text, h):
        samples, total = [], 0
        for bound, count in zip((*h.bounds, "+Inf"), h.counts):
            total += count
            samples.append((f'_bucket{{le="{bound}"}}', total))
        samples += [("_sum", h.sum), ("_count", total)]
        metric(name, "histogram", help_text, samples)

    used, total = engine.kv_pages_used, engine.kv_pages_total
    metric("num_requests_running", "gauge", "requests scheduled (prefilling or decoding)", [("", engine.running)])
    metric("num_requests_waiting", "gauge", "requests waiting to be scheduled", [("", engine.waiting)])
    metric("max_num_seqs", "gauge", "requests decoded together at most (--max-num-seqs)",
           [("", engine.max_num_seqs)])
    metric("kv_pages_used", "gauge", "KV cache pages holding a request's tokens", [("", used)])
    metric("kv_pages_total", "gauge", "KV cache pages in all", [("", total)])
    metric("kv_cache_usage_perc", "gauge", "share of the KV cache pages in use, 0 to 1 (1 means 100 percent)",
           [("", used / total if total else 0.0)])
    metric("num_preemptions_total", "counter", "requests preempted (their pages given up, recomputed later) for "
           "want of KV pages", [("", s.num_preemptions)])
    metric("prompt_tokens_total", "counter", "prompt tokens (prefilled, or found in the prefix cache)",
           [("", s.prompt_tokens)])
    metric("generation_tokens_total", "counter", "tokens generated", [("", s.generation_tokens)])
    metric("prefix_cache_queries_total", "counter", "prompt tokens looked up in the prefix cache",
           [("", s.prefix_cache_queries)])
    metric("prefix_cache_hits_total", "counter", "prompt tokens found in the prefix cache (not prefilled again)",
           [("", s.prefix_cache_hits)])
    metric("request_success_total", "counter", "finished requests by finish reason",
           [(f'{{finished_reason="{k}"}}', v) for k, v in sorted(s.requests_finished.items())])
    metric("decode_steps_total", "counter", "decode steps dispatched", [("", engine.steps)])
    metric("prefill_calls_total", "counter", "prefill calls dispatched (each packs whole prompts, or is one "
           "piece of a longer one)", [("", engine.prefills)])
    metric("compilations_total", "counter", "XLA compilations in this process (constant after start-up)",
           [("", COMPILATIONS["backend"])])
    histogram("time_to_first_token_seconds", "from arrival to the first token", s.ttft)
    histogram("inter_token_latency_seconds", "between consecutive tokens of a request", s.itl)
    return "\n".join(lines) + "\n"


# ---- serving ----------------------------------------------------------------------------------------------
def bind_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A TCP socket bound to HOST:PORT and listening (port 0: a free one), for uvicorn to take over once the app
    is ready; connections that come before wait in its backlog. InputError naming HOST:PORT when the port is in
    use, or the address is not this machine's or not the user's to take."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: no wait for a last run's TIME_WAIT
        sock.bind(address)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        why = ("the port is in use (is another server running there?)" if e.errno == errno.EADDRINUSE else
               e.strerror or str(e))
        raise InputError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(False)
    return sock


def url_of(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def serve(model, tokenizer, *, name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          log_requests: bool = True, sock: socket.socket | None = None, progress=None, **engine_settings) -> None:
    """Serves ``model`` as ``name`` on http://HOST:PORT/v1 until the process is stopped. ``sock``: a socket
    ``bind_socket`` made (else it is made here, and closed at the end); ``progress(message)`` hears what happens
    at start-up (default: stderr): the engine's steps as they compile and warm up, the engine's summary, and
    "serving NAME on URL" once uvicorn answers. ``engine_settings``: ``engine.Engine``'s keywords
    (``max_num_seqs``, ``max_model_len``, ``max_num_batched_tokens``, ``block_size``, ``kv_cache_memory``, ...,
    checked by ``engine.check_settings``). ``api_key`` and ``log_requests``: ``create_app``'s."""
    import uvicorn

    from .engine import Engine

    say = progress or _say
    own = sock is None
    if own:
        sock = bind_socket(host, port)
    try:
        cfg = model.config
        eos = [*(model.generation_config.eos_token_id if model.generation_config else ()), *cfg.eos_token_id]
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        start = time.perf_counter()
        engine = Engine(model, eos_token_ids=tuple(dict.fromkeys(eos)), **engine_settings)
        engine.start(progress=say)
        try:
            say(f"engine ready in {time.perf_counter() - start:.1f} s: {engine.summary()}")
            app = create_app(engine, tokenizer, name, model.generation_config, api_key=api_key,
                             log_requests=log_requests)
            url = url_of(host, sock.getsockname()[1])

            class Server(uvicorn.Server):
                async def startup(self, sockets=None):
                    await super().startup(sockets=sockets)
                    if self.started:  # uvicorn answers on the socket from here on
                        say(f"serving {name!r} on {url}" + (" (API key required)" if api_key is not None else ""))

            Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
        finally:
            engine.stop()
    finally:
        if own:
            sock.close()
