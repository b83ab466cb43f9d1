"""The serving engine's model runner: its steps (``steps``) compiled for every shape at start-up, the state they
donate to one another, the host arguments of each call, and the outputs read back.

``ModelRunner.compile`` compiles every step ahead of time (a decode step per row bucket, a packed prefill per
length 16, 32 .. ``prefill_chunk``, a piece per length of ``piece_sizes``, and ``_reuse`` with prefix caching)
and the runner calls those executables only; all per-request values are arrays, so no load compiles anything
after that (``TRACES``, ``COMPILATIONS``). A decode step runs over the first 1, 2, 4 .. ``slots`` rows, the fewest
that hold every busy slot (requests take the lowest free slot): on XLA:CPU an idle row would cost as much as a
busy one. Outputs are copied to the host as soon as their step is dispatched and read later (``results``), so
the device never waits for the host.
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
from .request import MAX_EOS, Request, SamplingParams
from .state import EngineState, SlotControls, _new_state, abstract_state, state_formats, state_shardings
from .steps import _decode, _prefill, _prefill_packed, _reuse, jit_step


class ModelRunner:
    """The compiled steps of ``model`` over a state of ``slots`` rows of ``max_len`` positions, and their
    dispatch: ``prefill_packed``, ``prefill_piece``, ``reuse`` and ``decode`` each call one, the state donated, and
    return its outputs on the device; ``collect`` and ``results`` read them back. ``eos_token_ids``: the end
    tokens of a request that names none."""

    def __init__(self, model, *, slots: int, max_len: int, prefill_chunk: int, prefix_caching: bool,
                 eos_token_ids: Sequence[int]):
        cfg = model.config
        self.model, self.config, self.slots, self.max_len = model, cfg, slots, max_len
        self.eos_token_ids, self.prefix_caching = tuple(eos_token_ids), prefix_caching
        self.buckets = [b for b in (MIN_PROMPT_BUCKET << i for i in range(32)) if b <= prefill_chunk]
        # Lengths of the pieces prefilled into a row: a long prompt's prefill_chunk; with prefix caching also the
        # shorter buckets, for the rest of a prompt after its cached prefix. A piece never runs past its row.
        self.piece_sizes = [t for t in self.buckets if t <= max_len and (prefix_caching or t == prefill_chunk < max_len)]

        self._graphdef, self._params = nnx.split(model)
        self._views = views.expert_views(model)
        self._platform = moe.platform_of(self._params)
        mesh = getattr(model, "mesh", None)
        if mesh is not None and slots % mesh.shape["data"]:
            raise InputError(f"slots {slots} must be a multiple of the mesh's data axis ({mesh.shape['data']})")
        if mesh is None:
            device = next(iter(jax.tree.leaves(self._params)[0].sharding.device_set))
            self._replicated = jax.sharding.SingleDeviceSharding(device)
            self._shardings = jax.tree.map(lambda _: self._replicated,
                                           abstract_state(cfg, slots, max_len, model.dtype))
        else:
            self._replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            self._shardings = state_shardings(cfg, mesh, slots)
        self._new_state = None  # jitted by compile, to lay the state out as the steps read it
        # Decode steps over the first 1, 2, 4 .. slots rows.
        self.rows = sorted({min(1 << i, slots) for i in range(slots.bit_length() + 1)})
        self._packed: dict[int, Callable] = {}  # piece length -> compiled step
        self._piece: dict[int, Callable] = {}  # piece length -> compiled step
        self._reuse: Callable | None = None  # compiled: a row's prefix copied into a slot
        self._decode: dict[int, Callable] = {}  # rows -> compiled step
        self._state = None
        self.pending: collections.deque = collections.deque()  # dispatched, not yet read: (outputs, kind, snapshot)

    def _fresh_state(self) -> EngineState:
        return self._new_state(self.config, self.slots, self.max_len, self.model.dtype)

    def compile(self) -> None:
        """Compiles each step ahead of time (``lower().compile()``) and keeps the executables, which the runner
        calls directly: no argument's layout or commitment can make a step compile again under load. The steps are
        traced one at a time (Python holds the GIL) while those already traced compile on a thread per core (XLA
        compiles outside it), and each executable runs once as soon as it is compiled (its first run sets itself
        up, which no request should wait for): the three overlap, rather than follow one another."""
        static = dict(graphdef=self._graphdef, platform=self._platform)
        keep = np.zeros(self.slots, bool)
        # The widest decode step first, the state's layouts left to the compiler; every other step takes and
        # returns the state in the layouts it chose, and the state is made in them.
        widest = max(self.rows)
        abstract = abstract_state(self.config, self.slots, self.max_len, self.model.dtype, self._shardings)
        first = jit_step(_decode, state_formats(abstract), self._replicated, rows=widest, **static).lower(
            self._params, self._views, abstract, keep).compile()
        formats = state_formats(abstract, chosen=first.input_formats[0][2])
        self._new_state = jax.jit(_new_state, static_argnums=(0, 1, 2, 3), out_shardings=formats)
        steps = {("decode", widest): (first, (keep,))}  # (kind, size) -> (jitted step, its arguments after the state)
        for t in self.buckets:
            steps["packed", t] = (jit_step(_prefill_packed, formats, self._replicated, **static),
                                  self._packed_args([], t))
        for t in self.piece_sizes:
            steps["piece", t] = (jit_step(_prefill, formats, self._replicated, **static),
                                 self._piece_args(0, Request([0] * t, SamplingParams(max_tokens=1)), 0)[0])
        if self.prefix_caching:
            steps["reuse", None] = (jit_step(_reuse, formats, self._replicated, **static), self._reuse_args(0, 0, []))
        for b in self.rows:
            if b != widest:
                steps["decode", b] = (jit_step(_decode, formats, self._replicated, rows=b, **static), (keep,))
        compiled = {("decode", widest): first}

        def run(key, state):  # dispatched, not waited for: the state is the first runs' own, given up after them
            return compiled[key](self._params, self._views, state, *steps[key][1])[0]

        state = run(("decode", widest), self._fresh_state())
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
            compiling = {}
            for key, (step, args) in steps.items():
                if key not in compiled:
                    compiling[key] = pool.submit(step.lower(self._params, self._views, abstract, *args).compile)
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
        self._decode = {b: c for (kind, b), c in compiled.items() if kind == "decode"}
        self._piece = {t: c for (kind, t), c in compiled.items() if kind == "piece"}
        self._reuse = compiled.get(("reuse", None))

    # ---- dispatch ----
    def prefill_packed(self, jobs: list[tuple[int, Request]]):
        """One packed prefill of the whole prompts of ``jobs`` ((slot, request)) -> its outputs [P, 2]."""
        # A piece of t holds min(slots, t) prompts: each has a token at least.
        t = bucket(sum(len(r.prompt) for _, r in jobs), MIN_PROMPT_BUCKET)
        self._state, out = self._packed[t](self._params, self._views, self._state, *self._packed_args(jobs, t))
        return out

    def prefill_piece(self, slot: int, request: Request, done: int):
        """The prefill of the next piece of ``request``'s prompt, ``done`` of its tokens written into row ``slot``
        -> (its outputs [2], the number of prompt tokens in it)."""
        args, n = self._piece_args(slot, request, done)
        self._state, out = self._piece[args[1].shape[1]](self._params, self._views, self._state, *args)
        return out, n

    def reuse(self, source: int, slot: int, prefix) -> None:
        """Dispatches the copy of row ``source``'s first ``len(prefix)`` tokens (``prefix``) into row ``slot``."""
        self._state, _ = self._reuse(self._params, self._views, self._state, *self._reuse_args(source, slot, prefix))

    def decode(self, keep: np.ndarray):
        """A decode step of the slots ``keep`` names, over the fewest rows that hold them -> its outputs [slots, 2]."""
        rows = next(b for b in self.rows if b > np.flatnonzero(keep)[-1])
        self._state, out = self._decode[rows](self._params, self._views, self._state, keep.copy())
        return out

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

    def _seed(self, p: SamplingParams) -> int:
        return random.getrandbits(32) if p.seed is None else p.seed % 2**32

    def _packed_args(self, jobs: list[tuple[int, Request]], t: int):
        """The arguments of ``_prefill_packed`` after the state: ``jobs``' whole prompts in a piece of ``t``."""
        p = self.segments(t)
        ids, positions = np.zeros((1, t), np.int32), np.zeros((1, t), np.int32)
        segment_ids = np.full((1, t), -1, np.int32)
        ends, slots = np.zeros(p, np.int32), np.full(p, self.slots, np.int32)
        controls = [self._controls(SamplingParams(max_tokens=1))] * p
        seeds = np.zeros(p, np.uint32)
        at = 0
        for i, (slot, request) in enumerate(jobs):
            n = len(request.prompt)
            ids[0, at:at + n], positions[0, at:at + n], segment_ids[0, at:at + n] = request.prompt, np.arange(n), i
            ends[i], slots[i], at = at + n - 1, slot, at + n
            controls[i], seeds[i] = self._controls(request.params), self._seed(request.params)
        controls = jax.tree.map(lambda *rows: np.concatenate(rows), *controls)
        return ids, positions, segment_ids, ends, slots, controls, seeds

    def segments(self, t: int) -> int:
        """Prompts a packed piece of ``t`` tokens holds at most."""
        return min(self.slots, t)

    def _piece_length(self, done: int, total: int) -> tuple[int, int]:
        """(prompt tokens, piece length) of the next piece of a prompt of ``total`` tokens with ``done`` written:
        as many as the longest piece holds, in the shortest piece that holds them."""
        n = min(total - done, self.piece_sizes[-1])
        return n, next(t for t in self.piece_sizes if t >= n)

    def pieces_fit(self, done: int, total: int) -> bool:
        """Whether the pieces of the rest of a prompt from ``done`` stay inside the row (a piece writes its
        whole length, padding included, before it is shifted into place)."""
        while done < total:
            n, t = self._piece_length(done, total)
            if done + t > self.max_len:
                return False
            done += n
        return True

    def _piece_args(self, slot: int, request: Request, done: int):
        """The arguments of the prefill of the next piece (left-padded) of ``request``'s prompt into row ``slot``,
        ``done`` of its tokens written, after the state; and the number of prompt tokens in it."""
        prompt = request.prompt
        n, t = self._piece_length(done, len(prompt))
        ids = np.zeros((1, t), np.int32)
        mask = np.zeros((1, t), bool)
        ids[0, t - n:], mask[0, t - n:] = prompt[done:done + n], True
        positions = np.zeros((1, t), np.int32)
        positions[0, t - n:] = np.arange(done, done + n)
        p = request.params
        return (np.int32(slot), ids, mask, positions, np.int32(done), np.bool_(done + n == len(prompt)),
                self._controls(p), np.uint32(self._seed(p))), n

    def _reuse_args(self, source: int, slot: int, prefix: list[int]):
        ids = np.full(self.max_len, self.config.vocab_size, np.int32)
        ids[:len(prefix)] = prefix
        return np.int32(source), np.int32(slot), ids
