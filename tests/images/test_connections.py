"""Kept-alive connections to image hosts (``images/connections.py``): a real loopback HTTP/1.1 host that counts
the connections it is opened."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llamascope.images import connections
from llamascope.images.connections import CLIENTS
from llamascope.images.source import FetchPolicy, parse_reference

ALLOW = FetchPolicy.from_allow_list(["127.0.0.0/8", "localhost"])


class Host(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True
        self.connections = 0
        self.hosts: list[str] = []


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server: Host

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hosts.append(self.headers["Host"])
        body = b"\x89PNG " + self.path.encode()
        if self.path == "/cookie":  # sets a cookie
            body = b"\x89PNG set"
            self.send_response(200)
            self.send_header("Set-Cookie", "who=alice; Path=/")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path == "/echo":  # the cookies it was sent
            body = b"\x89PNG " + (self.headers.get("Cookie") or "none").encode()
        if self.path == "/slow":  # half the body, a pause, the rest
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:4])
            self.wfile.flush()
            time.sleep(0.5)
            self.wfile.write(body[4:])
            return
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/after")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def host() -> Iterator[Host]:
    server = Host()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_fetches_from_one_host_share_a_connection_and_two_names_never_do(host: Host) -> None:
    port = host.server_address[1]

    async def fetches() -> list[bytes]:
        urls = [f"http://127.0.0.1:{port}/{i}" for i in range(3)] + [f"http://localhost:{port}/named"]
        try:
            return [await parse_reference(url, ALLOW).read() for url in urls]
        finally:
            await CLIENTS.aclose()

    bodies = asyncio.run(fetches())
    assert bodies == [b"\x89PNG /0", b"\x89PNG /1", b"\x89PNG /2", b"\x89PNG /named"]
    # 127.0.0.1's three fetches on one connection; localhost, the same address, on its own.
    assert host.connections == 2 and host.hosts[-1] == f"localhost:{port}"


def test_a_new_event_loop_starts_without_the_last_ones_connections(host: Host) -> None:
    url = f"http://127.0.0.1:{host.server_address[1]}/x"
    for _ in range(2):
        assert asyncio.run(parse_reference(url, ALLOW).read()) == b"\x89PNG /x"
    assert host.connections == 2


def test_a_host_evicted_while_its_image_is_read_finishes_the_read(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing an httpx client closes its connections in use: an evicted host's client waits for its fetches."""
    monkeypatch.setattr(connections, "MAX_HOSTS", 1)
    port = host.server_address[1]

    async def fetches() -> list[bytes]:
        slow = asyncio.ensure_future(parse_reference(f"http://127.0.0.1:{port}/slow", ALLOW).read())
        await asyncio.sleep(0.2)  # its headers in, its body under way
        other = await parse_reference(f"http://localhost:{port}/other", ALLOW).read()  # evicts 127.0.0.1's
        try:
            return [await slow, other]
        finally:
            await CLIENTS.aclose()

    assert asyncio.run(fetches()) == [b"\x89PNG /slow", b"\x89PNG /other"]


def test_a_cookie_an_image_host_sets_goes_out_with_no_later_fetch(host: Host) -> None:
    """One caller's fetch must not carry what the host told another's; nor may the jar grow with the host's use."""
    port = host.server_address[1]

    async def fetches() -> bytes:
        try:
            await parse_reference(f"http://127.0.0.1:{port}/cookie", ALLOW).read()
            return await parse_reference(f"http://127.0.0.1:{port}/echo", ALLOW).read()
        finally:
            await CLIENTS.aclose()

    assert asyncio.run(fetches()) == b"\x89PNG none" and host.connections == 1
