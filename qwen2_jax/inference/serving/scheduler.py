"""The serving engine's scheduler: which requests wait, which slot and pages each running one has, and what runs
next (vLLM's scheduler, with a slot per running request as the row of the decode step it takes).

Each turn of the engine's loop it ends the aborted requests, frees their slots and pages, and admits waiting
requests, first come first served, while a slot is free (``max_num_seqs``) and the pool has the pages of the
prompt (``schedule``; idle, it first lets a request that just came wait up to ``batch_wait`` for the rest of its
burst, so that they share packed calls). Then it chooses the next prefill call within the step's token budget
(``max_num_batched_tokens`` less the decoding rows): the whole prompts next in line that fit together in one packed
call, or a piece of the prompt first in line when it goes in pieces (too long to pack, or the rest of a prompt
after its cached pages), so that a long prompt holds the decoding requests up for one piece at a time
(``next_prefill``). ``keep`` names the slots the next decode step runs; ``grow`` takes the page each needs for
it, and when none is free the engine preempts the newest running request (``preempt``): its pages are freed and it
waits at the head of the line, to be prefilled again with the tokens it had generated and go on from there.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable

import numpy as np

from .kv_cache_manager import KVCacheManager
from .request import QueueFull, Request

# An idle engine's wait for the rest of a burst: 10 ms gathered 16 clients' requests into two full packed calls
# on the quarter config (docs/serving.md); a lone request's first token comes that much later.
DEFAULT_BATCH_WAIT_MS = 10.0
MIN_CALL = 16  # the smallest prefill call


@dataclasses.dataclass
class PrefillJob:
    request: Request
    slot: int
    tokens: list[int]  # to prefill: the prompt, and the tokens generated before a preemption
    done: int = 0  # tokens written (or found in cached pages)
    pieces: bool = False  # in pieces attending to its pages (too long to pack, or after a cached head)
    table: np.ndarray | None = None  # its page-table row (every page of ``tokens``)
    looked_up: bool = False  # its head looked for again in the cached pages just before its first call


class Scheduler:
    """The queues of ``slots`` slots and up to ``max_waiting`` waiting requests, guarded by ``lock`` (any thread
    may ``add`` or ``abort``; the engine's thread does the rest). A prefill call holds at most ``budget`` tokens
    less the decoding rows, of at most ``max_packed`` prompts packed, a piece at most ``chunk``. Pages come from
    ``kv``; the decode step's page-table updates gather in ``new_pages`` ([slots, 2] of (index, page); index
    ``max_pages``: none) until it is dispatched."""

    def __init__(self, kv: KVCacheManager, *, slots: int, budget: int, chunk: int, max_waiting: int,
                 batch_wait: float, max_packed: int, max_pages: int):
        self.kv, self.slots, self.budget, self.chunk, self.max_waiting = kv, slots, budget, chunk, max_waiting
        self.batch_wait, self.max_packed, self.max_pages = batch_wait, max_packed, max_pages
        self.lock = threading.Condition()
        self.waiting: collections.deque[Request] = collections.deque()
        self._aborted: set[int] = set()
        self.slot_req: list[Request | None] = [None] * slots
        self.prefilling: collections.deque[PrefillJob] = collections.deque()
        self.keep = np.zeros(slots, bool)
        self.length = np.zeros(slots, np.int64)  # positions each decoding slot's steps dispatched so far fill
        self.new_pages = np.tile(np.array([max_pages, 0], np.int32), (slots, 1))
        self._admitted_at = np.zeros(slots, np.int64)  # admission order, for choosing whom to preempt
        self._clock = 0
        self._stopping = False

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.slot_req)

    # ---- any thread ----
    def add(self, request: Request) -> None:
        with self.lock:
            if self.running + len(self.waiting) >= self.slots + self.max_waiting:
                raise QueueFull(f"all {self.slots} sequences are running and {len(self.waiting)} requests are waiting")
            request.submitted = time.perf_counter()
            self.waiting.append(request)
            self.lock.notify()

    def abort(self, request: Request) -> None:
        with self.lock:
            if not request.finished:
                self._aborted.add(request.id)
                self.lock.notify()

    def stop(self) -> None:
        with self.lock:
            self._stopping = True
            self.lock.notify()

    def requests(self) -> list[Request]:
        """Every request in a slot or waiting."""
        with self.lock:
            return [r for r in (*self.slot_req, *self.waiting) if r is not None]

    # ---- the engine's thread ----
    def schedule(self, device_idle: bool, finish: Callable[[Request, str], None]) -> bool:
        """Waits for work (``device_idle``: no step's outputs are left to read), ends the aborted requests
        (``finish(request, "abort")``) and admits waiting ones while a slot and their pages are free. False once
        stopped."""
        with self.lock:
            while (not self._stopping and not self.waiting and not self._aborted and self.running == 0
                   and device_idle):
                self.lock.wait()
            if self.batch_wait and self.waiting and self.running == 0 and device_idle:
                self._gather_burst()
            if self._stopping:
                return False
            aborted, self._aborted = self._aborted, set()
            for slot, r in enumerate(self.slot_req):
                if r is not None and r.id in aborted:
                    self.release(slot)
                    finish(r, "abort")
            for r in [r for r in self.waiting if r.id in aborted]:
                self.waiting.remove(r)
                finish(r, "abort")
            for slot in range(self.slots):
                if self.slot_req[slot] is None and self.waiting and not self._admit(slot, self.waiting[0]):
                    break
        return True

    def _admit(self, slot: int, r: Request) -> bool:
        """``r`` (first in line) into ``slot`` if the pool has its pages."""
        tokens = r.prompt + r.output  # a preempted request goes on from where it was
        cached = self.kv.admit(r, tokens)
        if cached is None:
            return False
        self.waiting.popleft()
        self.slot_req[slot] = r
        self._clock += 1
        self._admitted_at[slot] = self._clock
        if not r.output:
            r.cached_tokens = cached
        self.prefilling.append(PrefillJob(r, slot, tokens, done=cached, pieces=bool(cached) or len(tokens) > self.chunk,
                                          table=self.kv.table(r, self.max_pages)))
        if cached:
            self.kv.commit(r, tokens[:cached])
        return True

    def _gather_burst(self) -> None:
        """Idle, with a request just in: waits (the lock released) up to ``batch_wait`` for more, until the waiting
        prompts fill a prefill call or every slot. Clients of a burst arrive a few milliseconds apart; prefilled as
        they come, the first one or two went in a call of their own (a 128-token call costs about half a 512-token
        one on XLA:CPU), and the waves after, finishing together, kept the split (docs/serving.md)."""
        deadline = time.perf_counter() + self.batch_wait
        while (not self._stopping and not self._aborted and len(self.waiting) < self.slots
               and sum(len(r.prompt) for r in self.waiting) < self.chunk
               and (left := deadline - time.perf_counter()) > 0):
            self.lock.wait(left)

    def capacity(self) -> int:
        """Prompt tokens the next prefill call may hold: the step's budget less the decoding rows (at least the
        smallest call)."""
        return min(self.chunk, max(MIN_CALL, self.budget - int(self.keep.sum())))

    def next_prefill(self) -> list[PrefillJob]:
        """The jobs of the next prefill call: ``[job]`` when the prompt first in line goes in pieces (the job stays
        in line until ``piece_written`` says its last piece is), else the whole prompts next in line that fit in
        one packed call, taken off the line, their slots decoding from the next step."""
        if self._look_up(self.prefilling[0]).pieces:
            return [self.prefilling[0]]
        jobs, total, room = [], 0, self.capacity()
        while self.prefilling and len(jobs) < self.max_packed and not self._look_up(self.prefilling[0]).pieces:
            n = len(self.prefilling[0].tokens)
            if jobs and total + n > room:  # the first always goes (at most a call of ``chunk``)
                break
            jobs.append(self.prefilling.popleft())
            total += n
        for j in jobs:
            self._decoding(j)
        return jobs

    def _look_up(self, job: PrefillJob) -> PrefillJob:
        """Before a job's first prefill call: its head looked for again in the cached pages (``reshare``), then
        prefilled in pieces after what is found. Looked up this late, a prompt that waited behind another with the
        same head (a burst of questions on one document) finds that head written."""
        if not job.looked_up:
            job.looked_up = True
            cached = self.kv.reshare(job.request, job.tokens, job.done)
            if cached > job.done:
                job.done, job.pieces = cached, True
                job.table = self.kv.table(job.request, self.max_pages)
                if not job.request.output:
                    job.request.cached_tokens = cached
                self.kv.commit(job.request, job.tokens[:cached])
        return job

    def piece_written(self, job: PrefillJob, n: int) -> bool:
        """``n`` more of ``job``'s tokens are being prefilled; -> whether that was its last piece (the job then
        leaves the line and its slot decodes from the next step)."""
        job.done += n
        self.kv.commit(job.request, job.tokens[:job.done])
        if job.done < len(job.tokens):
            return False
        self.prefilling.popleft()
        self._decoding(job)
        return True

    def _decoding(self, job: PrefillJob) -> None:
        self.keep[job.slot] = True
        self.length[job.slot] = len(job.tokens)
        self.kv.commit(job.request, job.tokens)

    def grow(self) -> None:
        """Takes the page each decoding slot's next position needs (``new_pages``); raises ``PoolExhausted`` when
        the pool has none (the pages taken so far are kept)."""
        for slot in np.flatnonzero(self.keep):
            index = self.kv.grow(self.slot_req[slot], int(self.length[slot]) + 1)
            if index is not None:
                self.new_pages[slot] = index, self.kv.pages[self.slot_req[slot].id][index]

    def decoded(self) -> np.ndarray:
        """A decode step is dispatched: -> the page-table updates it takes; the slots it ran are one longer."""
        new_pages = self.new_pages.copy()
        self.new_pages[:, 0] = self.max_pages
        self.length += self.keep
        return new_pages

    def preempt(self) -> Request:
        """Frees the newest running request's slot and pages and puts it first in line (the lock is taken)."""
        with self.lock:
            slot = max((s for s, r in enumerate(self.slot_req) if r is not None), key=lambda s: self._admitted_at[s])
            r = self.slot_req[slot]
            self.kv.free(r)
            self._clear(slot)
            self.waiting.appendleft(r)
            return r

    def free(self, slot: int, request: Request) -> None:
        """``request`` has ended: its slot is freed if it still holds it."""
        with self.lock:
            if self.slot_req[slot] is request:
                self.release(slot)

    def release(self, slot: int) -> None:
        """Frees ``slot`` and its request's pages (the lock held); the pages of its tokens stay cached."""
        r = self.slot_req[slot]
        if r is not None:
            if self.keep[slot]:  # prefilled: every token but the last is in its pages
                self.kv.commit(r, r.prompt + r.output[:-1])
            self.kv.free(r)
        self._clear(slot)

    def _clear(self, slot: int) -> None:
        self.slot_req[slot] = None
        self.keep[slot] = False
        self.new_pages[slot, 0] = self.max_pages
        self.prefilling = collections.deque(j for j in self.prefilling if j.slot != slot)
