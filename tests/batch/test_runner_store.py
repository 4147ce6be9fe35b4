"""A line's result written to a store that does not answer for a while (SQLite held by another writer past its
busy timeout, as a PostgreSQL restarting would be): written once it answers, not lost with the line's task."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import timedelta
from pathlib import Path

from llamascope.accounts.records import utcnow
from llamascope.accounts.store import AccountStore
from llamascope.batch.files import FileStore
from llamascope.batch.lines import CHAT, Line
from llamascope.batch.records import BatchView, Status
from llamascope.batch.repository import BatchRepository
from llamascope.batch.runner import Runner


def _batch(batch_id: str, key_id: int) -> BatchView:
    now = utcnow()
    return BatchView(
        id=batch_id,
        key_id=key_id,
        input_file_id="file-batch-in",
        endpoint=CHAT,
        completion_window="24h",
        model="m",
        status=Status.IN_PROGRESS,
        ending=None,
        errors=None,
        metadata=None,
        output_file_id=None,
        error_file_id=None,
        total=1,
        completed=0,
        failed=0,
        input_tokens=0,
        output_tokens=0,
        created_at=now,
        expires_at=now + timedelta(hours=24),
        in_progress_at=now,
        finalizing_at=None,
        completed_at=None,
        failed_at=None,
        expired_at=None,
        cancelling_at=None,
        cancelled_at=None,
    )


def test_a_result_is_written_once_the_store_answers_again(tmp_path: Path) -> None:
    """The write failed after the busy timeout (10 s), and with it the line's task: the line stayed claimed by the
    live process, never run again nor reported, and its batch stayed in progress until a restart."""
    path = tmp_path / "accounts.db"
    store = AccountStore(f"sqlite:///{path}")
    store.migrate()
    repository = BatchRepository(store)
    runner = Runner(repository, FileStore(tmp_path / "files", 1 << 20), {}, store, replica_id="r1")
    _, key = store.create_key()
    batch = _batch("batch_1", key.id)
    repository.add_batch(batch)
    repository.add_lines(batch.id, [Line(1, "a", 0, 10)], first=True)
    (line,) = repository.claim_lines(batch.id, "r1", 1)

    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    released = threading.Timer(12, lambda: holder.execute("COMMIT"))  # past the busy timeout of the first write
    released.start()
    try:
        body = {"usage": {"prompt_tokens": 3, "completion_tokens": 2}}
        asyncio.run(asyncio.wait_for(runner._finish(batch, line, 200, "req-1", None, body), 120))
    finally:
        released.join()
        holder.close()
    assert repository.unfinished(batch.id) == (0, 0)
    saved = repository.batch(batch.id)
    assert saved is not None and (saved.completed, saved.input_tokens, saved.output_tokens) == (1, 3, 2)
