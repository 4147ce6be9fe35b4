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

Crash safety: a running request has an ``in_flight`` row (written with its reservation, or by the
checkpoint writer of ``accounts/checkpoints.py``) holding what it had made at its last checkpoint; ``settle``
deletes it. Each serving process holds a lease in ``replicas``. ``reclaim`` charges the in-flight requests of
a replica that is gone (its lease ran out, or its process no longer exists on this host) what their last
checkpoint recorded, releases their reservations and writes their ledger rows with status ``interrupted``,
exactly once however many replicas try (the replica's row is deleted in the same transaction, and only
one transaction can delete it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import case, create_engine, delete, event, func, insert, select, text, update
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from llamascope.accounts.lookups import Lookups
from llamascope.accounts.records import (
    INTERRUPTED,
    PREFIX_LENGTH,
    GrantView,
    KeyView,
    Reservation,
    aware,
    hash_key,
    is_whole_key,
    new_key,
    utcnow,
    view_of,
)
from llamascope.accounts.refusals import RefusalCounts, with_refusals
from llamascope.accounts.schema import ApiKey, Base, Grant, InFlight, Replica, UsageRecord
from llamascope.accounts.sqlite_hot_path import SqliteHotPath, already_charged, sqlite_pragmas
from llamascope.accounts.statements import LEDGER_FIELDS, HotStatements, reserve_rows, upsert_into

MIGRATIONS = Path(__file__).parent / "migrations"
# The newest migration: its file's number is its revision (tests/accounts/test_store.py checks it is
# Alembic's head). A store already there starts without importing Alembic.
HEAD = max(p.name.partition("_")[0] for p in (MIGRATIONS / "versions").glob("[0-9]*_*.py"))
# Alembic's own table, as its first upgrade makes it on SQLite.
_VERSION_TABLE = (
    "CREATE TABLE alembic_version (\n\tversion_num VARCHAR(32) NOT NULL, \n\t"
    "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)\n)"
)
log = logging.getLogger(__name__)
V = TypeVar("V")
# What a checkpoint updates in an existing in-flight row (the reservation stays as admission wrote it).
_CHECKPOINTED = ("input_tokens", "output_tokens", "image_tokens", "checkpoint_at")


class StoreUnreachable(Exception):
    """The accounts store cannot be opened: its URL does not parse, its driver is not installed, or its
    database does not answer or refuses the login. The message says which, for the operator."""


def open_store(url: str, data_dir: Path | None = None) -> AccountStore:
    """The store at ``url``, its schema migrated (``data_dir``: made first, for a default SQLite file there):
    a database that cannot be reached stops here, with StoreUnreachable."""
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
    try:
        store = AccountStore(url)
    except ArgumentError as exc:  # no URL, or no such dialect (a misspelt postgresql+psycopg)
        raise StoreUnreachable(f"the accounts store's URL {_shown(url)} is not one it can use: {exc}") from None
    except ImportError as exc:
        hint = " (PostgreSQL: pip install -c constraints.txt -e '.[postgres]')" if url.startswith("postgres") else ""
        missing = f"the accounts store {_shown(url)} needs a driver that is not installed: {exc}{hint}"
        raise StoreUnreachable(missing) from None
    try:
        store.migrate()
    except (DBAPIError, OSError) as exc:
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
        raise StoreUnreachable(f"cannot open the accounts store {printable_url(url)}: {reason}") from None
    return store


def printable_url(url: str) -> str:
    """A database URL without its password, for printing."""
    return make_url(url).render_as_string(hide_password=True)


def _shown(url: str) -> str:
    """The URL for a message: without its password, and not at all if it may hold one that does not parse."""
    try:
        return repr(printable_url(url))
    except ArgumentError:
        return "(not shown: it does not parse)" if "@" in url else repr(url)


def _view(cls: type[V], row: Any) -> V:
    """A frozen copy of an ORM row's fields, datetimes in UTC: views leave the session, rows do not."""
    view = view_of(cls, [getattr(row, f.name) for f in fields(cls)])  # type: ignore[arg-type]
    assert view is not None
    return view


class AccountStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        # A database that does not answer is an error within seconds, never a request that hangs.
        libpq = make_url(url).get_driver_name() in ("psycopg", "psycopg2")
        connect_args = {"connect_timeout": 5} if libpq else {}
        self.engine: Engine = create_engine(url, pool_pre_ping=not self.is_sqlite, connect_args=connect_args)
        if self.is_sqlite:
            event.listen(self.engine, "connect", sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._hot = HotStatements()
        self.refusals = RefusalCounts(self.engine)
        database = self.engine.url.database
        # The per-request path through the stdlib driver, for an SQLite file (not an in-memory database).
        self._sqlite = (
            SqliteHotPath(database, self._hot) if self.is_sqlite and database and database != ":memory:" else None
        )
        # Keys and grants as the requests look them up, remembered until the store changes (see lookups.py);
        # an in-memory SQLite (tests) is read afresh every time.
        self._lookups: Lookups | None = None
        if self._sqlite is not None:
            self._lookups = Lookups(self._sqlite.data_version)
        elif not self.is_sqlite:
            self._lookups = Lookups(None)
        if self._lookups is not None:
            event.listen(self.engine, "commit", lambda _connection: self._lookups.changed())  # type: ignore[union-attr]
        self._unlimited: set[int] = set()  # grants without an allowance: charging them changes no decision

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
        """Bring the schema to the newest migration.

        Alembic (a quarter of a second of imports) runs only for a store below the head: one at the head
        is left as it is, and a new SQLite file gets the schema the migrations make (the same tables and
        indexes, tests/accounts/test_store.py compares them), stamped at the head."""
        if self.revision() == HEAD or (self.is_sqlite and self._create_at_head()):
            return
        # why: Alembic only when there are migrations to run
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

    def revision(self) -> str | None:
        """The store's migration (None: a new database, or one Alembic never stamped)."""
        with self.engine.connect() as connection:
            try:
                return connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
            except DBAPIError:  # no such table
                return None

    def _create_at_head(self) -> bool:
        """On an SQLite file with no tables: make the schema, stamped at the head, in one transaction that
        holds the write lock (a replica starting beside this one waits, then finds it made). False if the
        file has tables already (Alembic decides)."""
        with self.engine.connect() as connection:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
            if connection.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar():
                connection.rollback()
                return False
            Base.metadata.create_all(connection)
            connection.exec_driver_sql(_VERSION_TABLE)
            connection.exec_driver_sql("INSERT INTO alembic_version (version_num) VALUES (?)", (HEAD,))
            connection.commit()
        return True

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
            prefix=key[:PREFIX_LENGTH],
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
            return key, _view(KeyView, row)

    def find_key(self, key: str) -> KeyView | None:
        key_hash = hash_key(key)

        def load() -> KeyView | None:
            return view_of(KeyView, self._lookup(self._hot.find_key, {"key_hash": key_hash}))

        return load() if self._lookups is None else self._lookups.get(key_hash, load)

    def key(self, ref: str | int) -> KeyView:
        """A key by id, by the key itself (matched by its hash), or by an unambiguous prefix of it.

        Only the first ``len(prefix)`` characters of a key are stored (``keys list`` shows them), so a longer
        prefix is matched on those: it must still fit exactly one key. A whole key is matched by its hash
        only, so a mistyped one matches nothing.
        """
        text = str(ref).strip().removesuffix("…")
        with self.session() as s:
            if isinstance(ref, int) or text.isdigit():
                row = s.get(ApiKey, int(text))
                rows = [row] if row else []
            elif is_whole_key(text):
                rows = list(s.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(text))))
            elif len(text) < len("sk-") + 1:
                raise LookupError(f"{text!r} is too short to name a key: give its id, its prefix or the key")
            else:
                candidates = s.scalars(select(ApiKey).where(ApiKey.prefix.startswith(text[:PREFIX_LENGTH])))
                rows = [row for row in candidates if text.startswith(row.prefix) or row.prefix.startswith(text)]
            if len(rows) != 1:
                raise LookupError(f"no key {ref!r}" if not rows else f"{ref!r} matches {len(rows)} keys; use the id")
            return _view(KeyView, rows[0])

    def count_keys(self, active: bool = False) -> int:
        """Keys in the store; with ``active``, only those neither revoked nor expired."""
        query = select(func.count(ApiKey.id))
        if active:
            now = utcnow()
            query = query.where(ApiKey.revoked_at.is_(None), ApiKey.expires_at.is_(None) | (ApiKey.expires_at > now))
        with self.session() as s:
            return int(s.scalar(query) or 0)

    def list_keys(self) -> list[tuple[KeyView, list[GrantView]]]:
        with self.session() as s:
            keys = list(s.scalars(select(ApiKey).order_by(ApiKey.id)))
            grants = list(s.scalars(select(Grant).order_by(Grant.key_id, Grant.model)))
        return [(_view(KeyView, k), [_view(GrantView, g) for g in grants if g.key_id == k.id]) for k in keys]

    def revoke(self, ref: str | int) -> KeyView:
        view = self.key(ref)
        self.update_key(view.id, revoked_at=utcnow())
        return self.key(view.id)

    def update_key(self, key_id: int, **values: Any) -> None:
        """Set fields of a key's record (name, revoked_at, ...)."""
        with self.session() as s:
            s.execute(update(ApiKey).where(ApiKey.id == key_id).values(**values))

    def key_hashes(self, name: str) -> dict[str, KeyView]:
        """The keys of this name, by hash (to find the keys from settings that settings no longer name)."""
        with self.session() as s:
            rows = list(s.scalars(select(ApiKey).where(ApiKey.name == name)))
        return {row.key_hash: _view(KeyView, row) for row in rows}

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
            return _view(GrantView, row)

    def find_grant(self, key_id: int, model: str, fresh: bool = False) -> GrantView | None:
        """The grant that applies to the key for the model; ``fresh``: read now, not as remembered."""

        def load() -> GrantView | None:
            grant = view_of(GrantView, self._lookup(self._hot.find_grant, {"key_id": key_id, "model": model}))
            if grant is not None and grant.allowance_tokens is None:
                self._unlimited.add(grant.id)
            elif grant is not None:
                self._unlimited.discard(grant.id)
            return grant

        if self._lookups is None or fresh:
            return load()
        return self._lookups.get((key_id, model), load)

    def _lookup(self, statement: Any, parameters: dict[str, Any]) -> Any:
        """One row of a per-request lookup: through the stdlib driver on SQLite, else SQLAlchemy Core (the
        ORM took three times as long)."""
        if self._sqlite is not None:
            return self._sqlite.lookup(statement, parameters)
        with self.engine.connect() as connection:
            return connection.execute(statement, parameters).first()

    # -- charging ---------------------------------------------------------------

    def reserve(
        self,
        key_id: int,
        model: str,
        tokens: int,
        now: datetime | None = None,
        prompt_tokens: int | None = None,
        in_flight: tuple[str, str] | None = None,
    ) -> Reservation | None:
        """Hold ``tokens`` of the key's allowance for the model in one conditional UPDATE; None if there is
        no grant, or it is spent (``used + reserved >= allowance``) or expired.

        The grant is the model's own, else the key's grant for every model (``EVERY_MODEL``). With
        ``prompt_tokens``, the hold is cut to what the allowance has left (but at least the prompt and one
        token), in the same transaction: ``Reservation.tokens`` says what was held, and the request may make
        at most ``tokens - prompt_tokens`` tokens, so it overruns the allowance by at most its prompt.

        ``in_flight`` (request id, replica id) writes the request's in-flight row in the same transaction,
        so a crash at any moment leaves no reservation that ``reclaim`` cannot release.
        """
        now = now or utcnow()
        with self.engine.begin() as connection:

            def execute(statement: Any, parameters: dict[str, Any]) -> list[Any]:
                result = connection.execute(statement, parameters)
                return list(result.fetchall()) if result.returns_rows else []

            return reserve_rows(execute, self._hot, key_id, model, tokens, now, prompt_tokens, in_flight)

    def reserve_at_once(
        self,
        key_id: int,
        model: str,
        tokens: int,
        prompt_tokens: int | None = None,
        in_flight: tuple[str, str] | None = None,
    ) -> tuple[bool, Reservation | None]:
        """``reserve``, only where that cannot wait (SQLite, its write lock free at once): (True, what ``reserve``
        returns), else (False, None). The event loop calls it so, saving the hop to a thread and back and
        SQLAlchemy's connection pool (see sqlite_hot_path)."""
        if self._sqlite is None:
            return False, None
        done, reservation = self._sqlite.reserve(key_id, model, tokens, utcnow(), prompt_tokens, in_flight)
        if done and self._lookups is not None:  # committed where neither data_version nor SQLAlchemy sees it
            self._lookups.changed()
        return done, reservation

    def settle(
        self,
        reservation: Reservation,
        request_id: str,
        input_tokens: int,
        output_tokens: int,
        image_tokens: int,
        status: str,
        wait: bool = True,
        in_flight: bool = False,
    ) -> bool:
        """Charge what was used, release the reservation and write the ledger row, in one transaction;
        with ``in_flight``, delete the request's in-flight row in it too.

        A request already in the ledger (a replica's lease ran out while it lived, and another reclaimed
        its requests) is not charged again: the ledger's unique request id rolls the charge back; its
        in-flight row, which this replica's checkpoints put back after the reclaim, is deleted all the same.

        SQLAlchemy Core on a plain connection: this runs once per request, and the ORM's unit of work
        made it three times slower. On SQLite, the stdlib driver directly (see sqlite_hot_path).

        ``wait=False`` settles only if that cannot wait (SQLite, the write lock free at once) and says
        whether it did; the event loop calls it so, saving the hop to a thread and back (0.4 ms a request,
        bench/gateway.py), and runs ``checkpoint`` off the loop when ``checkpoint_due``.
        """
        now = utcnow()  # the parameters of HotStatements.charge and .ledger_row
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
            settled = self._sqlite.settle(charge, row, wait=wait, in_flight=in_flight)
            if settled and not wait and self._lookups is not None:  # committed where data_version cannot see it
                if reservation.grant_id in self._unlimited:
                    self._lookups.charged(reservation.grant_id, input_tokens + output_tokens, reservation.tokens)
                else:  # the grant's room changed: decisions may too
                    self._lookups.changed()
            return settled
        if not wait:
            return False
        try:
            with self.engine.begin() as connection:
                connection.execute(self._hot.charge, charge)
                connection.execute(self._hot.ledger_row, row)
                if in_flight:
                    connection.execute(self._hot.forget_in_flight, {"request_id": request_id})
        except IntegrityError:
            already_charged(request_id)
            if in_flight:  # the row this replica's checkpoints put back after the reclaim: nothing holds it now
                self.forget_checkpoints([request_id])
        return True

    @property
    def checkpoint_due(self) -> bool:
        return self._sqlite is not None and self._sqlite.checkpoint_due

    def checkpoint(self) -> None:
        if self._sqlite is not None:
            self._sqlite.checkpoint()

    # -- checkpoints and leases ---------------------------------------------------

    def save_checkpoints(self, rows: list[dict[str, Any]]) -> None:
        """Write running requests' in-flight rows (InFlight's columns), new or updated, in one transaction."""
        if not rows:
            return
        statement = upsert_into(InFlight, self.engine.dialect.name)
        latest = {name: statement.excluded[name] for name in _CHECKPOINTED}
        with self.engine.begin() as connection:
            connection.execute(statement.on_conflict_do_update(index_elements=["request_id"], set_=latest), rows)

    def forget_checkpoints(self, request_ids: list[str]) -> None:
        """Delete in-flight rows of requests already settled (a checkpoint written while they settled); a
        request the ledger does not have yet keeps its row (its settle, still to commit, deletes it)."""
        if request_ids:
            settled = select(UsageRecord.request_id).where(UsageRecord.request_id.in_(request_ids))
            with self.engine.begin() as connection:
                connection.execute(
                    delete(InFlight).where(InFlight.request_id.in_(request_ids), InFlight.request_id.in_(settled))
                )

    def _now(self) -> Any:
        """The time leases are measured by: the database's own clock on PostgreSQL, shared by every replica."""
        return utcnow() if self.is_sqlite else func.now()

    def hold_lease(self, replica_id: str, host: str, process: str, seconds: float) -> bool:
        """Take or renew a replica's lease for ``seconds``; False if it had been lost (and so was reclaimed)."""
        until = self._now() + timedelta(seconds=seconds)
        with self.engine.begin() as connection:
            renewed = connection.execute(
                update(Replica).where(Replica.id == replica_id).values(lease_until=until)
            ).rowcount
            if not renewed:
                row = {"id": replica_id, "host": host, "process": process, "started_at": utcnow()}
                connection.execute(insert(Replica).values(row | {"lease_until": until}))
        return bool(renewed)

    def end_lease(self, replica_id: str) -> bool:
        """Give the lease up at a clean stop, unless requests of this replica are still in flight (rows of
        requests already in the ledger, put back by a checkpoint written while they settled, do not count)."""
        with self.engine.begin() as connection:
            mine = InFlight.replica_id == replica_id
            connection.execute(delete(InFlight).where(mine, InFlight.request_id.in_(select(UsageRecord.request_id))))
            if connection.execute(select(InFlight.request_id).where(InFlight.replica_id == replica_id)).first():
                return False
            connection.execute(delete(Replica).where(Replica.id == replica_id))
        return True

    def replicas(self) -> list[tuple[str, str, str, bool]]:
        """Every replica: id, host, process, and whether its lease has run out."""
        expired = Replica.lease_until < self._now()
        with self.engine.connect() as connection:
            query = select(Replica.id, Replica.host, Replica.process, expired)
            return [(r[0], r[1], r[2], bool(r[3])) for r in connection.execute(query)]

    def reclaim(self, replica_id: str, lease_expired: bool) -> int:
        """Settle the in-flight requests of a replica that is gone, as ``interrupted``; how many.

        One transaction deletes the replica's row first (only while its lease is still expired, when that is
        the reason), so of several replicas reclaiming the same one at once, exactly one charges: the others
        wait on the row lock (PostgreSQL) or the write lock (SQLite) and then find nothing to delete."""
        with self.engine.begin() as connection:
            claim = delete(Replica).where(Replica.id == replica_id)
            if lease_expired:
                claim = claim.where(Replica.lease_until < self._now())
            if not connection.execute(claim).rowcount:
                return 0
            return self._charge_interrupted(connection, replica_id)

    def _charge_interrupted(self, connection: Connection, replica_id: str) -> int:
        rows = list(connection.execute(select(InFlight).where(InFlight.replica_id == replica_id)))
        ids = [r.request_id for r in rows]
        settled = set(connection.scalars(select(UsageRecord.request_id).where(UsageRecord.request_id.in_(ids))))
        now = utcnow()
        charged = 0
        for r in rows:
            if r.request_id in settled:  # settled while its checkpoint was being written: charged already
                continue
            used = r.input_tokens + r.output_tokens
            connection.execute(
                self._hot.charge, {"grant_id": r.grant_id, "used": used, "held": r.reserved_tokens, "now": now}
            )
            ledger = {name: getattr(r, name) for name in LEDGER_FIELDS if hasattr(r, name)}
            connection.execute(self._hot.ledger_row, ledger | {"status": INTERRUPTED, "finished_at": r.checkpoint_at})
            charged += 1
        connection.execute(delete(InFlight).where(InFlight.replica_id == replica_id))
        if charged:
            log.warning(
                "charged %d requests of replica %s, interrupted, as far as their checkpoints", charged, replica_id
            )
        return charged

    # -- the ledger -------------------------------------------------------------

    def record_refusal(self, key_id: int, model: str, code: str) -> None:
        """Count a request of this key refused before it reached a model (``code``: the DashScope code; ``model``
        "" if none is known). In memory, no store call: ``save_refusals`` writes the counts (see refusals.py)."""
        self.refusals.count(key_id, model, code)

    def save_refusals(self) -> None:
        self.refusals.save()

    def usage(self, key_id: int | None = None, since: datetime | None = None) -> list[dict[str, Any]]:
        """Totals per key, model and day (UTC): requests by how they ended, tokens, and the requests refused
        before they reached the model (``refused``, and ``refusals`` per DashScope code; counted per day, so
        ``since`` takes its whole first day of them)."""
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
                func.sum(case((UsageRecord.status == "ok", 1), else_=0)).label("ok"),
                func.sum(case((UsageRecord.status == "cancelled", 1), else_=0)).label("cancelled"),
                func.sum(case((UsageRecord.status.not_in(["ok", "cancelled"]), 1), else_=0)).label("failed"),
                func.sum(case((UsageRecord.status == INTERRUPTED, 1), else_=0)).label("interrupted"),
            )
            .join(ApiKey, ApiKey.id == UsageRecord.key_id)
            .group_by(UsageRecord.key_id, ApiKey.prefix, UsageRecord.model, day)
            .order_by(day, UsageRecord.key_id, UsageRecord.model)
        )
        if key_id is not None:
            query = query.where(UsageRecord.key_id == key_id)
        if since is not None:
            query = query.where(UsageRecord.started_at >= since)
        self.refusals.save()  # what this process counted so far
        with self.session() as s:
            rows = [dict(row._mapping) | {"day": str(row.day)} for row in s.execute(query)]
        return with_refusals(rows, self.refusals.totals(key_id, since))

    def requests(
        self, key_id: int | None = None, since: datetime | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """The newest ledger rows, each request with its status (ok, cancelled, or the error code)."""
        query = (
            select(UsageRecord, ApiKey.prefix)
            .join(ApiKey, ApiKey.id == UsageRecord.key_id)
            .order_by(UsageRecord.id.desc())
            .limit(limit)
        )
        if key_id is not None:
            query = query.where(UsageRecord.key_id == key_id)
        if since is not None:
            query = query.where(UsageRecord.started_at >= since)
        with self.session() as s:
            rows = s.execute(query).all()
        return [
            {name: getattr(record, name) for name in LEDGER_FIELDS}
            | {"prefix": prefix, "started_at": aware(record.started_at), "finished_at": aware(record.finished_at)}
            for record, prefix in rows
        ]

    def ledger(self, key_id: int | None = None) -> list[UsageRecord]:
        with self.session() as s:
            query = select(UsageRecord).order_by(UsageRecord.id)
            if key_id is not None:
                query = query.where(UsageRecord.key_id == key_id)
            return list(s.scalars(query))
