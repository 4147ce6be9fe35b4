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
