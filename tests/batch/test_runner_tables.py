"""The runner forgets a key's window, limit, pauses and client once no batch of the key is under way."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from llamascope.accounts.store import AccountStore
from llamascope.batch.files import FileStore
from llamascope.batch.repository import BatchRepository
from llamascope.batch.runner import Runner


async def _app(scope, receive, send) -> None:  # never called: no line runs here
    raise AssertionError("no request expected")


def test_a_key_with_no_batch_left_is_forgotten_and_one_with_running_lines_kept(tmp_path: Path) -> None:
    store = AccountStore(f"sqlite:///{tmp_path / 'accounts.db'}")
    store.migrate()
    runner = Runner(BatchRepository(store), FileStore(tmp_path / "files", 1 << 20), {}, store, replica_id="r1")
    runner._app = _app

    async def round_after_two_keys_ran() -> tuple[object, object]:
        gone, busy = runner._client(1), runner._client(2)
        now = time.monotonic()
        for key in (1, 2):
            runner._window[key], runner._limits[key] = 2.0, (now, 4)
        runner._paused[("key", 1)] = now - 1  # a pause over
        runner._paused[("model", "m")] = now - 1
        runner._key_running[2] = 1  # a line of key 2 still running here
        runner._running["m"] = 0
        await runner._tick(expire=False)  # no batch in the store
        return gone, busy

    gone, busy = asyncio.run(round_after_two_keys_ran())
    assert set(runner._window) == set(runner._limits) == set(runner._clients) == {2}
    assert runner._paused == {} and dict(runner._running) == {}
    assert gone.is_closed and not busy.is_closed


def test_shutdown_waits_a_bounded_time_for_lines_still_saving(tmp_path: Path, monkeypatch) -> None:
    """Each stopped line saves what it made to its end (``to_the_end``), and a stalled store would hold that
    forever: shutdown waits ``STOP_SECONDS`` for them, then goes on."""
    from llamascope.accounts.limits import to_the_end
    from llamascope.batch import runner as module

    monkeypatch.setattr(module, "STOP_SECONDS", 0.2)
    store = AccountStore(f"sqlite:///{tmp_path / 'accounts.db'}")
    store.migrate()
    runner = Runner(BatchRepository(store), FileStore(tmp_path / "files", 1 << 20), {}, store, replica_id="r1")

    async def stop_with_a_stuck_line() -> float:
        async def line() -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                await to_the_end(asyncio.sleep(3600))  # saving, on a store that never answers

        runner._lines["b"] = {0: asyncio.ensure_future(line())}
        await asyncio.sleep(0)
        began = time.monotonic()
        await runner.stop()
        return time.monotonic() - began

    assert asyncio.run(asyncio.wait_for(stop_with_a_stuck_line(), 30)) < 10
