"""Throwaway services the tests start on loopback: a redis-server, a fresh PostgreSQL database.

The markers (``redis``, ``postgres``) and the skip-or-fail rule for a missing service are in tests/conftest.py.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import psycopg
import redis

from tests.conftest import free_port


class RedisServer:
    """A throwaway redis-server on loopback, stopped and restarted on the same port at will."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.port = tmp, free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def fresh_database(url: str) -> str:
    """A new, empty database on the test server, so other tests' rows do not meet these replicas."""
    name = f"llamascope_replicas_{uuid.uuid4().hex[:8]}"
    base, _, _ = url.rpartition("/")
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{base}/{name}"
