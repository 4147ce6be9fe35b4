"""The accounts store on a real SQLite file: keys by hash, grants, atomic reservations, the ledger."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from llamascope.accounts.access import bearer_key, grant_refusal, key_refusal
from llamascope.accounts.lookups import TTL_SECONDS
from llamascope.accounts.records import Reservation, utcnow
from llamascope.accounts.store import HEAD, MIGRATIONS, AccountStore


def test_keys_are_stored_as_hashes(store: AccountStore) -> None:
    key, view = store.create_key("alice")
    assert key.startswith("sk-") and len(key) >= 35
    assert store.find_key(key) == view
    assert store.find_key(key + "x") is None
    with store.engine.connect() as connection:
        stored = [str(v) for row in connection.exec_driver_sql("SELECT * FROM api_keys") for v in row]
    assert key not in stored and view.prefix == key[:7]


def test_migrations_are_idempotent(store: AccountStore) -> None:
    store.migrate()
    store.migrate()
    assert store.count_keys() == 0


def test_decisions() -> None:
    now = utcnow()
    assert bearer_key("Bearer sk-1") == "sk-1" and bearer_key("Basic sk-1") is None and bearer_key(None) is None
    assert key_refusal(None, now).code == "InvalidApiKey"


def test_grant_refusals_say_which_and_since_when(store: AccountStore) -> None:
    _, key = store.create_key()
    now = utcnow()
    assert grant_refusal("m", None, now).code == "AccessDenied.Unpurchased"
    grant = store.grant(key.id, "m", 100, days=30)
    assert grant_refusal("m", grant, now) is None
    assert "expired on" in grant_refusal("m", grant, now + timedelta(days=31)).message
    reservation = store.reserve(grant.key_id, "m", 150)
    store.settle(reservation, "r1", 100, 20, 6404, "ok")
    spent = store.find_grant(key.id, "m")
    refusal = grant_refusal("m", spent, utcnow())
    assert refusal.code == "AllocationQuota.FreeTierOnly"
    assert "was used up on" in refusal.message and "120 of 100 tokens" in refusal.message


def test_fifty_racing_requests_overrun_at_most_once(store: AccountStore) -> None:
    """50 threads (each its own connection) race for an allowance with 60 tokens left; each needs 44."""
    _, key = store.create_key()
    grant = store.grant(key.id, "m", 1000, days=None)
    store.settle(store.reserve(grant.key_id, "m", 940), "warm-up", 940, 0, 0, "ok")
    barrier = threading.Barrier(50)
    admitted: list[int] = []

    def request(i: int) -> None:
        barrier.wait()
        reservation = store.reserve(grant.key_id, "m", 44)
        if reservation is not None:
            admitted.append(i)
            store.settle(reservation, f"r{i}", 24, 20, 0, "ok")

    threads = [threading.Thread(target=request, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = store.find_grant(key.id, "m")
    assert final.reserved_tokens == 0
    # Admitted while used + reserved < allowance: with 60 left, two can hold 44 each, and only the second overruns.
    assert len(admitted) <= 2
    overrun = [i for i in range(len(admitted)) if 940 + 44 * (i + 1) > 1000]
    assert len(overrun) <= 1
    ledger = store.ledger(key.id)
    assert sum(r.input_tokens + r.output_tokens for r in ledger) == final.used_tokens


def test_usage_report(store: AccountStore) -> None:
    _, a = store.create_key("a")
    grant = store.grant(a.id, "m", None, None)
    for i in range(3):
        store.settle(store.reserve(grant.key_id, "m", 10), f"r{i}", 5, 3, 100, "ok")
    [row] = store.usage(a.id)
    assert (row["requests"], row["input_tokens"], row["output_tokens"], row["image_tokens"]) == (3, 15, 9, 300)


def test_a_key_is_found_by_itself_by_its_id_and_by_a_prefix(store: AccountStore) -> None:
    """Issue 13, item 1: a whole key, or a prefix longer than the 7 characters kept, found nothing."""
    key, view = store.create_key("a")
    assert store.key(key) == view and store.key(view.id) == view and store.key(str(view.id)) == view
    assert store.key(key[:7]) == view and store.key(key[:20]) == view and store.key(key[:7] + "…") == view
    with pytest.raises(LookupError, match="no key"):
        store.key(key[:-1] + ("0" if key[-1] != "0" else "1"))  # a whole key matches by its hash only
    with pytest.raises(LookupError, match="too short"):
        store.key("sk-")


def test_a_key_of_dashscope_s_format_is_matched_whole(store: AccountStore) -> None:
    """Issue 27, item 2: a key from the settings as DashScope makes them (sk- and 32 hex) is a whole key."""
    key = "sk-9f86d081884c7d659a2feaa0c55ad015"
    _, view = store.create_key("from settings", key=key)
    assert store.key(key) == view and store.key(key[:12]) == view
    with pytest.raises(LookupError, match="no key"):
        store.key(key[:-1] + "0")  # mistyped: matches nothing, not the key of the same prefix


def test_a_grant_for_every_model_and_a_models_own(store: AccountStore) -> None:
    """Issue 13, item 2: one grant ('*') covers every model; a model's own grant goes first."""
    _, key = store.create_key()
    store.grant(key.id, "*", 1000, None)
    assert store.find_grant(key.id, "anything").model == "*"
    store.grant(key.id, "m", 50, None)
    assert store.find_grant(key.id, "m").model == "m" and store.find_grant(key.id, "other").model == "*"
    held = store.reserve(key.id, "other", 100)
    assert held.model == "other" and store.find_grant(key.id, "x").reserved_tokens == 100
    store.settle(held, "r1", 10, 20, 0, "ok")
    assert store.find_grant(key.id, "m").used_tokens == 0 and store.find_grant(key.id, "y").used_tokens == 30
    [row] = store.requests(key.id)
    assert (row["model"], row["status"], row["output_tokens"]) == ("other", "ok", 20)


def test_a_hold_is_cut_to_what_the_allowance_has_left(store: AccountStore) -> None:
    """Issue 13, item 8: the reservation (prompt + max_tokens) is cut to what is left, at least prompt + 1."""
    _, key = store.create_key()
    store.grant(key.id, "m", 100, None)
    first = store.reserve(key.id, "m", 60, prompt_tokens=10)
    assert first.tokens == 60
    second = store.reserve(key.id, "m", 60, prompt_tokens=10)
    assert second.tokens == 40  # what the first left
    assert store.reserve(key.id, "m", 60, prompt_tokens=10) is None  # nothing left: refused
    store.settle(first, "a", 10, 50, 0, "ok")
    store.settle(second, "b", 10, 20, 0, "ok")
    third = store.reserve(key.id, "m", 60, prompt_tokens=25)
    assert third.tokens == 26  # 20 left, less than the prompt: the prompt and one token
    assert store.find_grant(key.id, "m").reserved_tokens == 26


def test_a_new_sqlite_store_has_the_schema_the_migrations_make(tmp_path: Path) -> None:
    """Issue 29: a new SQLite file gets the schema without Alembic; it must be the migrations' own, stamped
    at their head (the newest migration file's number)."""
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(config).get_current_head() == HEAD
    made = AccountStore.for_path(tmp_path / "made.db")
    made.migrate()
    migrated = AccountStore.for_path(tmp_path / "migrated.db")
    with migrated.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    def schema(path: Path) -> list[tuple[str, ...]]:
        with sqlite3.connect(path) as connection:
            return sorted(connection.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))

    assert schema(tmp_path / "made.db") == schema(tmp_path / "migrated.db")
    assert made.revision() == migrated.revision() == HEAD
    made.migrate()  # at the head: left as it is
    assert made.count_keys() == 0


def test_the_lines_of_batches_ended_before_an_upgrade_are_dropped(tmp_path: Path) -> None:
    """Migration 0005: ended batches' lines (their results are in the batches' files) go; a running batch's
    stay."""
    from alembic import command
    from alembic.config import Config

    store = AccountStore.for_path(tmp_path / "old.db")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0004")
    when = "2026-12-01 00:00:00"
    with sqlite3.connect(tmp_path / "old.db") as db:
        # (foreign keys are off in a plain sqlite3 connection: no key row needed)
        for batch, status in (("done", "completed"), ("gone", "cancelled"), ("live", "in_progress")):
            db.execute(
                "INSERT INTO batches (id, key_id, input_file_id, endpoint, completion_window, status, total, "
                "completed, failed, input_tokens, output_tokens, created_at, expires_at) "
                "VALUES (?, 1, 'f', '/v1/chat/completions', '24h', ?, 2, 0, 0, 0, 0, ?, ?)",
                (batch, status, when, when),
            )
            for line in range(2):
                db.execute(
                    "INSERT INTO batch_lines (batch_id, line, custom_id, offset, length, state, attempts, "
                    "input_tokens, output_tokens) VALUES (?, ?, 'c', 0, 1, 'done', 1, 0, 0)",
                    (batch, line),
                )
    store.migrate()
    with sqlite3.connect(tmp_path / "old.db") as db:
        left = db.execute("SELECT batch_id, count(*) FROM batch_lines GROUP BY batch_id").fetchall()
        batches = db.execute("SELECT count(*) FROM batches").fetchone()[0]
    assert left == [("live", 2)] and batches == 3
    assert store.revision() == HEAD


def test_lookups_see_every_change_at_once(store: AccountStore, tmp_path: Path) -> None:
    """Issue 29: keys and grants are remembered between requests, yet a change shows on the next lookup,
    whoever made it: this store, another store on the same database (another process, `llamascope keys`),
    or the request's own charge."""
    key, view = store.create_key("k")
    unlimited = store.grant(view.id, "m", None, None)
    store.grant(view.id, "small", 100, days=30)
    assert store.find_key(key) == store.find_key(key) and store.find_grant(view.id, "m").id == unlimited.id
    other = AccountStore(store.url)  # as another process would

    def others_change_shown() -> None:  # at once on SQLite; another replica's within a second on PostgreSQL
        if not store.is_sqlite:
            time.sleep(TTL_SECONDS)

    other.revoke(view.id)
    others_change_shown()
    assert store.find_key(key).revoked_at is not None
    other.update_key(view.id, revoked_at=None)
    others_change_shown()
    assert store.find_key(key).revoked_at is None
    store.update_key(view.id, name="renamed")  # this store's own change
    assert store.find_key(key).name == "renamed"

    wait = not store.is_sqlite  # the event loop's settle on SQLite (on PostgreSQL it always waits)
    for i in range(3):  # charged on the grant as remembered, exactly
        assert store.settle(Reservation(unlimited.id, view.id, "m", 0, utcnow()), f"r{i}", 5, 2, 0, "ok", wait=wait)
        assert store.find_grant(view.id, "m").used_tokens == 7 * (i + 1)
    assert store.find_grant(view.id, "m") == store.find_grant(view.id, "m", fresh=True)

    assert store.find_grant(view.id, "small").used_tokens == 0
    held = store.reserve(view.id, "small", 100)
    assert store.find_grant(view.id, "small").reserved_tokens == 100
    assert store.settle(held, "s", 60, 40, 0, "ok", wait=wait)
    grant = store.find_grant(view.id, "small")
    assert (grant.used_tokens, grant.reserved_tokens, grant.exhausted_at is not None) == (100, 0, True)
    other.grant(view.id, "small", 500, days=30)
    others_change_shown()
    assert store.find_grant(view.id, "small").allowance_tokens == 500
