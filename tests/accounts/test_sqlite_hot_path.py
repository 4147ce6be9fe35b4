"""The per-request path on an SQLite file, through the stdlib driver (accounts/sqlite_hot_path.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from llamascope.accounts.records import Reservation, utcnow
from llamascope.accounts.store import AccountStore


def test_settling_at_once_never_waits_for_the_write_lock(tmp_path: Path) -> None:
    """The event loop's settle: done at once when SQLite's write lock is free, refused (not waited for) when not."""
    store = AccountStore.for_path(tmp_path / "accounts.db")
    store.migrate()
    _, key = store.create_key()
    grant = store.grant(key.id, "m", 1000, days=30)
    assert store.settle(store.reserve(key.id, "m", 50), "first", 10, 5, 0, "ok", wait=False)
    other = sqlite3.connect(tmp_path / "accounts.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writing
    late = Reservation(grant.id, key.id, "m", 0, utcnow())
    # Refused while the other writer still holds the lock: it did not wait for it (waiting would have ended
    # in SQLite's busy error after busy_timeout, not in False). How fast: bench/gateway.py.
    assert not store.settle(late, "second", 1, 1, 0, "ok", wait=False)
    assert other.in_transaction
    other.execute("COMMIT")
    assert store.settle(late, "second", 1, 1, 0, "ok")  # the pool's way, which waits
    store.checkpoint()
    assert store.find_grant(key.id, "m").used_tokens == 17
    assert [r["requests"] for r in store.usage()] == [2]


def test_reserving_at_once_holds_what_reserve_holds_and_never_waits(tmp_path: Path) -> None:
    """The event loop's reservation: the rows AccountStore.reserve writes (the hold, cut to what is left, and
    the in-flight row), a refusal when nothing is left, and no wait at all while another process writes."""
    store = AccountStore.for_path(tmp_path / "accounts.db")
    store.migrate()
    _, key = store.create_key()
    store.grant(key.id, "m", 100, days=30)
    store.grant(key.id, "other", 100, days=30)
    done, first = store.reserve_at_once(key.id, "m", 60, prompt_tokens=10, in_flight=("r1", "replica"))
    assert done and first is not None and first.tokens == 60
    done, second = store.reserve_at_once(key.id, "m", 60, prompt_tokens=10, in_flight=("r2", "replica"))
    assert done and second is not None and second.tokens == 40  # what was left
    assert store.reserve_at_once(key.id, "m", 60, prompt_tokens=10) == (True, None)  # nothing left: refused
    assert store.reserve_at_once(key.id, "none", 60) == (True, None)  # no grant
    assert store.find_grant(key.id, "m").reserved_tokens == 100  # seen at once: the remembered view is dropped
    same = store.reserve(key.id, "other", 60, prompt_tokens=10, in_flight=("r3", "replica"))
    with sqlite3.connect(tmp_path / "accounts.db") as db:
        rows = db.execute("SELECT * FROM in_flight ORDER BY request_id").fetchall()
    assert [r[:6] for r in rows] == [
        ("r1", "replica", first.grant_id, key.id, "m", 60),
        ("r2", "replica", first.grant_id, key.id, "m", 40),
        ("r3", "replica", same.grant_id, key.id, "other", 60),
    ]
    assert rows[0][6:] == (0, 0, 0, *rows[0][9:]) and type(rows[0][9]) is type(rows[2][9])
    assert len(rows[0][9]) == len(rows[2][9])  # the same timestamp text as SQLAlchemy writes
    store.settle(first, "r1", 10, 5, 0, "ok", wait=False, in_flight=True)
    other = sqlite3.connect(tmp_path / "accounts.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writing
    assert store.reserve_at_once(key.id, "m", 10) == (False, None)  # not waited for: the pool's way then
    other.execute("COMMIT")
