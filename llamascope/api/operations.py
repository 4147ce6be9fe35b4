"""Health and the model listing."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from llamascope.api.errors import request_id_of
from llamascope.conversation.service import ConversationService

router = APIRouter()

TEST_MODEL_NOTE = "built-in test model: tiny and randomly initialised, its answers are random text"


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Up, and each served model's load (shared engines are listed under each of their names)."""
    service: ConversationService = request.app.state.service
    return JSONResponse({"status": "ok", "models": {name: e.stats() for name, e in service.engines.items()}})


@router.get("/api/v1/models")
async def models(request: Request) -> JSONResponse:
    service: ConversationService = request.app.state.service
    data = []
    for name, engine in service.engines.items():
        info = engine.info
        data.append(
            {
                "model": name,
                "context_length": info.context_length,
                "engine": info.kind,
                "test_model": info.test_model,
                "takes_images": info.takes_images,  # False: a text-only model, for the text-generation API
                "description": TEST_MODEL_NOTE if info.test_model else f"served by the {info.kind} engine",
            }
        )
    return JSONResponse({"request_id": request_id_of(request), "data": data})
