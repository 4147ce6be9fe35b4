"""Reading a request and watching its client, the same way on every surface."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import orjson
from fastapi import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from llamascope import errors
from llamascope.api.drain import SHUTTING_DOWN, stopped_by_shutdown
from llamascope.api.errors import error_response, request_id_of
from llamascope.batch.caller import KEY_EXTENSION
from llamascope.conversation.rules import lone_surrogate
from llamascope.conversation.service import ConversationService, Endpoint, Event, Reply
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


# Deeper than any request needs (a JSON Schema of ten levels is already rare); deep enough bodies would
# otherwise end in a RecursionError, in the parser or in whatever walks the body after it: a 500.
MAX_JSON_DEPTH = 128


async def read_json(request: Request) -> object:
    """The request's JSON body, checked (``_fault``); the served model it names is kept on the request for its
    log line (``_note_model``)."""
    value = parse_body(await request.body())
    _note_model(request, value)
    return value


def parse_body(body: bytes) -> object:
    """``body`` as JSON, checked (``_fault``), or the ServiceError that says why it is not usable.

    It runs on the event loop, so it is made cheap (bench/json_body.py): orjson parses, and the cyclic
    garbage collector is paused meanwhile (each 700 containers created set it off, and its sweeps of the
    server's whole heap were most of a large body's time). orjson refuses all that Python's json reads
    beyond JSON (NaN and Infinity, which the parameter checks then name; 1e400 read as inf; a BOM; UTF-16;
    lone surrogates, which ``_fault`` names; nesting past 1,024) and reads integers past 64 bits as floats:
    those bodies, and any that orjson refused, are read by json, as they always were, so each answer stays
    the same."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _parse_slowly(body)
        checked = _checked(value)
        if checked is None:  # a float past 64-bit integers: perhaps an integer literal orjson did not keep
            return _parse_slowly(body)
        if not checked:
            raise _too_deep()
        return value
    finally:
        if enabled:
            gc.enable()


def _parse_slowly(body: bytes) -> object:
    """``body`` read by Python's json, and checked for all ``_fault`` finds."""
    try:
        value = json.loads(body)
    except RecursionError:  # nested past the parser's own limit
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.invalid_parameter(f"The request body is not valid JSON: {exc}") from None
    fault = _fault(value)
    if fault is not None:
        raise fault
    return value


# orjson reads integers in [-2**63, 2**64) as int, the rest as float: a float this large may have been one.
_WIDE = 2.0**63


def _checked(value: object) -> bool | None:
    """For a value orjson read: False if it nests deeper than MAX_JSON_DEPTH, None if it holds a float of
    magnitude 2**63 or more (json must read it again), True otherwise. No lone surrogate needs looking for:
    orjson refuses them. ``_fault``'s walk less its look at every string and key: under half its time."""
    stack: list[tuple[dict[Any, Any] | list[Any], int]] = [([value], 0)]
    wide = False
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return False
        for child in item.values() if type(item) is dict else item:
            kind = type(child)
            if kind is dict or kind is list:
                stack.append((child, depth + 1))
            elif kind is float and not -_WIDE < child < _WIDE:
                wide = True
    return None if wide else True


# A body up to this size is read before the key's concurrency is looked at (the slot's own check refuses it just
# after, the same 429): the look costs a Redis round trip with shared limits, on every request of a limited key.
EARLY_LOOK_BYTES = 1 << 20


async def read_call_json(request: Request) -> object:
    """``read_json`` for a request that takes one of its key's concurrent slots (a generation, a count of
    tokens): a key at its bound is refused with the 429 of the slot's own check before a byte of a large body
    (or one of no stated length) is read (``Accounts.refuse_when_full``)."""
    principal = getattr(request.state, "principal", None)
    length = request.headers.get("content-length", "")
    if principal is not None and (not length.isdigit() or int(length) > EARLY_LOOK_BYTES):
        service: ConversationService = request.app.state.service
        await service.accounts.refuse_when_full(principal)
    return await read_json(request)


def _note_model(request: Request, body: object) -> None:
    """The model ``body`` names, kept on the request (``state.model``) if it is served: the access-log line and
    the key's count of refusals (``Authentication``) name it should the request be refused before it runs. An
    unknown name is not kept: the counts stay bounded, and the log says ``model=-``."""
    model = body.get("model") if isinstance(body, dict) else None
    if isinstance(model, str) and model in request.app.state.service.engines:
        request.state.model = model


def _fault(value: object) -> errors.ServiceError | None:
    """What makes a parsed body unusable though it parsed: an array or object more than MAX_JSON_DEPTH levels
    deep, or a string holding a lone surrogate (``lone_surrogate``: no text can be encoded with one, so it would
    fail as a 500 wherever it is: the prompt, an error message echoing it).

    One walk over the containers, without recursion: its cost is their number, not the body's bytes (``isascii``
    is a flag of the string, so a 10 MB data: URI costs nothing; scanning the raw bytes for brackets and escapes
    took 10 ms for one).
    """
    stack: list[tuple[dict[Any, Any] | list[Any], int]] = [([value], 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return _too_deep()
        for child in (*item, *item.values()) if isinstance(item, dict) else item:  # keys too
            if type(child) is str:
                if lone_surrogate(child):
                    return errors.invalid_parameter(
                        "The request body is not valid JSON: a string holds a lone surrogate (one half of a pair, "
                        "\\ud800 to \\udfff, as a string cut inside an emoji has), which is no character; send "
                        "text as UTF-8."
                    )
            elif isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return None


def _too_deep() -> errors.ServiceError:
    return errors.invalid_parameter(f"The request body is nested too deeply: at most {MAX_JSON_DEPTH} levels.")


async def until_hangup(
    receive: Receive, work: Awaitable[T], stop: asyncio.Event | None = None, on_stop: Callable[[], None] | None = None
) -> tuple[bool, T | None]:
    """Run ``work`` unless the client hangs up first: (True, its result), or (False, None) once cancelled.

    Its errors are raised. A cancelled ``work`` gets to run its cleanup (a reply cancels its engine).
    ``stop`` (the server's shutdown, see ``api.drain``) ends ``work`` too: ``on_stop`` is called, ``work``
    is cancelled and ``stopped_by_shutdown`` is raised.

    ``work`` runs in the calling task, which the hang-up or the stop cancels: one watcher task a request,
    and one task for the whole server waiting for ``stop``. (A task for ``work`` and one waiting for
    ``stop`` for each request, joined by ``asyncio.wait``, took 27 us a request where this takes 11 us.)"""
    task = asyncio.current_task()
    assert task is not None
    ended: list[str] = []  # why this cancelled ``work``: "hangup" or "stop"

    def end(why: str) -> None:
        if not ended and not task.done():
            ended.append(why)
            if why == "stop" and on_stop is not None:
                on_stop()
            task.cancel()

    async def hangup() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        end("hangup")

    def stopped(_: object) -> None:
        end("stop")

    watcher = asyncio.ensure_future(hangup())
    stopping = _stopping(stop) if stop is not None else None
    if stopping is not None:
        stopping.add_done_callback(stopped)
    try:
        result = await work
    except BaseException as exc:
        # Ours was delivered to ``work``, whatever it ended with (its cleanup's errors are not the caller's);
        # another cancellation as well (the server stopping at once) goes on.
        if not ended or (task.uncancel() > 0 and isinstance(exc, asyncio.CancelledError)):
            raise
        if ended[0] == "stop":
            raise stopped_by_shutdown() from None
        return False, None
    finally:
        watcher.cancel()
        if stopping is not None:
            stopping.remove_done_callback(stopped)
    if ended:  # asked to cancel as it finished: it finished
        task.uncancel()
    return True, result


# The server's shutdown (``Drain.stop``) as one future per server, which requests watch with a callback.
_stops: weakref.WeakKeyDictionary[asyncio.Event, asyncio.Future[Any]] = weakref.WeakKeyDictionary()


def _stopping(stop: asyncio.Event) -> asyncio.Future[Any]:
    future = _stops.get(stop)
    if future is None or future.get_loop() is not asyncio.get_running_loop():
        future = _stops[stop] = asyncio.ensure_future(stop.wait())
    return future


async def unless_disconnected(request: Request, work: Awaitable[T], reply: Reply | None = None) -> T | None:
    """Run ``work``; if the client hangs up first, cancel it and return None. If the server stops first
    (the end of its shutdown grace), cancel it and raise the 503 that says so, ``reply`` charged as such."""
    return (await until_hangup(request.receive, work, *_stop_of(request.scope, reply)))[1]


def _stop_of(scope: Scope, reply: Reply | None) -> tuple[asyncio.Event | None, Callable[[], None] | None]:
    drain = getattr(getattr(scope.get("app"), "state", None), "drain", None)
    if drain is None:
        return None, None

    def record() -> None:
        if reply is not None:
            reply.status = SHUTTING_DOWN
        scope.setdefault("state", {})["error_code"] = SHUTTING_DOWN

    return drain.stop, record


def _batch_line(request: Request) -> bool:
    return KEY_EXTENSION in (request.scope.get("extensions") or {})


def source_context(
    request: Request, hung_up: Callable[[], Awaitable[None]] | None = None, sdk_uploads: bool = False
) -> SourceContext:
    """Whose request this is, whether it may name uploaded oss:// objects, (``hung_up``) when its client left, and
    (``sdk_uploads``) whether it comes from the one SDK call that uploads local files first."""
    return SourceContext(
        owner=request.state.principal.key_id,
        resolve_oss=request.headers.get("x-dashscope-ossresourceresolve", "").strip().lower() == "enable",
        hung_up=hung_up,
        sdk_uploads=sdk_uploads,
    )


class Hangup:
    """The client's hang-up while a request is opened (its images fetched), for however many fetches wait on it:
    one task reads ``receive`` from the first wait until ``close``, which comes before the answer's own watch."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._left = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def wait(self) -> None:
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())
        await self._left.wait()

    async def _read(self) -> None:
        # A server whose receive raises once the client is gone: gone all the same.
        with contextlib.suppress(Exception):
            while (await self._receive())["type"] != "http.disconnect":
                pass
        self._left.set()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()


class Call(Protocol):
    """A parsed generation request, whatever its surface."""

    @property
    def model(self) -> Any: ...
    @property
    def messages(self) -> Any: ...
    @property
    def parameters(self) -> Any: ...


async def open_reply(request: Request, call: Call, endpoint: Endpoint) -> Reply:
    """The conversation service's reply to ``call`` for the request's key, kept on the request: the access log
    reads it, and the request's end charges it."""
    service: ConversationService = request.app.state.service
    if isinstance(call.model, str) and call.model in service.engines:
        request.state.model = call.model  # whose refusal this may be (a served name: the counts stay bounded)
    hangup = Hangup(request.receive)  # an image fetch ends when the client hangs up (not the rest of open)
    try:
        reply = await service.open(
            request.state.principal,
            request_id_of(request),
            call.model,
            call.messages,
            call.parameters,
            # A batch line is no SDK call, though it names the multimodal endpoint: no SDK uploaded its files.
            source_context(
                request, hangup.wait, sdk_uploads=endpoint is Endpoint.MULTIMODAL and not _batch_line(request)
            ),
            endpoint,
        )
    finally:
        hangup.close()
    request.state.reply = reply
    return reply


class EventStream(Response):
    """A streamed reply as an ASGI response: its events, made into bytes by ``render``, as they come.

    The first event is awaited before the response starts, so what fails before it (a full engine
    queue, a wait too long, an upstream that refuses) is raised from here and answered as a plain HTTP
    error with its true status, as the wire spec asks of errors found before streaming starts. A client
    that hangs up, before the first event or after, cancels the reply (and so the engine).

    Written here rather than using Starlette's StreamingResponse plus a separate wait for the first
    event: those watched for the hang-up twice, the second time through an anyio task group, and one
    asyncio watcher for the whole response took 0.1 ms a request off bench/gateway.py's added latency.
    """

    def __init__(
        self,
        reply: Reply,
        render: Callable[[AsyncIterator[Event]], AsyncIterator[bytes]],
        media_type: str,
        headers: dict[str, str],
        last_words: Callable[[errors.ServiceError, int], bytes],
        together: bool = False,
    ) -> None:
        self.background = None  # what frameworks expect of a Response; nothing runs after this one
        self.media_type = media_type
        self.init_headers(headers)  # Starlette's own: content type (with charset) and the given headers
        self.reply = reply
        self.frames = render
        self.last_words = last_words  # the surface's error frame, for a stream the server's shutdown ends
        # Frames that come at once may share an HTTP chunk (one write). DashScope's SSE is flushed per event,
        # one block per chunk (the wire spec): its surface leaves this off.
        self.together = together
        self.started = False
        self.sent = 0  # frames sent
        # Frames made but not sent yet: those whose next frame the engine already holds, and those made once the
        # answer has finished (sent with the body's end).
        self.held = b""
        self.held_frames = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            finished, _ = await until_hangup(receive, self._stream(send), *_stop_of(scope, self.reply))
        except errors.ServiceError as error:  # refused before the first event, or the server's shutdown ended it
            scope.setdefault("state", {})["error_code"] = error.code  # for the access log and the metrics
            if self.started:
                if self.held_frames:  # frames made before the stop: they go first
                    await self._send_held(send, more_body=True)
                last = self.last_words(error, self.sent + 1)
                await send({"type": "http.response.body", "body": last, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            else:
                await error_response(error, scope.get("state", {}).get("request_id", ""), scope["path"])(
                    scope, receive, send
                )
            return
        if finished:
            return
        if not self.started:  # for the access log; the client is gone
            await send({"type": "http.response.start", "status": CLIENT_CLOSED, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    async def _stream(self, send: Send) -> None:
        events = self.reply.events()
        try:
            first = await anext(events)
            self.started = True
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

            async def chained() -> AsyncIterator[Event]:
                yield first
                async for event in events:
                    yield event

            # The answer's last frame goes with the body's end, in one write (a wake-up of the client fewer).
            # With ``together``, so do the frames before it that come at once: a frame then waits only for
            # frames already on their way (``Reply.next_ready``: the engine holds the rest of a burst), and
            # whatever must be waited for, the frames before it are sent first. The same bytes, fewer writes.
            reply, together = self.reply, self.together
            async for frame in self.frames(chained()):
                if self.held_frames and not together:  # one frame a chunk: the one held goes first
                    await self._send_held(send, more_body=True)
                self.held += frame
                self.held_frames += 1
                if reply.finish_reason is None and not (together and reply.next_ready):
                    await self._send_held(send, more_body=True)
            await self._send_held(send, more_body=False)
        finally:
            await events.aclose()

    async def _send_held(self, send: Send, more_body: bool) -> None:
        # Held until sent: a shutdown that cancels this send still sends them first (``__call__``).
        await send({"type": "http.response.body", "body": self.held, "more_body": more_body})
        self.sent += self.held_frames
        self.held, self.held_frames = b"", 0
