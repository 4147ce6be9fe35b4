"""Batches, their files and their lines in the accounts database (SQLite, or PostgreSQL shared by replicas).

Work is claimed, never assigned. A line is claimed by a replica (``owner``) in one UPDATE, on PostgreSQL over
rows locked with ``FOR UPDATE SKIP LOCKED`` so that replicas claiming at once take different lines; the claim
lasts as long as that replica's lease in ``replicas`` (renewed by its checkpoint writer, see
accounts/checkpoints.py): a replica that dies, or is killed and restarted, loses its claims, and any replica
takes the lines over. A step of a whole batch (validating it, writing its result files) is claimed the same
way through ``batches.worker``.

A line's result is written once: only by its owner, only while it is running, in the transaction that counts
it in the batch. A replica that lost its claim (its lease ran out while it lived) writes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import fields
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.engine import Connection

from llamascope.accounts.records import aware, utcnow
from llamascope.accounts.schema import BatchFile, BatchJob, BatchLine, Replica
from llamascope.accounts.store import AccountStore
from llamascope.batch.lines import Line
from llamascope.batch.records import (
    DONE,
    ENDED,
    PENDING,
    RUNNING,
    BatchView,
    FileView,
    LineError,
    Status,
)
from llamascope.observability.facts import BatchStats

INSERT_CHUNK = 1000


def _file(row: Any) -> FileView:
    return FileView(row.id, row.key_id, row.filename, row.purpose, row.bytes, aware(row.created_at))  # type: ignore[arg-type]


def _batch(row: Any) -> BatchView:
    values: dict[str, Any] = {}
    for field in fields(BatchView):
        column = "meta" if field.name == "metadata" else field.name
        value = getattr(row, column)
        if isinstance(value, datetime):
            value = aware(value)
        values[field.name] = value
    values["status"] = Status(values["status"])
    values["ending"] = Status(values["ending"]) if values["ending"] else None
    values["errors"] = json.loads(values["errors"]) if values["errors"] else None
    values["metadata"] = json.loads(values["metadata"]) if values["metadata"] else None
    return BatchView(**values)


class BatchRepository:
    def __init__(self, store: AccountStore) -> None:
        self.store = store
        self.engine = store.engine

    def _now(self) -> Any:
        """The time leases are measured by: the database's clock on PostgreSQL, as the accounts store does."""
        return utcnow() if self.store.is_sqlite else func.now()

    def _live(self) -> Any:
        """The replicas whose lease still runs: their claims hold."""
        return select(Replica.id).where(Replica.lease_until >= self._now())

    def _unclaimed(self, column: Any) -> Any:
        return or_(column.is_(None), column.not_in(self._live()))

    def _takeable_step(self, replica_id: str) -> Any:
        """A batch's step no live replica holds, or one this replica holds: left by a step of its own that failed
        (the store not answering), taken again (the runner runs one step of a batch at a time). Without it, that
        batch stayed validating or finalizing, claimed by this live process, until it was restarted."""
        return or_(self._unclaimed(BatchJob.worker), BatchJob.worker == replica_id)

    # -- files ----------------------------------------------------------------------------------------

    def add_file(self, file: FileView) -> None:
        with self.engine.begin() as connection:
            connection.execute(insert(BatchFile).values(**{f.name: getattr(file, f.name) for f in fields(file)}))

    def file(self, file_id: str, key_id: int) -> FileView | None:
        """The key's file (another key's is None, as if it did not exist)."""
        with self.engine.connect() as connection:
            row = connection.execute(
                select(BatchFile).where(BatchFile.id == file_id, BatchFile.key_id == key_id)
            ).first()
        return _file(row) if row else None

    def files(self, key_id: int, purpose: str | None, limit: int, after: str | None) -> list[FileView]:
        """The key's files, newest first; ``after``: those older than that file."""
        query = select(BatchFile).where(BatchFile.key_id == key_id)
        if purpose:
            query = query.where(BatchFile.purpose == purpose)
        if after:
            cursor = select(BatchFile.created_at).where(BatchFile.id == after).scalar_subquery()
            query = query.where(
                or_(BatchFile.created_at < cursor, and_(BatchFile.created_at == cursor, BatchFile.id < after))
            )
        query = query.order_by(BatchFile.created_at.desc(), BatchFile.id.desc()).limit(limit)
        with self.engine.connect() as connection:
            return [_file(row) for row in connection.execute(query)]

    def usage(self, key_id: int) -> tuple[int, int]:
        """The key's files kept (its inputs and its batches' results, until deleted): how many, and their bytes."""
        query = select(func.count(), func.coalesce(func.sum(BatchFile.bytes), 0)).where(BatchFile.key_id == key_id)
        with self.engine.connect() as connection:
            count, size = connection.execute(query).one()
        return int(count), int(size)

    def held_inputs(self, key_id: int) -> list[str]:
        """The inputs the key deleted that a batch of its under way still reads: their bytes stay on the disk until
        it ends (``forsaken``), and count against its quota until then."""
        ended = [s.value for s in ENDED]
        recorded = select(BatchFile.id).where(BatchFile.id == BatchJob.input_file_id).exists()
        query = (
            select(BatchJob.input_file_id)
            .where(BatchJob.key_id == key_id, BatchJob.status.not_in(ended), ~recorded)
            .distinct()
        )
        with self.engine.connect() as connection:
            return list(connection.scalars(query))

    def delete_file(self, file_id: str, key_id: int) -> bool:
        with self.engine.begin() as connection:
            gone = connection.execute(delete(BatchFile).where(BatchFile.id == file_id, BatchFile.key_id == key_id))
        return bool(gone.rowcount)

    def forsaken(self, file_id: str) -> bool:
        """Deleted (no record), and the input of no batch under way (one keeps it until it ends): its bytes may go."""
        ended = [s.value for s in ENDED]
        with self.engine.connect() as connection:
            recorded = connection.scalar(select(func.count()).select_from(BatchFile).where(BatchFile.id == file_id))
            reading = connection.scalar(
                select(func.count())
                .select_from(BatchJob)
                .where(BatchJob.input_file_id == file_id, BatchJob.status.not_in(ended))
            )
        return not recorded and not reading

    # -- batches --------------------------------------------------------------------------------------

    def add_batch(self, batch: BatchView) -> None:
        row = {("meta" if f.name == "metadata" else f.name): getattr(batch, f.name) for f in fields(batch)}
        row["status"] = batch.status.value
        row["errors"] = None
        row["meta"] = json.dumps(batch.metadata) if batch.metadata is not None else None
        with self.engine.begin() as connection:
            connection.execute(insert(BatchJob).values(**row))

    def batch(self, batch_id: str, key_id: int | None = None) -> BatchView | None:
        query = select(BatchJob).where(BatchJob.id == batch_id)
        if key_id is not None:
            query = query.where(BatchJob.key_id == key_id)
        with self.engine.connect() as connection:
            row = connection.execute(query).first()
        return _batch(row) if row else None

    def batches(self, key_id: int, limit: int, after: str | None) -> list[BatchView]:
        """The key's batches, newest first; ``after``: those older than that batch."""
        query = select(BatchJob).where(BatchJob.key_id == key_id)
        if after:
            cursor = select(BatchJob.created_at).where(BatchJob.id == after).scalar_subquery()
            query = query.where(
                or_(BatchJob.created_at < cursor, and_(BatchJob.created_at == cursor, BatchJob.id < after))
            )
        query = query.order_by(BatchJob.created_at.desc(), BatchJob.id.desc()).limit(limit)
        with self.engine.connect() as connection:
            return [_batch(row) for row in connection.execute(query)]

    def with_status(self, *statuses: Status) -> list[BatchView]:
        query = select(BatchJob).where(BatchJob.status.in_([s.value for s in statuses])).order_by(BatchJob.created_at)
        with self.engine.connect() as connection:
            return [_batch(row) for row in connection.execute(query)]

    def cancel(self, batch_id: str, key_id: int) -> BatchView | None:
        """Validating or in progress: now cancelling (no new line starts). Any other state is left as it is."""
        now = utcnow()
        with self.engine.begin() as connection:
            connection.execute(
                update(BatchJob)
                .where(
                    BatchJob.id == batch_id,
                    BatchJob.key_id == key_id,
                    BatchJob.status.in_([Status.VALIDATING.value, Status.IN_PROGRESS.value]),
                )
                .values(status=Status.CANCELLING.value, ending=Status.CANCELLED.value, cancelling_at=now)
            )
        return self.batch(batch_id, key_id)

    def expire_due(self) -> int:
        """Batches still running past their window end now (their running lines are stopped); how many."""
        now = utcnow()
        with self.engine.begin() as connection:
            return connection.execute(
                update(BatchJob)
                .where(
                    BatchJob.status.in_([Status.VALIDATING.value, Status.IN_PROGRESS.value]),
                    BatchJob.ending.is_(None),
                    BatchJob.expires_at < now,
                )
                .values(ending=Status.EXPIRED.value)
            ).rowcount

    # -- validating -----------------------------------------------------------------------------------

    def claim_step(self, batch_id: str, status: Status, replica_id: str) -> bool:
        """Take a step of the whole batch (validating, finalizing) unless a live replica has it."""
        with self.engine.begin() as connection:
            claimed = connection.execute(
                update(BatchJob)
                .where(BatchJob.id == batch_id, BatchJob.status == status.value, self._takeable_step(replica_id))
                .values(worker=replica_id)
            ).rowcount
        return bool(claimed)

    def add_lines(self, batch_id: str, lines: Sequence[Line], first: bool = False) -> None:
        """Lines as validation finds them; ``first``: the first chunk, which replaces any a dead validator left."""
        rows = [
            {
                "batch_id": batch_id,
                "line": line.number,
                "custom_id": line.custom_id,
                "offset": line.offset,
                "length": line.length,
                "state": PENDING,
                "attempts": 0,
                "input_tokens": 0,
                "output_tokens": 0,
            }
            for line in lines
        ]
        with self.engine.begin() as connection:
            if first:
                connection.execute(delete(BatchLine).where(BatchLine.batch_id == batch_id))
            if rows:
                connection.execute(insert(BatchLine), rows)

    def validated(self, batch_id: str, replica_id: str, model: str, total: int) -> bool:
        """The input passed: in progress (or, cancelled meanwhile, left cancelling with its lines to report)."""
        now = utcnow()
        with self.engine.begin() as connection:
            mine = and_(BatchJob.id == batch_id, BatchJob.worker == replica_id)
            connection.execute(update(BatchJob).where(mine).values(model=model, total=total, worker=None))
            return bool(
                connection.execute(
                    update(BatchJob)
                    .where(BatchJob.id == batch_id, BatchJob.status == Status.VALIDATING.value)
                    .values(status=Status.IN_PROGRESS.value, in_progress_at=now)
                ).rowcount
            )

    def invalid(self, batch_id: str, replica_id: str, problems: list[LineError], model: str | None) -> None:
        """The input failed: failed with its errors (or cancelled, if cancelled meanwhile); no line is kept."""
        now = utcnow()
        body = json.dumps([p.as_json() for p in problems], ensure_ascii=False)
        with self.engine.begin() as connection:
            connection.execute(delete(BatchLine).where(BatchLine.batch_id == batch_id))
            connection.execute(
                update(BatchJob)
                .where(BatchJob.id == batch_id, BatchJob.worker == replica_id)
                .values(errors=body, model=model, worker=None)
            )
            connection.execute(
                update(BatchJob)
                .where(BatchJob.id == batch_id, BatchJob.status == Status.VALIDATING.value)
                .values(status=Status.FAILED.value, failed_at=now)
            )
            connection.execute(
                update(BatchJob)
                .where(BatchJob.id == batch_id, BatchJob.status == Status.CANCELLING.value)
                .values(status=Status.CANCELLED.value, cancelled_at=now)
            )

    # -- lines ----------------------------------------------------------------------------------------

    def claim_lines(self, batch_id: str, replica_id: str, count: int) -> list[Line]:
        """Up to ``count`` lines not done and not held by a live replica, in file order; now this replica's."""
        takeable = or_(BatchLine.state == PENDING, and_(BatchLine.state == RUNNING, self._unclaimed(BatchLine.owner)))
        chosen = (
            select(BatchLine.line).where(BatchLine.batch_id == batch_id, takeable).order_by(BatchLine.line).limit(count)
        )
        if not self.store.is_sqlite:
            chosen = chosen.with_for_update(skip_locked=True)
        with self.engine.begin() as connection:
            numbers = list(connection.scalars(chosen))
            if not numbers:
                return []
            rows = connection.execute(
                update(BatchLine)
                .where(BatchLine.batch_id == batch_id, BatchLine.line.in_(numbers), takeable)
                .values(state=RUNNING, owner=replica_id, attempts=BatchLine.attempts + 1)
                .returning(BatchLine.line, BatchLine.custom_id, BatchLine.offset, BatchLine.length)
            ).all()
        return sorted((Line(r.line, r.custom_id, r.offset, r.length) for r in rows), key=lambda line: line.number)

    def finish_line(
        self, batch_id: str, line: int, replica_id: str, ok: bool, result: str, input_tokens: int, output_tokens: int
    ) -> bool:
        """Write a line's result and count it, once: False if this replica no longer holds the line."""
        with self.engine.begin() as connection:
            written = connection.execute(
                update(BatchLine)
                .where(
                    BatchLine.batch_id == batch_id,
                    BatchLine.line == line,
                    BatchLine.state == RUNNING,
                    BatchLine.owner == replica_id,
                )
                .values(
                    state=DONE,
                    owner=None,
                    ok=ok,
                    result=result,
                    input_tokens=input_tokens,
                    output_tokens=output_tokens,
                )
            ).rowcount
            if written:
                connection.execute(
                    update(BatchJob)
                    .where(BatchJob.id == batch_id)
                    .values(
                        completed=BatchJob.completed + int(ok),
                        failed=BatchJob.failed + int(not ok),
                        input_tokens=BatchJob.input_tokens + input_tokens,
                        output_tokens=BatchJob.output_tokens + output_tokens,
                    )
                )
        return bool(written)

    def release_lines(self, batch_id: str, lines: Sequence[int], replica_id: str) -> None:
        """Give lines back unfinished (stopped, or refused for a while): pending again, for any replica."""
        with self.engine.begin() as connection:
            self._release(connection, batch_id, lines, replica_id)

    @staticmethod
    def _release(connection: Connection, batch_id: str, lines: Sequence[int], replica_id: str) -> None:
        if lines:
            connection.execute(
                update(BatchLine)
                .where(
                    BatchLine.batch_id == batch_id,
                    BatchLine.line.in_(list(lines)),
                    BatchLine.state == RUNNING,
                    BatchLine.owner == replica_id,
                )
                .values(state=PENDING, owner=None)
            )

    def release_all(self, replica_id: str) -> None:
        """At a clean stop: every line this replica holds is pending again."""
        with self.engine.begin() as connection:
            connection.execute(
                update(BatchLine)
                .where(BatchLine.state == RUNNING, BatchLine.owner == replica_id)
                .values(state=PENDING, owner=None)
            )

    def unfinished(self, batch_id: str) -> tuple[int, int]:
        """Lines waiting to run, and lines running on a live replica."""
        with self.engine.connect() as connection:
            pending = connection.scalar(
                select(func.count())
                .select_from(BatchLine)
                .where(
                    BatchLine.batch_id == batch_id,
                    or_(
                        BatchLine.state == PENDING,
                        and_(BatchLine.state == RUNNING, self._unclaimed(BatchLine.owner)),
                    ),
                )
            )
            running = connection.scalar(
                select(func.count())
                .select_from(BatchLine)
                .where(
                    BatchLine.batch_id == batch_id,
                    BatchLine.state == RUNNING,
                    BatchLine.owner.in_(self._live()),
                )
            )
        return int(pending or 0), int(running or 0)

    # -- finalizing -----------------------------------------------------------------------------------

    def begin_finalizing(self, batch_id: str, replica_id: str) -> BatchView | None:
        """Take the writing of the result files: in progress becomes finalizing; cancelling stays so."""
        now = utcnow()
        with self.engine.begin() as connection:
            free = and_(BatchJob.id == batch_id, self._takeable_step(replica_id))
            taken = connection.execute(
                update(BatchJob)
                .where(free, BatchJob.status == Status.IN_PROGRESS.value)
                .values(status=Status.FINALIZING.value, finalizing_at=now, worker=replica_id)
            ).rowcount
            taken = (
                taken
                or connection.execute(
                    update(BatchJob)
                    .where(free, BatchJob.status.in_([Status.FINALIZING.value, Status.CANCELLING.value]))
                    .values(worker=replica_id)
                ).rowcount
            )
        return self.batch(batch_id) if taken else None

    def results(self, batch_id: str, ok: bool) -> Iterator[str]:
        """The result lines of the output (``ok``) or error file, in input order, streamed from the database."""
        query = (
            select(BatchLine.result)
            .where(BatchLine.batch_id == batch_id, BatchLine.state == DONE, BatchLine.ok.is_(ok))
            .order_by(BatchLine.line)
            .execution_options(yield_per=500)
        )
        with self.engine.connect() as connection:
            for row in connection.execute(query):
                yield row.result

    def not_run(self, batch_id: str) -> Iterator[str]:
        """The custom_ids of the lines that never finished, in input order."""
        query = (
            select(BatchLine.custom_id)
            .where(BatchLine.batch_id == batch_id, BatchLine.state != DONE)
            .order_by(BatchLine.line)
            .execution_options(yield_per=500)
        )
        with self.engine.connect() as connection:
            for row in connection.execute(query):
                yield row.custom_id

    def finalized(
        self,
        batch_id: str,
        replica_id: str,
        status: Status,
        files: Sequence[FileView],
        output_file_id: str | None,
        error_file_id: str | None,
        not_run: int,
    ) -> bool:
        """The result files are written: record them, end the batch and drop its lines, in one transaction."""
        now = utcnow()
        stamp = {Status.COMPLETED: "completed_at", Status.EXPIRED: "expired_at", Status.CANCELLED: "cancelled_at"}
        with self.engine.begin() as connection:
            done = connection.execute(
                update(BatchJob)
                .where(BatchJob.id == batch_id, BatchJob.worker == replica_id)
                .values(
                    status=status.value,
                    worker=None,
                    output_file_id=output_file_id,
                    error_file_id=error_file_id,
                    failed=BatchJob.failed + not_run,
                    **{stamp[status]: now},
                )
            ).rowcount
            if not done:
                return False
            for file in files:
                connection.execute(insert(BatchFile).values(**{f.name: getattr(file, f.name) for f in fields(file)}))
            # The files hold every line's result now: its rows would only keep a second copy, for good.
            connection.execute(delete(BatchLine).where(BatchLine.batch_id == batch_id))
        return True

    # -- what /metrics reads --------------------------------------------------------------------------

    def stats(self) -> BatchStats:
        """Every batch's lines in one look: waiting and running lines of the batches not ended (their lines
        found through the (batch, state) index), the counts and tokens of all."""
        live_statuses = [s.value for s in Status if s not in ENDED]
        running_batches = select(BatchJob.id).where(BatchJob.status == Status.IN_PROGRESS.value)
        with self.engine.connect() as connection:
            totals = connection.execute(
                select(
                    func.coalesce(func.sum(BatchJob.completed), 0),
                    func.coalesce(func.sum(BatchJob.failed), 0),
                    func.coalesce(func.sum(BatchJob.input_tokens), 0),
                    func.coalesce(func.sum(BatchJob.output_tokens), 0),
                )
            ).one()
            statuses = dict(
                connection.execute(
                    select(BatchJob.status, func.count())
                    .where(BatchJob.status.in_(live_statuses))
                    .group_by(BatchJob.status)
                ).all()
            )
            live_batches = select(BatchJob.id).where(BatchJob.status.in_(live_statuses))
            running = connection.scalar(
                select(func.count())
                .select_from(BatchLine)
                .where(
                    BatchLine.batch_id.in_(live_batches),
                    BatchLine.state == RUNNING,
                    BatchLine.owner.in_(self._live()),
                )
            )
            waiting = connection.scalar(
                select(func.count())
                .select_from(BatchLine)
                .where(
                    BatchLine.batch_id.in_(running_batches),
                    or_(
                        BatchLine.state == PENDING,
                        and_(BatchLine.state == RUNNING, self._unclaimed(BatchLine.owner)),
                    ),
                )
            )
        return BatchStats(
            waiting=int(waiting or 0),
            running=int(running or 0),
            completed=int(totals[0]),
            failed=int(totals[1]),
            input_tokens=int(totals[2]),
            output_tokens=int(totals[3]),
            batches={status: int(statuses.get(status, 0)) for status in live_statuses},
        )
