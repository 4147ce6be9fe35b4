"""The HTTP shell of the native endpoint: parse, call the service, shape the answer."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from llamascope.api.errors import request_id_of
from llamascope.api.incoming import CLIENT_CLOSED, EventStream, read_json, source_context, unless_disconnected
from llamascope.api.native import sse
from llamascope.api.native.protocol import GenerationRequest, GenerationResult
from llamascope.conversation.service import ConversationService

GENERATION_PATH = "/api/v1/services/aigc/multimodal-generation/generation"
router = APIRouter()


async def generation(request: Request) -> Response:
    service: ConversationService = request.app.state.service
    request_id = request_id_of(request)
    call = GenerationRequest.from_body(await read_json(request))
    principal = request.state.principal
    reply = await service.open(
        principal, request_id, call.model, call.messages, call.parameters, source_context(request)
    )
    request.state.reply = reply
    if request.headers.get("x-dashscope-sse", "").strip().lower() == "enable":
        return EventStream(
            reply,
            lambda events: sse.stream(reply, events, request_id, request.state),
            media_type=sse.MEDIA_TYPE,
            headers=sse.HEADERS,
            last_words=lambda error, n: sse.error_block(n, error, request_id),
        )
    text = await unless_disconnected(request, reply.complete(), reply)
    if text is None:
        return Response(status_code=CLIENT_CLOSED)
    assert reply.finish_reason is not None
    result = GenerationResult.of(text, reply.finish_reason.value, reply.usage, request_id)
    return JSONResponse(result.model_dump())


# A plain Starlette route: FastAPI's per-request dependency solving has nothing to do here.
router.add_route(GENERATION_PATH, generation, methods=["POST"])
