"""The topology of docs/deploy.md, run for real on loopback: nginx balancing three llamascope replicas that
share one PostgreSQL and one Redis, in front of two upstream engines (llamascope instances on the built-in
model). Everything goes through nginx with the official SDK or plain HTTP, as clients would.

Needs nginx, redis-server and PostgreSQL (LLAMASCOPE_TEST_DATABASE_URL): .ci/run installs and starts them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import CACHE_DIR, SEED_MODEL, Server, free_port, png_bytes, start_server, wait_ready
from tests.services import RedisServer, fresh_database

pytestmark = [pytest.mark.server, pytest.mark.postgres, pytest.mark.redis, pytest.mark.nginx]
PATH = "/api/v1/services/aigc/multimodal-generation/generation"
ENGINE_KEY = "sk-e3b0c44298fc1c149afbf4c8996fb92427ae41e4"  # keys of the settings must be hard to guess
FIRST_KEY = "sk-f1d2d2f924e986ac86fdf7b36c94bcdf32beec15"
SECRET = "topology-upload-secret-" + "1" * 40

NGINX_CONF = """
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {tmp}/nginx-access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 32m;
    upstream llamascope {{
{servers}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://llamascope;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            # Server-sent events: pass each event on as it comes, and let long answers stream.
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            # A replica that refuses the connection or dies before answering: try the next one.
            # ... or that drains (503 ShuttingDown: it ran nothing of the request), POSTs included.
            proxy_next_upstream error timeout http_503 non_idempotent;
        }}
        # No replica answered: an error in the API's own shape, worth a retry, not nginx's HTML page.
        error_page 502 504 = @no_replica;
        location @no_replica {{
            default_type application/json;
            add_header Retry-After 1 always;
            if ($uri ~ ^/(compatible-mode/)?v1/) {{
                return 503 '{{"error": {{"code": "ServiceUnavailable", "type": "server_error", "param": null,
                    "message": "No replica answered; retry the request."}}, "request_id": "$request_id"}}';
            }}
            return 503 '{{"code": "ServiceUnavailable", "message": "No replica answered; retry the request.",
                "request_id": "$request_id"}}';
        }}
    }}
}}
"""


@dataclass
class Topology:
    base: str  # nginx
    replicas: list[Server]
    engines: list[Server]
    env: dict[str, str]

    @property
    def api(self) -> str:
        return self.base + "/api/v1"


def wait_healthy(servers: list[Server]) -> None:
    deadline = time.monotonic() + 180
    for server in servers:
        wait_ready(server, max(deadline - time.monotonic(), 1))


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory, test_model_dir: Path) -> Iterator[Topology]:
    url = os.environ.get("LLAMASCOPE_TEST_DATABASE_URL")
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not url or nginx is None or shutil.which("redis-server") is None:
        pytest.skip("needs nginx, redis-server and LLAMASCOPE_TEST_DATABASE_URL (.ci/run provides them)")
    tmp = tmp_path_factory.mktemp("topology")
    redis = RedisServer(tmp)
    engines = [
        start_server(tmp / f"engine{i}", env={"LLAMASCOPE_API_KEYS": ENGINE_KEY}, wait=False)
        for i in (1, 2)
        if (tmp / f"engine{i}").mkdir() is None
    ]
    wait_healthy(engines)
    upstreams = ", ".join(f'"{e.base}/v1"' for e in engines)
    config = tmp / "llamascope.toml"
    config.write_text(
        f'[models."{SEED_MODEL}"]\nupstreams = [{upstreams}]\nupstream_api_key = "{ENGINE_KEY}"\n'
        "allowance_tokens = 1000000\n"
    )
    env = {
        "LLAMASCOPE_DATABASE_URL": fresh_database(url),
        "LLAMASCOPE_REDIS_URL": redis.url,
        "LLAMASCOPE_UPLOAD_SECRET": SECRET,
        "LLAMASCOPE_UPLOAD_DIR": str(tmp / "uploads"),
        "LLAMASCOPE_API_KEYS": FIRST_KEY,
        "LLAMASCOPE_CONFIG": str(config),
        "LLAMASCOPE_LEASE_SECONDS": "4",  # a dead replica is found and its requests charged within seconds
    }
    replicas = []
    for i in (1, 2, 3):
        (tmp / f"replica{i}").mkdir()
        replicas.append(start_server(tmp / f"replica{i}", env=env, wait=False))
    wait_healthy(replicas)
    port = free_port()
    servers = "\n".join(
        f"        server {r.base.removeprefix('http://')} max_fails=1 fail_timeout=2s;" for r in replicas
    )
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / sub).mkdir()
    (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, servers=servers, port=port))
    proxy = subprocess.Popen([nginx, "-c", str(tmp / "nginx.conf"), "-g", "daemon off;"], stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(base + "/health", timeout=1)
            break
        except httpx.HTTPError:
            if proxy.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start: {proxy.stderr.read() if proxy.stderr else ''}") from None
            time.sleep(0.1)
    yield Topology(base, replicas, engines, env)
    proxy.send_signal(signal.SIGQUIT)
    proxy.wait(10)
    for server in [*replicas, *engines]:
        server.stop()
    redis.stop()


def new_key(topology: Topology, *options: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "llamascope", "keys", "create", *options],
        env={**os.environ, **topology.env, "LLAMASCOPE_CACHE_DIR": str(CACHE_DIR)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[0]


def image() -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes((30, 120, 200), (320, 240))).decode()


def messages(text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"image": image()}, {"text": text}]}]


def body(**parameters: object) -> dict:
    return {"model": SEED_MODEL, "input": {"messages": messages()}, "parameters": parameters}


async def burst(topology: Topology, key: str, count: int, **parameters: object) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=topology.base, timeout=300) as client:
        return list(
            await asyncio.gather(
                *(
                    client.post(PATH, json=body(**parameters), headers={"Authorization": f"Bearer {key}"})
                    for _ in range(count)
                )
            )
        )


def replicas_used(topology: Topology, request_ids: set[str]) -> int:
    return sum(any(f"request_id={rid}" in r.log() for rid in request_ids) for r in topology.replicas)


def test_sdk_through_nginx_streams_and_uploads(topology: Topology, tmp_path: Path) -> None:
    """The official SDK, unchanged but for the base URL: streaming through nginx, and a local file uploaded
    through one replica and read by whichever replica the generation lands on."""
    import dashscope

    photo = tmp_path / "photo.png"
    photo.write_bytes(png_bytes((250, 180, 20), (500, 400)))
    old = dashscope.base_http_api_url
    dashscope.base_http_api_url = topology.api
    try:
        events = list(
            dashscope.MultiModalConversation.call(
                api_key=FIRST_KEY,
                model=SEED_MODEL,
                messages=messages(),
                stream=True,
                incremental_output=True,
                max_tokens=24,
                min_new_tokens=24,
            )
        )
        assert len(events) >= 5 and all(e.status_code == 200 for e in events)
        assert events[-1].usage["output_tokens"] == 24
        ids = set()
        for _ in range(4):  # round robin: the SDK's policy, upload and generation meet different replicas
            r = dashscope.MultiModalConversation.call(
                api_key=FIRST_KEY,
                model=SEED_MODEL,
                messages=[{"role": "user", "content": [{"image": str(photo)}, {"text": "?"}]}],
                max_tokens=2,
            )
            assert r.status_code == 200, r  # the oss:// object was found whichever replica took the upload
            assert r.usage["output_tokens"] == 2
            ids.add(r.request_id)
    finally:
        dashscope.base_http_api_url = old
    uploaded = {i for i, r in enumerate(topology.replicas) if "POST /api/v1/uploads/oss" in r.log()}
    generated = {i for i, r in enumerate(topology.replicas) if any(f"request_id={x}" in r.log() for x in ids)}
    assert uploaded and generated and uploaded | generated != uploaded & generated, (uploaded, generated)


def test_allowance_race_across_replicas_overruns_at_most_once(topology: Topology) -> None:
    key = new_key(topology, "--model", SEED_MODEL, "--allowance", "300")
    responses = asyncio.run(burst(topology, key, 12, max_tokens=40, temperature=0))
    statuses = [r.status_code for r in responses]
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 403]
    assert len(served) + len(refused) == 12, statuses
    assert all(r.json()["code"] == "AllocationQuota.FreeTierOnly" for r in refused)
    used = [r.json()["usage"]["total_tokens"] for r in served]
    # Each request reserves its most before it runs: all but at most one fit inside the allowance.
    assert sum(sorted(used)[:-1]) <= 300, used
    ids = {r.json()["request_id"] for r in served}
    deadline = time.monotonic() + 10  # an access line is written as its request ends, just after its last byte
    while replicas_used(topology, ids) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert replicas_used(topology, ids) >= 2
    # The books agree: the grant's used tokens equal the ledger's rows, which equal what the answers reported.
    # (A charge is written as its request ends, a moment after the last byte: wait for the last of them.)
    deadline = time.monotonic() + 15
    while True:
        with psycopg_connect(topology) as db:
            used_tokens, reserved = db.execute(
                "SELECT g.used_tokens, g.reserved_tokens FROM grants g JOIN api_keys k ON k.id = g.key_id "
                "WHERE k.prefix = %s AND g.model = %s",
                (key[:7], SEED_MODEL),
            ).fetchone()
            ledger = db.execute(
                "SELECT count(*), sum(u.input_tokens + u.output_tokens) FROM usage u "
                "JOIN api_keys k ON k.id = u.key_id WHERE k.prefix = %s",
                (key[:7],),
            ).fetchone()
        if reserved == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (used_tokens, reserved) == (sum(used), 0)
    assert ledger == (len(served), sum(used))


def psycopg_connect(topology: Topology):
    import psycopg

    return psycopg.connect(topology.env["LLAMASCOPE_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://"))


def test_requests_per_minute_hold_in_total(topology: Topology) -> None:
    key = new_key(topology, "--rpm", "4")
    responses = asyncio.run(burst(topology, key, 9, max_tokens=1))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 4 + [429] * 5, statuses
    assert all(r.json()["code"] == "Throttling.RateQuota" for r in responses if r.status_code == 429)


def test_concurrency_holds_across_replicas(topology: Topology) -> None:
    key = new_key(topology, "--concurrency", "2")
    responses = asyncio.run(burst(topology, key, 8, max_tokens=60, min_new_tokens=60, temperature=0))
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert (len(ok), len(refused)) == (2, 6), [r.status_code for r in responses]
    assert all("at most 2 concurrent" in r.json()["message"] for r in refused)


def test_a_replica_killed_mid_traffic(topology: Topology) -> None:
    """SIGKILL one replica while six streams run through nginx (two on each replica): the streams on the
    others finish; the dead replica's requests are charged, once, what their last checkpoint recorded, by
    the replicas left, with an ``interrupted`` ledger row each and nothing left reserved. Runs last: it
    leaves the topology one replica short."""
    key = new_key(topology, "--model", SEED_MODEL, "--allowance", "1000000")
    headers = {"Authorization": f"Bearer {key}", "X-DashScope-SSE": "enable"}
    # Long enough that every stream is still running when the last of the six passes 20 tokens (the kill).
    payload = body(max_tokens=150, min_new_tokens=150, temperature=0, incremental_output=True)
    victim = topology.replicas[-1]
    streaming: set[int] = set()
    all_streaming = asyncio.Event()

    async def one(client: httpx.AsyncClient, results: dict[str, tuple[int, bool]], n: int) -> None:
        request_id, made, finished = "", 0, False
        try:
            async with client.stream("POST", PATH, json=payload, headers=headers) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        event = json.loads(line[5:])
                        request_id = event.get("request_id", request_id)
                        made = event.get("usage", {}).get("output_tokens", made)
                        choices = event.get("output", {}).get("choices") or [{}]
                        finished = choices[0].get("finish_reason") == "length"
                        if made >= 20:
                            streaming.add(n)
                            if len(streaming) == 6:
                                all_streaming.set()
        except httpx.HTTPError:
            pass  # its replica died under it
        results[request_id] = (made, finished)

    async def scenario() -> dict[str, tuple[int, bool]]:
        results: dict[str, tuple[int, bool]] = {}
        async with httpx.AsyncClient(base_url=topology.base, timeout=300) as client:
            tasks = [asyncio.create_task(one(client, results, n)) for n in range(6)]
            await asyncio.wait_for(all_streaming.wait(), 120)  # every replica is mid-stream
            victim.process.send_signal(signal.SIGKILL)
            await asyncio.gather(*tasks)
        return results

    results = asyncio.run(scenario())
    cut = {rid: made for rid, (made, finished) in results.items() if not finished}
    assert len(results) == 6 and 1 <= len(cut) <= 3, results
    assert all(made == 150 for made, finished in results.values() if finished)
    # The replicas left find the dead one (its process is gone from this host) and charge its requests once.
    deadline = time.monotonic() + 60
    while True:
        with psycopg_connect(topology) as db:
            rows = db.execute(
                "SELECT u.request_id, u.output_tokens, u.status FROM usage u JOIN api_keys k ON k.id = u.key_id "
                "WHERE k.prefix = %s",
                (key[:7],),
            ).fetchall()
            used, reserved = db.execute(
                "SELECT g.used_tokens, g.reserved_tokens FROM grants g JOIN api_keys k ON k.id = g.key_id "
                "WHERE k.prefix = %s",
                (key[:7],),
            ).fetchone()
            in_flight = db.execute("SELECT count(*) FROM in_flight").fetchone()[0]
        if (len(rows) == 6 and reserved == 0 and in_flight == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    ledger = {rid: (output, status) for rid, output, status in rows}
    assert sorted(ledger) == sorted(results), (ledger, results)
    for rid, delivered in cut.items():
        output, status = ledger[rid]
        assert status == "interrupted", (rid, status)
        assert delivered - 64 <= output <= delivered + 64, (rid, delivered, output)  # CHECKPOINT_TOKENS
    assert (reserved, in_flight) == (0, 0)
    with psycopg_connect(topology) as db:
        charged = db.execute(
            "SELECT sum(u.input_tokens + u.output_tokens) FROM usage u JOIN api_keys k ON k.id = u.key_id "
            "WHERE k.prefix = %s",
            (key[:7],),
        ).fetchone()[0]
    assert used == charged


def test_a_draining_replica_passes_new_requests_on(topology: Topology) -> None:
    """Found following docs/deploy.md: while one replica drained (SIGTERM, a stream still running on it), the
    requests nginx sent it came back to the clients as 503 ShuttingDown (about one in two with two replicas),
    since nginx passed a POST on to the next replica only when the connection failed. Through the page's
    config nginx now gives them to another replica. Runs after the kill: it leaves a second replica gone."""
    key = new_key(topology, "--model", SEED_MODEL, "--allowance", "1000000")
    headers = {"Authorization": f"Bearer {key}"}
    draining = topology.replicas[-2]

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(timeout=300) as client:
            long = body(max_tokens=400, min_new_tokens=400, incremental_output=True)
            async with client.stream(
                "POST", draining.base + PATH, json=long, headers={**headers, "X-DashScope-SSE": "enable"}
            ) as stream:
                lines = stream.aiter_lines()
                while not (await anext(lines)).startswith("data:"):
                    pass  # it is making tokens: the drain waits for it
                draining.process.send_signal(signal.SIGTERM)
                while (await client.get(draining.base + "/health")).status_code != 503:
                    await asyncio.sleep(0.05)
                codes = [
                    (await client.post(topology.base + PATH, json=body(max_tokens=2), headers=headers)).status_code
                    for _ in range(6)
                ]
                async for _ in lines:
                    pass
        return codes

    assert asyncio.run(scenario()) == [200] * 6


def test_no_replica_answering_is_an_api_error_not_nginxs_page(tmp_path: Path) -> None:
    """New-user trial: with every replica down, nginx answered its HTML "502 Bad Gateway", which the SDK
    reports as code "Unknown" with the HTML as the message. The configuration of docs/deploy.md answers 503
    in each API's own error shape, with Retry-After."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("needs nginx (.ci/run installs it)")
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / sub).mkdir()
    port = free_port()
    servers = f"        server 127.0.0.1:{free_port()} max_fails=1 fail_timeout=2s;"  # nothing listens there
    (tmp_path / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp_path, servers=servers, port=port))
    proxy = subprocess.Popen([nginx, "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"], stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                native = httpx.post(base + PATH, json={}, headers={"Authorization": f"Bearer {FIRST_KEY}"})
                break
            except httpx.HTTPError:
                assert proxy.poll() is None and time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.1)
        assert (native.status_code, native.headers["retry-after"]) == (503, "1")
        body = native.json()
        assert body["code"] == "ServiceUnavailable" and "retry" in body["message"] and len(body["request_id"]) == 32
        compatible = httpx.post(base + "/compatible-mode/v1/chat/completions", json={})
        assert compatible.status_code == 503 and compatible.json()["error"]["code"] == "ServiceUnavailable"
    finally:
        proxy.send_signal(signal.SIGQUIT)
        proxy.wait(10)
