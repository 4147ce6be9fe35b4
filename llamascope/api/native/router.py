"""The HTTP shell of the native endpoint: parse, call the service, shape the answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from llamascope import errors
from llamascope.api.errors import request_id_of
from llamascope.api.native import sse
from llamascope.api.native.protocol import GenerationRequest, GenerationResult
from llamascope.conversation.service import ConversationService
from llamascope.images.source import SourceContext

GENERATION_PATH = "/api/v1/services/aigc/multimodal-generation/generation"
CLIENT_CLOSED = 499  # nginx's code for a client that left before the answer

router = APIRouter()
T = TypeVar("T")


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


@router.post(GENERATION_PATH)
async def generation(request: Request) -> Response:
    service: ConversationService = request.app.state.service
    request_id = request_id_of(request)
    call = GenerationRequest.from_body(await read_json(request))
    principal = request.state.principal
    context = SourceContext(
        owner=principal.key_id,
        resolve_oss=request.headers.get("x-dashscope-ossresourceresolve", "").strip().lower() == "enable",
    )
    reply = await service.open(principal, request_id, call.model, call.messages, call.parameters, context)
    request.state.reply = reply
    if request.headers.get("x-dashscope-sse", "").strip().lower() == "enable":
        return StreamingResponse(
            sse.stream(reply, request_id, request.state), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS
        )
    text = await unless_disconnected(request, reply.complete())
    if text is None:
        return Response(status_code=CLIENT_CLOSED)
    assert reply.finish_reason is not None
    result = GenerationResult.of(text, reply.finish_reason.value, reply.usage, request_id)
    return JSONResponse(result.model_dump())
