"""Requests that name one image URL at once fetch it once (``images/inflight.py``, ``ImageIntake._load_url``),
through the real server (tests/conftest.py) and a real loopback image host that counts its GETs.

Every request here names two images: the slow URL they share, then a marker URL of its own that the host
answers at once. A request's images are loaded together, the first one first: once the host has seen every
request's marker, every request is waiting for the slow URL (without single flight, each had asked the host
for it by then); only then does the host answer the slow URL."""

from __future__ import annotations

import http.client
import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.conftest import SEED_MODEL, Server, png_bytes

GENERATION = "/api/v1/services/aigc/multimodal-generation/generation"
PNG = png_bytes((30, 120, 200), (64, 48))
N = 5  # requests at once


class Host(ThreadingHTTPServer):
    """``/slow/...`` answers once ``gate`` opens (``/slow/missing...``: 404), with ``headers``;
    ``/stall/...`` never answers, and notes when the fetcher closes the connection; ``/mark/...`` at once."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True
        self.gets: Counter[str] = Counter()
        self.seen = threading.Condition()
        self.gate = threading.Event()
        self.closed = threading.Event()  # a /stall/ connection was closed by the fetcher
        self.headers = {"Cache-Control": "max-age=60"}

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def wait_for(self, prefix: str, count: int, timeout: float = 60) -> None:
        with self.seen:
            assert self.seen.wait_for(lambda: self.asked(prefix) >= count, timeout), self.gets

    def asked(self, prefix: str) -> int:
        return sum(n for path, n in self.gets.items() if path.startswith(prefix))


class Handler(BaseHTTPRequestHandler):
    server: Host

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        host = self.server
        with host.seen:
            host.gets[self.path] += 1
            host.seen.notify_all()
        if self.path.startswith("/stall/"):
            while self.connection.recv(65536):
                pass
            host.closed.set()
            return
        if self.path.startswith("/slow/"):
            host.gate.wait(60)
        if "missing" in self.path:
            self.send_error(404)
            return
        self.send_response(200)
        for name, value in host.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        self.wfile.write(PNG)


@pytest.fixture
def host() -> Iterator[Host]:
    server = Host()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.gate.set()
    server.shutdown()


def body(*images: str) -> dict[str, object]:
    content = [{"image": image} for image in images] + [{"text": "What is in the picture?"}]
    return {
        "model": SEED_MODEL,
        "input": {"messages": [{"role": "user", "content": content}]},
        "parameters": {"max_tokens": 1},
    }


def generate(server: Server, *images: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {server.key}"}
    return httpx.post(server.base + GENERATION, json=body(*images), headers=headers, timeout=90)


def at_once(server: Server, host: Host, slow: str, count: int = N) -> list[httpx.Response]:
    """``count`` requests naming ``slow`` and a marker each, the host's answer to ``slow`` held until all wait."""
    with ThreadPoolExecutor(count) as pool:
        replies = [pool.submit(generate, server, slow, host.url(f"/mark/{uuid.uuid4().hex}.png")) for _ in range(count)]
        host.wait_for("/mark/", count)
        host.gate.set()
        return [reply.result() for reply in replies]


def hang_up_later(server: Server, *images: str) -> tuple[http.client.HTTPConnection, str]:
    """A request sent on a connection of its own, to be closed (hung up) later; its X-Request-Id."""
    client_id = uuid.uuid4().hex
    connection = http.client.HTTPConnection(server.base.removeprefix("http://"), timeout=60)
    headers = {"Authorization": f"Bearer {server.key}", "Content-Type": "application/json", "X-Request-Id": client_id}
    connection.request("POST", GENERATION, json.dumps(body(*images)), headers)
    return connection, client_id


def hung_up(server: Server, client_id: str) -> None:
    """Once the server has answered the hung-up request ``client_id`` as a client that left."""
    line = server.access_line(client_id)  # the client's id, logged as client_request_id=...
    assert "error=ClientClosedRequest" in line, line


@pytest.mark.parametrize("headers", [{"Cache-Control": "max-age=60"}, {"ETag": '"v1"'}], ids=["fresh", "etag"])
def test_requests_naming_one_url_at_once_fetch_it_once(server: Server, host: Host, headers: dict[str, str]) -> None:
    """A batch whose lines name one image, or a burst of chat requests: each request fetched it while none had
    finished (8 fetches for 200 lines, 8 at once)."""
    host.headers = headers
    slow = f"/slow/{uuid.uuid4().hex}.png"
    replies = at_once(server, host, host.url(slow))
    assert [r.status_code for r in replies] == [200] * N, replies[0].text
    assert host.gets[slow] == 1


@pytest.mark.parametrize(
    "headers",
    [{"Cache-Control": "no-store, max-age=60"}, {"Cache-Control": "private, max-age=60"}, {"Vary": "*"}, {}],
    ids=["no-store", "private", "vary-star", "says nothing"],
)
def test_an_answer_a_shared_cache_may_not_reuse_serves_its_own_request_alone(
    server: Server, host: Host, headers: dict[str, str]
) -> None:
    """The requests that waited for it fetch the URL again, each (RFC 9111 section 4: collapsed requests a
    shared cache cannot use the answer for are forwarded); later ones fetch it each at once, not after waiting."""
    host.headers = headers
    slow = f"/slow/{uuid.uuid4().hex}.png"
    replies = at_once(server, host, host.url(slow))
    assert [r.status_code for r in replies] == [200] * N, replies[0].text
    assert host.gets[slow] == N
    host.gate.clear()
    with ThreadPoolExecutor(N) as pool:
        later = [pool.submit(generate, server, host.url(slow)) for _ in range(N)]
        host.wait_for(slow, 2 * N, timeout=20)  # all asked while the host holds its answers: none waits for another
        host.gate.set()
        assert [reply.result().status_code for reply in later] == [200] * N


def test_spellings_of_one_url_are_one_fetch(server: Server, host: Host) -> None:
    slow = f"/slow/{uuid.uuid4().hex}.png"
    port = host.server_address[1]
    spellings = [f"http://127.0.0.1:{port}{slow}", f"HTTP://127.0.0.1:{port}{slow}#top"]
    with ThreadPoolExecutor(2) as pool:
        marks = [host.url(f"/mark/{uuid.uuid4().hex}.png") for _ in spellings]
        replies = [pool.submit(generate, server, url, mark) for url, mark in zip(spellings, marks, strict=True)]
        host.wait_for("/mark/", 2)
        host.gate.set()
        assert [r.result().status_code for r in replies] == [200, 200]
    assert host.gets[slow] == 1


def test_a_failed_fetch_is_each_requests_own_400(server: Server, host: Host) -> None:
    slow = f"/slow/missing-{uuid.uuid4().hex}.png"
    replies = at_once(server, host, host.url(slow))
    assert host.gets[slow] == 1
    ids = set()
    for reply in replies:
        answer = reply.json()
        assert reply.status_code == 400, answer
        assert answer["code"] == "InvalidParameter" and "HTTP 404" in answer["message"], answer
        assert answer["request_id"] == reply.headers["x-request-id"]
        ids.add(answer["request_id"])
    assert len(ids) == N


def test_the_first_request_hanging_up_leaves_the_fetch_to_the_others(server: Server, host: Host) -> None:
    slow = f"/slow/{uuid.uuid4().hex}.png"
    first, client_id = hang_up_later(server, host.url(slow))
    host.wait_for(slow, 1)  # its fetch is under way
    with ThreadPoolExecutor(N) as pool:
        replies = [
            pool.submit(generate, server, host.url(slow), host.url(f"/mark/{uuid.uuid4().hex}.png")) for _ in range(N)
        ]
        host.wait_for("/mark/", N)
        first.close()  # the request that started the fetch hangs up
        hung_up(server, client_id)
        host.gate.set()
        assert [r.result().status_code for r in replies] == [200] * N
    assert host.gets[slow] == 1


def test_a_fetch_nobody_waits_for_any_more_ends(server: Server, host: Host) -> None:
    """Each request that waited hangs up: the fetch ends then, not at its deadline (15 s later)."""
    stall = host.url(f"/stall/{uuid.uuid4().hex}.png")
    waiting = [hang_up_later(server, stall, host.url(f"/mark/{uuid.uuid4().hex}.png")) for _ in range(2)]
    host.wait_for("/mark/", 2)
    (first, first_id), (second, second_id) = waiting
    first.close()
    hung_up(server, first_id)
    assert not host.closed.is_set()  # still fetched for the second
    second.close()
    hung_up(server, second_id)
    assert host.closed.wait(10)
    assert host.asked("/stall/") == 1
