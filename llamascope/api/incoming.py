"""Reading a request and watching its client, the same way on every surface."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request

from llamascope import errors
from llamascope.conversation.service import Event, Reply
from llamascope.images.source import SourceContext

CLIENT_CLOSED = 499  # nginx's code for a client that left before the answer
T = TypeVar("T")


def envelope(body: object) -> dict[str, Any]:
    """The checks every surface makes of a request body first: a JSON object naming a model."""
    if not isinstance(body, dict):
        raise errors.invalid_parameter("The request body must be a JSON object.")
    if body.get("model") in (None, ""):
        raise errors.ServiceError(400, "BadRequest.EmptyModel", 'Required parameter "model" missing from request.')
    return body


async def read_json(request: Request) -> object:
    body = await request.body()
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.invalid_parameter(f"The request body is not valid JSON: {exc}") from None


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run ``work``; if the client hangs up first, cancel it and return None."""
    task = asyncio.ensure_future(work)

    async def hangup() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(hangup())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
    if not task.done() or task.cancelled():
        with contextlib.suppress(BaseException):
            await task  # let the cancelled reply run its cleanup (it cancels the engine)
        return None
    return task.result()


def source_context(request: Request) -> SourceContext:
    """Whose request this is, and whether it may name uploaded oss:// objects."""
    return SourceContext(
        owner=request.state.principal.key_id,
        resolve_oss=request.headers.get("x-dashscope-ossresourceresolve", "").strip().lower() == "enable",
    )


async def first_event(request: Request, reply: Reply) -> AsyncIterator[Event] | None:
    """Start a streamed reply before its response does, and return its events from the first one on.

    What fails before the first event (a full engine queue, a wait too long, an upstream that
    refuses) is then a plain HTTP error with its true status, as the wire spec asks of errors
    found before streaming starts. None: the client hung up while waiting.
    """
    events = reply.events()

    async def pull() -> Event:
        return await anext(events)

    try:
        first = await unless_disconnected(request, pull())
    except BaseException:
        await events.aclose()
        raise
    if first is None:
        await events.aclose()
        return None

    async def chained() -> AsyncIterator[Event]:
        try:
            yield first
            async for event in events:
                yield event
        finally:
            await events.aclose()

    return chained()
