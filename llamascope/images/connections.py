"""Kept-alive connections to image hosts: one httpx client per host name, reused across fetches.

A batch job over thousands of images on one bucket, or a busy server whose callers keep one image host,
opened a new connection for every image: a TCP handshake, and for https a TLS one, each a round trip to the
host and the TLS one milliseconds of CPU. Each client here keeps a few idle connections open for a while.

A client serves one host name (scheme, name, port), never two: its connections go to the addresses
``source.UrlSource`` checked and pinned for that name, each opened with the name as its TLS server name and
its certificate verified for it, so no connection made for one name carries a request for another. Every
request is still resolved and checked before it is sent; a connection is reused only to an address the name
resolved to and that passed the check again.

Clients belong to the event loop that made them (a server has one; a new loop finds none); the least
recently used beyond ``MAX_HOSTS`` are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from collections import OrderedDict
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

    def get(self, scheme: str, host: str, port: int) -> httpx.AsyncClient:
        import httpx  # why: see tls

        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # another loop's clients cannot be used (or closed) from this one
            self._loop, self._clients = loop, OrderedDict()
        key = (scheme, host, port)
        client = self._clients.get(key)
        if client is not None:
            self._clients.move_to_end(key)
            return client
        client = httpx.AsyncClient(
            trust_env=False,
            follow_redirects=False,
            verify=tls(),
            limits=httpx.Limits(
                max_connections=None, max_keepalive_connections=IDLE_PER_HOST, keepalive_expiry=IDLE_SECONDS
            ),
        )
        self._clients[key] = client
        while len(self._clients) > MAX_HOSTS:
            _, evicted = self._clients.popitem(last=False)
            # Its fetches under way keep it open until they end; only its idle connections close now.
            task = loop.create_task(evicted.aclose())
            task.add_done_callback(_taken)
        return client

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), OrderedDict()
        if self._loop is asyncio.get_running_loop():
            for client in clients:
                with contextlib.suppress(Exception):
                    await client.aclose()


def _taken(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()  # an evicted client's close that failed: nothing to do about it


CLIENTS = HostClients()
