"""The HTTP shell of the OpenAI-compatible surface: chat completions and the model list."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from llamascope import errors
from llamascope.api.errors import openai_error_body, request_id_of
from llamascope.api.incoming import (
    CLIENT_CLOSED,
    EventStream,
    open_reply,
    read_json,
    source_context,
    unless_disconnected,
)
from llamascope.api.openai.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    ChunkChoice,
    Message,
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

    def chunk(choices: list[ChunkChoice], usage: UsageBody | None = None) -> bytes:
        body = ChatCompletionChunk(
            id=completion_id(request_id), created=created, model=reply.model, choices=choices, usage=usage
        )
        return _data(body.model_dump_json())

    try:
        async for event in events:
            finish = event.finish_reason.value if event.finish_reason else None
            if event.delta or finish:
                yield chunk([ChunkChoice(delta=Message(content=event.delta), finish_reason=finish)])
        if include_usage:
            yield chunk([], UsageBody.of(reply.usage))
        yield _data("[DONE]")
    except errors.ServiceError as error:
        state.error_code = error.code  # type: ignore[attr-defined]  # for the access log
        yield _data(openai_error_body(error, request_id))


async def chat_completions(request: Request) -> Response:
    request_id = request_id_of(request)
    call = ChatRequest.from_body(await read_json(request))
    reply = await open_reply(request, call, Endpoint.CHAT)
    if call.stream:
        return EventStream(
            reply,
            lambda events: _stream(reply, events, request_id, call.include_usage, request.state),
            media_type="text/event-stream; charset=utf-8",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    text = await unless_disconnected(request, reply.complete())
    if text is None:
        return Response(status_code=CLIENT_CLOSED)
    assert reply.finish_reason is not None
    body = ChatCompletion.of(request_id, reply.model, text, reply.finish_reason.value, reply.usage)
    return JSONResponse(body.model_dump())


async def tokenize(request: Request) -> JSONResponse:
    """vLLM's ``POST /tokenize`` for chat messages: the prompt's token count, as a completion would report it.

    An llamascope in front of another (``--model NAME=openai+http://...``) asks it this, so its usage is exact
    from the first event. The token ids vLLM also returns are left out: no caller here needs them.
    """
    service: ConversationService = request.app.state.service
    call = ChatRequest.from_body(await read_json(request))
    count = await service.count(request.state.principal, call.model, call.messages, source_context(request))
    return JSONResponse({"count": count, "max_model_len": service.engine(call.model).info.context_length})


async def list_models(request: Request) -> JSONResponse:
    service: ConversationService = request.app.state.service
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "llamascope", "test_model": engine.info.test_model}
        for name, engine in service.engines.items()
    ]
    return JSONResponse({"object": "list", "data": data})


# Plain Starlette routes for the hot path: FastAPI's per-request dependency solving has nothing to do here.
for prefix in PREFIXES:
    router.add_route(f"{prefix}/chat/completions", chat_completions, methods=["POST"])
    router.add_api_route(f"{prefix}/models", list_models, methods=["GET"])
router.add_route("/tokenize", tokenize, methods=["POST"])  # where vLLM serves it: beside /v1, not in it
