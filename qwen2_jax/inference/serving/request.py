"""What a client hands the serving engine and what it gets back: a prompt with its sampling settings
(``SamplingParams``, ``Request``), its tokens as they come (``Request.deliver``), ``QueueFull`` when the engine
can take no more, and the engine's counters and histograms (``Stats``, for ``/metrics``). Also the per-slot status
codes a step reports to the host."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import time
from typing import Callable, Sequence

from qwen2_jax.errors import InputError
from qwen2_jax.inference.sampling import check_sampling_args

MAX_EOS = 8  # end tokens per request, padded with -1

# Per-slot status a step reports to the host.
IDLE, RUNNING, STOPPED, LENGTH = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: a random one
    ignore_eos: bool = False
    eos_token_ids: tuple[int, ...] | None = None  # None: the engine's

    def check(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InputError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        check_sampling_args(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                            repetition_penalty=self.repetition_penalty)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InputError(f"seed must be an integer, got {self.seed!r}")


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its bound."""


_IDS = itertools.count()


class Request:
    """A prompt and its settings; the engine calls ``deliver(token_ids, finish_reason)`` from its thread as
    tokens come (``finish_reason`` None until the last call: "stop" or "length", or "abort"). Without
    ``deliver``, the calls go to ``events`` (a queue), e.g. for tests."""

    def __init__(self, prompt: Sequence[int], params: SamplingParams,
                 deliver: Callable[[list[int], str | None], None] | None = None):
        self.id = next(_IDS)
        self.prompt = [int(t) for t in prompt]
        self.params = params
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.deliver = deliver or (lambda tokens, finish: self.events.put((tokens, finish)))
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.output: list[int] = []  # tokens delivered so far
        self.cached_tokens = 0  # prompt tokens whose keys and values came from the prefix cache
        self.seed: int | None = None  # the seed its tokens are drawn with, once chosen
        self.preemptions = 0  # times its pages were taken back and it waited to be prefilled again
        self.finished = False

    def result(self, timeout: float | None = None) -> tuple[list[int], str]:
        """Blocks until the request ends (``events`` only): (all its tokens, finish_reason)."""
        tokens = []
        while True:
            new, finish = self.events.get(timeout=timeout)
            tokens += new
            if finish is not None:
                return tokens, finish


@dataclasses.dataclass
class Stats:
    """What ``/metrics`` reports; histograms as (bucket bounds, counts, sum)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of them, found (their prefill skipped)
    num_preemptions: int = 0  # running requests whose pages were taken back (recomputed later)
    requests_finished: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    ttft: "Histogram" = None
    itl: "Histogram" = None

    def __post_init__(self):
        self.ttft = Histogram((0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.itl = Histogram((0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


class Histogram:
    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, x: float) -> None:
        self.counts[next((i for i, b in enumerate(self.bounds) if x <= b), len(self.bounds))] += 1
        self.sum += x
