"""Which tokens' keys and values each row of the serving engine's KV cache holds, and their reuse (prefix caching).

The cache has one row of ``max_len`` positions per slot; a request writes the row of the slot it was admitted
into. A freed slot's row keeps the keys and values of its request's tokens (prompt and generated); a busy row
holds its request's prompt once the prefill writing it is dispatched (``wrote``). Just before a prompt's first
prefill call (``reuse_prefix``), a prompt that begins with enough of a row's tokens (at least ``MIN_PREFIX`` and
half the prompt: a short shared head, such as a system prompt, is cheaper to prefill again packed with other
prompts) gets that row copied into its slot (the ``_reuse`` step) and prefills only the rest, in pieces attending
to the copied prefix: the next turn of a conversation prefills only the new message, and a question about a
document that another request is reading, or that one just ahead of it in the queue is prefilling, prefills only
the question. A request admitted into a row first moves that row's tokens aside (``move_aside``: copied into the
free row holding the least, which is nothing, a duplicate, or else the least recently used tokens), so the free
rows above the busy ones keep the most recent conversations while requests still take the lowest rows.

``KVCacheManager`` keeps that bookkeeping on the host and dispatches the copies through the model runner; a paged
KV cache would replace it behind the same calls.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from qwen2_jax.inference.generate import MIN_PROMPT_BUCKET
from .request import Request, Stats

MIN_PREFIX = MIN_PROMPT_BUCKET  # cached tokens a prompt must reuse (and half of it) to skip their prefill


class KVCacheManager:
    """The tokens each of ``slots`` rows holds, and the reuse of them. ``copy_rows(source, slot, prefix)``
    dispatches the copy of row ``source``'s first ``len(prefix)`` tokens into row ``slot``; ``fits(done, total)``
    says whether a prompt of ``total`` tokens with ``done`` written can be prefilled in pieces from there. With
    ``enabled`` False nothing is looked up or moved. Prefix-cache counters go to ``stats``."""

    def __init__(self, slots: int, *, enabled: bool, stats: Stats, copy_rows: Callable[[int, int, list[int]], None],
                 fits: Callable[[int, int], bool]):
        self.slots, self.enabled, self.stats = slots, enabled, stats
        self._copy_rows, self._fits = copy_rows, fits
        # The tokens whose keys and values each row holds, counting only writes already dispatched (the device runs
        # them before a copy dispatched now): a finished request's prompt and output, a running one's prompt, the
        # pieces of a prompt dispatched so far, a copied prefix; a row whose new request has written nothing yet
        # still holds its last request's.
        self._held: list[np.ndarray] = [np.zeros(0, np.int64)] * slots
        # When each row's held tokens were last released or copied from: the least recently used are given up first.
        self._used = np.zeros(slots, np.int64)
        self._clock = 0

    def wrote(self, slot: int, tokens: Sequence[int]) -> None:
        """A prefill writing ``tokens`` (from position 0) into row ``slot`` is dispatched."""
        self._held[slot] = np.asarray(tokens)

    def release(self, slot: int, tokens: Sequence[int]) -> None:
        """Row ``slot``'s request is done, the row holding ``tokens``: they stay for reuse, the most recently used.
        (The row holds the prompt and every token but the last, each fed to a step already read. Idle decode steps
        write at the row's length, past these, or at its last position when the row is full, which no prompt
        reuses: a prompt leaves a position for max_tokens, and its last token is always prefilled.)"""
        self._held[slot] = np.asarray(tokens)
        self._touch(slot)

    def reuse_prefix(self, prompt: list[int], slot: int) -> int:
        """Before a prompt's first prefill call: the longest head of it that a row holds, copied into row ``slot``
        when worth it (``head``); -> how many tokens were (0: none, and the whole prompt is to prefill)."""
        if not self.enabled:
            return 0
        self.stats.prefix_cache_queries += len(prompt)
        source, cached = self.head(prompt)
        if cached:
            self.stats.prefix_cache_hits += cached
            self._copy(source, slot, prompt[:cached])
            self._touch(source)
        return cached

    def head(self, prompt: list[int]) -> tuple[int, int]:
        """(row, tokens): the row whose held tokens begin ``prompt`` the furthest, and how many of them to reuse;
        (-1, 0) if none is worth it. The prompt's last token is always prefilled, for its logits."""
        ids, best, source = np.asarray(prompt[:-1]), 0, -1
        for slot, held in enumerate(self._held):
            n = min(len(held), len(ids))
            if n > best:
                differ = np.flatnonzero(held[:n] != ids[:n])
                if (same := int(differ[0]) if differ.size else n) > best:
                    best, source = same, slot
        if best < MIN_PREFIX or 2 * best < len(prompt) or not self._fits(best, len(prompt)):
            return -1, 0
        return source, best

    def move_aside(self, admitted: list[tuple[int, Request]], free: Sequence[int]) -> None:
        """Before new requests write over the rows they were admitted into (``admitted``: (row, request); ``free``:
        the rows no request holds): the tokens each of those rows holds copied into the free row that holds the
        least (nothing, tokens another row holds too, else the least recently used), so that a conversation's next
        turn finds its tokens however many requests came between, while the busy rows stay the lowest (the decode
        step stays narrow). Not moved: what a row's own new request will reuse, or another row holds too; never
        over newer tokens, nor over a row a new prompt will copy from."""
        if not self.enabled:
            return
        source = {slot: self.head(r.prompt)[0] for slot, r in admitted}  # the row each new prompt will copy from
        taken, wanted = set(source), set(source.values())

        known = {}  # row -> spare(row), until the next move changes what the rows hold

        def spare(row: int) -> bool:  # holds nothing that a row no new request writes over does not hold too
            if row not in known:
                held, n = self._held[row], len(self._held[row])
                # The last tokens compared first: most rows differ there, and a full compare is n tokens.
                known[row] = not n or any(other != row and other not in taken and len(h) >= n and h[n - 1] == held[-1]
                                          and np.array_equal(h[:n], held) for other, h in enumerate(self._held))
            return known[row]

        for slot in source:
            if len(self._held[slot]) < MIN_PREFIX or source[slot] == slot or spare(slot):
                continue
            targets = [s for s in free if s not in wanted]
            if not targets:
                return
            target = min(targets, key=lambda s: (not spare(s), self._used[s]))
            if spare(target) or self._used[target] < self._used[slot]:
                self._copy(slot, target, self._held[slot])
                self._used[target] = self._used[slot]
                self.stats.prefix_cache_moves += 1
                known.clear()

    def _copy(self, source: int, slot: int, prefix) -> None:
        """Dispatches the copy of row ``source``'s first ``len(prefix)`` tokens into row ``slot``."""
        self._copy_rows(source, slot, prefix)
        self._held[slot] = np.asarray(prefix)

    def _touch(self, row: int) -> None:
        self._clock += 1
        self._used[row] = self._clock
