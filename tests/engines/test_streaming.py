"""The model thread's hand-over to the event loop: every message, in order, one wake-up per burst."""

from __future__ import annotations

import asyncio
import threading

import pytest

from llamascope.engines.mllama import _Outbox


def test_a_burst_is_delivered_in_order_with_one_wake_up() -> None:
    """Puts only file messages (the loop is idle and would otherwise wake for each); a flush hands them all
    over with one wake-up, however often it is called before the loop gets to them."""

    async def scenario() -> tuple[list[list[int]], int, int]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        schedule = loop.call_soon_threadsafe

        def counted(callback, *args):  # type: ignore[no-untyped-def]
            nonlocal wakeups
            wakeups += getattr(callback, "__self__", None) is outbox  # not asyncio.to_thread's own
            return schedule(callback, *args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        outbox = _Outbox(loop)
        queues: list[asyncio.Queue] = [asyncio.Queue() for _ in range(3)]
        burst = threading.Thread(target=lambda: [outbox.put(queues[i % 3], [i]) for i in range(48)])
        burst.start()
        await asyncio.to_thread(burst.join)  # the loop runs meanwhile: nothing may arrive before the flush
        before_flush = sum(q.qsize() for q in queues)
        await asyncio.to_thread(lambda: [outbox.flush() for _ in range(3)])
        got = [[] for _ in queues]
        for q, into in zip(queues, got, strict=True):
            for _ in range(16):
                into += await asyncio.wait_for(q.get(), 5)
        return got, wakeups, before_flush

    got, wakeups, before_flush = asyncio.run(scenario())
    assert before_flush == 0
    assert got == [list(range(i, 48, 3)) for i in range(3)]
    assert wakeups == 1


def test_a_closed_loop_refuses() -> None:
    loop = asyncio.new_event_loop()
    outbox = _Outbox(loop)
    loop.close()
    with pytest.raises(RuntimeError):
        outbox.put(asyncio.Queue(), [1])
