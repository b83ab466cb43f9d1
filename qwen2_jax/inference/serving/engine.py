"""Continuous batching over a paged KV cache: the engine behind ``qwen2-jax serve``.

One pool of KV pages lives on the device, shared by every running request (``state``, ``model.paged_attention``),
donated to every step. One thread (``Engine``) owns it and, in a loop:

- frees the slots and pages of requests that ended or were aborted, and admits waiting requests, first come first
  served, while a slot (``max_num_seqs``) and the pages of the prompt are free; a prompt that begins with the tokens
  of cached pages shares them (prefix caching: ``kv_cache_manager``). Idle, it first lets a request that just came
  wait up to ``batch_wait_ms`` for the rest of its burst, so that they share packed calls (``scheduler``);
- prefills, one call per loop within the step's token budget (``max_num_batched_tokens`` less the decoding rows):
  the whole prompts next in line packed into one call, or a piece of a longer one (``scheduler`` chooses,
  ``runner`` dispatches the ``steps``), so a long prompt holds the running requests up one piece at a time;
- decodes: one token for every running request, each with its own sampling settings and stopping rules, over the
  fewest rows that hold every busy slot, after taking the page each needs; when the pool has none left, the newest
  running request is preempted (its pages freed; prefilled again later with the tokens it had, it goes on exactly
  as it would have);
- reads the tokens of the step before the one it just dispatched, so the device never waits for the host, and
  hands each request its tokens (``Request.deliver``).

``Engine.start`` compiles every step ahead of time (``ModelRunner.compile``), so that no load compiles anything
after that (``TRACES``, ``COMPILATIONS``). The pool's size (``pool_size``): ``num_gpu_blocks_override`` pages, or
those that ``kv_cache_memory`` bytes hold, or on an accelerator ``gpu_memory_utilization`` of the device's memory
less what is already in use (the weights) and a margin for the steps' activations; on CPU 4 GiB (vLLM CPU's
default) where nothing is said; never more than ``max_num_seqs`` sequences of ``max_model_len`` use.

The parts, each importing only those before it: ``request`` (what clients hand in and get back), ``state`` and
``steps`` (the device state and the pure jitted steps), ``kv_cache_manager`` (the pages of each request and their
reuse), ``scheduler`` (queues, admission, budget, preemption), ``runner`` (compiled steps, dispatch, outputs read
back) and this module, which wires them together. The names other code imports from here are re-exported.
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

from qwen2_jax.errors import InputError
from qwen2_jax.inference.generate import default_eos_token_ids
from qwen2_jax.model.paged_attention import page_bytes
from .kv_cache_manager import MIN_PREFIX, KVCacheManager, PoolExhausted  # noqa: F401
from .request import (IDLE, LENGTH, MAX_EOS, RUNNING, STOPPED, Histogram, QueueFull, Request,  # noqa: F401
                      SamplingParams, Stats)
from .runner import ModelRunner
from .scheduler import DEFAULT_BATCH_WAIT_MS, MIN_CALL, PrefillJob, Scheduler  # noqa: F401
from .state import (COMPILATIONS, TRACES, EngineState, PageCache, SlotControls, _new_state,  # noqa: F401
                    abstract_state, state_formats, state_shardings)
from .steps import _decode, _prefill, _prefill_packed, _status, jit_step, sample  # noqa: F401

CPU_KV_CACHE_MEMORY = 4 << 30  # bytes of pages on CPU where nothing is said (vLLM CPU's default KV space)
# The attention over pages: "xla" (model.paged_attention, every backend) or "pallas" (model.tpu_paged_attention's
# ragged kernel: TPU only, checked in Pallas' interpreter, not yet run on a TPU).
ATTENTION_BACKENDS = ("xla", "pallas")
ACTIVATION_MARGIN = 1 << 30  # bytes left on an accelerator for the steps' activations, besides their logits


def check_settings(context_length: int, *, flags: bool = False, **settings) -> None:
    """InputError for engine settings it cannot run with (``max_num_seqs``, ``max_model_len``,
    ``max_num_batched_tokens``, ``block_size``, ``num_gpu_blocks_override``, ``gpu_memory_utilization``,
    ``kv_cache_memory``, ``max_waiting``, ``batch_wait_ms``; those not given are not checked), named as keywords or,
    with ``flags``, as the command line's ``--flags``."""
    name = (lambda key: "--" + key.replace("_", "-")) if flags else (lambda key: key)
    lows = (("max_num_seqs", 1), ("max_model_len", 2), ("max_num_batched_tokens", MIN_CALL), ("block_size", 1),
            ("num_gpu_blocks_override", 1), ("kv_cache_memory", 1), ("max_waiting", 0))
    for key, low in lows:
        value = settings.get(key)
        if value is None and key in ("num_gpu_blocks_override", "kv_cache_memory") or key not in settings:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name(key)} must be an integer >= {low}, got {value!r}")
    wait = settings.get("batch_wait_ms", 0)
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 10_000:
        raise InputError(f"{name('batch_wait_ms')} must be a number of milliseconds in [0, 10000], got {wait!r}")
    util = settings.get("gpu_memory_utilization", 0.9)
    if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1:
        raise InputError(f"{name('gpu_memory_utilization')} must be a fraction in (0, 1], got {util!r}")
    max_len = settings.get("max_model_len")
    if max_len is not None and max_len > context_length:
        raise InputError(f"{name('max_model_len')} {max_len} exceeds the model's context of {context_length} tokens")
    size = settings.get("block_size")
    if size is not None and (size & (size - 1) or (max_len is not None and size > max_len)):
        raise InputError(f"{name('block_size')} {size} must be a power of two no larger than {name('max_model_len')} "
                         f"({max_len})")


def pool_size(cfg, dtype, *, page_size: int, max_num_seqs: int, max_model_len: int, tensor: int = 1,
              num_gpu_blocks_override=None, kv_cache_memory=None, gpu_memory_utilization: float = 0.9,
              max_num_batched_tokens: int = 512, memory: tuple[int, int] | None = None):
    """(pages, bytes a page takes on a device, what sized them): the pool's size, see the module's text. ``tensor``:
    the mesh's tensor axis (the KV heads split over it where they divide); ``memory``: (the device's bytes, those in
    use), None on CPU."""
    per_page = page_bytes(cfg, page_size, dtype)
    if cfg.num_key_value_heads % tensor == 0:
        per_page //= tensor  # each device holds its KV heads' share of every page
    enough = max_num_seqs * -(-max_model_len // page_size)
    if num_gpu_blocks_override is not None:
        return num_gpu_blocks_override, per_page, "--num-gpu-blocks-override"
    if kv_cache_memory is not None:
        return min(enough, kv_cache_memory // per_page), per_page, f"{kv_cache_memory / 2**30:.2f} GiB asked"
    if memory is None:
        return min(enough, CPU_KV_CACHE_MEMORY // per_page), per_page, f"{CPU_KV_CACHE_MEMORY / 2**30:.0f} GiB (CPU)"
    limit, in_use = memory
    logits = max_num_batched_tokens * cfg.vocab_size * 4
    free = int(limit * gpu_memory_utilization) - in_use - logits - ACTIVATION_MARGIN
    return (min(enough, max(0, free) // per_page), per_page,
            f"{gpu_memory_utilization:g} of {limit / 2**30:.1f} GiB less {in_use / 2**30:.1f} in use")


def device_memory(model) -> tuple[int, int] | None:
    """(bytes, bytes in use) of the first device ``model`` lies on; None on CPU."""
    import jax
    from flax import nnx

    mesh = getattr(model, "mesh", None)
    device = (mesh.devices.flat[0] if mesh is not None
              else next(iter(jax.tree.leaves(nnx.state(model))[0].sharding.device_set)))
    stats = device.memory_stats() if device.platform != "cpu" else None
    return (stats["bytes_limit"], stats.get("bytes_in_use", 0)) if stats and "bytes_limit" in stats else None


class Engine:
    """Continuous batching of up to ``max_num_seqs`` requests at a time over a model (``from_pretrained``), each
    request using at most ``max_model_len`` positions (prompt + max_tokens), their keys and values in a pool of pages
    of ``block_size`` positions (sized by ``pool_size``). A step holds at most ``max_num_batched_tokens`` tokens:
    one per decoding request and the rest for a prefill call. ``max_waiting``: requests that may wait
    (``submit`` raises QueueFull past it). ``enable_prefix_caching``: prompts share the cached pages of the tokens
    they begin with. ``batch_wait_ms``: how long an idle engine lets a first request wait for others
    (``Scheduler._gather_burst``). ``attention_backend``: ``ATTENTION_BACKENDS``. ``start()`` compiles every shape
    and starts the thread. The names before 0.3
    (``slots``, ``max_len``, ``prefill_chunk``, ``prefix_caching``) are taken for theirs."""

    def __init__(self, model, *, max_num_seqs: int = 16, max_model_len: int = 2048,
                 max_num_batched_tokens: int = 512, block_size: int = 16, num_gpu_blocks_override: int | None = None,
                 gpu_memory_utilization: float = 0.9, kv_cache_memory: int | None = None,
                 enable_prefix_caching: bool = True, max_waiting: int = 256,
                 eos_token_ids: Sequence[int] | None = None, batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
                 attention_backend: str = "xla", slots: int | None = None, max_len: int | None = None, prefill_chunk: int | None = None,
                 prefix_caching: bool | None = None):
        max_num_seqs = max_num_seqs if slots is None else slots
        max_model_len = max_model_len if max_len is None else max_len
        max_num_batched_tokens = max_num_batched_tokens if prefill_chunk is None else prefill_chunk
        enable_prefix_caching = enable_prefix_caching if prefix_caching is None else prefix_caching
        cfg = model.config
        settings = dict(max_num_seqs=max_num_seqs, max_model_len=max_model_len, block_size=block_size,
                        max_num_batched_tokens=max_num_batched_tokens, num_gpu_blocks_override=num_gpu_blocks_override,
                        gpu_memory_utilization=gpu_memory_utilization, kv_cache_memory=kv_cache_memory,
                        max_waiting=max_waiting, batch_wait_ms=batch_wait_ms)
        check_settings(cfg.context_length, **settings)
        self.model, self.config = model, cfg
        self.max_num_seqs, self.max_model_len, self.block_size = max_num_seqs, max_model_len, block_size
        self.max_num_batched_tokens, self.max_waiting = max_num_batched_tokens, max_waiting
        self.chunk = 1 << (max_num_batched_tokens.bit_length() - 1)  # the longest prefill call: a power of two
        self.batch_wait = batch_wait_ms / 1000
        eos = default_eos_token_ids(model) if eos_token_ids is None else tuple(eos_token_ids)
        self.eos_token_ids = tuple(dict.fromkeys(int(e) for e in eos))
        if len(self.eos_token_ids) > MAX_EOS:
            raise InputError(f"at most {MAX_EOS} end tokens, got {len(self.eos_token_ids)}")
        self.prefix_caching = bool(enable_prefix_caching)
        mesh = getattr(model, "mesh", None)
        self.num_pages, self.page_bytes, self.sized_by = pool_size(
            cfg, model.dtype, page_size=block_size, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
            tensor=mesh.shape["tensor"] if mesh is not None else 1, num_gpu_blocks_override=num_gpu_blocks_override,
            kv_cache_memory=kv_cache_memory, gpu_memory_utilization=gpu_memory_utilization,
            max_num_batched_tokens=max_num_batched_tokens, memory=device_memory(model))
        if self.num_pages * block_size < max_model_len:
            raise InputError(f"the KV cache holds {self.num_pages * block_size} tokens ({self.num_pages} pages of "
                             f"{block_size}, {self.sized_by}), fewer than one sequence of max_model_len "
                             f"{max_model_len}: give it more memory or lower max_model_len")
        if attention_backend not in ATTENTION_BACKENDS:
            raise InputError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got "
                             f"{attention_backend!r}")
        self.attention_backend = attention_backend
        self.runner = ModelRunner(model, slots=max_num_seqs, max_len=max_model_len, chunk=self.chunk,
                                  num_pages=self.num_pages, page_size=block_size, eos_token_ids=self.eos_token_ids,
                                  attention=attention_backend)
        self.stats = Stats()
        self.kv = KVCacheManager(self.num_pages, block_size, enabled=self.prefix_caching, stats=self.stats)
        self.scheduler = Scheduler(self.kv, slots=max_num_seqs, budget=max_num_batched_tokens, chunk=self.chunk,
                                   max_waiting=max_waiting, batch_wait=self.batch_wait,
                                   max_packed=self.runner.segments(self.chunk), max_pages=self.runner.max_pages)
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.steps = 0  # decode steps dispatched
        self.prefills = 0  # prefill calls dispatched

    # the names before 0.3
    slots = property(lambda self: self.max_num_seqs)
    max_len = property(lambda self: self.max_model_len)

    @property
    def kv_pages_total(self) -> int:
        return self.num_pages

    @property
    def kv_pages_used(self) -> int:
        return self.kv.used

    def summary(self) -> str:
        """The start-up line: the pool, and the sequences of ``max_model_len`` it holds at once."""
        tokens = self.num_pages * self.block_size
        return (f"KV cache: {self.num_pages} pages of {self.block_size} tokens, {tokens} tokens "
                f"({self.num_pages * self.page_bytes / 2**30:.2f} GiB a device, {self.sized_by}); "
                f"{min(self.max_num_seqs, tokens // self.max_model_len)} sequences of max_model_len "
                f"{self.max_model_len} at once, up to {self.max_num_seqs} running; prefix caching "
                f"{'on' if self.prefix_caching else 'off'}")

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

    def start(self, progress=None) -> "Engine":
        """Compiles every step (a decode step per row bucket, a packed prefill per length, a piece per length) and
        runs each once, then starts the loop thread. ``progress(message)``: told of each program compiled."""
        self.runner.progress = progress or self.runner.progress
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
        # One prefill call (within the step's token budget), then a decode step for the running slots.
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
        whole prompts next in line that fit in one packed call."""
        self.prefills += 1
        capacity = self.scheduler.capacity()
        jobs = self.scheduler.next_prefill()
        if jobs[0].pieces:
            job = jobs[0]
            out, n = self.runner.prefill_piece(job.slot, job.request, job.tokens, job.done, job.table, capacity)
            if not self.scheduler.piece_written(job, n):
                return
        else:
            out = self.runner.prefill_packed(jobs)
        self.runner.collect(out, "prefill", [(j.slot, j.request) for j in jobs])

    def _dispatch_decode(self) -> None:
        """A decode step, once every running slot has the page its next token goes to: when the pool has none
        left, the steps in flight are read (requests that ended free theirs) and then the newest running request
        is preempted, until the rest fit."""
        while True:
            try:
                self.scheduler.grow()
                break
            except PoolExhausted:
                if self.runner.pending:
                    for kind, snapshot, out in self.runner.results(leave=0):
                        self._read(out, kind, snapshot)
                    continue
                r = self.scheduler.preempt()
                r.preemptions += 1
                self.stats.num_preemptions += 1
                if not self.scheduler.keep.any():
                    return
        longest = int(self.scheduler.length[self.scheduler.keep].max()) + 1
        out = self.runner.decode(self.scheduler.keep, self.scheduler.decoded(), longest)
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
