"""The serving engine's scheduler: which requests wait, which slot each running one has, and what runs next.

Each turn of the engine's loop it ends the aborted requests, frees their slots and admits waiting requests into
the lowest free slots (``schedule``; idle, it first lets a request that just came wait up to ``batch_wait`` for
the rest of its burst, so that they share packed calls). Then it chooses the next prefill call, of at most
``prefill_chunk`` prompt tokens, so that the slots already decoding go on between calls (``next_prefill``): the
whole prompts next in line that fit together in one packed call, or a piece of the prompt first in line when it
goes in pieces (longer than ``prefill_chunk``, or the rest of a prompt after a cached prefix). ``keep`` names the
slots the next decode step runs.
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


@dataclasses.dataclass
class PrefillJob:
    request: Request
    slot: int
    done: int = 0  # prompt tokens written
    pieces: bool = False  # in pieces into its row (a long prompt, or the rest of a cached prefix), not packed
    looked_up: bool = False  # its prompt's head has been looked for in the rows (and copied, if found)


class Scheduler:
    """The queues of ``slots`` slots and up to ``max_waiting`` waiting requests, guarded by ``lock`` (any thread
    may ``add`` or ``abort``; the engine's thread does the rest). A packed prefill call holds up to
    ``prefill_chunk`` tokens of at most ``max_packed`` prompts. Rows are looked up and released through ``kv``."""

    def __init__(self, kv: KVCacheManager, *, slots: int, prefill_chunk: int, max_waiting: int, batch_wait: float,
                 max_packed: int):
        self.kv, self.slots, self.chunk, self.max_waiting = kv, slots, prefill_chunk, max_waiting
        self.batch_wait, self.max_packed = batch_wait, max_packed
        self.lock = threading.Condition()
        self.waiting: collections.deque[Request] = collections.deque()
        self._aborted: set[int] = set()
        self.slot_req: list[Request | None] = [None] * slots
        self.prefilling: collections.deque[PrefillJob] = collections.deque()
        self.keep = np.zeros(slots, bool)
        self._stopping = False

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.slot_req)

    # ---- any thread ----
    def add(self, request: Request) -> None:
        with self.lock:
            if self.running + len(self.waiting) >= self.slots + self.max_waiting:
                raise QueueFull(f"all {self.slots} slots are busy and {len(self.waiting)} requests are waiting")
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
        (``finish(request, "abort")``) and admits waiting ones into free slots, whose rows' tokens the KV cache
        manager then moves aside. False once stopped."""
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
            admitted = []
            for slot in range(self.slots):
                if self.slot_req[slot] is None and self.waiting:
                    r = self.waiting.popleft()
                    self.slot_req[slot] = r
                    self.prefilling.append(PrefillJob(r, slot, pieces=len(r.prompt) > self.chunk))
                    admitted.append((slot, r))
        if admitted:
            self.kv.move_aside(admitted, [s for s in range(self.slots) if self.slot_req[s] is None])
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

    def next_prefill(self) -> list[PrefillJob]:
        """The jobs of the next prefill call (some are prefilling): ``[job]`` when the prompt first in line goes in
        pieces (the job stays in line until ``piece_written`` says its last piece is), else the whole prompts next
        in line that fit in one packed piece, taken off the line, their slots decoding from the next step."""
        job = self._look_up(self.prefilling[0])
        if job.pieces:
            return [job]
        jobs, total = [], 0
        while (self.prefilling and len(jobs) < self.max_packed
               and not self._look_up(self.prefilling[0]).pieces
               and total + len(self.prefilling[0].request.prompt) <= self.chunk):
            jobs.append(self.prefilling.popleft())
            total += len(jobs[-1].request.prompt)
        self.keep[[j.slot for j in jobs]] = True
        return jobs

    def piece_written(self, job: PrefillJob, n: int) -> bool:
        """``n`` more of ``job``'s prompt tokens are being prefilled; -> whether that was its last piece (the job
        then leaves the line and its slot decodes from the next step)."""
        job.done += n
        if job.done < len(job.request.prompt):
            return False
        self.prefilling.popleft()
        self.keep[job.slot] = True
        return True

    def _look_up(self, job: PrefillJob) -> PrefillJob:
        """Before a job's first prefill call: the longest head of its prompt that a row holds, copied into its row
        when worth it (``KVCacheManager.reuse_prefix``), the rest then prefilled in pieces. Looked up this late, a
        prompt that waited behind another with the same head (a burst of questions on one document) finds that
        head written."""
        if job.looked_up:
            return job
        job.looked_up = True
        cached = self.kv.reuse_prefix(job.request.prompt, job.slot)
        if cached:
            job.done, job.pieces = cached, True
        job.request.cached_tokens = cached
        return job

    def free(self, slot: int, request: Request) -> None:
        """``request`` has ended: its slot is freed if it still holds it."""
        with self.lock:
            if self.slot_req[slot] is request:
                self.release(slot)

    def release(self, slot: int) -> None:
        """Frees ``slot`` (the lock held), its row keeping its request's tokens for reuse."""
        r = self.slot_req[slot]
        if r is not None and r.output:
            self.kv.release(slot, r.prompt + r.output[:-1])
        self.slot_req[slot] = None
        self.keep[slot] = False
        self.prefilling = collections.deque(j for j in self.prefilling if j.slot != slot)
