"""The HTTP/1.1 client of the hop to the upstream engines: a keep-alive pool per origin, responses read as
they arrive, and nothing else.

Written here rather than taken from aiohttp, which made this hop until now, because the hop is most of
what a gateway does: on a 2-core machine, a streamed chat request through aiohttp's client cost about 220 us
of CPU, a fifth of the gateway's budget of 1 ms a request (issue 29), and about 100 us through this one
(bench/upstream_http.py measures both). It does what the hop needs and no more:

- HTTP/1.1 over TCP, or TLS by the event loop (the system's trust store, verified), with keep-alive: idle
  connections are kept per origin for ``KEEP_IDLE_SECONDS``, less than engines served by uvicorn (vLLM,
  SGLang) or llama.cpp keep theirs, so that a request rarely meets a connection the engine is closing. One
  found closed before the request is written is replaced; a GET that got nothing back on a kept connection
  is sent once more on a new one, as aiohttp and Go do, but never a POST, which the engine may have begun
  (its failure goes to the engine's failover);
- bodies framed by Content-Length, chunked, or by the connection's end, parsed by httptools (the parser
  uvicorn serves with); gzip and deflate bodies are decoded, though none is asked for, a bounded step
  at a time (a compressed page of KiB may hold GB);
- a deadline per request (connecting included) that ends it with ``TimeoutError``: for the whole
  request, or (``silence=True``, a streamed answer, however long) for the engine's silence before its head
  and between two reads; and back pressure: a reader slower than the engine stops reading from its socket,
  so its buffer stays bounded;
- a response left before its end closes its connection, so the engine sees the hang-up and stops; interim
  (1xx) responses are skipped, and bytes from an idle connection end it.

No redirects, cookies, proxies, connection limits or HTTP/2: the engines are URLs the operator configured,
and the requests in flight to them are bounded by llamascope's own admission. A user and password in the
URL are sent as Basic authentication, as aiohttp sent them, unless an API key is configured.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
import zlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import httptools

from llamascope import __version__

KEEP_IDLE_SECONDS = 4.0  # engines served by uvicorn (vLLM, SGLang) and llama.cpp's server close theirs after 5 s
IDEMPOTENT = frozenset({"GET", "HEAD"})
MAX_IDLE_PER_ORIGIN = 64
HIGH_WATER = 1 << 16  # bytes received and not yet read, past which reading from the socket pauses
USER_AGENT = f"llamascope/{__version__}"


class TransportError(Exception):
    """The engine could not be reached, or broke the connection or the protocol before its answer's end."""


class Unreachable(TransportError):
    """No connection to the engine could be made: the request never reached it."""


@dataclass(frozen=True)
class _Origin:
    scheme: str
    host: str
    port: int
    host_header: str


@dataclass(frozen=True)
class _Target:
    origin: _Origin
    path: str  # with its query, as sent
    basic: str | None  # an Authorization header from the URL's user and password


def _target(url: str) -> _Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    default = 443 if parts.scheme == "https" else 80
    port = parts.port or default
    host = parts.hostname
    shown = f"[{host.replace('%', '%25')}]" if ":" in host else host  # an IPv6 literal (its zone escaped)
    host_header = shown if port == default else f"{shown}:{port}"
    # As sent on the request line: what a URL may hold unescaped stays, the rest (spaces, non-ASCII) is escaped.
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    basic = None
    if parts.username is not None:
        user_password = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        basic = "Basic " + base64.b64encode(user_password).decode()
    return _Target(_Origin(parts.scheme, host, port, host_header), path, basic)


class _Connection(asyncio.Protocol):
    """One connection and the response being read on it (one at a time)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.busy = False  # a request sent and its response not yet given back: bytes now belong to it
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None  # the request's deadline
        self.silence: float | None = None  # seconds the engine may be silent (None: the deadline is the request's)
        self.last_heard = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self.reset()

    def reset(self) -> None:
        """Ready for the next response."""
        self.status = 0
        self.interim = False  # a 1xx response is being read: skipped
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.framed = False  # Content-Length or chunked: the body's end is in the bytes, not the connection's
        self.encoding = b""
        self.content_type = b""
        self.pieces: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self.received = False  # any byte of this response
        self.error: BaseException | None = None

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport: create_connection's
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # an idle connection has nothing to say (a 408 before closing it, ...): it ends
            self.lost = True
            self.close()
            return
        self.received = True
        self.last_heard = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(TransportError(f"the engine's response is not HTTP/1.1: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.headers_done and not self.complete and not self.framed and self.error is None and exc is None:
            self.complete = True  # a body delimited by the connection's end (closed, not reset): this is its end
            self._wake()
        elif not self.complete:
            self.fail(TransportError(f"the engine closed the connection{f': {exc}' if exc else ''}"))

    # -- httptools callbacks --

    def on_message_begin(self) -> None:
        self.framed = False
        self.encoding = b""
        self.content_type = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-encoding":
            self.encoding = value.strip().lower()
        elif name == b"content-type":
            self.content_type = value.partition(b";")[0].strip().lower()
        elif name in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # interim (100 Continue, 103 Early Hints): the answer follows
            self.interim = True
            return
        self.status = status
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.interim:
            return
        self.pieces.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.keep_alive = self.parser.should_keep_alive()  # read here: the parser forgets it after this call
        self.complete = True
        self._wake()

    # -- for the pool and the response --

    def arm(self, deadline: float, silence: float | None) -> None:
        """End the response with ``TimeoutError`` at ``deadline``, or (``silence``) once the engine has
        sent nothing for that many seconds: the timer moves on to the last byte's time plus ``silence`` when it
        fires (one timer a request, not one a read)."""
        self.silence, self.last_heard = silence, self.loop.time()
        self.timer = self.loop.call_at(deadline, self._time_out)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _time_out(self) -> None:
        if self.silence is not None and (heard_until := self.last_heard + self.silence) > self.loop.time():
            self.timer = self.loop.call_at(heard_until, self._time_out)
            return
        self.timer = None
        self.fail(TimeoutError())

    def fail(self, error: BaseException) -> None:
        """End the response being read with ``error`` (unless it has ended) and close the connection."""
        if self.complete:  # all here: nothing to end (a deadline passing while the caller still holds it)
            return
        if self.error is None:
            self.error = error
        self._wake()
        self.close()

    async def wait(self) -> None:
        """Until something arrives, the response ends, or the connection fails (one reader at a time)."""
        assert self._waiter is None, "two readers of one response"
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def take(self) -> bytes:
        """The body received and not yet read."""
        data = self.pieces[0] if len(self.pieces) == 1 else b"".join(self.pieces)
        self.pieces.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:  # held back by the reader, which reads again: progress
            self.last_heard = self.loop.time()
            self.paused = False
            self.transport.resume_reading()
        return data

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def reusable(self) -> bool:
        return (
            self.complete
            and not self.pieces
            and self.error is None
            and not self.lost
            and self.keep_alive
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


INFLATE_STEP = 256 * 1024  # the most of a compressed body decoded at once


class Response:
    """An engine's response: its status, then its body as it arrives (``async for``: all that has arrived at
    once, joined). An iterator, not a generator: one left unfinished needs no closing."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.status = connection.status
        self.content_type = connection.content_type.decode("latin-1")  # lower case, without its parameters
        encoding = connection.encoding
        self._decoder: Any = None
        if encoding in (b"gzip", b"x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == b"deflate":
            self._decoder = zlib.decompressobj()

    @property
    def at_end(self) -> bool:
        """Whether the whole body has arrived and been read."""
        connection = self._connection
        return connection.complete and not connection.pieces

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        connection = self._connection
        while True:
            if self._decoder is not None and self._decoder.unconsumed_tail:  # what one step left inflated
                data = self._decompress(self._decoder.unconsumed_tail)
                if data:
                    return data
            elif connection.pieces:
                data = connection.take()
                if self._decoder is not None:
                    data = self._decompress(data)
                if data:
                    return data
            elif connection.complete:
                if self._decoder is not None:
                    rest, self._decoder = self._decompress(None), None
                    if rest:
                        return bytes(rest)
                raise StopAsyncIteration
            elif connection.error is not None:
                raise connection.error
            else:
                await connection.wait()

    def _decompress(self, data: bytes | None) -> bytes:
        """The next decoded bytes of the body, at most INFLATE_STEP of them (the input they leave is the
        decoder's ``unconsumed_tail``, decoded next); with None, the last. Bounded: a few KiB of a hostile
        engine's gzip inflate to many MB, and a capped read (an error page's 8 KiB) must hold no more than it."""
        try:
            return self._decoder.decompress(data, INFLATE_STEP) if data is not None else self._decoder.flush()
        except zlib.error as exc:
            raise TransportError(f"the engine's compressed body is broken: {exc}") from None

    async def read(self, limit: int = 1 << 20) -> bytes:
        """The body, or its first ``limit`` bytes (an error page, a count: never large). Reading stops there: the
        rest of a larger (or endless) body is not read, and its connection is closed, not kept."""
        body = bytearray()
        async for data in self:
            body += data[: limit - len(body)]
            if len(body) >= limit:
                break
        return bytes(body)


class Client:
    """Requests to the engines: a pool of kept connections per origin (scheme, host, port)."""

    def __init__(self, headers: Mapping[str, str] | None = None, connect_timeout: float = 5.0) -> None:
        headers = headers or {}
        self.connect_timeout = connect_timeout
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._targets: dict[str, _Target] = {}
        self._tls: ssl.SSLContext | None = None
        self._fixed = _lines(headers)  # every request's
        self._authorized = any(name.lower() == "authorization" for name in headers)
        self._closed = False

    @contextlib.asynccontextmanager
    async def request(
        self,
        method: str,
        url: str,
        timeout: float,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        silence: bool = False,
    ) -> AsyncIterator[Response]:
        """Send a request; the response once its head has arrived. Raises ``TransportError`` where the engine
        cannot be reached or breaks off, ``TimeoutError`` past ``timeout`` seconds: of the whole request,
        or with ``silence`` of the engine sending nothing (connecting included)."""
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = _target(url)
            if len(self._targets) > 256:  # a few URLs per engine: bounded all the same
                self._targets.pop(next(iter(self._targets)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        message = self._message(method, target, body, headers)
        for attempt in (1, 2):
            connection, kept = await self._connection(target.origin, loop, deadline)
            transport = connection.transport
            assert transport is not None  # connected
            connection.arm(deadline, timeout if silence else None)
            connection.busy = True
            try:
                transport.write(message)
                while not connection.headers_done and connection.error is None:
                    await connection.wait()
            except BaseException:  # cancelled
                connection.disarm()
                transport.close()
                raise
            if connection.error is None:
                break
            connection.disarm()
            error = connection.error
            # A kept connection the engine closed as the request went out (its idle timeout, a restart): a GET is
            # sent once more, on a new connection (those kept beside it are likely closed too). Not a POST: the
            # engine may have read it and begun.
            resend = method in IDEMPOTENT and kept and attempt == 1 and not connection.received
            if not (resend and isinstance(error, TransportError)):
                if kept and not connection.received and type(error) is TransportError:  # closed as it was reused
                    raise Unreachable(f"{error} (a kept connection, as the request went out)") from None
                raise error
            for stale in self._idle.pop(target.origin, ()):
                stale.close()
        try:
            yield Response(connection)
        finally:
            connection.disarm()
            idle = self._idle.setdefault(target.origin, [])
            if connection.reusable() and len(idle) < MAX_IDLE_PER_ORIGIN and not self._closed:
                connection.reset()
                connection.busy = False
                connection.idle_since = loop.time()
                idle.append(connection)
            else:  # left before its end, or broken: the engine sees the hang-up and stops
                connection.close()

    async def close(self) -> None:
        """Close the kept connections; those in use close when their response is done with."""
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()

    def _message(self, method: str, target: _Target, body: bytes | None, headers: Mapping[str, str] | None) -> bytes:
        lines = [
            f"{method} {target.path} HTTP/1.1\r\nHost: {target.origin.host_header}\r\n"
            f"User-Agent: {USER_AGENT}\r\nAccept: */*\r\n"
        ]
        if body is not None:
            lines.append(f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
        if target.basic is not None and not self._authorized:
            lines.append(f"Authorization: {target.basic}\r\n")
        head = "".join(lines).encode("latin-1") + self._fixed + (_lines(headers) if headers else b"") + b"\r\n"
        return head + body if body else head

    async def _connection(
        self, origin: _Origin, loop: asyncio.AbstractEventLoop, deadline: float
    ) -> tuple[_Connection, bool]:
        """A kept connection to ``origin`` that is still open (the last kept first), else a new one."""
        idle = self._idle.get(origin)
        now = loop.time()
        while idle:
            connection = idle.pop()
            if not connection.lost and connection.error is None and now - connection.idle_since < KEEP_IDLE_SECONDS:
                return connection, True
            connection.close()
        tls = None
        if origin.scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(loop),
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                ),
                max(0.0, min(self.connect_timeout, deadline - now)),
            )
        except TimeoutError:  # before OSError: on Python 3.11 and later, a TimeoutError is an OSError
            raise Unreachable(f"cannot connect to {origin.host_header}: timed out") from None
        except OSError as exc:  # refused, unreachable, a name that does not resolve, TLS refused
            raise Unreachable(f"cannot connect to {origin.host_header}: {exc}") from None
        return connection, False


def _lines(headers: Mapping[str, str]) -> bytes:
    """Header lines as sent; a name or value that would break the request's lines is refused."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    for name, value in headers.items():
        if not name.strip() or ":" in name or any(c in name or c in value for c in "\r\n\0"):
            raise ValueError(f"header {name!r} cannot be sent: an empty name, a colon in it, or a line break")
    try:
        return lines.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("a header outside Latin-1 cannot be sent") from None
