"""The serving engine's model runner: its steps (``steps``) compiled for every shape at start-up, the state they
donate to one another, the host arguments of each call, and the outputs read back.

``ModelRunner.compile`` compiles every step ahead of time (a decode step per row bucket, a packed prefill per
length 16, 32 .. ``chunk``, a piece per length of ``piece_sizes``) and the runner calls those executables only; all
per-request values are arrays, so no load compiles anything after that (``TRACES``, ``COMPILATIONS``). A decode
step runs over the first 1, 2, 4 .. ``slots`` rows, the fewest that hold every busy slot (requests take the lowest
free slot): on XLA:CPU an idle row would cost as much as a busy one. Outputs are copied to the host as soon as
their step is dispatched and read later (``results``), so the device never waits for the host.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import random
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from qwen2_jax.errors import InputError
from qwen2_jax.inference.generate import MIN_PROMPT_BUCKET, bucket
from qwen2_jax.model import moe, views
from qwen2_jax.model.paged_attention import BLOCK_TOKENS
from .request import MAX_EOS, Request, SamplingParams
from .state import EngineState, SlotControls, _new_state, abstract_state, state_formats, state_shardings
from .steps import _decode, _prefill, _prefill_packed, jit_step


class ModelRunner:
    """The compiled steps of ``model`` over a state of ``slots`` rows and a pool of ``num_pages`` pages of
    ``page_size`` (a row's table has ``max_pages``, for ``max_len`` positions), and their dispatch:
    ``prefill_packed``, ``prefill_piece`` and ``decode`` each call one, the state donated, and return its outputs on
    the device; ``collect`` and ``results`` read them back. ``eos_token_ids``: the end tokens of a request that
    names none. ``progress(message)``: told of each program compiled. ``attention``: the attention over pages,
    ``paged_attention.PagedKV.kernel``."""

    def __init__(self, model, *, slots: int, max_len: int, chunk: int, num_pages: int, page_size: int,
                 eos_token_ids: Sequence[int], progress: Callable[[str], None] | None = None, attention: str = "xla"):
        cfg = model.config
        self.model, self.config, self.slots, self.max_len = model, cfg, slots, max_len
        self.num_pages, self.page_size = num_pages, page_size
        self.max_pages = -(-max_len // page_size)
        self.eos_token_ids, self.attention = tuple(eos_token_ids), attention
        self.progress = progress or (lambda message: None)
        self.buckets = [b for b in (MIN_PROMPT_BUCKET << i for i in range(32)) if b <= chunk]
        # A piece: a long prompt's chunk, or the rest after a cached head; besides the powers of two, the longest
        # piece beside a full decode step (the budget less a token per slot), so a long prompt goes in pieces of that.
        beside = (chunk - slots) // MIN_PROMPT_BUCKET * MIN_PROMPT_BUCKET
        self.piece_sizes = sorted(set(self.buckets) | ({beside} if beside >= MIN_PROMPT_BUCKET else set()))

        self._graphdef, self._params = nnx.split(model)
        self._views = views.expert_views(model)
        self._platform = moe.platform_of(self._params)
        if attention == "pallas" and self._platform != "tpu":
            raise InputError(f"the pallas attention backend is a TPU kernel; this model is on {self._platform}")
        mesh = getattr(model, "mesh", None)
        if mesh is not None and slots % mesh.shape["data"]:
            raise InputError(f"max_num_seqs {slots} must be a multiple of the mesh's data axis ({mesh.shape['data']})")
        shape = (cfg, slots, num_pages, page_size, self.max_pages, model.dtype)
        if mesh is None:
            device = next(iter(jax.tree.leaves(self._params)[0].sharding.device_set))
            self._replicated = jax.sharding.SingleDeviceSharding(device)
            self._shardings = jax.tree.map(lambda _: self._replicated, abstract_state(*shape))
        else:
            self._replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            self._shardings = state_shardings(cfg, mesh)
        self._abstract = abstract_state(*shape, self._shardings)
        self._new_state = None  # jitted by compile, to lay the state out as the steps read it
        # Decode steps over the first 1, 2, 4 .. slots rows; on GPU and TPU each for a bucket of context (pages read).
        self.rows = sorted({min(1 << i, slots) for i in range(slots.bit_length() + 1)})
        self.contexts = context_buckets(self.max_pages, page_size) if self._platform in BUCKETED else [None]
        self._packed: dict[int, Callable] = {}  # piece length -> compiled step
        self._piece: dict[int, Callable] = {}  # piece length -> compiled step
        self._decode: dict[tuple, Callable] = {}  # (rows, context pages) -> compiled step
        self._state = None
        self.pending: collections.deque = collections.deque()  # dispatched, not yet read: (outputs, kind, snapshot)

    def _fresh_state(self) -> EngineState:
        return self._new_state(self.config, self.slots, self.num_pages, self.page_size, self.max_pages,
                               self.model.dtype)

    def programs(self) -> list[tuple[str, int | tuple[int, int | None]]]:
        """The programs ``compile`` makes: ("decode", (rows, context pages)), ("packed", tokens), ("piece", tokens)."""
        return ([("decode", (b, c)) for b in sorted(self.rows, reverse=True) for c in self.contexts[::-1]]
                + [("packed", t) for t in self.buckets] + [("piece", t) for t in self.piece_sizes])

    def compile(self) -> None:
        """Compiles each step ahead of time (``lower().compile()``) and keeps the executables, which the runner
        calls directly: no argument's layout or commitment can make a step compile again under load. The steps are
        traced one at a time (Python holds the GIL) while those already traced compile on a thread per core (XLA
        compiles outside it), and each executable runs once as soon as it is compiled (its first run sets itself
        up, which no request should wait for): the three overlap, rather than follow one another."""
        static = dict(graphdef=self._graphdef, platform=self._platform, max_len=self.max_len,
                      attention=self.attention)
        keep, no_pages = np.zeros(self.slots, bool), self._no_pages()
        # The widest decode step first, the state's layouts left to the compiler; every other step takes and
        # returns the state in the layouts it chose, and the state is made in them.
        programs = self.programs()
        widest = programs[0][1]
        abstract = self._abstract
        self.progress(f"compiling program 1 of {len(programs)} (decode over {widest[0]} rows)")
        first = jit_step(_decode, state_formats(abstract), self._replicated, rows=widest[0], ctx_pages=widest[1],
                         **static).lower(self._params, self._views, abstract, keep, no_pages).compile()
        formats = state_formats(abstract, chosen=first.input_formats[0][2])
        self._new_state = jax.jit(_new_state, static_argnums=(0, 1, 2, 3, 4, 5), out_shardings=formats)
        steps = {("decode", widest): (first, (keep, no_pages))}  # (kind, size) -> (jitted step, its arguments after the state)
        for kind, size in programs:
            if kind == "packed":
                steps[kind, size] = (jit_step(_prefill_packed, formats, self._replicated, **static),
                                     self._packed_args([], size))
            elif kind == "piece":
                steps[kind, size] = (jit_step(_prefill, formats, self._replicated, **static),
                                     self._piece_args(0, Request([0] * size, SamplingParams(max_tokens=1)),
                                                      [0] * size, 0, np.zeros(self.max_pages, np.int32), size)[0])
            elif size != widest:
                steps[kind, size] = (jit_step(_decode, formats, self._replicated, rows=size[0], ctx_pages=size[1],
                                              **static), (keep, no_pages))
        compiled = {("decode", widest): first}

        def run(key, state):  # dispatched, not waited for: the state is the first runs' own, given up after them
            return compiled[key](self._params, self._views, state, *steps[key][1])[0]

        state = run(("decode", widest), self._fresh_state())
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
            compiling = {}
            for key, (step, args) in steps.items():
                if key not in compiled:
                    compiling[key] = pool.submit(step.lower(self._params, self._views, abstract, *args).compile)
                    what = (f"decode over {key[1][0]} rows" + (f", {key[1][1]} pages" if key[1][1] else "")
                            if key[0] == "decode" else f"{key[0]} prefill of {key[1]} tokens")
                    self.progress(f"compiling program {len(compiled) + len(compiling)} of {len(programs)} ({what})")
                for done in [k for k, f in compiling.items() if f.done()]:
                    compiled[done] = compiling.pop(done).result()
                    state = run(done, state)
            for key, future in compiling.items():
                compiled[key] = future.result()
                state = run(key, state)
        jax.block_until_ready(state)
        del state
        self._state = self._fresh_state()
        self._packed = {t: c for (kind, t), c in compiled.items() if kind == "packed"}
        self._decode = {size: c for (kind, size), c in compiled.items() if kind == "decode"}
        self._piece = {t: c for (kind, t), c in compiled.items() if kind == "piece"}

    # ---- dispatch ----
    def prefill_packed(self, jobs):
        """One packed prefill of the whole token lists of ``jobs`` (``scheduler.PrefillJob``s) -> its outputs [P, 2]."""
        t = bucket(sum(len(j.tokens) for j in jobs), MIN_PROMPT_BUCKET)
        self._state, out = self._packed[t](self._params, self._views, self._state, *self._packed_args(jobs, t))
        return out

    def prefill_piece(self, slot: int, request: Request, tokens: list[int], done: int, table: np.ndarray,
                      capacity: int):
        """The prefill of the next piece of ``tokens``, ``done`` of them written, into slot ``slot`` (its page-table
        row ``table``), at most ``capacity`` tokens -> (its outputs [2], the number of tokens in it)."""
        args, n = self._piece_args(slot, request, tokens, done, table, capacity)
        self._state, out = self._piece[args[1].shape[1]](self._params, self._views, self._state, *args)
        return out, n

    def decode(self, keep: np.ndarray, new_pages: np.ndarray, longest: int):
        """A decode step of the slots ``keep`` names, over the fewest rows that hold them, after the page-table
        updates ``new_pages``; ``longest``: the most positions a row holds after it -> its outputs [slots, 2]."""
        rows = next(b for b in self.rows if b > np.flatnonzero(keep)[-1])
        pages = -(-longest // self.page_size)
        context = next(c for c in self.contexts if c is None or c >= pages)
        self._state, out = self._decode[rows, context](self._params, self._views, self._state, keep.copy(),
                                                        new_pages)
        return out

    def _no_pages(self) -> np.ndarray:
        return np.tile(np.array([self.max_pages, 0], np.int32), (self.slots, 1))

    def collect(self, outputs, kind: str, snapshot) -> None:
        """Starts copying a step's ``outputs`` to the host, to be read (``results``) with ``kind`` and ``snapshot``."""
        outputs.copy_to_host_async()
        self.pending.append((outputs, kind, snapshot))

    def results(self, leave: int):
        """(kind, snapshot, outputs as a host array) of each step collected, oldest first, all but the last
        ``leave`` (the device runs those meanwhile)."""
        while len(self.pending) > leave:
            outputs, kind, snapshot = self.pending.popleft()
            yield kind, snapshot, np.asarray(outputs)

    # ---- the host arguments of each step ----
    def _controls(self, p: SamplingParams) -> SlotControls:
        eos = () if p.ignore_eos else (self.eos_token_ids if p.eos_token_ids is None else tuple(p.eos_token_ids))
        one = lambda x, dt: np.asarray([x], dt)
        return SlotControls(temperature=one(p.temperature, np.float32), top_k=one(p.top_k, np.int32),
                            top_p=one(p.top_p, np.float32), repetition_penalty=one(p.repetition_penalty, np.float32),
                            keys=np.zeros((1,), np.uint32),  # replaced by the key of the seed in the step
                            max_tokens=one(p.max_tokens, np.int32),
                            eos=np.asarray([list(eos) + [-1] * (MAX_EOS - len(eos))], np.int32))

    def _seed(self, request: Request) -> int:
        """The request's seed (a random one drawn once: a preempted request resumes with it)."""
        if request.seed is None:
            p = request.params
            request.seed = random.getrandbits(32) if p.seed is None else p.seed % 2**32
        return request.seed

    def _packed_args(self, jobs, t: int):
        """The arguments of ``_prefill_packed`` after the state: ``jobs``' whole token lists in a piece of ``t``."""
        p = self.segments(t)
        ids, positions = np.zeros((1, t), np.int32), np.zeros((1, t), np.int32)
        segment_ids = np.full((1, t), -1, np.int32)
        ends, slots = np.zeros(p, np.int32), np.full(p, self.slots, np.int32)
        tables, steps0 = np.zeros((p, self.max_pages), np.int32), np.zeros(p, np.int32)
        controls = [self._controls(SamplingParams(max_tokens=1))] * p
        seeds = np.zeros(p, np.uint32)
        at = 0
        for i, job in enumerate(jobs):
            n = len(job.tokens)
            ids[0, at:at + n], positions[0, at:at + n], segment_ids[0, at:at + n] = job.tokens, np.arange(n), i
            ends[i], slots[i], at = at + n - 1, job.slot, at + n
            tables[i], steps0[i] = job.table, len(job.request.output)
            controls[i], seeds[i] = self._controls(job.request.params), self._seed(job.request)
        controls = jax.tree.map(lambda *rows: np.concatenate(rows), *controls)
        return ids, positions, segment_ids, ends, slots, tables, steps0, controls, seeds

    def segments(self, t: int) -> int:
        """Prompts a packed piece of ``t`` tokens holds at most."""
        return min(self.slots, t)

    def _piece_args(self, slot: int, request: Request, tokens: list[int], done: int, table, capacity: int):
        """The arguments of the prefill of the next piece (right-padded) of ``tokens`` into slot ``slot``, ``done``
        of them written, after the state; and the number of tokens in it: as many as ``capacity`` (at least the
        smallest piece) and the longest piece allow, in the shortest piece that holds them."""
        fits = [t for t in self.piece_sizes if t <= capacity] or self.piece_sizes[:1]
        n = min(len(tokens) - done, fits[-1])
        t = next(t for t in self.piece_sizes if t >= n)
        ids = np.zeros((1, t), np.int32)
        ids[0, :n] = tokens[done:done + n]
        positions = (done + np.arange(t, dtype=np.int32))[None]
        seen = np.zeros(self.config.vocab_size, bool)
        seen[tokens[:done + n]] = True
        p = request.params
        return (np.int32(slot), ids, np.int32(n), positions, np.asarray(table, np.int32),
                np.bool_(done + n == len(tokens)), np.int32(len(request.output)), seen, self._controls(p),
                np.uint32(self._seed(request))), n


# Where a decode step is compiled per bucket of context and reads its pages in one pass: on GPU a loop of a
# data-dependent trip count syncs with the host every trip; on TPU the blockwise loop's gathers were copies (5.2x
# the decode step's roofline on a v5p-8 at 64 sequences of 2,048, docs/serving.md). On CPU the loop is cheap.
BUCKETED = ("gpu", "tpu")


def context_buckets(max_pages: int, page_size: int) -> list[int]:
    """Pages a GPU or TPU decode step reads per row: a block of attention (``BLOCK_TOKENS``) times 1, 4, 16 .. and one page
    (the next token of a sequence of such a length), then the whole table; a step compiled for each (with a loop of
    a static trip count, which XLA:GPU runs without the host). Buckets 4x apart: a decode step reads at most 4x the
    pages its rows hold, and a server compiles 5 contexts a row count at 65,536 positions in pages of 16."""
    first = max(1, BLOCK_TOKENS // page_size)
    sizes = [(first << 2 * i) + 1 for i in range(16) if (first << 2 * i) + 1 < max_pages]
    return sizes + [max_pages]
