"""Crash-safe accounting in the store: checkpoints, leases, and reclaiming a dead replica's requests once.

On a real SQLite file always, and on PostgreSQL when LLAMASCOPE_TEST_DATABASE_URL is set (.ci/run does).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from llamascope import errors
from llamascope.accounts.admission import Accounts, Admission, Principal
from llamascope.accounts.checkpoints import Checkpoints, process_alive, this_process
from llamascope.accounts.limits import RateLimits
from llamascope.accounts.records import Reservation, utcnow
from llamascope.accounts.store import AccountStore

DEAD = "00000000-0000-0000-0000-00000000dead"


def _count(db: AccountStore, table: str) -> int:
    with db.engine.connect() as connection:
        return int(connection.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar() or 0)


def _lease_runs_out(db: AccountStore) -> None:
    """The dead replica's lease ends a second ago (as if time had passed, without waiting for it)."""
    db.hold_lease(DEAD, "elsewhere/boot", "1:1", seconds=-1)


def _interrupted_requests(db: AccountStore) -> tuple[Reservation, Reservation]:
    """A replica with a lease, two requests in flight: one holding a reservation, one unlimited."""
    _, key = db.create_key()
    limited = db.grant(key.id, "m", 10_000, days=None)
    unlimited = db.grant(key.id, "u", None, days=None)
    db.hold_lease(DEAD, "elsewhere/boot", "1:1", seconds=30)
    held = db.reserve(key.id, "m", 600, in_flight=("r-limited", DEAD))
    assert held is not None and limited.id == held.grant_id
    free = Reservation(unlimited.id, key.id, "u", 0, utcnow())
    rows = [
        {"request_id": "r-limited", "grant_id": held.grant_id, "reserved_tokens": 600, "output_tokens": 40},
        {"request_id": "r-free", "grant_id": free.grant_id, "reserved_tokens": 0, "output_tokens": 7},
    ]
    now = utcnow()
    common = {"replica_id": DEAD, "key_id": key.id, "input_tokens": 100, "image_tokens": 6404}
    db.save_checkpoints([r | common | {"model": "m", "started_at": now, "checkpoint_at": now} for r in rows])
    assert db.find_grant(key.id, "m").reserved_tokens == 600
    return held, free


def test_a_dead_replicas_requests_are_charged_once_however_many_reclaim(store: AccountStore) -> None:
    held, _ = _interrupted_requests(store)
    assert store.reclaim(DEAD, lease_expired=True) == 0  # its lease still runs
    _lease_runs_out(store)
    barrier, charged = threading.Barrier(4), []

    def reclaimer() -> None:
        barrier.wait()
        charged.append(store.reclaim(DEAD, lease_expired=True))

    threads = [threading.Thread(target=reclaimer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(charged) == [0, 0, 0, 2]
    ledger = {r.request_id: r for r in store.ledger()}
    assert {r.status for r in ledger.values()} == {"interrupted"}
    assert (ledger["r-limited"].input_tokens, ledger["r-limited"].output_tokens) == (100, 40)
    grant = store.find_grant(held.key_id, "m")
    assert (grant.used_tokens, grant.reserved_tokens) == (140, 0)
    assert _count(store, "in_flight") == 0 and _count(store, "replicas") == 0
    [row] = store.usage()  # both requests were of model m (see _interrupted_requests)
    assert (row["requests"], row["interrupted"]) == (2, 2)

    # The replica was alive after all (a long pause): its checkpoint writer, resumed, puts its request's row
    # back, and its own settle then charges nothing twice, and leaves no row in flight behind it.
    store.hold_lease(DEAD, "elsewhere/boot", "1:1", seconds=30)  # renewed after the pause
    now = utcnow()
    row = {"request_id": "r-limited", "replica_id": DEAD, "grant_id": held.grant_id, "key_id": held.key_id}
    row |= {"model": "m", "reserved_tokens": 600, "input_tokens": 100, "output_tokens": 50, "image_tokens": 6404}
    store.save_checkpoints([row | {"started_at": now, "checkpoint_at": now}])
    assert store.settle(held, "r-limited", 100, 55, 6404, "ok", in_flight=True)
    grant = store.find_grant(held.key_id, "m")
    assert (grant.used_tokens, grant.reserved_tokens) == (140, 0) and len(store.ledger()) == 2
    assert _count(store, "in_flight") == 0


def test_a_settled_request_left_in_flight_is_not_charged_again(store: AccountStore) -> None:
    """A checkpoint written while its request settled puts the row back: reclaiming skips it."""
    _, free = _interrupted_requests(store)
    store.settle(free, "r-free", 100, 9, 6404, "ok")  # without deleting its in-flight row
    _lease_runs_out(store)
    assert store.reclaim(DEAD, lease_expired=True) == 1
    assert {r.request_id: r.status for r in store.ledger()} == {"r-free": "ok", "r-limited": "interrupted"}
    assert store.find_grant(free.key_id, "u").used_tokens == 109


def test_leases_and_processes(store: AccountStore) -> None:
    assert store.hold_lease("a", "h", "1:1", 30) is False  # taken, not renewed
    assert store.hold_lease("a", "h", "1:1", 30) is True
    assert [(r[0], r[3]) for r in store.replicas()] == [("a", False)]
    _, key = store.create_key()
    grant = store.grant(key.id, "m", None, days=None)
    now = utcnow()
    row = {"request_id": "x", "replica_id": "a", "grant_id": grant.id, "key_id": key.id, "model": "m"}
    row |= {"reserved_tokens": 0, "input_tokens": 1, "output_tokens": 2, "image_tokens": 0}
    store.save_checkpoints([row | {"started_at": now, "checkpoint_at": now}])
    assert not store.end_lease("a")  # a request of its own still in flight
    store.settle(Reservation(grant.id, key.id, "m", 0, now), "x", 1, 2, 0, "ok")  # the row put back after it
    assert store.end_lease("a") and store.replicas() == [] and _count(store, "in_flight") == 0
    assert process_alive(this_process())
    pid, _, started = this_process().partition(":")
    assert not process_alive(f"{pid}:{int(started) + 1}")  # the same pid, another process


def test_streams_wait_for_their_checkpoint_and_fail_clearly_without_one(store: AccountStore) -> None:
    _, key = store.create_key()
    grant = store.grant(key.id, "m", None, days=None)
    checkpoints = Checkpoints(store, seconds=30, tokens=8, wait_seconds=1.0, lease_seconds=30)
    checkpoints.start()
    try:
        progress = checkpoints.track("r1", Reservation(grant.id, key.id, "m", 0, utcnow()), written=False)
        assert checkpoints.record(progress, 10, 8, 0) is False  # 8 unsaved: within the window
        assert checkpoints.record(progress, 10, 9, 0) is True
        asyncio.run(checkpoints.saved(progress))  # the writer, woken, saved it
        assert progress.saved_output == 9 and progress.written
        with store.engine.connect() as connection:
            row = connection.exec_driver_sql("SELECT input_tokens, output_tokens FROM in_flight").one()
        assert tuple(row) == (10, 9)

        checkpoints.stop()  # no writer: the next checkpoint never comes
        assert checkpoints.record(progress, 10, 30, 0)
        with pytest.raises(errors.ServiceError) as failure:
            asyncio.run(checkpoints.saved(progress))
        assert (failure.value.status, failure.value.code) == (503, "ServiceUnavailable")
    finally:
        checkpoints.stop()


@pytest.mark.parametrize("first", [True, False], ids=["a-later-checkpoint", "its-first-checkpoint"])
def test_a_checkpoint_written_as_its_request_settles_leaves_no_row(store: AccountStore, first: bool) -> None:
    """New-user trial (tests/deploy/test_topology.py failed on it by chance: one in-flight row left): the
    writer read a request's last tokens, its settle then committed (deleting the row), the writer's upsert put
    the row back, and the writer's check for settled requests came before the settle was marked finished
    (Redis's leave is awaited in between): the row stayed for as long as the replica lived."""
    _, key = store.create_key()
    grant = store.grant(key.id, "m", None, days=None)
    checkpoints = Checkpoints(store, seconds=0.01, tokens=64, wait_seconds=1.0, lease_seconds=30)
    reservation = Reservation(grant.id, key.id, "m", 0, utcnow())
    progress = checkpoints.track("r1", reservation, written=False)
    if first:
        checkpoints.record(progress, 10, 5, 0)
        checkpoints._flush(time.monotonic() + 1)  # a first checkpoint: the row exists
    checkpoints.record(progress, 10, 9, 0)  # its last tokens, not yet saved

    settle = store.settle

    def settling_meanwhile(*args: object, **kwargs: object) -> bool:
        if not first:  # the request's first checkpoint, written as its settle (told no row exists) begins
            checkpoints._flush(time.monotonic() + 1)
        done = settle(*args, **kwargs)  # type: ignore[arg-type]
        if done and first:  # committed: the writer's turn, before the settle is marked finished
            checkpoints._flush(time.monotonic() + 1)
        return done

    store.settle = settling_meanwhile  # type: ignore[method-assign]
    admission = Admission(
        Accounts(store, RateLimits(), checkpoints=checkpoints), Principal(key), reservation, "r1", True, progress
    )
    asyncio.run(admission.settle(10, 9, 0, "ok"))
    assert [r.request_id for r in store.ledger()] == ["r1"]
    assert _count(store, "in_flight") == 0
