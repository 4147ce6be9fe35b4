"""One batch through nginx and three replicas on one PostgreSQL, one replica SIGKILLed mid-batch: the others
take its lines over when its lease runs out, and every ``custom_id`` ends in exactly one result file.

Needs nginx and PostgreSQL (LLAMASCOPE_TEST_DATABASE_URL): .ci/run installs and starts them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import openai
import psycopg
import pytest

from llamascope.settings import BUILTIN_TEXT
from tests.api.batch.test_batches import request as line
from tests.api.batch.test_batches import results, submit, wait
from tests.conftest import API_KEY, TEXT_MODEL, free_port, start_server
from tests.deploy.test_topology import NGINX_CONF, wait_healthy
from tests.services import fresh_database

pytestmark = [pytest.mark.server, pytest.mark.postgres, pytest.mark.nginx]


def test_a_batch_through_nginx_survives_a_replica_killed_mid_batch(tmp_path: Path, text_model_dir: Path) -> None:
    url, nginx = os.environ.get("LLAMASCOPE_TEST_DATABASE_URL"), shutil.which("nginx") or "/usr/sbin/nginx"
    if not url or not Path(nginx).exists():
        pytest.skip("needs nginx and LLAMASCOPE_TEST_DATABASE_URL (.ci/run provides them)")
    database = fresh_database(url)
    env = {
        "LLAMASCOPE_DATABASE_URL": database,
        "LLAMASCOPE_BATCH_FILES_DIR": str(tmp_path / "files"),  # shared by the replicas, as docs/batch.md says
        "LLAMASCOPE_UPLOAD_SECRET": "batch-replicas-secret-" + "2" * 40,
        "LLAMASCOPE_LEASE_SECONDS": "3",  # a dead replica's lines are free again within seconds
        "LLAMASCOPE_BATCH_POLL_SECONDS": "0.5",  # how soon the others see the batch and the expired lease
        "LLAMASCOPE_BATCH_IN_FLIGHT": "2",
    }
    replicas = [
        start_server(tmp_path / f"r{i}", ["--model", f"{TEXT_MODEL}={BUILTIN_TEXT}"], env, wait=False)
        for i in range(3)
        if (tmp_path / f"r{i}").mkdir() is None
    ]
    servers = "\n".join(
        f"        server {r.base.removeprefix('http://')} max_fails=1 fail_timeout=2s;" for r in replicas
    )
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / sub).mkdir()
    port = free_port()
    (tmp_path / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp_path, servers=servers, port=port))
    proxy = subprocess.Popen([nginx, "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"])
    db = psycopg.connect(database.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    try:
        wait_healthy(replicas)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/compatible-mode/v1", api_key=API_KEY, max_retries=0)
        ids = [f"r{i}" for i in range(12)]
        batch = submit(client, [line(i, f"Count to {n}.", max_tokens=24, model=TEXT_MODEL) for n, i in enumerate(ids)])
        running = "SELECT DISTINCT r.process FROM batch_lines l JOIN replicas r ON r.id = l.owner WHERE l.state = %s"
        deadline = time.monotonic() + 90
        while len(owners := [row[0] for row in db.execute(running, ("running",))]) < 2:  # SKIP LOCKED: both at once
            assert time.monotonic() < deadline, "the replicas never ran the batch's lines at once"
            time.sleep(0.1)
        victim = next(r for r in replicas if any(o.startswith(f"{r.process.pid}:") for o in owners))
        victim.stop(signal.SIGKILL)
        batch = wait(client, batch.id, timeout=120)
        output, failed = results(client, batch.output_file_id), results(client, batch.error_file_id)
    finally:
        db.close()
        proxy.send_signal(signal.SIGQUIT)
        proxy.wait(10)
        for server in replicas:
            server.stop()
    assert batch.status == "completed" and not failed, batch
    # Each exactly once: the victim held running lines when it was killed (it was picked among their owners), so
    # those were run again elsewhere (their attempts are not there to count: an ended batch's lines are dropped).
    assert sorted(result["custom_id"] for result in output) == sorted(ids)
