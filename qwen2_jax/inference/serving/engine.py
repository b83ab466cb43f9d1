"""Continuous batching over a fixed number of decode slots: the engine behind ``qwen2-jax serve``.

One KV cache of ``slots`` rows x ``max_len`` positions lives on the device, donated to every step. One thread
(``Engine``) owns it and, in a loop:

- frees the slots whose requests ended or were aborted, and admits waiting requests into free slots (idle, it first
  lets a request that just came wait up to ``batch_wait_ms`` for the rest of its burst, so that they share packed
  calls): ``scheduler``;
- prefills, one call of at most ``prefill_chunk`` prompt tokens per loop, so that the slots already decoding go
  on between calls: the whole prompts next in line that fit together packed into one call, or a piece of a
  longer prompt into its row (``scheduler`` chooses, ``runner`` dispatches the ``steps``), a prompt that begins
  with a row's tokens first getting them copied (prefix caching: ``kv_cache_manager``);
- decodes: one token for every running slot, each with its own sampling settings and stopping rules, over the
  fewest rows that hold every busy slot (requests take the lowest free slot);
- reads the tokens of the step before the one it just dispatched, so the device never waits for the host, and
  hands each request its tokens (``Request.deliver``).

``Engine.start`` compiles every step ahead of time (``ModelRunner.compile``), so that no load compiles anything
after that (``TRACES``, ``COMPILATIONS``).

The parts, each importing only those before it: ``request`` (what clients hand in and get back), ``state`` and
``steps`` (the device state and the pure jitted steps), ``kv_cache_manager`` (which tokens each row holds, and
their reuse), ``scheduler`` (queues, admission, what runs next), ``runner`` (compiled steps, dispatch, outputs
read back) and this module, which wires them together. The names other code imports from here are re-exported.
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

from qwen2_jax.errors import InputError
from qwen2_jax.inference.generate import MIN_PROMPT_BUCKET, default_eos_token_ids
from .kv_cache_manager import MIN_PREFIX, KVCacheManager  # noqa: F401
from .request import (IDLE, LENGTH, MAX_EOS, RUNNING, STOPPED, Histogram, QueueFull, Request,  # noqa: F401
                      SamplingParams, Stats)
from .runner import ModelRunner
from .scheduler import DEFAULT_BATCH_WAIT_MS, PrefillJob, Scheduler  # noqa: F401
from .state import (COMPILATIONS, TRACES, EngineState, SlotCache, SlotControls, _new_state,  # noqa: F401
                    abstract_state, state_formats, state_shardings)
from .steps import _decode, _prefill, _prefill_packed, _reuse, _status, jit_step, sample  # noqa: F401


def check_settings(context_length: int, *, flags: bool = False, **settings) -> None:
    """InputError for engine settings (``slots``, ``max_len``, ``prefill_chunk``, ``max_waiting``,
    ``batch_wait_ms``) it cannot run with, named as keywords or, with ``flags``, as the command line's ``--flags``."""
    name = (lambda key: "--" + key.replace("_", "-")) if flags else (lambda key: key)
    for key, low in (("slots", 1), ("max_len", 2), ("prefill_chunk", MIN_PROMPT_BUCKET), ("max_waiting", 0)):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name(key)} must be an integer >= {low}, got {value!r}")
    wait = settings.get("batch_wait_ms", 0)
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 10_000:
        raise InputError(f"{name('batch_wait_ms')} must be a number of milliseconds in [0, 10000], got {wait!r}")
    max_len, chunk = settings["max_len"], settings["prefill_chunk"]
    if max_len > context_length:
        raise InputError(f"{name('max_len')} {max_len} exceeds the model's context of {context_length} tokens")
    if chunk & (chunk - 1) or (chunk < max_len and max_len % chunk):
        raise InputError(f"{name('prefill_chunk')} {chunk} must be a power of two that divides {name('max_len')} "
                         f"{max_len} or is at least it (a piece of a long prompt must never run past its row)")


class Engine:
    """Continuous batching of ``slots`` requests at a time over a model (``from_pretrained``), each request
    using at most ``max_len`` positions (prompt + max_tokens). ``max_waiting``: requests that may wait for a
    slot (``submit`` raises QueueFull past it). ``prefix_caching``: reuse rows' keys and values for prompts that
    begin with their tokens. ``batch_wait_ms``: how long an idle engine lets a first request wait for others
    (``Scheduler._gather_burst``). ``start()`` compiles every shape and starts the thread."""

    def __init__(self, model, *, slots: int = 16, max_len: int = 2048, prefill_chunk: int = 512,
                 max_waiting: int = 256, eos_token_ids: Sequence[int] | None = None, prefix_caching: bool = True,
                 batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS):
        cfg = model.config
        check_settings(cfg.context_length, slots=slots, max_len=max_len, prefill_chunk=prefill_chunk,
                       max_waiting=max_waiting, batch_wait_ms=batch_wait_ms)
        self.model, self.config = model, cfg
        self.slots, self.max_len, self.chunk, self.max_waiting = slots, max_len, prefill_chunk, max_waiting
        self.batch_wait = batch_wait_ms / 1000
        eos = default_eos_token_ids(model) if eos_token_ids is None else tuple(eos_token_ids)
        self.eos_token_ids = tuple(dict.fromkeys(int(e) for e in eos))
        if len(self.eos_token_ids) > MAX_EOS:
            raise InputError(f"at most {MAX_EOS} end tokens, got {len(self.eos_token_ids)}")
        self.prefix_caching = bool(prefix_caching)
        self.runner = ModelRunner(model, slots=slots, max_len=max_len, prefill_chunk=prefill_chunk,
                                  prefix_caching=self.prefix_caching, eos_token_ids=self.eos_token_ids)
        self.buckets, self.piece_sizes, self.rows = self.runner.buckets, self.runner.piece_sizes, self.runner.rows
        self.stats = Stats()
        self.kv = KVCacheManager(slots, enabled=self.prefix_caching, stats=self.stats, copy_rows=self.runner.reuse,
                                 fits=self.runner.pieces_fit)
        self.scheduler = Scheduler(self.kv, slots=slots, prefill_chunk=prefill_chunk, max_waiting=max_waiting,
                                   batch_wait=self.batch_wait, max_packed=self.runner.segments(prefill_chunk))
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.steps = 0  # decode steps dispatched
        self.prefills = 0  # prefill calls dispatched

    # ---- the public side (any thread) ----
    @property
    def running(self) -> int:
        return self.scheduler.running

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting)

    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """InputError for a request this engine cannot run: bad settings, token ids, or too long for a row."""
        params.check()
        if not prompt:
            raise InputError("the prompt is empty; it needs at least one token")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        if len(prompt) + params.max_tokens > self.max_len:
            raise InputError(f"this model's maximum context length is {self.max_len} tokens; the prompt has "
                             f"{len(prompt)} tokens and max_tokens is {params.max_tokens} ({len(prompt) + params.max_tokens} "
                             "in all): shorten the prompt or lower max_tokens")
        eos = params.eos_token_ids
        if eos is not None and (len(eos) > MAX_EOS or not all(0 <= e < self.config.vocab_size for e in eos)):
            raise InputError(f"eos_token_ids must be at most {MAX_EOS} token ids in [0, {self.config.vocab_size})")

    def submit(self, request: Request) -> Request:
        self.check(request.prompt, request.params)
        with self.scheduler.lock:
            if self.error is not None:
                raise RuntimeError(f"the engine has stopped: {self.error!r}")
            self.scheduler.add(request)
        return request

    def abort(self, request: Request) -> None:
        """Ends ``request`` (e.g. its client went away): its slot is free for the next step."""
        self.scheduler.abort(request)

    def start(self) -> "Engine":
        """Compiles every step (a decode step per row bucket, a packed prefill per length, the piece of a long
        prompt) and runs each once, then starts the loop thread."""
        self.runner.compile()
        self._thread = threading.Thread(target=self._run, name="qwen2-jax-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.scheduler.stop()
        if self._thread is not None:
            self._thread.join()

    # ---- the engine thread ----
    def _run(self) -> None:
        try:
            while self._loop_once():
                pass
        except BaseException as e:  # a bug: fail every request rather than leave clients waiting forever
            self.error = e
            for r in self.scheduler.requests():
                self._finish(r, "abort")
            raise

    def _loop_once(self) -> bool:
        if not self.scheduler.schedule(device_idle=not self.runner.pending, finish=self._finish):
            return False
        # One prefill call (up to prefill_chunk prompt tokens), then a decode step for the running slots.
        if self.scheduler.prefilling:
            self._dispatch_prefill()
        dispatched = False
        if self.scheduler.keep.any():
            self._dispatch_decode()
            dispatched = True
        # Read everything but the step just dispatched: the device runs it meanwhile.
        for kind, snapshot, out in self.runner.results(leave=1 if dispatched else 0):
            self._read(out, kind, snapshot)
        return True

    def _dispatch_prefill(self) -> None:
        """One prefill call: the next piece of a prompt that goes in pieces if one is first in line, else the
        whole prompts next in line that fit in one packed piece."""
        self.prefills += 1
        jobs = self.scheduler.next_prefill()
        if jobs[0].pieces:
            job = jobs[0]
            out, n = self.runner.prefill_piece(job.slot, job.request, job.done)
            last = self.scheduler.piece_written(job, n)
            self.kv.wrote(job.slot, job.request.prompt[:job.done])
            if not last:
                return
        else:
            out = self.runner.prefill_packed([(j.slot, j.request) for j in jobs])
            for j in jobs:
                self.kv.wrote(j.slot, j.request.prompt)
        self.runner.collect(out, "prefill", [(j.slot, j.request) for j in jobs])

    def _dispatch_decode(self) -> None:
        out = self.runner.decode(self.scheduler.keep)
        self.runner.collect(out, "decode", list(self.scheduler.slot_req))
        self.steps += 1

    def _read(self, out, kind: str, snapshot) -> None:
        if kind == "prefill":
            for (slot, r), (token, status) in zip(snapshot, out.reshape(-1, 2)):
                self.stats.prompt_tokens += len(r.prompt)
                self._emit(slot, r, int(token), int(status))
            return
        for slot, r in enumerate(snapshot):
            if r is not None and out[slot, 1] != IDLE:
                self._emit(slot, r, int(out[slot, 0]), int(out[slot, 1]))

    def _emit(self, slot: int, r: Request, token: int, status: int) -> None:
        if r.finished:
            return
        now = time.perf_counter()
        if r.first_token_at is None:
            r.first_token_at = now
            self.stats.ttft.observe(now - r.submitted)
        else:
            self.stats.itl.observe(now - r.last_token_at)
        r.last_token_at = now
        r.output.append(token)
        self.stats.generation_tokens += 1
        finish = {STOPPED: "stop", LENGTH: "length"}.get(status)
        if finish is not None:
            self.scheduler.free(slot, r)
            self._finish(r, finish, [token])
        else:
            r.deliver([token], None)

    def _finish(self, r: Request, reason: str, tokens: list[int] | None = None) -> None:
        if r.finished:
            return
        r.finished = True
        self.stats.requests_finished[reason] += 1
        r.deliver(tokens or [], reason)
