"""The accounts store: API keys, grants with token allowances, and the usage ledger.

SQLAlchemy 2 over SQLite (WAL mode) by default, or PostgreSQL for several
replicas sharing one store. Schema changes are Alembic migrations, applied by
``migrate()`` at start-up or by ``llamascope db upgrade``.

Allowances are charged in two steps so that concurrent requests cannot spend
the same tokens twice. ``admit`` reserves a request's worst case (its prompt
plus max_tokens) in one conditional UPDATE that succeeds only while
``used + reserved < allowance``; ``settle`` swaps the reservation for the
tokens really used and writes the ledger row, in one transaction. So once an
allowance is nearly spent, only one running request can hold it, and at most
that one can overrun it.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import BigInteger, bindparam, case, create_engine, event, func, insert, select, text, update
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from llamascope.accounts.schema import ApiKey, Grant, UsageRecord

MIGRATIONS = Path(__file__).parent / "migrations"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands datetimes back without their zone; they are stored as UTC.
    return value.replace(tzinfo=timezone.utc) if value is not None and value.tzinfo is None else value


V = TypeVar("V")


def _view(cls: type[V], row: Any) -> V:
    """A frozen copy of an ORM row's fields, datetimes in UTC: views leave the session, rows do not."""
    view = _view_of(cls, [getattr(row, f.name) for f in fields(cls)])  # type: ignore[arg-type]
    assert view is not None
    return view


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "sk-" + secrets.token_hex(20)


@dataclass(frozen=True)
class KeyView:
    id: int
    prefix: str
    name: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrent: int | None

    @classmethod
    def of(cls, row: ApiKey) -> KeyView:
        return _view(cls, row)


@dataclass(frozen=True)
class GrantView:
    id: int
    key_id: int
    model: str
    allowance_tokens: int | None
    used_tokens: int
    reserved_tokens: int
    granted_at: datetime
    expires_at: datetime | None
    exhausted_at: datetime | None

    @classmethod
    def of(cls, row: Grant) -> GrantView:
        return _view(cls, row)


@dataclass(frozen=True)
class Reservation:
    grant_id: int
    key_id: int
    model: str
    tokens: int
    started_at: datetime


class AccountStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.engine: Engine = create_engine(url, pool_pre_ping=not self.is_sqlite)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._hot = _HotStatements()
        database = self.engine.url.database
        # The per-request path through the stdlib driver, for an SQLite file (not an in-memory database).
        self._sqlite = (
            _SqliteHotPath(database, self._hot) if self.is_sqlite and database and database != ":memory:" else None
        )

    @classmethod
    def for_path(cls, path: Path) -> AccountStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{path}")

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    # -- schema -----------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest migration."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Replicas starting together on one store: one migrates, the others wait, then find it done.
                connection.execute(text("SELECT pg_advisory_xact_lock(7247150131)"))
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def forget_reservations(self) -> None:
        """Drop reservations left by a process that died mid-request. Only safe when no other replica runs."""
        with self.session() as s:
            s.execute(update(Grant).values(reserved_tokens=0))

    # -- keys -------------------------------------------------------------------

    def create_key(
        self,
        name: str = "",
        *,
        key: str | None = None,
        expires_at: datetime | None = None,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        max_concurrent: int | None = None,
    ) -> tuple[str, KeyView]:
        """Make a key (or store a given one). Returns the key itself, which is not kept, and its record."""
        key = key or new_key()
        row = ApiKey(
            key_hash=hash_key(key),
            prefix=key[:7],
            name=name,
            created_at=utcnow(),
            expires_at=expires_at,
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            max_concurrent=max_concurrent,
        )
        with self.session() as s:
            s.add(row)
            s.flush()
            return key, KeyView.of(row)

    def find_key(self, key: str) -> KeyView | None:
        return _view_of(KeyView, self._lookup(self._hot.find_key, {"key_hash": hash_key(key)}))

    def key(self, ref: str | int) -> KeyView:
        """A key by id or by its visible prefix (which must be unambiguous)."""
        with self.session() as s:
            if isinstance(ref, int) or str(ref).isdigit():
                row = s.get(ApiKey, int(ref))
                rows = [row] if row else []
            else:
                rows = list(s.scalars(select(ApiKey).where(ApiKey.prefix.startswith(str(ref)[:16]))))
            if len(rows) != 1:
                raise LookupError(f"no key {ref!r}" if not rows else f"{ref!r} matches {len(rows)} keys; use the id")
            return KeyView.of(rows[0])

    def count_keys(self) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count(ApiKey.id))) or 0)

    def list_keys(self) -> list[tuple[KeyView, list[GrantView]]]:
        with self.session() as s:
            keys = list(s.scalars(select(ApiKey).order_by(ApiKey.id)))
            grants = list(s.scalars(select(Grant).order_by(Grant.key_id, Grant.model)))
        return [(KeyView.of(k), [GrantView.of(g) for g in grants if g.key_id == k.id]) for k in keys]

    def revoke(self, ref: str | int) -> KeyView:
        view = self.key(ref)
        with self.session() as s:
            s.execute(update(ApiKey).where(ApiKey.id == view.id).values(revoked_at=utcnow()))
        return self.key(view.id)

    # -- grants -----------------------------------------------------------------

    def grant(self, key_id: int, model: str, allowance_tokens: int | None, days: float | None) -> GrantView:
        """Grant a model to a key (or replace the grant): a fresh allowance from now."""
        now = utcnow()
        expires = now + timedelta(days=days) if days is not None else None
        with self.session() as s:
            row = s.scalar(select(Grant).where(Grant.key_id == key_id, Grant.model == model))
            if row is None:
                row = Grant(key_id=key_id, model=model, used_tokens=0, reserved_tokens=0)
                s.add(row)
            row.allowance_tokens = allowance_tokens
            row.granted_at = now
            row.expires_at = expires
            row.exhausted_at = None
            row.used_tokens = 0
            s.flush()
            return GrantView.of(row)

    def find_grant(self, key_id: int, model: str) -> GrantView | None:
        return _view_of(GrantView, self._lookup(self._hot.find_grant, {"key_id": key_id, "model": model}))

    def _lookup(self, statement: Any, parameters: dict[str, Any]) -> Any:
        """One row of a per-request lookup: through the stdlib driver on SQLite, else SQLAlchemy Core (the
        ORM took three times as long)."""
        if self._sqlite is not None:
            return self._sqlite.lookup(statement, parameters)
        with self.engine.connect() as connection:
            return connection.execute(statement, parameters).first()

    # -- charging ---------------------------------------------------------------

    def reserve(self, key_id: int, model: str, tokens: int, now: datetime | None = None) -> Reservation | None:
        """Hold ``tokens`` of the key's allowance for the model in one conditional UPDATE; None if there is
        no grant, or it is spent (``used + reserved >= allowance``) or expired."""
        now = now or utcnow()
        unlimited = Grant.allowance_tokens.is_(None)
        has_room = Grant.used_tokens + Grant.reserved_tokens < Grant.allowance_tokens
        valid = Grant.expires_at.is_(None) | (Grant.expires_at > now)
        with self.engine.begin() as connection:
            grant_id = connection.execute(
                update(Grant)
                .where(Grant.key_id == key_id, Grant.model == model, unlimited | has_room, valid)
                .values(reserved_tokens=Grant.reserved_tokens + tokens)
                .returning(Grant.id)
            ).scalar()
        return None if grant_id is None else Reservation(grant_id, key_id, model, tokens, now)

    def settle(
        self,
        reservation: Reservation,
        request_id: str,
        input_tokens: int,
        output_tokens: int,
        image_tokens: int,
        status: str,
        wait: bool = True,
    ) -> bool:
        """Charge what was used, release the reservation and write the ledger row, in one transaction.

        SQLAlchemy Core on a plain connection: this runs once per request, and the ORM's unit of work
        made it three times slower. On SQLite, the stdlib driver directly (see _SqliteHotPath).

        ``wait=False`` settles only if that cannot wait (SQLite, the write lock free at once) and says
        whether it did; the event loop calls it so, saving the hop to a thread and back (0.4 ms a request,
        bench/gateway.py), and runs ``checkpoint`` off the loop when ``checkpoint_due``.
        """
        now = utcnow()  # the parameters of _HotStatements.charge and .ledger_row
        charge = {
            "grant_id": reservation.grant_id,
            "used": input_tokens + output_tokens,
            "held": reservation.tokens,
            "now": now,
        }
        row = {
            "request_id": request_id,
            "key_id": reservation.key_id,
            "model": reservation.model,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "image_tokens": image_tokens,
            "status": status,
            "started_at": reservation.started_at,
            "finished_at": now,
        }
        if self._sqlite is not None:
            return self._sqlite.settle(charge, row, wait=wait)
        if not wait:
            return False
        with self.engine.begin() as connection:
            connection.execute(self._hot.charge, charge)
            connection.execute(self._hot.ledger_row, row)
        return True

    @property
    def checkpoint_due(self) -> bool:
        return self._sqlite is not None and self._sqlite.checkpoint_due

    def checkpoint(self) -> None:
        if self._sqlite is not None:
            self._sqlite.checkpoint()

    # -- the ledger -------------------------------------------------------------

    def usage(self, key_id: int | None = None, since: datetime | None = None) -> list[dict[str, Any]]:
        """Totals per key, model and day (UTC)."""
        day = func.date(UsageRecord.started_at)
        query = (
            select(
                UsageRecord.key_id,
                ApiKey.prefix,
                UsageRecord.model,
                day.label("day"),
                func.count(UsageRecord.id).label("requests"),
                func.sum(UsageRecord.input_tokens).label("input_tokens"),
                func.sum(UsageRecord.output_tokens).label("output_tokens"),
                func.sum(UsageRecord.image_tokens).label("image_tokens"),
            )
            .join(ApiKey, ApiKey.id == UsageRecord.key_id)
            .group_by(UsageRecord.key_id, ApiKey.prefix, UsageRecord.model, day)
            .order_by(day, UsageRecord.key_id, UsageRecord.model)
        )
        if key_id is not None:
            query = query.where(UsageRecord.key_id == key_id)
        if since is not None:
            query = query.where(UsageRecord.started_at >= since)
        with self.session() as s:
            return [dict(row._mapping) | {"day": str(row.day)} for row in s.execute(query)]

    def ledger(self, key_id: int | None = None) -> list[UsageRecord]:
        with self.session() as s:
            query = select(UsageRecord).order_by(UsageRecord.id)
            if key_id is not None:
                query = query.where(UsageRecord.key_id == key_id)
            return list(s.scalars(query))


class _SqliteHotPath:
    """What every request does to the store (look up its key and its grant, then settle), on SQLite,
    through the stdlib driver itself, on the event loop's thread.

    Measured with bench/gateway.py on this machine: through SQLAlchemy (pool checkout, compiled-statement
    cache, result rows) a lookup took about 70 us, twice a request on the event loop, and handing the
    settle to a thread and back added 0.4 ms p50 to every request. Through ``sqlite3`` a lookup takes
    2 to 5 us, and a settle some 30 us. The statements are _HotStatements', compiled once for SQLite.

    Each thread has two autocommit connections (so every lookup sees the latest commit: a revoked key is
    refused on the very next request):
    - "at once": never waits for the write lock (busy_timeout 0: the caller falls back to a waiting path)
      and never checkpoints the WAL, which syncs the database file; ``checkpoint_due`` says when to run
      one off the loop. Lookups use it too, so its page cache survives its own settles.
    - "waiting": busy_timeout 10 s and SQLite's automatic checkpoints, for pool threads.
    """

    def __init__(self, path: str, hot: _HotStatements) -> None:
        self.path = path
        self.hot = hot
        self._local = threading.local()
        statements = (hot.find_key, hot.find_grant, hot.charge, hot.ledger_row)
        self._compiled = {id(s): str(s.compile(dialect=_SQLITE_NAMED)) for s in statements}
        self.settled_at_once = 0

    def _sql(self, statement: Any) -> str:
        return self._compiled[id(statement)]

    def _connection(self, wait: bool) -> sqlite3.Connection:
        name = "waiting" if wait else "at_once"
        connection: sqlite3.Connection | None = getattr(self._local, name, None)
        if connection is None:
            connection = sqlite3.connect(self.path, isolation_level=None)
            _sqlite_pragmas(connection, None)
            if not wait:
                connection.execute("PRAGMA busy_timeout=0")
                connection.execute("PRAGMA wal_autocheckpoint=0")
            setattr(self._local, name, connection)
        return connection

    def lookup(self, statement: Any, parameters: dict[str, Any]) -> tuple[Any, ...] | None:
        sql = self._sql(statement)
        try:
            row: tuple[Any, ...] | None = self._connection(wait=False).execute(sql, parameters).fetchone()
        except sqlite3.OperationalError as exc:
            if not _busy(exc):
                raise
            row = self._connection(wait=True).execute(sql, parameters).fetchone()  # rare in WAL mode
        return row

    def settle(self, charge: dict[str, Any], row: dict[str, Any], wait: bool) -> bool:
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
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
        if not wait:
            self.settled_at_once += 1
        return True

    @property
    def checkpoint_due(self) -> bool:
        return self.settled_at_once % 256 == 0

    def checkpoint(self) -> None:
        """Move the WAL's pages into the database file, without waiting for readers."""
        self._connection(wait=True).execute("PRAGMA wal_checkpoint(PASSIVE)")


def _busy(error: sqlite3.OperationalError) -> bool:
    text = str(error)
    return "locked" in text or "busy" in text


class _HotStatements:
    """The statements every request runs, built once: building them per call was most of their cost."""

    def __init__(self) -> None:
        self.find_key = select(*_columns(ApiKey, KeyView)).where(ApiKey.key_hash == bindparam("key_hash"))
        self.find_grant = select(*_columns(Grant, GrantView)).where(
            Grant.key_id == bindparam("key_id"), Grant.model == bindparam("model")
        )
        used: Any = bindparam("used", type_=BigInteger)
        crosses = Grant.allowance_tokens.is_not(None) & (Grant.used_tokens + used >= Grant.allowance_tokens)
        self.charge = (
            update(Grant)
            .where(Grant.id == bindparam("grant_id"))
            .values(
                used_tokens=Grant.used_tokens + used,
                reserved_tokens=Grant.reserved_tokens - bindparam("held"),
                exhausted_at=case((Grant.exhausted_at.is_(None) & crosses, bindparam("now")), else_=Grant.exhausted_at),
            )
        )
        self.ledger_row = insert(UsageRecord).values({name: bindparam(name) for name in LEDGER_FIELDS})


LEDGER_FIELDS = (
    "request_id",
    "key_id",
    "model",
    "input_tokens",
    "output_tokens",
    "image_tokens",
    "status",
    "started_at",
    "finished_at",
)
_SQLITE_NAMED = sqlite_dialect.dialect(paramstyle="named")


def _columns(table: Any, view: type) -> list[Any]:
    """The table's columns a view holds, in the view's order."""
    return [table.__table__.c[f.name] for f in fields(view)]


_DATE_FIELDS: dict[type, list[int]] = {}


def _date_fields(view: type) -> list[int]:
    if view not in _DATE_FIELDS:
        _DATE_FIELDS[view] = [i for i, f in enumerate(fields(view)) if "datetime" in str(f.type)]
    return _DATE_FIELDS[view]


def _view_of(view: type[V], row: Any) -> V | None:
    """A view from a row holding its fields in order; SQLite gives datetimes as text or without a zone."""
    if row is None:
        return None
    values = list(row)
    for i in _date_fields(view):
        if isinstance(values[i], str):  # SQLite through the stdlib driver
            values[i] = datetime.fromisoformat(values[i])
        values[i] = _aware(values[i])
    return view(*values)


def _stored(moment: datetime) -> str:
    """A datetime as SQLAlchemy stores it in SQLite: UTC, without the zone."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
    cursor.execute("PRAGMA busy_timeout=10000")  # writers queue instead of failing
    cursor.execute("PRAGMA foreign_keys=ON")
    # In WAL mode NORMAL keeps every commit across process crashes and restarts, without an fsync per
    # commit (which cost 7 ms p50 / 70 ms p99 per request in bench/gateway.py); a power cut may roll back
    # the last commits. PostgreSQL keeps its own durability settings.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
