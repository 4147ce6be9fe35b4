"""Work under way, by key, that callers asking for the same key wait for rather than doing again ("single
flight"): the image intake's fetches of one URL that many requests name at once (a batch whose lines all name
one image, a burst of chat requests).

The work runs as a task of its own, not in the caller that started it: a caller that leaves (its client hung
up, its request cancelled) stops waiting, and the others go on waiting for the same work. Once no caller waits
any more the work is cancelled, so nothing runs on for nobody; a caller that comes after that starts it anew.
Whatever the work ends with, its result or its exception, goes to every caller waiting then; the work is
forgotten as it ends, so a caller that comes later starts it anew (what it may reuse is the work's own affair,
``intake``'s caches).

Hand-written, some forty lines around ``asyncio.shield``: the one package on PyPI for it (aiocoalesce, a
first 0.1.0 release) is not worth a dependency for so little, and the rule that the work ends once nobody waits
is this server's own.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class _Flight(Generic[T]):
    __slots__ = ("task", "waiting")

    def __init__(self, task: asyncio.Task[T]) -> None:
        self.task = task
        self.waiting = 0  # callers awaiting the task


class InFlight(Generic[K, T]):
    """The work under way for each key, for the event loop that runs it."""

    def __init__(self) -> None:
        self._flights: dict[K, _Flight[T]] = {}
        self._tasks: set[asyncio.Task[T]] = set()  # the loop holds tasks weakly: each is held here until it ends

    def __len__(self) -> int:
        return len(self._flights)

    async def join(self, key: K, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """The result of ``work()`` for ``key``: of the one under way if there is one, else of a new one."""
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight(asyncio.get_running_loop().create_task(work()))
            self._tasks.add(flight.task)
            flight.task.add_done_callback(functools.partial(self._ended, key, flight))
        flight.waiting += 1
        try:
            return await asyncio.shield(flight.task)
        finally:  # returned, raised, or this caller cancelled: the task goes on for the others
            flight.waiting -= 1
            if not flight.waiting and not flight.task.done():
                flight.task.cancel()  # nobody waits for it: it ends (its cleanup runs in the task)
                self._forget(key, flight)  # and a caller that comes now starts anew

    def _ended(self, key: K, flight: _Flight[T], task: asyncio.Task[T]) -> None:
        self._tasks.discard(task)
        self._forget(key, flight)
        if not task.cancelled():
            task.exception()  # taken: each waiter had it (none may be left), so asyncio does not log it as lost

    def _forget(self, key: K, flight: _Flight[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
