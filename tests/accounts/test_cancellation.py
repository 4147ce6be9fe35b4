"""A request counted in by its key's limits, or holding its allowance, is counted out and charged however often
its task is cancelled meanwhile: asyncio's own ``Task.cancel``, as the hang-up watch and the batch runner call it,
on the real store and a real Redis (paused with SIGSTOP, so that the cancellations come while it is waited for)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import anyio
import pytest

from llamascope.accounts.admission import Accounts, Principal
from llamascope.accounts.limits import RateLimits, SharedRateLimits, to_the_end
from llamascope.accounts.store import AccountStore
from tests.services import RedisServer


@contextmanager
def paused(redis_server: RedisServer) -> Iterator[None]:
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)


async def cancelled_twice(task: asyncio.Task[object]) -> None:
    await asyncio.sleep(0.1)
    task.cancel()
    await asyncio.sleep(0.1)
    task.cancel()
    await asyncio.sleep(0.1)


async def ended(task: asyncio.Task[object]) -> None:
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)


@pytest.mark.redis
def test_a_leave_cancelled_twice_still_frees_the_slot(tmp_path: Path, redis_server: RedisServer) -> None:
    """A hang-up's cancel, then the server's stop, while Redis counts a refused request out: the slot was kept,
    and a key limited to one concurrent request got 429 on that replica for as long as it lived."""
    store = AccountStore.for_path(tmp_path / "accounts.db")
    store.migrate()
    _, view = store.create_key(max_concurrent=1)

    async def scenario() -> None:
        accounts = Accounts(store, SharedRateLimits(redis_server.url, timeout=2.0))
        principal = Principal(view)
        counted = await accounts.enter(principal)
        with paused(redis_server):
            leaving = asyncio.ensure_future(accounts.leave(principal, counted))
            await cancelled_twice(leaving)
        await ended(leaving)
        assert await accounts.enter(principal) is True  # the slot is free
        await accounts.leave(principal, True)
        await accounts.limits.aclose()
        accounts.close()

    asyncio.run(scenario())


@pytest.mark.redis
def test_an_enter_cancelled_while_redis_counts_it_in_does_not_keep_the_slot(redis_server: RedisServer) -> None:
    """A batch line stopped while Redis runs its concurrency count: the count ran, and nothing took it out."""
    store_less = SharedRateLimits(redis_server.url, timeout=2.0, prefix="entering")

    async def scenario() -> None:
        from tests.accounts.test_limits import key

        one = key(concurrent=1)
        assert await store_less.enter(one) is True  # the heartbeat is up
        await store_less.leave(one, 0)
        with paused(redis_server):
            entering = asyncio.ensure_future(store_less.enter(one))
            await cancelled_twice(entering)
        await ended(entering)
        assert await store_less.enter(one) is True  # the slot is free
        await store_less.leave(one, 0)
        await store_less.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("shared", [False, pytest.param(True, marks=pytest.mark.redis)])
def test_a_settle_cancelled_twice_charges_and_frees_the_slot(
    tmp_path: Path, request: pytest.FixtureRequest, shared: bool
) -> None:
    """A hang-up's cancel while the charge waits for the store's write lock, a second while Redis counts the
    request out: the charge and the count-out are both done."""
    redis_server: RedisServer | None = request.getfixturevalue("redis_server") if shared else None
    path = tmp_path / "accounts.db"
    store = AccountStore.for_path(path)
    store.migrate()
    _, view = store.create_key(max_concurrent=1)
    store.grant(view.id, "m", 1000, days=None)

    async def scenario() -> None:
        limits = SharedRateLimits(redis_server.url, timeout=2.0) if redis_server else RateLimits()
        accounts = Accounts(store, limits)
        principal = Principal(view)
        grant = await accounts.check(principal, "m")
        admission = await accounts.admit(principal, "m", grant, 100, "r1", counted=await accounts.enter(principal))
        writer = sqlite3.connect(path, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")  # the store's write lock, held: the charge waits for it off the loop
        with paused(redis_server) if redis_server is not None else nullcontext():
            settling = asyncio.ensure_future(admission.settle(10, 5, 0, "ok"))
            await asyncio.sleep(0.1)
            settling.cancel()
            await asyncio.sleep(0.1)
            assert not settling.done()  # the charge is waited for, not left to a thread no one waits on
            writer.execute("COMMIT")
            writer.close()
            await asyncio.sleep(0.3)  # charged; counting out, from a Redis that does not answer yet
            settling.cancel()
            await asyncio.sleep(0.1)
        await ended(settling)
        assert [(r.request_id, r.input_tokens, r.output_tokens) for r in store.ledger()] == [("r1", 10, 5)]
        assert await accounts.enter(principal) is True  # the slot is free
        await accounts.leave(principal, True)
        await limits.aclose()
        accounts.close()

    asyncio.run(scenario())


def test_to_the_end_in_a_cancelled_anyio_scope_waits_without_spinning() -> None:
    """Starlette cancels a stream's task group when its client leaves: anyio then cancels the task again on
    every turn of the loop while it is not shielded, and the wait for the charge was a busy loop (some
    30,000 turns for a 0.3 s wait, a core held all along)."""

    charged: list[str] = []

    async def charge() -> None:
        await asyncio.to_thread(time.sleep, 0.3)
        charged.append("r1")

    async def scenario() -> int:
        task = asyncio.current_task()
        assert task is not None
        with anyio.CancelScope() as scope:
            scope.cancel()
            try:
                await to_the_end(charge())
                await anyio.sleep(0)  # the scope's cancellation, delivered once the charge is done
            finally:
                cancels = task.cancelling()
            raise AssertionError("not cancelled")
        return cancels

    assert asyncio.run(scenario()) <= 1
    assert charged == ["r1"]


def test_to_the_end_failing_after_a_cancel_still_raises_the_cancellation() -> None:
    """A count-out or a charge that fails after its caller was cancelled: the error instead of the cancellation
    let the task go on as though nothing had cancelled it (an ``enter`` with ``on_error="open"`` let the
    request of a client gone run to its end)."""

    async def failing() -> None:
        await asyncio.sleep(0.2)
        raise ValueError("Redis went away")

    async def scenario() -> None:
        waiting = asyncio.ensure_future(to_the_end(failing()))
        await asyncio.sleep(0.05)
        waiting.cancel()
        await ended(waiting)

    asyncio.run(scenario())


def test_a_charge_that_fails_for_good_still_counts_the_request_out(tmp_path: Path) -> None:
    """The event loop's settle raising other than "unreachable" (sqlite3.DatabaseError: a damaged file) skipped
    the count-out: a key limited to one concurrent request got 429 for as long as the process lived. A store
    whose charge fails so stands in for the damaged file."""

    class Damaged(AccountStore):
        def settle(self, *args: object, **kwargs: object) -> bool:
            raise sqlite3.DatabaseError("database disk image is malformed")

    store = Damaged.for_path(tmp_path / "accounts.db")
    store.migrate()
    _, view = store.create_key(max_concurrent=1)
    store.grant(view.id, "m", 1000, days=None)

    async def scenario() -> None:
        accounts = Accounts(store, RateLimits())
        principal = Principal(view)
        grant = await accounts.check(principal, "m")
        admission = await accounts.admit(principal, "m", grant, 100, "r1", counted=await accounts.enter(principal))
        with pytest.raises(sqlite3.DatabaseError):
            await admission.settle(10, 5, 0, "ok")
        assert await accounts.enter(principal) is True  # the slot is free
        await accounts.leave(principal, True)
        accounts.close()

    asyncio.run(scenario())
