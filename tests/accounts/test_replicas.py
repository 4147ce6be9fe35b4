"""Two llamascope replicas sharing one PostgreSQL store, one Redis and one upload directory, as
docs/deploy.md sets them up: a key's limits hold across both, and an upload made through one is usable
through the other. Real servers, real Redis, real PostgreSQL (skipped without LLAMASCOPE_TEST_DATABASE_URL,
which .ci/run sets)."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.upload_flow import PATH, generate_with, policy_for, upload
from tests.conftest import CACHE_DIR, SEED_MODEL, Server, png_bytes, start_server, wait_ready
from tests.services import RedisServer, fresh_database


@pytest.fixture
def replicas(tmp_path: Path, redis_server: RedisServer, test_model_dir: Path) -> Iterator[tuple[Server, Server, dict]]:
    url = os.environ.get("LLAMASCOPE_TEST_DATABASE_URL")
    if not url:
        pytest.skip("LLAMASCOPE_TEST_DATABASE_URL is not set (.ci/run starts a PostgreSQL)")
    env = {
        "LLAMASCOPE_DATABASE_URL": fresh_database(url),
        "LLAMASCOPE_REDIS_URL": redis_server.url,
        "LLAMASCOPE_UPLOAD_SECRET": "replicas-share-this-secret-" + "0" * 40,
        "LLAMASCOPE_UPLOAD_DIR": str(tmp_path / "uploads"),
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = servers = [start_server(tmp_path / name, env=env, wait=False) for name in ("a", "b")]  # together
    try:
        for server in servers:
            wait_ready(server)
        yield a, b, env
    finally:
        for server in servers:
            server.stop()


def new_key(env: dict, *options: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "llamascope", "keys", "create", *options],
        env={**os.environ, **env, "LLAMASCOPE_CACHE_DIR": str(CACHE_DIR)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[0]


def body(text: str = "?", **parameters: int) -> dict:
    image = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    messages = [{"role": "user", "content": [{"image": image}, {"text": text}]}]
    return {"model": SEED_MODEL, "input": {"messages": messages}, "parameters": parameters}


def ask(server: Server, key: str) -> httpx.Response:
    return httpx.post(
        server.base + PATH, json=body(max_tokens=1), headers={"Authorization": f"Bearer {key}"}, timeout=120
    )


@pytest.mark.server
@pytest.mark.redis
@pytest.mark.postgres
def test_limits_and_uploads_hold_across_replicas(replicas: tuple[Server, Server, dict]) -> None:
    a, b, env = replicas

    # 3 requests a minute for the key: 3 in total through both replicas, not 3 each.
    key = new_key(env, "--rpm", "3")
    statuses = [ask(server, key).status_code for server in (a, b, a, b)]
    assert statuses == [200, 200, 200, 429], statuses

    # 1 concurrent request: one running on a holds b's door shut until it ends.
    one = new_key(env, "--concurrency", "1")
    headers = {"Authorization": f"Bearer {one}", "X-DashScope-SSE": "enable"}
    long = body("Tell a long story.", max_tokens=4000, min_new_tokens=4000)
    with httpx.stream("POST", a.base + PATH, json=long, headers=headers, timeout=120) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # held: a dropped iterator would close the stream
        next(lines)  # it is generating
        refused = ask(b, one)
        assert (refused.status_code, refused.json()["code"]) == (429, "Throttling.RateQuota")
        assert "at most 1 concurrent" in refused.json()["message"]
    # hung up: a counts it out, and b lets the key in again
    for _ in range(50):
        if ask(b, one).status_code == 200:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the slot never came back")

    # An upload made through a (its policy signed by a) is usable through b: one secret, one directory.
    data = policy_for(a, a.key)
    oss_key = data["upload_dir"] + "/cat.png"
    assert upload(data, oss_key, png_bytes((250, 180, 20), (500, 400))).status_code == 200
    r = generate_with(b, oss_key, a.key)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["image_tokens"] == 6404
