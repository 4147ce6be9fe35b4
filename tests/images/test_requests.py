"""Image intake as requests to a real server meet it: how a data: URI may be written, and a fetch whose
client leaves. The server (tests/conftest.py) may fetch from 127.0.0.1 (LLAMASCOPE_IMAGE_FETCH_ALLOW)."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import Server, generation_body, png_bytes

GENERATION = "/api/v1/services/aigc/multimodal-generation/generation"


def test_url_safe_and_unpadded_base64_is_the_same_image(server: Server) -> None:
    """Base64 in the URL-safe alphabet without padding (Go's RawURLEncoding, JavaScript's base64url) is read
    as the standard alphabet is (it was refused as "not valid base64")."""
    image = png_bytes((250, 180, 20), (500, 400))
    url_safe = base64.urlsafe_b64encode(image).decode().rstrip("=")
    assert ("-" in url_safe or "_" in url_safe) and len(url_safe) % 4
    usage = []
    for payload in (base64.b64encode(image).decode(), url_safe):
        r = httpx.post(
            server.base + GENERATION,
            json=generation_body("data:image/png;base64," + payload, max_tokens=1),
            headers={"Authorization": f"Bearer {server.key}"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        usage.append(r.json()["usage"]["image_tokens"])
    assert usage[0] == usage[1]


@pytest.mark.parametrize(
    "spelling",
    ["; base64", "percent-encoded", "percent-encoded lines"],
)
def test_data_uris_as_browsers_read_them_are_the_same_image(server: Server, spelling: str) -> None:
    """Spellings a browser's data: URL reader takes (WHATWG fetch: spaces between ";" and "base64"; the payload
    percent-decoded before base64, as a URI put through encodeURIComponent or urllib's quote has it): the first
    was read as percent-encoded bytes ("not an image in a known format"), the others "not valid base64"."""
    image = png_bytes((20, 160, 90), (300, 200))
    plain = base64.b64encode(image).decode()
    assert "+" in plain or "/" in plain
    uris = {
        "; base64": "data:image/png; base64," + plain,
        "percent-encoded": "data:image/png;base64," + quote(plain, safe=""),
        "percent-encoded lines": "data:image/png;base64," + quote(base64.encodebytes(image).decode(), safe=""),
    }
    usage = []
    for uri in ("data:image/png;base64," + plain, uris[spelling]):
        r = httpx.post(
            server.base + GENERATION,
            json=generation_body(uri, max_tokens=1),
            headers={"Authorization": f"Bearer {server.key}"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        usage.append(r.json()["usage"]["image_tokens"])
    assert usage[0] == usage[1]


class StalledHost:
    """An image host that takes the connection, reads the request and never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.asked = threading.Event()
        self.closed = threading.Event()  # the fetcher closed its connection
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection:
            connection.recv(65536)
            self.asked.set()
            while connection.recv(65536):
                pass
            self.closed.set()


@pytest.fixture
def stalled() -> Iterator[StalledHost]:
    host = StalledHost()
    yield host
    host.listener.close()


def test_a_fetch_ends_when_its_client_hangs_up(server: Server, stalled: StalledHost) -> None:
    """A client that leaves while its image is fetched ends the fetch: it ran on to its 15 s deadline, for
    nobody, answered as a timed-out download."""
    request_id = uuid.uuid4().hex
    connection = http.client.HTTPConnection(server.base.removeprefix("http://"), timeout=30)
    body = json.dumps(generation_body(f"http://127.0.0.1:{stalled.port}/slow.png", max_tokens=1))
    headers = {"Authorization": f"Bearer {server.key}", "Content-Type": "application/json", "X-Request-Id": request_id}
    connection.request("POST", GENERATION, body, headers)
    assert stalled.asked.wait(30)
    connection.close()  # the client hangs up while its image is being fetched
    line = access_line(server, request_id)
    assert "error=ClientClosedRequest" in line and "client=disconnected" in line, line
    assert stalled.closed.wait(10)


def access_line(server: Server, client_request_id: str) -> str:
    """The access-log line of the request sent with ``X-Request-Id: client_request_id`` (written as it ends)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in server.log().splitlines():
            if f"client_request_id={client_request_id}" in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no access line for {client_request_id}:\n{server.log()[-3000:]}")
