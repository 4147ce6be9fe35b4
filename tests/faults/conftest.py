"""What the fault tests share: a throwaway PostgreSQL they can stop and start, and streams they can watch.

Faults are real: processes get SIGKILL, the database server is stopped with ``pg_ctl``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_KEY, PG_BIN, SEED_MODEL, Server, free_port, generation_body

PATH = "/api/v1/services/aigc/multimodal-generation/generation"


class Postgres:
    """A PostgreSQL cluster of its own on a free loopback port, in a temporary directory.

    As root, its commands run as the ``postgres`` user (PostgreSQL refuses to run as root), as .ci/postgres.sh
    does; otherwise as the current user. Its tests carry the ``postgres`` marker, which checks both."""

    def __init__(self) -> None:
        assert PG_BIN is not None, "a test that starts PostgreSQL is marked @pytest.mark.postgres"
        self.as_root = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="llamascope-pg-"))
        if self.as_root:
            shutil.chown(self.dir, "postgres")
        self.port = free_port()
        self._run(f"{PG_BIN}/initdb -D {self.dir}/data -A trust -U llamascope")
        self.start()
        self._run(f"{PG_BIN}/createdb -h 127.0.0.1 -p {self.port} -U llamascope llamascope")
        self.url = f"postgresql+psycopg://llamascope@127.0.0.1:{self.port}/llamascope"

    def _run(self, command: str) -> None:
        command += f" >>{shlex.quote(str(self.dir / 'commands.log'))} 2>&1"
        full = ["su", "postgres", "-s", "/bin/sh", "-c", command] if self.as_root else ["sh", "-c", command]
        subprocess.run(full, check=True, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._run(f"{PG_BIN}/pg_ctl -D {self.dir}/data -o '{options}' -l {self.dir}/pg.log -w start")

    def stop(self) -> None:
        self._run(f"{PG_BIN}/pg_ctl -D {self.dir}/data -m fast -w stop")

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    pg = Postgres()
    yield pg
    pg.close()


@dataclass
class Stream:
    """One streamed request on its own thread: the usage of the last event received, and how it ended."""

    server: Server
    image: str
    max_tokens: int
    key: str = ""
    request_id: str = ""
    usage: dict[str, int] = field(default_factory=dict)
    events: int = 0
    error: dict[str, str] | None = None  # an event:error's data
    failure: str = ""  # the connection broke
    ended_at: float = 0.0
    thread: threading.Thread | None = None

    def start(self) -> Stream:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        body = generation_body(self.image, max_tokens=self.max_tokens, incremental_output=True)
        headers = {"Authorization": f"Bearer {self.key or self.server.key}", "X-DashScope-SSE": "enable"}
        try:
            with httpx.stream("POST", self.server.base + PATH, json=body, headers=headers, timeout=120) as r:
                self.request_id = r.headers.get("x-request-id", "")
                kind = ""
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        kind = line[6:]
                    elif line.startswith("data:"):
                        data = json.loads(line[5:])
                        if kind == "error" or r.status_code != 200:
                            self.error = data
                        else:
                            self.usage = data["usage"]
                            self.events += 1
        except httpx.HTTPError as exc:
            self.failure = type(exc).__name__
        finally:
            self.ended_at = time.monotonic()

    @property
    def delivered(self) -> int:
        return self.usage.get("output_tokens", 0)

    def join(self, timeout: float = 120) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"stream {self.request_id} still running after {timeout} s"


def until(condition, timeout: float = 120, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.05)


def limited_key(server: Server, allowance: int = 900_000) -> str:
    """A new key with a token allowance (its requests hold reservations), through the admin API."""
    body = {"models": [SEED_MODEL], "allowance_tokens": allowance}
    r = httpx.post(server.base + "/admin/keys", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, r.text
    return str(r.json()["data"]["api_key"])
