"""Kept-alive connections to image hosts: one httpx client per host name, reused across fetches.

A batch job over thousands of images on one bucket, or a busy server whose callers keep one image host,
opened a new connection for every image: a TCP handshake, and for https a TLS one, each a round trip to the
host and the TLS one milliseconds of CPU. Each client here keeps a few idle connections open for a while.

A client serves one host name (scheme, name, port), never two: its connections go to the addresses
``source.UrlSource`` checked and pinned for that name, each opened with the name as its TLS server name and
its certificate verified for it, so no connection made for one name carries a request for another. Every
request is still resolved and checked before it is sent; a connection is reused only to an address the name
resolved to and that passed the check again.

A client is lent for one request and its answer (``lend``): the least recently used beyond ``MAX_HOSTS`` are
closed, each once its last request lent is done (closing an httpx client closes its connections in use too,
cutting the fetches under way). Clients keep no cookies: an image host's ``Set-Cookie`` from one caller's fetch
would go out with every later caller's, and the jar would grow for as long as the host is used.

Clients belong to the event loop that made them (a server has one; a new loop finds none).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from collections import OrderedDict
from collections.abc import Iterator
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

MAX_HOSTS = 32  # host names with a client kept
IDLE_PER_HOST = 4  # connections kept open between fetches, each host
IDLE_SECONDS = 30.0  # how long an idle connection is kept


@functools.cache
def tls() -> ssl.SSLContext:
    """The TLS settings of every image fetch, made once: httpx makes them anew for each client it builds (the
    CA bundle read again), 20-25 ms of the event loop's time for each image URL."""
    import httpx  # why: its import (rich included) is 0.1-0.2 s of a gateway's start; only URLs need it

    return httpx.create_ssl_context(trust_env=False)


class HostClients:
    """httpx clients by host name, for the running event loop."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: OrderedDict[tuple[str, str, int], httpx.AsyncClient] = OrderedDict()
        self._lent: dict[httpx.AsyncClient, int] = {}  # requests under way, by client
        self._closing: set[asyncio.Task[None]] = set()

    @contextlib.contextmanager
    def lend(self, scheme: str, host: str, port: int) -> Iterator[httpx.AsyncClient]:
        """The host name's client, for one request and the reading of its answer."""
        client = self._client(scheme, host, port)
        self._lent[client] = self._lent.get(client, 0) + 1
        try:
            yield client
        finally:
            left = self._lent.pop(client, 1) - 1
            if left:
                self._lent[client] = left
            elif client not in self._clients.values():  # evicted while lent: its last request is done
                self._close(client)

    def _client(self, scheme: str, host: str, port: int) -> httpx.AsyncClient:
        import httpx  # why: see tls

        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # another loop's clients cannot be used (or closed) from this one
            self._loop, self._clients, self._lent = loop, OrderedDict(), {}
        key = (scheme, host, port)
        client = self._clients.get(key)
        if client is not None:
            self._clients.move_to_end(key)
            return client
        client = httpx.AsyncClient(
            trust_env=False,
            follow_redirects=False,
            verify=tls(),
            cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),  # none kept: see the module's docstring
            limits=httpx.Limits(
                max_connections=None, max_keepalive_connections=IDLE_PER_HOST, keepalive_expiry=IDLE_SECONDS
            ),
        )
        self._clients[key] = client
        while len(self._clients) > MAX_HOSTS:
            _, evicted = self._clients.popitem(last=False)
            if evicted not in self._lent:  # else closed when its last request is done (lend)
                self._close(evicted)
        return client

    def _close(self, client: httpx.AsyncClient) -> None:
        task = asyncio.get_running_loop().create_task(client.aclose())
        self._closing.add(task)  # the loop holds its tasks weakly
        task.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        if not task.cancelled():
            task.exception()  # an evicted client's close that failed: nothing to do about it

    async def aclose(self) -> None:
        clients, self._clients, self._lent = list(self._clients.values()), OrderedDict(), {}
        if self._loop is asyncio.get_running_loop():
            for client in clients:
                with contextlib.suppress(Exception):
                    await client.aclose()


CLIENTS = HostClients()
