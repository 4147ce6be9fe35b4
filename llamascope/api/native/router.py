"""The HTTP shell of the native endpoint: parse, call the service, shape the answer."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from llamascope.api import openapi
from llamascope.api.errors import request_id_of
from llamascope.api.incoming import CLIENT_CLOSED, EventStream, open_reply, read_call_json, unless_disconnected
from llamascope.api.native import sse
from llamascope.api.native.protocol import GenerationBody, GenerationRequest, GenerationResult
from llamascope.conversation.service import Endpoint, Reply

GENERATION_PATH = "/api/v1/services/aigc/multimodal-generation/generation"
router = APIRouter()


async def generation(request: Request) -> Response:
    call = GenerationRequest.from_body(await read_call_json(request))
    reply = await open_reply(request, call, Endpoint.MULTIMODAL)
    return await answer(request, reply, GenerationResult.of)


async def answer(request: Request, reply: Reply, render: sse.Render) -> Response:
    """A DashScope answer: server-sent events when ``X-DashScope-SSE: enable``, else one JSON body."""
    request_id = request_id_of(request)
    if request.headers.get("x-dashscope-sse", "").strip().lower() == "enable":
        return EventStream(
            reply,
            lambda events: sse.stream(reply, events, request_id, request.state, render),
            media_type=sse.MEDIA_TYPE,
            headers=sse.HEADERS,
            last_words=lambda error, n: sse.error_block(n, error, request_id),
        )
    text = await unless_disconnected(request, reply.complete(), reply)
    if text is None:
        return Response(status_code=CLIENT_CLOSED)
    assert reply.finish_reason is not None
    logprobs = reply.logprobs if reply.options.sampling.logprobs is not None else None
    result = render(text, reply.finish_reason.value, reply.usage, request_id, reply.tool_calls, logprobs)
    return JSONResponse(result.model_dump(exclude_none=True))


# A plain Starlette route: FastAPI's per-request dependency solving has nothing to do here.
router.add_route(GENERATION_PATH, generation, methods=["POST"])
SSE_HEADERS = (  # what a DashScope generation call reads, for the OpenAPI document
    openapi.Header("X-DashScope-SSE", "enable: the answer streams as server-sent events (else JSON)"),
    openapi.Header("X-DashScope-OssResourceResolve", "enable: oss:// image references name uploads"),
)
OPERATIONS = (
    openapi.operation(
        "POST",
        GENERATION_PATH,
        "Multimodal generation (DashScope native)",
        tag="native",
        body=GenerationBody,
        ok=GenerationResult,
        stream=sse.EVENTS,
        headers=SSE_HEADERS,
        refusals=(403, 408, 429, 500, 503),
    ),
)
