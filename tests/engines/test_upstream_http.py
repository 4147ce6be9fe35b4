"""The upstream hop's HTTP/1.1 client against real servers on loopback that answer with exact bytes: framing,
keep-alive and its failures, deadlines, hang-ups and back pressure."""

from __future__ import annotations

import asyncio
import base64
import datetime
import gzip
import ipaddress
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from llamascope.engines.upstream_http import HIGH_WATER, INFLATE_STEP, Client, TransportError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (Content-Length framed, as the client sends them)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.startswith(b"Content-Length")), 0)
    return head, await reader.readexactly(length)


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def serve(handler: Handler, check: Callable[[str, list[int]], Awaitable[None]]) -> None:
    """Run ``check(base_url, connections)`` against a server whose n-th connection ``handler`` answers."""
    connections: list[int] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections))
        try:
            await handler(reader, writer, len(connections) - 1)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await check(f"http://127.0.0.1:{port}", connections)
    finally:
        server.close()


def test_kept_connection_serves_requests_in_turn_with_the_request_as_sent() -> None:
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            head, body = await read_request(reader)
            heads.append(head)
            writer.write(ok(b"echo:" + body))
            await writer.drain()

    async def check(base: str, connections: list[int]) -> None:
        client = Client({"Authorization": "Bearer k"})
        for i in range(3):
            async with client.request("POST", base + "/v1/chat?x=1", 5, b'{"i":%d}' % i, {"x-request-id": "r"}) as r:
                assert r.status == 200
                assert await r.read() == b'echo:{"i":%d}' % i
                assert r.at_end
        await client.close()
        assert connections == [0]  # one connection, kept

    asyncio.run(serve(handler, check))
    head = heads[0].decode()
    assert head.startswith("POST /v1/chat?x=1 HTTP/1.1\r\n")
    for line in ("Host: 127.0.0.1:", "Content-Length: 7", "Authorization: Bearer k", "x-request-id: r"):
        assert line in head


def test_chunked_body_is_read_as_it_arrives() -> None:
    go_on = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"data: 1\n\n"))
        await writer.drain()
        await go_on.wait()  # the rest only once the client has read the first piece
        writer.write(chunk(b"data: 2\n\n") + b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def check(base: str, connections: list[int]) -> None:
        client = Client()
        async with client.request("POST", base + "/", 5, b"{}") as r:
            pieces = []
            async for data in r:
                pieces.append(data)
                if len(pieces) == 1:
                    assert not r.at_end
                    go_on.set()
            assert pieces == [b"data: 1\n\n", b"data: 2\n\n"]
            assert r.at_end
        await client.close()

    asyncio.run(serve(handler, check))


def test_body_ended_by_the_connection_and_gzip() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 0:  # neither length nor chunks: the body ends with the connection
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        else:
            writer.write(ok(gzip.compress(b"unzipped " * 100), b"Content-Encoding: gzip\r\n"))
        await writer.drain()

    async def check(base: str, connections: list[int]) -> None:
        client = Client()
        async with client.request("GET", base + "/", 5) as r:
            assert await r.read() == b"all of it"
        async with client.request("GET", base + "/", 5) as r:
            assert await r.read() == b"unzipped " * 100
        await client.close()
        assert connections == [0, 1]  # the first one was closed, not kept

    asyncio.run(serve(handler, check))


def test_a_compressed_body_is_inflated_a_bounded_step_at_a_time() -> None:
    """32 KiB of gzip holding 32 MiB (a hostile engine's error page): decoded in steps of INFLATE_STEP, so a read
    capped at 8 KiB holds no more than a step, and the whole body still arrives, each byte once."""
    bomb = gzip.compress(bytes(32 << 20))

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        for _ in range(2):
            await read_request(reader)
            writer.write(ok(bomb, b"Content-Encoding: gzip\r\n"))
            await writer.drain()

    async def check(base: str, connections: list[int]) -> None:
        client = Client()
        async with client.request("GET", base + "/", 30) as r:
            assert await r.read(8192) == bytes(8192)
        async with client.request("GET", base + "/", 30) as r:
            sizes = [len(piece) async for piece in r]
        assert sum(sizes) == 32 << 20 and max(sizes) <= INFLATE_STEP
        await client.close()

    asyncio.run(serve(handler, check))


def test_kept_connection_closed_by_the_engine_resends_a_get_but_never_a_post() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(ok(b"ok%d" % n))
        await writer.drain()
        await read_request(reader)  # the next request, on the kept connection: read, then closed unanswered

    async def check(base: str, connections: list[int]) -> None:
        client = Client()
        for expected in (b"ok0", b"ok1"):
            async with client.request("GET", base + "/", 5) as r:
                assert await r.read() == expected
        assert connections == [0, 1]  # the second GET went again, on a new connection
        with pytest.raises(TransportError):  # the engine may have begun a POST: its failover decides
            async with client.request("POST", base + "/", 5, b"{}"):
                pass
        await client.close()
        assert connections == [0, 1]  # not sent again

    asyncio.run(serve(handler, check))


def test_interim_answers_and_idle_bytes_never_reach_a_request() -> None:
    unasked = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 0:  # 103 Early Hints, then the answer
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(ok(b"real"))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 7\r\n\r\ntimeout")  # idle: unasked
            await writer.drain()
            unasked.set()
            await reader.read()
        else:
            writer.write(ok(b"second"))
            await writer.drain()
            await reader.read()

    async def check(base: str, connections: list[int]) -> None:
        client = Client()
        async with client.request("POST", base + "/", 5, b"{}") as r:
            assert (r.status, await r.read()) == (200, b"real")
        await asyncio.wait_for(unasked.wait(), 5)
        kept = next(iter(client._idle.values()))
        for _ in range(200):  # until the kept connection has read the 408 and ended (2 s: under its 4 s of idling)
            if not kept or kept[0].lost:
                break
            await asyncio.sleep(0.01)
        async with client.request("POST", base + "/", 5, b"{}") as r:
            assert (r.status, await r.read()) == (200, b"second")
        await client.close()
        assert connections == [0, 1]

    asyncio.run(serve(handler, check))


def test_a_reset_is_no_end_and_a_passed_deadline_keeps_a_finished_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            head, _ = await read_request(reader)
            if b"/reset" in head:  # a body ended by the connection, but reset: cut off
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npartial")
                await writer.drain()
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            writer.write(ok(b"whole"))
            await writer.drain()

    async def check(base: str, connections: list[int]) -> None:
        client = Client()
        with pytest.raises(TransportError):
            async with client.request("GET", base + "/reset", 5) as r:
                await r.read()
        async with client.request("GET", base + "/", 1) as r:
            assert await r.read() == b"whole"
            await asyncio.sleep(1.2)  # past the deadline, the answer read: nothing to end
        async with client.request("GET", base + "/", 5) as r:
            assert await r.read() == b"whole"
        await client.close()
        assert connections == [0, 1]  # the second connection served both

    asyncio.run(serve(handler, check))


def test_user_and_password_in_the_url_are_sent() -> None:
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        head, _ = await read_request(reader)
        heads.append(head)
        writer.write(ok(b""))
        await writer.drain()

    async def check(base: str, connections: list[int]) -> None:
        url = base.replace("http://", "http://user:p%40ss@") + "/a b"
        async with Client().request("GET", url, 5) as r:
            await r.read()
        async with Client({"Authorization": "Bearer k"}).request("GET", url, 5) as r:  # an API key configured
            await r.read()

    asyncio.run(serve(handler, check))
    assert heads[0].startswith(b"GET /a%20b HTTP/1.1\r\n")
    assert b"Authorization: Basic " + base64.b64encode(b"user:p@ss") + b"\r\n" in heads[0]
    assert b"Authorization: Bearer k\r\n" in heads[1] and b"Basic" not in heads[1]  # the key's, not both


def test_a_new_connection_closed_without_an_answer_is_an_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)

    async def check(base: str, connections: list[int]) -> None:
        client = Client()
        with pytest.raises(TransportError):
            async with client.request("POST", base + "/", 5, b"{}"):
                pass
        assert connections == [0]  # not sent twice

    asyncio.run(serve(handler, check))


def test_nothing_listening_is_an_error() -> None:
    async def refused() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(TransportError, match="cannot connect"):
            async with Client().request("GET", f"http://127.0.0.1:{port}/", 5):
                pass

    asyncio.run(refused())


def test_deadline_ends_a_silent_engine_and_its_connection() -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"one"))
        await writer.drain()
        await reader.read()  # never answers more; returns when the client closes
        closed.set()

    async def check(base: str, connections: list[int]) -> None:
        client = Client()
        with pytest.raises(asyncio.TimeoutError):
            async with client.request("POST", base + "/", 0.3, b"{}") as r:
                async for _ in r:
                    pass
        await asyncio.wait_for(closed.wait(), 5)

    asyncio.run(serve(handler, check))


def test_leaving_early_closes_the_connection() -> None:
    gone = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while True:  # an answer without end, until the client hangs up
                writer.write(chunk(b"more"))
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            gone.set()

    async def check(base: str, connections: list[int]) -> None:
        client = Client()
        async with client.request("POST", base + "/", 5, b"{}") as r:
            async for _ in r:
                break
        await asyncio.wait_for(gone.wait(), 5)
        assert client._idle.get(next(iter(client._idle), None), []) == []  # type: ignore[arg-type]  # not kept

    asyncio.run(serve(handler, check))


def test_a_read_with_a_limit_stops_there_and_its_connection_is_not_kept() -> None:
    """An error page read for its words: an engine that sends more than the limit, or never stops, is not read to
    the end (into memory, or forever); its connection is closed, so the rest never reaches the next request. A
    body within the limit is read whole and its connection kept."""
    sent: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            head, _ = await read_request(reader)
            if b"/small" in head:
                writer.write(ok(b"small"))
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n")
            sent.append(0)
            while sent[-1] < 64 << 20:  # endless, as far as a reader that reads to the end could tell
                writer.write(chunk(b"x" * 65536))
                await writer.drain()
                sent[-1] += 65536
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async def check(base: str, connections: list[int]) -> None:
        client = Client()
        async with client.request("GET", base + "/small", 5) as r:
            assert await r.read(100) == b"small"
        async with client.request("POST", base + "/endless", 30, b"{}") as r:
            assert r.status == 403 and await r.read(100) == b"x" * 100
        async with client.request("GET", base + "/small", 5) as r:  # not on the endless one's connection
            assert (r.status, await r.read()) == (200, b"small")
        await client.close()
        assert connections == [0, 1]

    asyncio.run(serve(handler, check))
    assert sent[0] < 64 << 20  # the engine saw the hang-up, not a reader of all it sent


def test_a_slow_reader_pauses_the_socket() -> None:
    size = 16 << 20

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size >> 16):
            writer.write(b"x" * (1 << 16))
            await writer.drain()

    async def check(base: str, connections: list[int]) -> None:
        client = Client()
        received = 0
        most = 0
        async with client.request("GET", base + "/", 30) as r:
            async for data in r:
                received += len(data)
                await asyncio.sleep(0.002)  # slower than the engine
                most = max(most, r._connection.buffered)
        assert received == size
        # Without the pause, the engine's 16 MB would pile up here while the reader sleeps.
        assert most <= HIGH_WATER + (1 << 20)

    asyncio.run(serve(handler, check))


def test_header_values_cannot_add_lines() -> None:
    with pytest.raises(ValueError):
        Client({"x-a": "b\r\nInjected: 1"})

    async def check() -> None:
        with pytest.raises(ValueError):
            async with Client().request("GET", "http://127.0.0.1:9/", 1, None, {"traceparent": "a\nb"}):
                pass

    asyncio.run(check())


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llamascope test engine")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def test_https_engine_is_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert_file, key_file = self_signed(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert_file, key_file)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request(reader)
            writer.write(ok(b"over TLS"))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def check() -> None:
        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls)
        url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        try:
            with pytest.raises(TransportError, match="cannot connect"):  # not trusted by the system's store
                async with Client().request("GET", url, 5):
                    pass
            monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))  # trusted, as the docs say
            async with Client().request("GET", url, 5) as r:
                assert await r.read() == b"over TLS"
        finally:
            server.close()

    asyncio.run(check())
