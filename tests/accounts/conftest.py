"""The accounts tests' fixtures: the store (SQLite, and PostgreSQL when set) and a throwaway Redis."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamascope.accounts.store import AccountStore
from tests.services import RedisServer

POSTGRES = os.environ.get("LLAMASCOPE_TEST_DATABASE_URL")


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgresql", marks=[pytest.mark.postgres, pytest.mark.skipif(not POSTGRES, reason="no PG")]),
    ]
)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> AccountStore:
    if request.param == "sqlite":
        s = AccountStore.for_path(tmp_path / "accounts.db")
    else:
        s = AccountStore(str(POSTGRES))
        with s.engine.begin() as connection:
            connection.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    s.migrate()
    return s


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs Debian's redis-server)")
    server = RedisServer(tmp_path)
    yield server
    server.stop()
