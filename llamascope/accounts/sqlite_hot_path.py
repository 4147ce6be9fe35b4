"""What every request does to the store (look up its key and its grant, reserve a limited grant's tokens,
then settle), on an SQLite file, through the stdlib driver itself, on the event loop's thread.

Measured with bench/gateway.py on this machine: through SQLAlchemy (pool checkout, compiled-statement
cache, result rows) a lookup took about 70 us, twice a request on the event loop, and handing the
settle to a thread and back added 0.4 ms p50 to every request. Through ``sqlite3`` a lookup takes
2 to 5 us, and a settle some 30 us. The statements are ``HotStatements``', compiled once for SQLite.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.dialects import sqlite as sqlite_dialect

from llamascope.accounts.records import Reservation
from llamascope.accounts.statements import HotStatements, reserve_rows

log = logging.getLogger(__name__)
_SQLITE_NAMED = sqlite_dialect.dialect(paramstyle="named")


class SqliteHotPath:
    """Each thread has two autocommit connections (so every lookup sees the latest commit: a revoked key is
    refused on the very next request):
    - "at once": never waits for the write lock (busy_timeout 0: the caller falls back to a waiting path)
      and never checkpoints the WAL, which syncs the database file; ``checkpoint_due`` says when to run
      one off the loop. Lookups use it too, so its page cache survives its own settles.
    - "waiting": busy_timeout 10 s and SQLite's automatic checkpoints, for pool threads.
    """

    def __init__(self, path: str, hot: HotStatements) -> None:
        self.path = path
        self.hot = hot
        self._local = threading.local()
        statements: tuple[Any, ...] = (hot.find_key, hot.find_grant, hot.charge, hot.ledger_row, hot.forget_in_flight)
        statements += (hot.grant_id, hot.hold, hot.give_back, hot.in_flight_row)
        self._compiled = {id(s): str(s.compile(dialect=_SQLITE_NAMED)) for s in statements}
        self.settled_at_once = 0

    def _sql(self, statement: Any) -> str:
        return self._compiled[id(statement)]

    def _connection(self, wait: bool) -> sqlite3.Connection:
        name = "waiting" if wait else "at_once"
        connection: sqlite3.Connection | None = getattr(self._local, name, None)
        if connection is None:
            connection = sqlite3.connect(self.path, isolation_level=None)
            sqlite_pragmas(connection, None)
            if not wait:
                connection.execute("PRAGMA busy_timeout=0")
                connection.execute("PRAGMA wal_autocheckpoint=0")
            setattr(self._local, name, connection)
        return connection

    def data_version(self) -> int:
        """The count of commits other connections made, as this thread's "at once" connection sees it."""
        cursor: sqlite3.Cursor | None = getattr(self._local, "version_cursor", None)
        if cursor is None:
            cursor = self._local.version_cursor = self._connection(wait=False).cursor()
        version: int = cursor.execute("PRAGMA data_version").fetchone()[0]
        return version

    def lookup(self, statement: Any, parameters: dict[str, Any]) -> tuple[Any, ...] | None:
        sql = self._sql(statement)
        try:
            row: tuple[Any, ...] | None = self._connection(wait=False).execute(sql, parameters).fetchone()
        except sqlite3.OperationalError as exc:
            if not _busy(exc):
                raise
            row = self._connection(wait=True).execute(sql, parameters).fetchone()  # rare in WAL mode
        return row

    def settle(self, charge: dict[str, Any], row: dict[str, Any], wait: bool, in_flight: bool) -> bool:
        """Settle; with ``wait=False`` only if the write lock is free at once, saying whether it was."""
        stored = {k: _stored(v) if isinstance(v, datetime) else v for k, v in row.items()}
        connection = self._connection(wait)
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if wait or not _busy(exc):
                raise
            return False
        try:
            connection.execute(self._sql(self.hot.charge), charge | {"now": _stored(charge["now"])})
            connection.execute(self._sql(self.hot.ledger_row), stored)
            if in_flight:
                connection.execute(self._sql(self.hot.forget_in_flight), {"request_id": row["request_id"]})
        except sqlite3.IntegrityError:
            connection.execute("ROLLBACK")
            already_charged(row["request_id"])
            if in_flight:  # the row this replica's checkpoints put back after the reclaim: nothing holds it now
                with contextlib.suppress(sqlite3.OperationalError):  # busy: a clean stop's end_lease drops it
                    connection.execute(self._sql(self.hot.forget_in_flight), {"request_id": row["request_id"]})
            return True
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
        if not wait:
            self.settled_at_once += 1
        return True

    def reserve(
        self,
        key_id: int,
        model: str,
        tokens: int,
        now: datetime,
        prompt_tokens: int | None,
        in_flight: tuple[str, str] | None,
    ) -> tuple[bool, Reservation | None]:
        """``AccountStore.reserve``'s transaction, only if the write lock is free at once: (False, None) if it
        was not, else (True, the reservation or None for a refusal)."""
        connection = self._connection(wait=False)
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not _busy(exc):
                raise
            return False, None

        def execute(statement: Any, parameters: dict[str, Any]) -> list[Any]:
            stored = {k: _stored(v) if isinstance(v, datetime) else v for k, v in parameters.items()}
            return connection.execute(self._sql(statement), stored).fetchall()  # to its end: no step pending

        try:
            reservation = reserve_rows(execute, self.hot, key_id, model, tokens, now, prompt_tokens, in_flight)
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
        return True, reservation

    @property
    def checkpoint_due(self) -> bool:
        return self.settled_at_once % 256 == 0

    def checkpoint(self) -> None:
        """Move the WAL's pages into the database file, without waiting for readers."""
        self._connection(wait=True).execute("PRAGMA wal_checkpoint(PASSIVE)")


def _busy(error: sqlite3.OperationalError) -> bool:
    text = str(error)
    return "locked" in text or "busy" in text


def already_charged(request_id: str) -> None:
    log.warning("request %s was already charged (its replica's lease had run out): not charged again", request_id)


def _stored(moment: datetime) -> str:
    """A datetime as SQLAlchemy stores it in SQLite: UTC, without the zone ("2025-01-31 12:00:00.000000").
    isoformat with the microseconds always written gives strftime's "%Y-%m-%d %H:%M:%S.%f" at half the cost."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
    cursor.execute("PRAGMA busy_timeout=10000")  # writers queue instead of failing
    cursor.execute("PRAGMA foreign_keys=ON")
    # In WAL mode NORMAL keeps every commit across process crashes and restarts, without an fsync per
    # commit (which cost 7 ms p50 / 70 ms p99 per request in bench/gateway.py); a power cut may roll back
    # the last commits. PostgreSQL keeps its own durability settings.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
