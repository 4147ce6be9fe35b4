"""What a caller over its limits, or a careless one, may cost the server: each refused as early as it can be."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.accounts.test_access import PATH, admin
from tests.conftest import SEED_MODEL, Server, generation_body, png_bytes, refused_unread, start_server
from tests.services import fresh_database


class Recorder:
    """A loopback image host that writes down every path asked of it; ``/slow`` answers once ``gate`` opens."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.gate = threading.Event()
        image = png_bytes()
        host = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                host.seen.append(self.path)
                if self.path == "/missing.png":
                    self.send_response(404)
                    self.end_headers()
                    return
                if self.path == "/slow.png":
                    host.gate.wait(60)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def wait_for(self, path: str) -> None:
        deadline = time.monotonic() + 30
        while path not in self.seen:
            assert time.monotonic() < deadline, f"{path} never asked for: {self.seen}"
            time.sleep(0.02)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    host = Recorder()
    yield host
    host.gate.set()
    host.httpd.shutdown()


def post(server: Server, key: str, image: str) -> httpx.Response:
    body = generation_body(image, max_tokens=1)
    return httpx.post(server.base + PATH, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def hold_the_slot(server: Server, key: str, recorder: Recorder) -> socket.socket:
    """A key's one slot, held by a request whose image is slow to come; sent by hand, so that it can hang up."""
    held = socket.create_connection(("127.0.0.1", int(server.base.rsplit(":", 1)[1])))
    payload = json.dumps(generation_body(recorder.url("/slow.png"), max_tokens=1)).encode()
    held.sendall(
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    recorder.wait_for("/slow.png")
    return held


@pytest.fixture(params=["sqlite", pytest.param("postgresql+redis", marks=[pytest.mark.postgres, pytest.mark.redis])])
def stores(request: pytest.FixtureRequest, server: Server, tmp_path: Path) -> Iterator[Server]:
    """The session server (SQLite, limits in the process), or one on PostgreSQL with its limits in Redis."""
    if request.param == "sqlite":
        yield server
        return
    url = os.environ.get("LLAMASCOPE_TEST_DATABASE_URL")
    if not url:
        pytest.skip("LLAMASCOPE_TEST_DATABASE_URL is not set (.ci/run starts a PostgreSQL)")
    redis = request.getfixturevalue("redis_server")
    shared = start_server(
        tmp_path, env={"LLAMASCOPE_DATABASE_URL": fresh_database(url), "LLAMASCOPE_REDIS_URL": redis.url}
    )
    yield shared
    shared.stop()


def test_a_key_at_its_concurrency_limit_costs_no_image_fetch(stores: Server, recorder: Recorder) -> None:
    """The rate limits were checked after the images were fetched and decoded: a key at its concurrency
    limit made the server fetch each new request's image before its 429. Now the slot is taken before any
    fetch, and given back on every path: a request whose caller hangs up mid-fetch, one whose image is
    refused."""
    server = stores
    key = admin(server, "POST", "/keys", concurrency=1)["api_key"]
    held = hold_the_slot(server, key, recorder)

    refused = post(server, key, recorder.url("/other.png"))
    assert (refused.status_code, refused.json()["code"]) == (429, "Throttling.RateQuota"), refused.text
    assert "at most 1 concurrent" in refused.json()["message"]
    assert recorder.seen == ["/slow.png"]  # the refused request's image was never asked for

    held.close()  # the caller hangs up while its image is fetched: its slot comes back
    deadline = time.monotonic() + 15
    while (r := post(server, key, recorder.url("/after-hangup.png"))).status_code == 429:
        assert time.monotonic() < deadline, "the slot of a request that hung up mid-fetch never came back"
        time.sleep(0.1)
    assert r.status_code == 200, r.text

    # An image refused (404): 400, and the slot is free at once for the next request.
    assert post(server, key, recorder.url("/missing.png")).status_code == 400
    assert post(server, key, recorder.url("/next.png")).status_code == 200


@pytest.mark.parametrize(
    "path",
    [PATH, "/api/v1/services/aigc/text-generation/generation", "/compatible-mode/v1/chat/completions", "/tokenize"],
)
def test_a_key_at_its_concurrency_limit_makes_the_server_read_no_body(
    stores: Server, recorder: Recorder, path: str
) -> None:
    """The concurrency was checked once the body was read: a key at its bound made the server read and hold a
    body of up to MAX_BODY_BYTES (32 MB) for each request it sent on, to answer 429. It is refused, with the
    same 429, before a byte of the body is read; a key with room left is still served."""
    server = stores
    key = admin(server, "POST", "/keys", concurrency=1)["api_key"]
    held = hold_the_slot(server, key, recorder)
    status, body = refused_unread(server, path, "Content-Type: application/json\r\n", '{"model": "', 30 * 2**20, key)
    assert status.startswith(b"HTTP/1.1 429"), status
    code = body["error"]["code"] if "error" in body else body["code"]  # the OpenAI shape on its surfaces
    message = body["error"]["message"] if "error" in body else body["message"]
    assert code == "Throttling.RateQuota" and "at most 1 concurrent" in message, body
    held.close()
    deadline = time.monotonic() + 15
    while (r := post(server, key, recorder.url("/after.png"))).status_code == 429:
        assert time.monotonic() < deadline, "the slot never came back"
        time.sleep(0.1)
    assert r.status_code == 200, r.text


def tokenize(server: Server, key: str, image: str | None = None) -> httpx.Response:
    content: list[dict] = [{"type": "text", "text": "What is it?"}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    body = {"model": SEED_MODEL, "messages": [{"role": "user", "content": content}]}
    return httpx.post(server.base + "/tokenize", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_tokenize_is_no_way_around_a_keys_limits(server: Server, recorder: Recorder) -> None:
    """POST /tokenize fetched and decoded a request's images whatever the key's limits: a free way round them.
    It holds one of the key's concurrent requests while it counts, and a key over its limits is refused; it
    is not counted in the requests per minute (an llamascope in front counts each prompt before its call)."""
    key = admin(server, "POST", "/keys", concurrency=1)["api_key"]
    held = hold_the_slot(server, key, recorder)
    refused = tokenize(server, key, recorder.url("/counted.png"))
    assert refused.status_code == 429 and "at most 1 concurrent" in refused.json()["error"]["message"], refused.text
    assert recorder.seen == ["/slow.png"]
    held.close()
    deadline = time.monotonic() + 15
    while (r := tokenize(server, key, recorder.url("/counted.png"))).status_code == 429:
        assert time.monotonic() < deadline, "the slot never came back"
        time.sleep(0.1)
    assert r.status_code == 200 and r.json()["count"] > 0, r.text
    assert tokenize(server, key).status_code == 200  # its slot was given back

    key = admin(server, "POST", "/keys", rpm=2)["api_key"]
    assert [tokenize(server, key).status_code for _ in range(3)] == [200] * 3  # not counted per minute
    assert [post(server, key, recorder.url("/next.png")).status_code for _ in range(3)] == [200, 200, 429]
    assert tokenize(server, key).status_code == 429  # the key is over its requests per minute
