"""The HTTP shell of the OpenAI-compatible surface: chat completions and the model list."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from llamascope import errors
from llamascope.api import openapi
from llamascope.api.errors import openai_error_body, request_id_of
from llamascope.api.incoming import (
    CLIENT_CLOSED,
    EventStream,
    open_reply,
    read_call_json,
    source_context,
    unless_disconnected,
)
from llamascope.api.native.protocol import IndexedToolCallBody, tool_call_bodies
from llamascope.api.openai.protocol import (
    ChatBody,
    ChatCompletion,
    ChatCompletionChunk,
    ChatInput,
    ChatRequest,
    ChunkChoice,
    Delta,
    ErrorBody,
    Logprobs,
    ModelEntry,
    ModelList,
    TextChunks,
    TokenCount,
    UsageBody,
    completion_id,
)
from llamascope.conversation.service import ConversationService, Endpoint, Event, Reply

router = APIRouter()
PREFIXES = ("/compatible-mode/v1", "/v1")


def _data(payload: object) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


async def _stream(
    reply: Reply, events: AsyncIterator[Event], request_id: str, include_usage: bool, state: object
) -> AsyncIterator[bytes]:
    created = int(time.time())
    wants_logprobs = reply.options.sampling.logprobs is not None

    def chunk(choices: list[ChunkChoice], usage: UsageBody | None = None) -> bytes:
        body = ChatCompletionChunk(
            id=completion_id(request_id), created=created, model=reply.model, choices=choices, usage=usage
        )
        return _data(body.model_dump_json())

    role: Literal["assistant"] | None = "assistant"  # in the first delta only

    def delta(content: str | None = None, tool_calls: list[IndexedToolCallBody] | None = None) -> Delta:
        nonlocal role
        news, role = Delta(role=role, content=content, tool_calls=tool_calls), None
        return news

    plain = TextChunks(completion_id(request_id), created, reply.model)

    def text(content: str, finish: str | None) -> bytes:
        """A chunk of text alone (no logprobs asked)."""
        nonlocal role
        frame = plain.text(content, finish, role is not None)
        if frame is None:  # text JSON cannot carry: the model refuses it, as it always did
            return chunk([ChunkChoice(delta=delta(content), finish_reason=finish)])
        role = None
        return frame

    # The frames of the last event wait for the end of the events (it comes at once) and go out with the usage
    # and [DONE] in one write: the same bytes, two writes (and two wake-ups of the client) fewer.
    last = b""
    try:
        async for event in events:
            if last:  # an event after the finishing one (none is expected): in order
                yield last
                last = b""
            finish = event.finish_reason.value if event.finish_reason else None
            logprobs = Logprobs.of(event.logprobs) if wants_logprobs else None
            if event.tool_calls:
                # As OpenAI streams them: the calls' deltas with their index, then the finish with nothing new.
                if event.delta:
                    yield chunk([ChunkChoice(delta=delta(event.delta), logprobs=logprobs)])
                yield chunk([ChunkChoice(delta=delta(tool_calls=tool_call_bodies(event.tool_calls)))])
                last = chunk([ChunkChoice(delta=delta(), finish_reason=finish)])
            elif logprobs is None and (finish or event.delta):
                frame = text(event.delta, finish)
                if finish:
                    last = frame
                else:
                    yield frame
            elif finish:
                last = chunk([ChunkChoice(delta=delta(event.delta), finish_reason=finish, logprobs=logprobs)])
            elif event.delta:
                yield chunk([ChunkChoice(delta=delta(event.delta), finish_reason=finish, logprobs=logprobs)])
        if include_usage:
            last += plain.usage(reply.usage)
        yield last + _data("[DONE]")
    except errors.ServiceError as error:
        state.error_code = error.code  # type: ignore[attr-defined]  # for the access log
        yield last + _data(openai_error_body(error, request_id))


async def chat_completions(request: Request) -> Response:
    request_id = request_id_of(request)
    call = ChatRequest.from_body(await read_call_json(request))
    reply = await open_reply(request, call, Endpoint.CHAT)
    if call.stream:
        return EventStream(
            reply,
            lambda events: _stream(reply, events, request_id, call.include_usage, request.state),
            media_type="text/event-stream; charset=utf-8",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            last_words=lambda error, _n: _data(openai_error_body(error, request_id)),
            together=True,  # its last frames already share one write; so may those that come at once
        )
    text = await unless_disconnected(request, reply.complete(), reply)
    if text is None:
        return Response(status_code=CLIENT_CLOSED)
    assert reply.finish_reason is not None
    logprobs = reply.logprobs if reply.options.sampling.logprobs is not None else None
    body = ChatCompletion.of(
        request_id, reply.model, text, reply.finish_reason.value, reply.usage, logprobs, reply.tool_calls
    )
    return JSONResponse(body.model_dump())


def _model(name: str, service: ConversationService) -> dict[str, object]:
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "llamascope",
        "test_model": _is_test(name, service),
    }


def _is_test(name: str, service: ConversationService) -> bool:
    return service.engines[name].info.test_model


async def tokenize(request: Request) -> Response:
    """vLLM's ``POST /tokenize`` for chat messages: the prompt's token count, as a completion would report it.

    An llamascope in front of another (``--model NAME=openai+http://...``) asks it this, so its usage is exact
    from the first event. The token ids vLLM also returns are left out: no caller here needs them. ``tools``
    (what a front sends with them) are counted as a completion puts them in the prompt.
    """
    service: ConversationService = request.app.state.service
    call = ChatRequest.from_body(await read_call_json(request))
    principal, context = request.state.principal, source_context(request)
    # A client that leaves ends the count: its image fetch, and its hold on the key's concurrency, as a chat's
    count = await unless_disconnected(
        request, service.count(principal, call.model, call.messages, context, call.parameters)
    )
    if count is None:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(
        TokenCount(count=count, max_model_len=service.engine(call.model).info.context_length).model_dump()
    )


async def list_models(request: Request) -> JSONResponse:
    service: ConversationService = request.app.state.service
    data = [ModelEntry(**_model(name, service)) for name in service.engines]  # type: ignore[arg-type]
    return JSONResponse(ModelList(data=data).model_dump())


async def retrieve_model(request: Request) -> JSONResponse:
    """``client.models.retrieve(id)``."""
    service: ConversationService = request.app.state.service
    name = request.path_params["model"]
    if name not in service.engines:
        raise errors.ServiceError(404, "model_not_found", f"The model {name!r} does not exist.")
    return JSONResponse(ModelEntry(**_model(name, service)).model_dump())  # type: ignore[arg-type]


# Plain Starlette routes for the hot path: FastAPI's per-request dependency solving has nothing to do here.
STREAM = openapi.Stream(
    (("message", ChatCompletionChunk), ("message", ErrorBody), ("message", {"const": "[DONE]"})),
    "Chunks with deltas (finish_reason null until the last; tool calls as one delta each, with their index), "
    "a usage chunk with no choices when "
    "stream_options.include_usage, then [DONE]; an error after the stream started is a data: error event.",
)
for prefix in PREFIXES:
    router.add_route(f"{prefix}/chat/completions", chat_completions, methods=["POST"])
    router.add_api_route(f"{prefix}/models", list_models, methods=["GET"])
    router.add_api_route(f"{prefix}/models/{{model:path}}", retrieve_model, methods=["GET"])
# Where vLLM serves it: beside /v1, not in it. Beside each prefix, so that an llamascope in front finds it
# whichever base it was given: /compatible-mode/v1 (DashScope's) or /v1.
TOKENIZE_PATHS = ("/compatible-mode/tokenize", "/tokenize")
for path in TOKENIZE_PATHS:
    router.add_route(path, tokenize, methods=["POST"])


def _prefix_operations(prefix: str) -> tuple[openapi.Operation, ...]:
    return (
        openapi.operation(
            "POST",
            f"{prefix}/chat/completions",
            "Chat completions (OpenAI-compatible mode)",
            tag="compatible-mode",
            body=ChatBody,
            ok=ChatCompletion,
            stream=STREAM,
            headers=(openapi.Header("X-DashScope-OssResourceResolve", "enable: oss:// image URLs name uploads"),),
            refusals=(403, 408, 429, 500, 503),
        ),
        openapi.operation("GET", f"{prefix}/models", "Served models", tag="compatible-mode", ok=ModelList),
        openapi.operation(
            "GET", f"{prefix}/models/{{model}}", "A served model", tag="compatible-mode", ok=ModelEntry, refusals=(404,)
        ),
    )


OPERATIONS = (
    *(op for prefix in PREFIXES for op in _prefix_operations(prefix)),
    *(
        openapi.operation(
            "POST",
            path,
            "A chat's prompt tokens, as a completion would count them (vLLM's /tokenize)",
            tag="compatible-mode",
            body=ChatInput,
            ok=TokenCount,
            refusals=(403,),
        )
        for path in TOKENIZE_PATHS
    ),
)
