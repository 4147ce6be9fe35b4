"""Replicas on one real PostgreSQL: one killed with SIGKILL is reclaimed once by the other (that several
reclaiming at once charge once is tests/accounts/test_checkpoints.py's); the database
stopped under running streams gives clear errors, and the service recovers by itself when it returns."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from llamascope.accounts.store import AccountStore
from tests.conftest import SEED_MODEL, Server, generation_body, start_server, wait_ready
from tests.faults.conftest import PATH, Postgres, Stream, limited_key, until

pytestmark = [pytest.mark.server, pytest.mark.postgres]
WINDOW = 8


@pytest.fixture(scope="module")
def replicas(
    postgres: Postgres, tmp_path_factory: pytest.TempPathFactory, test_model_dir: Path
) -> Iterator[list[Server]]:
    """Two replicas of one store, started together (on a store migrated beforehand, as docs/deploy.md says)."""
    AccountStore(postgres.url).migrate()
    env = {
        "LLAMASCOPE_DATABASE_URL": postgres.url,
        "LLAMASCOPE_CHECKPOINT_TOKENS": str(WINDOW),
        "LLAMASCOPE_CHECKPOINT_WAIT_SECONDS": "3",
        "LLAMASCOPE_LEASE_SECONDS": "4",
    }
    servers = [start_server(tmp_path_factory.mktemp("replica"), env=env, wait=False) for _ in range(2)]
    try:
        for s in servers:
            wait_ready(s)
        yield servers
    finally:
        for s in servers:
            s.stop()


def test_a_killed_replica_is_reclaimed_once_by_the_others(
    replicas: list[Server], postgres: Postgres, image_host
) -> None:
    doomed, survivor = replicas
    limited = limited_key(doomed)
    streams = [Stream(doomed, image_host.url("/red.png"), 3000, key=limited if i % 2 else "").start() for i in range(4)]
    until(lambda: all(s.delivered >= 2 * WINDOW for s in streams), what="tokens on the doomed replica")
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait(30)
    for s in streams:
        s.join()
    ids = {s.request_id for s in streams}
    store = AccountStore(postgres.url)

    def interrupted() -> list:  # type: ignore[type-arg]
        return [r for r in store.ledger() if r.request_id in ids]

    until(lambda: len(interrupted()) == 4, 60, "the survivor to reclaim")

    def lease_until() -> datetime:
        with store.engine.connect() as connection:
            return connection.exec_driver_sql("SELECT max(lease_until) FROM replicas").scalar()

    # More passes of the survivor's checkpoint thread (it reclaims every lease/2 = 2 s, renews its lease every
    # lease/3): once its lease has moved on 3 s, it has reclaimed again at least once, and charged nothing more.
    renewed = lease_until()
    until(lambda: lease_until() >= renewed + timedelta(seconds=3), 60, "more passes of the survivor")
    rows = {r.request_id: r for r in interrupted()}
    assert len(rows) == 4 and {r.status for r in rows.values()} == {"interrupted"}
    for s in streams:
        assert s.delivered - WINDOW <= rows[s.request_id].output_tokens <= s.delivered + 8
    for _, grants in store.list_keys():
        for g in grants:
            if g.model != SEED_MODEL:
                continue
            assert g.reserved_tokens == 0
            assert g.used_tokens == sum(r.input_tokens + r.output_tokens for r in rows.values() if r.key_id == g.key_id)
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM in_flight").scalar() == 0
        assert connection.exec_driver_sql("SELECT count(*) FROM replicas").scalar() == 1  # the survivor
    reclaims = [line for line in survivor.log().splitlines() if "interrupted, as far as" in line]
    assert len(reclaims) == 1 and "charged 4 requests" in reclaims[0], reclaims


def test_database_stopped_under_streams_then_back(replicas: list[Server], postgres: Postgres, image_host) -> None:
    server = replicas[1]
    headers = {"Authorization": f"Bearer {server.key}"}
    body = generation_body(image_host.url("/red.png"), max_tokens=5)
    before = httpx.post(server.base + PATH, json=body, headers=headers, timeout=60)
    assert before.status_code == 200
    streams = [Stream(server, image_host.url("/red.png"), 3000).start() for _ in range(3)]
    until(lambda: all(s.delivered >= 2 for s in streams), what="streams running")
    postgres.stop()
    stopped = time.monotonic()
    try:
        for s in streams:
            s.join()
        # Each stream ends with a DashScope error once its checkpoint is 3 s overdue, never hangs.
        for s in streams:
            assert s.error is not None and s.error["code"] == "ServiceUnavailable", (s.error, s.failure)
            assert s.ended_at - stopped < 30
        asked = time.monotonic()
        refused = httpx.post(server.base + PATH, json=body, headers=headers, timeout=60)
        assert time.monotonic() - asked < 15
        assert refused.status_code == 503 and refused.json()["code"] == "ServiceUnavailable", refused.text
        assert refused.headers["retry-after"] and "accounts store" in refused.json()["message"]
    finally:
        postgres.start()
    until(lambda: httpx.post(server.base + PATH, json=body, headers=headers, timeout=60).status_code == 200, 60,
          "the service to recover by itself")  # fmt: skip
    store = AccountStore(postgres.url)
    want = {before.json()["request_id"]} | {s.request_id for s in streams}
    until(lambda: want <= {r.request_id for r in store.ledger()}, 30, "the charges kept while it was down")
    rows = {r.request_id: r for r in store.ledger()}
    assert rows[before.json()["request_id"]].status == "ok"
    for s in streams:
        assert rows[s.request_id].status == "ServiceUnavailable"
        assert rows[s.request_id].output_tokens >= s.delivered
    assert "Traceback" not in server.log()
