"""Image sources against real loopback servers: SSRF refusals, caps, timeouts, data: URIs."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llamascope import errors
from llamascope.images.source import ANONYMOUS, DataUriSource, FetchPolicy, LocalPolicy, is_public, parse_reference

ALLOW_LOOPBACK = FetchPolicy.from_allow_list(["127.0.0.0/8"])


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # CGNAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped
        ("::ffff:10.0.0.1", False),
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("2002:808:808::", True),  # 6to4 of 8.8.8.8
        ("::7f00:1", False),  # IPv4-compatible 127.0.0.1 (Python's is_global says True)
        ("::ffff:0:a00:1", False),  # SIIT's IPv4-translated 10.0.0.1
        ("64:ff9b:1:a00:1::", False),  # NAT64 local-use prefix
        ("fec0::1", False),  # site-local
    ],
)
def test_is_public(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        if self.path == "/ok":
            self._send(b"\x89PNG fake image bytes")
        elif self.path == "/host":
            self._send(self.headers["Host"].encode())
        elif self.path == "/endless":  # no Content-Length: the body runs until the connection closes
            self.send_response(200)
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"x" * 65536)
            except OSError:
                pass
        elif self.path == "/declares-huge":
            self.send_response(200)
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
        elif self.path.startswith("/hop"):
            n = int(self.path[4:] or 0)
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{port}/hop{n + 1}" if n < 10 else "/ok")
            self.end_headers()
        elif self.path == "/to-localhost-name":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{port}/ok")
            self.end_headers()
        elif self.path == "/to-metadata":
            self.send_response(301)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def _send(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def host() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def read(url: str, policy: FetchPolicy) -> bytes:
    return asyncio.run(parse_reference(url, policy).read())


def refused(url: str, policy: FetchPolicy) -> errors.ServiceError:
    with pytest.raises(errors.ServiceError) as info:
        read(url, policy)
    return info.value


def test_loopback_refused_by_default(host: str, caplog: pytest.LogCaptureFixture) -> None:
    error = refused(host + "/ok", FetchPolicy())
    assert error.status == 400 and "private or local network" in error.message
    assert "127.0.0.1" not in error.message and "ALLOW" not in error.message
    # The operator's log says which address, and how to allow it (issue 13).
    [line] = [r.getMessage() for r in caplog.records if "image URL refused" in r.getMessage()]
    assert "127.0.0.1" in line and "LLAMASCOPE_IMAGE_FETCH_ALLOW" in line


def test_names_that_resolve_to_loopback_are_refused(host: str) -> None:
    port = host.rsplit(":", 1)[1]
    error = refused(f"http://localhost:{port}/ok", FetchPolicy())
    assert "private or local network" in error.message


def test_allowed_network_fetches_and_keeps_the_host_header(host: str) -> None:
    assert read(host + "/ok", ALLOW_LOOPBACK) == b"\x89PNG fake image bytes"
    port = host.rsplit(":", 1)[1]
    allow_name = FetchPolicy.from_allow_list(["localhost"])
    assert read(f"http://localhost:{port}/host", allow_name) == f"localhost:{port}".encode()


def test_every_redirect_hop_is_checked(host: str) -> None:
    assert "private or local" in refused(host + "/to-metadata", ALLOW_LOOPBACK).message
    # A hop to a name is resolved and checked again (localhost is loopback: allowed by this policy).
    assert read(host + "/to-localhost-name", ALLOW_LOOPBACK) == b"\x89PNG fake image bytes"
    assert "more than 3 redirects" in refused(host + "/hop0", ALLOW_LOOPBACK).message


def test_byte_cap_counts_what_arrives(host: str) -> None:
    small = FetchPolicy.from_allow_list(["127.0.0.0/8"], max_bytes=100_000)
    # Issue 13, item 10: a URL's body was refused as a "data-uri item"; say what it was.
    for path in ("/endless", "/declares-huge"):
        message = refused(host + path, small).message
        assert "the image URL's body is larger than the limit of 100000 bytes" in message
        assert "data-uri" not in message


def test_stalled_host_times_out() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # accepts connections, never answers
    try:
        policy = FetchPolicy.from_allow_list(["127.0.0.0/8"], total_timeout=0.5)
        error = refused(f"http://127.0.0.1:{listener.getsockname()[1]}/x.png", policy)
        assert error.code == "InvalidParameter.DataInspection" and "timed out" in error.message
    finally:
        listener.close()


def test_fetches_wait_their_turn_server_wide_and_a_long_wait_is_throttled(host: str) -> None:
    """Each fetch holds up to 10 MB as it arrives: at most ``max_fetches`` at once. One that waits as long as a
    fetch may take gets 429 Throttling (the server is busy, not the image at fault); a slot comes back after
    each fetch, whatever its end."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # accepts connections, never answers
    policy = FetchPolicy.from_allow_list(["127.0.0.0/8"], total_timeout=1.0, max_fetches=1)
    stalled = f"http://127.0.0.1:{listener.getsockname()[1]}/x.png"

    async def three() -> list[BaseException | bytes]:
        # Each fetch and each wait take at most 1 s: the first holds the one slot from 0 to 1.0 s, the second
        # waits from 0.3 s and holds it from 1.0 s to 2.0 s, the third waits from 0.4 s until 1.4 s.
        first = asyncio.ensure_future(parse_reference(stalled, policy).read())
        await asyncio.sleep(0.3)
        second = asyncio.ensure_future(parse_reference(stalled, policy).read())
        await asyncio.sleep(0.1)
        third = parse_reference(host + "/ok", policy).read()
        return await asyncio.gather(first, second, third, return_exceptions=True)

    try:
        first, second, third = asyncio.run(three())
    finally:
        listener.close()
    assert all(isinstance(e, errors.ServiceError) and "timed out" in e.message for e in (first, second))
    assert isinstance(third, errors.ServiceError) and (third.status, third.code) == (429, "Throttling")
    assert third.headers == {"Retry-After": "1"}
    assert read(host + "/ok", policy) == b"\x89PNG fake image bytes"  # both slots' holders let go


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "file:///etc/passwd", "/etc/passwd", "gopher://x/"])
def test_other_schemes_refused(url: str) -> None:
    assert "url error" in refused(url, FetchPolicy()).message


def test_oss_needs_the_resolve_header() -> None:
    error = refused("oss://dir/x.png", FetchPolicy())
    assert error.code == "InvalidParameter.DataInspection"


def test_local_files_only_inside_allowed_directories(tmp_path) -> None:
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(b"cat")
    (tmp_path / "secret.txt").write_bytes(b"secret")
    (allowed / "escape.png").symlink_to(tmp_path / "secret.txt")
    (allowed / "loop1.png").symlink_to(allowed / "loop2.png")
    (allowed / "loop2.png").symlink_to(allowed / "loop1.png")
    local = LocalPolicy(allowed_dirs=(allowed,))

    def load(ref: str) -> bytes:
        return asyncio.run(parse_reference(ref, FetchPolicy(), ANONYMOUS, local).read())

    assert load(str(allowed / "cat.png")) == b"cat"
    assert load(f"file://{allowed}/cat.png") == b"cat"
    for ref in (
        str(tmp_path / "secret.txt"),
        str(allowed / "escape.png"),
        f"{allowed}/../secret.txt",
        f"file://{allowed}/cat%00.png",  # a NUL byte (was a 500)
        str(allowed / "loop1.png"),  # a symlink loop (was a 500)
    ):
        with pytest.raises(errors.ServiceError, match="not a file inside a directory"):
            load(ref)
    with pytest.raises(errors.ServiceError, match="must name a local path"):
        load(f"file://otherhost{allowed}/cat.png")


def test_credentials_in_urls_refused() -> None:
    assert "credentials" in refused("http://user:pw@127.0.0.1/x", ALLOW_LOOPBACK).message


def test_data_uris() -> None:
    payload = b"\x89PNG\r\n"
    assert (
        asyncio.run(DataUriSource("data:image/png;base64," + base64.b64encode(payload).decode(), 100).read()) == payload
    )
    assert asyncio.run(DataUriSource("data:,hello%20there", 100).read()) == b"hello there"
    # Wrapped in lines (base64's and MIME's 76 columns): the line breaks do not count against the limit.
    wrapped = base64.encodebytes(b"\x89PNG" * 250).decode()
    assert asyncio.run(DataUriSource("data:image/png;base64," + wrapped, 1000).read()) == b"\x89PNG" * 250
    with pytest.raises(errors.ServiceError, match="max bytes per data-uri item : 100"):
        asyncio.run(DataUriSource("data:image/png;base64," + "A" * 1000, 100).read())
    with pytest.raises(errors.ServiceError, match="base64"):
        asyncio.run(DataUriSource("data:image/png;base64,@@@", 100).read())
    with pytest.raises(errors.ServiceError, match="needs a ','"):
        asyncio.run(DataUriSource("data:image/png;base64", 100).read())


def test_stalled_dns_holds_no_thread_the_rest_of_the_server_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Host lookups that never answer time out with their fetch, and leave asyncio's default executor (which
    asyncio.to_thread uses, as an upstream engine does for token counts) free."""
    release = threading.Event()
    real_getaddrinfo = socket.getaddrinfo

    def stalled(host: str, *args: object, **kwargs: object) -> object:
        if host.endswith("stall.test"):
            release.wait(30)  # a resolver that does not answer
            raise socket.gaierror("no answer")
        return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", stalled)
    policy = FetchPolicy(total_timeout=0.5, max_fetches=40)  # all at once: the lookups' threads are the subject

    async def many() -> tuple[list[object], str]:
        reads = [parse_reference(f"http://h{i}.stall.test/x.png", policy).read() for i in range(40)]
        fetches = asyncio.gather(*reads, return_exceptions=True)
        free = await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 10)
        return await fetches, free

    try:
        results, free = asyncio.run(many())
    finally:
        release.set()
    assert free == "free"
    assert all(isinstance(r, errors.ServiceError) and "timed out" in r.message for r in results)
