"""Which pages of the KV pool each request holds, and their reuse across requests (vLLM's automatic prefix caching).

The pool has ``num_pages`` pages of ``page_size`` positions (``PagePool``); a request takes pages as its tokens
arrive (``admit`` for its prompt, ``grow`` one at a time while it decodes) and returns them when it ends
(``free``). A full page is keyed by the tokens up to its end (its own ``page_size`` tokens and its predecessor's key,
``commit``): a prompt that begins with the tokens of cached pages shares them (a reference count each, no copy)
and prefills only the rest. A page no request holds stays cached, free to be taken, and the free pages are taken
least recently freed first, so a conversation's pages outlive the requests just after it. A request's pages are
freed last page first: its tail, the least likely to be shared, is given up before its head.

Pages are counted taken when the host dispatches a step that writes them; the device runs the steps in order, so
a page freed here is written by its next owner only after every step that read it for the last one.
"""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from qwen2_jax.inference.generate import MIN_PROMPT_BUCKET
from .request import Request, Stats

MIN_PREFIX = MIN_PROMPT_BUCKET  # cached tokens a prompt must find (and half of it) to skip their prefill


class PagePool:
    """``num_pages`` pages: reference counts, the free ones in the order they are to be taken, and the keys of
    the cached ones."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self.free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(num_pages))
        self.refs = np.zeros(num_pages, np.int64)
        self.key_of: dict[int, tuple] = {}  # page -> its key, while cached
        self.page_of: dict[tuple, int] = {}  # key -> page

    @property
    def used(self) -> int:
        return self.num_pages - len(self.free)

    def take(self) -> int:
        """A free page, the least recently freed (its cached key forgotten)."""
        page, _ = self.free.popitem(last=False)
        if page in self.key_of:
            del self.page_of[self.key_of.pop(page)]
        self.refs[page] = 1
        return page

    def share(self, page: int) -> None:
        if self.refs[page] == 0:
            del self.free[page]
        self.refs[page] += 1

    def release(self, page: int) -> None:
        self.refs[page] -= 1
        if self.refs[page] == 0:
            self.free[page] = None  # the most recently freed: taken last

    def cache(self, page: int, key: tuple) -> None:
        """``page`` holds the tokens of ``key``: a prompt beginning with them may share it (kept: an earlier page
        with the same tokens)."""
        if key not in self.page_of and page not in self.key_of:
            self.page_of[key], self.key_of[page] = page, key


class KVCacheManager:
    """The pages of each request (by ``Request.id``) over a pool of ``num_pages`` pages of ``page_size``; with
    ``enabled`` False nothing is shared. Prefix-cache counters go to ``stats``."""

    def __init__(self, num_pages: int, page_size: int, *, enabled: bool, stats: Stats):
        self.pool, self.page_size, self.enabled, self.stats = PagePool(num_pages), page_size, enabled, stats
        self.pages: dict[int, list[int]] = {}
        self._keys: dict[int, list[tuple]] = {}  # the keys of each request's full pages, as far as committed

    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    @property
    def used(self) -> int:
        return self.pool.used

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def _key_chain(self, tokens: Sequence[int], known: list[tuple]) -> list[tuple]:
        """The keys of the full pages of ``tokens``, extending ``known`` (those of its first pages)."""
        keys = list(known)
        for i in range(len(keys), len(tokens) // self.page_size):
            parent = keys[-1] if keys else None
            keys.append((hash(parent), tuple(tokens[i * self.page_size:(i + 1) * self.page_size])))
        return keys

    def lookup(self, tokens: Sequence[int]) -> list[int]:
        """The cached pages ``tokens`` begins with (at most up to its last token, which is always prefilled for
        its logits), if worth sharing: at least ``MIN_PREFIX`` tokens and half of them (a short shared head is
        cheaper to prefill again packed with other prompts than in a piece of its own)."""
        if not self.enabled:
            return []
        pages = []
        for key in self._key_chain(tokens[:len(tokens) - 1], []):
            if key not in self.pool.page_of:
                break
            pages.append(self.pool.page_of[key])
        cached = len(pages) * self.page_size
        return pages if cached >= MIN_PREFIX and 2 * cached >= len(tokens) else []

    def admit(self, request: Request, tokens: Sequence[int]) -> int | None:
        """Pages for ``request`` to prefill ``tokens``: its cached head shared, the rest taken. -> the cached tokens,
        or None (nothing taken) when the pool lacks the pages."""
        shared = self.lookup(tokens)
        free_shared = sum(self.pool.refs[p] == 0 for p in shared)  # sharing takes these off the free list too
        need = self.pages_for(len(tokens)) - len(shared)
        if need > len(self.pool.free) - free_shared:
            return None
        for page in shared:
            self.pool.share(page)
        self.pages[request.id] = shared + [self.pool.take() for _ in range(need)]
        self._keys[request.id] = self._key_chain(tokens[:len(shared) * self.page_size], [])
        if self.enabled:
            self.stats.prefix_cache_queries += len(tokens)
            self.stats.prefix_cache_hits += len(shared) * self.page_size
        return len(shared) * self.page_size

    def reshare(self, request: Request, tokens: Sequence[int], cached: int) -> int:
        """Before ``request``'s first prefill call, its pages taken at admission with ``cached`` tokens found: if more
        of ``tokens``' head is cached now (a prompt that waited behind another with the same head, which has
        written it since), those pages are shared instead of its own, which go back unwritten. -> the cached
        tokens."""
        shared = self.lookup(tokens)
        if len(shared) * self.page_size <= cached:
            return cached
        pages = self.pages[request.id]
        for page in shared[cached // self.page_size:]:
            self.pool.share(page)
        for page in reversed(pages[cached // self.page_size:len(shared)]):
            self.pool.release(page)
        pages[:len(shared)] = shared
        self._keys[request.id] = self._key_chain(tokens[:len(shared) * self.page_size], [])
        if self.enabled:
            self.stats.prefix_cache_hits += len(shared) * self.page_size - cached
        return len(shared) * self.page_size

    def grow(self, request: Request, length: int) -> int | None:
        """A page for position ``length - 1`` if ``request`` has none yet: -> its index in the request's table (None
        if it had one); raises ``PoolExhausted`` when no page is free."""
        pages = self.pages[request.id]
        if self.pages_for(length) <= len(pages):
            return None
        if not self.pool.free:
            raise PoolExhausted
        pages.append(self.pool.take())
        return len(pages) - 1

    def commit(self, request: Request, tokens: Sequence[int]) -> None:
        """A step writing ``request``'s ``tokens`` (from position 0) is dispatched: its full pages become cached."""
        if not self.enabled or request.id not in self.pages:
            return
        keys = self._key_chain(tokens, self._keys[request.id])
        pages = self.pages[request.id]
        for i in range(len(self._keys[request.id]), min(len(keys), len(pages))):
            self.pool.cache(pages[i], keys[i])
        self._keys[request.id] = keys

    def free(self, request: Request) -> None:
        """``request`` is done (or preempted): its pages return to the pool, last page first."""
        for page in reversed(self.pages.pop(request.id, [])):
            self.pool.release(page)
        self._keys.pop(request.id, None)

    def table(self, request: Request, width: int) -> np.ndarray:
        """``request``'s page table row of ``width`` entries (page 0 past its pages: never read)."""
        row = np.zeros(width, np.int32)
        pages = self.pages[request.id]
        row[:len(pages)] = pages
        return row


class PoolExhausted(Exception):
    """No page is free."""
