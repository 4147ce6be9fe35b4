"""Grammars compiled once per key, off the event loop, kept in a bounded LRU cache.

A request that asks for a schema already seen gets its grammar at once; a new one is compiled on a worker thread
while the request waits (llguidance drops the GIL while it builds), and requests that ask for the same new schema
at the same time share one compilation.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from llamascope.structured.backend import Backend, Grammar
from llamascope.structured.spec import GrammarSpec


@dataclass
class CompileStats:
    hits: int = 0
    misses: int = 0
    compile_seconds: float = 0.0  # summed over the misses


class GrammarCache:
    """``capacity`` compiled grammars of one backend, the least recently used dropped first."""

    def __init__(self, backend: Backend, capacity: int = 256, workers: int = 1) -> None:
        self.backend = backend
        self.capacity = capacity
        self.stats = CompileStats()
        self._done: OrderedDict[str, Grammar] = OrderedDict()
        self._pending: dict[str, Future[Grammar]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grammar-compile")

    async def get(self, spec: GrammarSpec) -> Grammar:
        """The compiled grammar of ``spec``; raises ``ServiceError`` InvalidParameter if it cannot be compiled."""
        found = self._lookup(spec)
        return found if isinstance(found, Grammar) else await asyncio.wrap_future(found)

    def get_blocking(self, spec: GrammarSpec) -> Grammar:
        """``get`` for a caller that is not on an event loop (tests, benchmarks, the engine's own thread)."""
        found = self._lookup(spec)
        return found if isinstance(found, Grammar) else found.result()

    def __len__(self) -> int:
        return len(self._done)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _lookup(self, spec: GrammarSpec) -> Grammar | Future[Grammar]:
        key = spec.key
        with self._lock:
            grammar = self._done.get(key)
            if grammar is not None:
                self._done.move_to_end(key)
                self.stats.hits += 1
                return grammar
            pending = self._pending.get(key)
            if pending is None:
                self.stats.misses += 1
                pending = self._pending[key] = self._pool.submit(self._compile, key, spec)
            return pending

    def _compile(self, key: str, spec: GrammarSpec) -> Grammar:
        began = time.perf_counter()
        try:
            grammar = self.backend.compile(spec)
        except BaseException:  # a failed compile is not kept: the next request gets the same error afresh
            with self._lock:
                self._pending.pop(key, None)
            raise
        with self._lock:  # done before it stops pending, so no lookup finds it in neither
            self.stats.compile_seconds += time.perf_counter() - began
            self._done[key] = grammar
            self._pending.pop(key, None)
            while len(self._done) > self.capacity:
                self._done.popitem(last=False)
        return grammar
