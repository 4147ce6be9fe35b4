"""The one in-memory cache shape llamascope uses: least recently used first out, bounded by a size.

Decoded images (bounded by their pixel bytes), the vision tower's outputs
(by their tensor bytes) and re-encoded data: URIs (by count) all use it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SizedLRU(Generic[K, V]):
    """Entries up to ``max_size`` in all, as ``size`` measures each; thread-safe; counts hits and misses.

    An entry larger than the whole bound is not kept.
    """

    def __init__(self, max_size: int, size: Callable[[V], int]) -> None:
        self.max_size = max_size
        self.size = size
        self.total = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return found

    def peek(self, key: K) -> V | None:
        """The entry, without counting a hit or a miss or making it recent."""
        with self._lock:
            return self._entries.get(key)

    def touch(self, key: K) -> bool:
        """Make the entry the most recent, without counting a hit; whether it is there."""
        with self._lock:
            if key not in self._entries:
                return False
            self._entries.move_to_end(key)
            return True

    def put(self, key: K, value: V) -> None:
        size = self.size(value)
        if size > self.max_size:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.total -= self.size(old)
            self._entries[key] = value
            self.total += size
            while self.total > self.max_size:
                _, evicted = self._entries.popitem(last=False)
                self.total -= self.size(evicted)

    def pop(self, key: K) -> None:
        """Forget the entry, if there is one."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.total -= self.size(old)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.total = 0

    def __len__(self) -> int:
        return len(self._entries)
