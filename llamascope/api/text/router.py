"""The HTTP shell of the text APIs: parse, call the conversation service, shape the answer."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from llamascope.api import openapi
from llamascope.api.errors import request_id_of
from llamascope.api.incoming import CLIENT_CLOSED, open_reply, read_call_json, source_context, unless_disconnected
from llamascope.api.native import sse
from llamascope.api.native.protocol import ErrorBody
from llamascope.api.native.router import SSE_HEADERS, answer
from llamascope.api.text.protocol import (
    TextGenerationBody,
    TextGenerationRequest,
    TextGenerationResult,
    TokenizationBody,
    TokenizationRequest,
    TokenizationResult,
)
from llamascope.conversation.service import ConversationService, Endpoint

TEXT_GENERATION_PATH = "/api/v1/services/aigc/text-generation/generation"
TOKENIZER_PATH = "/api/v1/tokenizer"
router = APIRouter()


async def generation(request: Request) -> Response:
    call = TextGenerationRequest.from_body(await read_call_json(request))
    reply = await open_reply(request, call, Endpoint.TEXT)
    return await answer(request, reply, TextGenerationResult.render(call.result_format))


async def tokenizer(request: Request) -> Response:
    """Token ids of the prompt a text-generation request with this input runs: the count is its input_tokens."""
    service: ConversationService = request.app.state.service
    call = TokenizationRequest.from_body(await read_call_json(request))
    principal, context = request.state.principal, source_context(request)
    # A client that leaves ends it: its image fetch, and its hold on the key's concurrency, as a generation's
    counted = await unless_disconnected(request, service.tokens(principal, call.model, call.messages, context))
    if counted is None:
        return Response(status_code=CLIENT_CLOSED)
    ids, tokens = counted
    return JSONResponse(TokenizationResult.of(ids, tokens, request_id_of(request)).model_dump())


# Plain Starlette routes, as the native surface's: FastAPI's dependency solving has nothing to do here.
router.add_route(TEXT_GENERATION_PATH, generation, methods=["POST"])
router.add_route(TOKENIZER_PATH, tokenizer, methods=["POST"])
OPERATIONS = (
    openapi.operation(
        "POST",
        TEXT_GENERATION_PATH,
        "Text generation (DashScope native)",
        tag="native",
        body=TextGenerationBody,
        ok=TextGenerationResult,
        stream=openapi.Stream((("result", TextGenerationResult), ("error", ErrorBody)), sse.EVENTS.description),
        headers=SSE_HEADERS,
        refusals=(403, 408, 429, 500, 503),
    ),
    openapi.operation(
        "POST",
        TOKENIZER_PATH,
        "The prompt's token ids (their count is a text-generation call's input_tokens)",
        tag="native",
        body=TokenizationBody,
        ok=TokenizationResult,
        refusals=(403,),
    ),
)
