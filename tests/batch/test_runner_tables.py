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
