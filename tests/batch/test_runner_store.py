"""A store that does not answer for a while (SQLite held by another writer past its busy timeout, as a PostgreSQL
restarting would be): what the runner writes then (a line's result, a batch's validation, its result files) is
written once it answers, not lost with the task that tried, nor left claimed by the live process for good."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import threading
from datetime import timedelta
from pathlib import Path

from sqlalchemy import create_engine, event

from llamascope.accounts.records import KeyView, utcnow
from llamascope.accounts.sqlite_hot_path import sqlite_pragmas
from llamascope.accounts.store import AccountStore
from llamascope.batch.files import FileStore
from llamascope.batch.lines import CHAT, Line
from llamascope.batch.records import BatchView, Status
from llamascope.batch.repository import BatchRepository
from llamascope.batch.runner import Runner


def _batch(batch_id: str, key_id: int, status: Status = Status.IN_PROGRESS) -> BatchView:
    now = utcnow()
    return BatchView(
        id=batch_id,
        key_id=key_id,
        input_file_id="file-batch-in",
        endpoint=CHAT,
        completion_window="24h",
        model="m",
        status=status,
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


def _live_replica_store(path: Path) -> tuple[AccountStore, KeyView, BatchRepository]:
    """A store at ``path`` with a key, and replica r1's lease held (the runner's process, alive: its claims
    hold), and its batch repository."""
    store = AccountStore(f"sqlite:///{path}")
    store.migrate()
    _, key = store.create_key()
    store.hold_lease("r1", "host", "1", 3600)
    return store, key, BatchRepository(store)


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


class _Held:
    """SQLite held by another writer (BEGIN EXCLUSIVE) until ``release``."""

    def __init__(self, path: Path) -> None:
        self.connection = sqlite3.connect(path, isolation_level=None)
        self.connection.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        self.connection.execute("COMMIT")
        self.connection.close()


def test_a_validation_and_a_finalization_the_store_cut_short_are_done_again(tmp_path: Path) -> None:
    """Validating while the store did not answer failed the batch as "the input file could not be read" (or, that
    not written either, left it validating for good); finalizing then left it finalizing for good: the step stayed
    claimed by the live process, which never took it again."""
    path = tmp_path / "accounts.db"
    store, key, repository = _live_replica_store(path)
    store.grant(key.id, "m", None, None)
    files = FileStore(tmp_path / "files", 1 << 20)
    lines = "".join(
        json.dumps({"custom_id": c, "method": "POST", "url": CHAT, "body": {"model": "m"}}) + "\n" for c in "ab"
    )
    files.save("file-batch-in", io.BytesIO(lines.encode()))
    runner = Runner(repository, files, {"m": None}, store, replica_id="r1")  # type: ignore[dict-item]
    batch = _batch("batch_1", key.id, Status.VALIDATING)
    repository.add_batch(batch)

    assert repository.claim_step(batch.id, Status.VALIDATING, "r1")
    held = _Held(path)
    try:
        asyncio.run(asyncio.wait_for(runner._validate(batch), 120))  # its writes wait out the busy timeout, and fail
    finally:
        held.release()
    found = repository.batch(batch.id)
    assert found is not None and (found.status, found.errors) == (Status.VALIDATING, None)
    assert repository.claim_step(batch.id, Status.VALIDATING, "r1")  # its own step, taken again
    asyncio.run(runner._validate(batch))
    found = repository.batch(batch.id)
    assert found is not None and (found.status, found.total) == (Status.IN_PROGRESS, 2), found.errors

    for line in repository.claim_lines(batch.id, "r1", 2):
        assert repository.finish_line(
            batch.id, line.number, "r1", True, json.dumps({"custom_id": line.custom_id}), 1, 1
        )
    assert repository.begin_finalizing(batch.id, "r1") is not None  # the step begun, then the store held
    held = _Held(path)
    try:
        asyncio.run(asyncio.wait_for(runner._finalize(batch.id), 120))
    finally:
        held.release()
    asyncio.run(runner._finalize(batch.id))
    found = repository.batch(batch.id)
    assert found is not None and found.status is Status.COMPLETED and found.output_file_id is not None
    assert [json.loads(x)["custom_id"] for x in files.read_range(found.output_file_id, 0, 1000).splitlines()] == [
        "a",
        "b",
    ]
    assert [p.name for p in files.root.iterdir()] == [found.output_file_id]  # (the input had no record: dropped)


def test_a_step_that_failed_is_not_taken_again_at_once(tmp_path: Path) -> None:
    """Review: a finalization that failed (here its result files could not be written; as well the store failing
    fast, a full disk) was taken again by the same process at the very next round, which the step's own end
    wakes: the result files rewritten and the failure logged in a tight loop, at full CPU, for as long as it
    lasted. Now it waits (a second, doubling), as a line's write does."""
    path = tmp_path / "accounts.db"
    store, key, repository = _live_replica_store(path)
    files = FileStore(tmp_path / "files", 1 << 20)
    runner = Runner(repository, files, {}, store, replica_id="r1", poll_seconds=3600)
    batch = _batch("batch_1", key.id)
    repository.add_batch(batch)
    repository.add_lines(batch.id, [Line(1, "a", 0, 10)], first=True)
    (line,) = repository.claim_lines(batch.id, "r1", 1)
    assert repository.finish_line(batch.id, line.number, "r1", True, json.dumps({"custom_id": "a"}), 1, 1)
    files.root.rmdir()
    files.root.write_text("")  # the result files cannot be written

    async def rounds() -> list[bool]:
        taken = []
        for _ in range(2):
            await runner._tick(expire=False)
            taken.append(batch.id in runner._steps)
            while runner._steps:  # the step ends (and fails)
                await asyncio.sleep(0.01)
        return taken

    assert asyncio.run(rounds()) == [True, False]
    found = repository.batch(batch.id)
    assert found is not None and found.status is Status.FINALIZING  # its step taken again later


class _AnswerLost(sqlite3.Connection):
    """A connection whose commit of a batch's end is made, and then not confirmed: as a PostgreSQL connection cut
    after its COMMIT, before the answer came back."""

    armed = True

    def commit(self) -> None:
        super().commit()
        ended = self.execute("SELECT count(*) FROM batches WHERE status = 'completed'").fetchone()[0]
        if ended and _AnswerLost.armed:
            _AnswerLost.armed = False
            raise sqlite3.OperationalError("server closed the connection unexpectedly")


def test_result_files_a_batch_may_name_are_not_deleted_when_its_end_is_not_confirmed(tmp_path: Path) -> None:
    """Review: the runner deleted its result files whenever recording the batch's end raised; a store that
    committed it, then failed to say so, left a completed batch whose output_file_id named a deleted file (its
    lines dropped in the same commit: every result lost). Now they are deleted only once the store shows they are
    not the batch's; a try that was not recorded has its files deleted at the next."""
    path = tmp_path / "accounts.db"
    store, key, repository = _live_replica_store(path)
    repository.engine = create_engine(f"sqlite:///{path}", connect_args={"factory": _AnswerLost})
    event.listen(repository.engine, "connect", sqlite_pragmas)
    files = FileStore(tmp_path / "files", 1 << 20)
    runner = Runner(repository, files, {}, store, replica_id="r1")
    batch = _batch("batch_1", key.id)
    repository.add_batch(batch)
    repository.add_lines(batch.id, [Line(1, "a", 0, 10)], first=True)
    (line,) = repository.claim_lines(batch.id, "r1", 1)
    assert repository.finish_line(batch.id, line.number, "r1", True, json.dumps({"custom_id": "a"}), 1, 1)

    asyncio.run(runner._finalize(batch.id))  # ended, and the store's answer lost
    assert not _AnswerLost.armed
    found = repository.batch(batch.id)
    assert found is not None and found.status is Status.COMPLETED and found.output_file_id is not None
    assert json.loads(files.read_range(found.output_file_id, 0, 1000))["custom_id"] == "a"

    # A try whose end was not recorded: its files go at the next.
    other = _batch("batch_2", key.id)
    repository.add_batch(other)
    runner._unsure[other.id] = ["file-batch_output-x"]
    files.write_lines("file-batch_output-x", ["{}"])
    asyncio.run(runner._finalize(other.id))
    assert not files.path("file-batch_output-x").exists()
    assert repository.batch(other.id).status is Status.COMPLETED  # type: ignore[union-attr]
