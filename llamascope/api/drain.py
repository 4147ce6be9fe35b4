"""Stopping without cutting anyone off.

On SIGTERM (or Ctrl+C) the server keeps its address but takes no new requests: each gets
``503 ServiceUnavailable.ShuttingDown`` with ``Retry-After``, so a load balancer or a client retries
elsewhere (``/health`` as well); ``/metrics`` is still served. Requests already running get
``SHUTDOWN_GRACE_SECONDS`` to finish. One still running then is ended by llamascope itself, not cut by
uvicorn: a stream gets a last ``event:error`` block (in the OpenAI-compatible mode, an error chunk), a plain
request a 503 answer, and either is charged what it made.
Only then does uvicorn's own shutdown run, with nothing left to cancel.

A second signal (a second Ctrl+C) stops at once: the grace period ends there, the running requests get their
last event as above, and the server exits within ``HURRY_SECONDS``, without tracebacks. A third signal is
uvicorn's own: it exits without waiting for anything.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from llamascope import errors
from llamascope.api.errors import error_response

log = logging.getLogger("llamascope")

SHUTTING_DOWN = "ServiceUnavailable.ShuttingDown"
# Answered while draining, as any time (see Draining).
SCRAPED_WHILE_DRAINING = frozenset({"/metrics"})
# After the grace period, how long the requests still running get to send their last event and settle.
LAST_WORDS_SECONDS = 5.0
# After a second signal, how long they get for the same, and uvicorn's shutdown after them.
HURRY_SECONDS = 0.5


def refused_while_draining() -> errors.ServiceError:
    return errors.ServiceError(
        503,
        SHUTTING_DOWN,
        "The server is shutting down and takes no new requests; retry the request.",
        headers={"Retry-After": "1", "x-should-retry": "true"},
    )


def stopped_by_shutdown() -> errors.ServiceError:
    return errors.ServiceError(
        503,
        SHUTTING_DOWN,
        "The server shut down before the answer was complete; what was sent so far is charged. Retry the request.",
        headers={"x-should-retry": "true"},
    )


class Drain:
    """The server's state of shutting down, shared by the middleware, the responses and the server."""

    def __init__(self, grace_seconds: float) -> None:
        self.grace_seconds = grace_seconds
        self.active = 0  # requests being answered
        self.began: float | None = None
        self.stop = asyncio.Event()  # set when the grace period is over: running requests end now

    @property
    def draining(self) -> bool:
        return self.began is not None

    def begin(self) -> None:
        if self.began is None:
            self.began = time.monotonic()


class Draining:
    """ASGI middleware: counts requests in and out, and refuses new ones while draining."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Prometheus goes on scraping while the server drains: the requests still running, and what they were
        # charged, are what an operator watches then. /health is refused, so a load balancer takes it out.
        if self.drain.draining and scope["path"] not in SCRAPED_WHILE_DRAINING:
            state = scope.setdefault("state", {})
            state["error_code"] = SHUTTING_DOWN
            await error_response(refused_while_draining(), state.get("request_id", ""), scope["path"])(
                scope, receive, send
            )
            return
        self.drain.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.active -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with a drain before its own shutdown (see the module's docstring)."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._stop_at: float | None = None
        self._announced = False
        self._hurry = False  # a second signal came: stop at once

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: only set state here (logging could deadlock); on_tick acts on it.
        if sig not in (signal.SIGTERM, signal.SIGINT) or self.should_exit:
            super().handle_exit(sig, frame)
            return
        if sig not in self._captured_signals:
            self._captured_signals.append(sig)  # re-raised after shutdown, as uvicorn does (once)
        if self.drain.draining:
            self._hurry = True
        self.drain.begin()

    @property
    def hurried(self) -> bool:
        """Whether a second signal stopped the server."""
        return self._hurry

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and not self.should_exit:
            self._drain_step()
        return await super().on_tick(counter)

    def _drain_step(self) -> None:
        drain = self.drain
        assert drain.began is not None
        waited = time.monotonic() - drain.began
        if not self._announced:
            self._announced = True
            log.info(
                "shutting down: %d requests running get up to %g s to finish; new requests get 503",
                drain.active,
                drain.grace_seconds,
            )
        last_words = HURRY_SECONDS if self._hurry else LAST_WORDS_SECONDS
        if drain.active == 0:
            log.info("shutting down: no requests running")
            self._exit()
        elif (waited >= drain.grace_seconds or self._hurry) and not drain.stop.is_set():
            if self._hurry:
                log.warning("shutting down now (a second signal): ending %d requests still running", drain.active)
            else:
                log.warning("shutting down: ending %d requests still running after %g s", drain.active, waited)
            drain.stop.set()
            self._stop_at = time.monotonic()
        elif self._stop_at is not None and time.monotonic() - self._stop_at > last_words:
            self._exit()

    def _exit(self) -> None:
        if self._hurry:  # what still runs after its last words is cut short by uvicorn within a second
            self.config.timeout_graceful_shutdown = 1
        self.should_exit = True
