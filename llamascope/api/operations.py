"""Health, metrics and the model listing."""

from __future__ import annotations

import hmac

import anyio
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from llamascope import errors
from llamascope.api.errors import request_id_of
from llamascope.conversation.service import ConversationService
from llamascope.observability.metrics import CONTENT_TYPE, MetricsEndpoint, exposition

router = APIRouter()

TEST_MODEL_NOTE = "built-in test model: tiny and randomly initialised, its answers are random text"


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Up, and each served model's load (shared engines are listed under each of their names)."""
    service: ConversationService = request.app.state.service
    return JSONResponse({"status": "ok", "models": {name: e.stats() for name, e in service.engines.items()}})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics (docs/observability.md); a Bearer key only when LLAMASCOPE_METRICS_KEY is set."""
    endpoint: MetricsEndpoint = request.app.state.metrics
    if not endpoint.on_main_port:
        raise errors.ServiceError(404, "NotFound", "Metrics are not served here (see LLAMASCOPE_METRICS_PORT).")
    if endpoint.key is not None:
        given = (request.headers.get("authorization") or "").strip().encode()
        if not hmac.compare_digest(f"Bearer {endpoint.key}".encode(), given):
            raise errors.invalid_api_key()
    # Off the event loop: per-key allowances are read from the accounts store.
    body = await anyio.to_thread.run_sync(exposition, request.app.state.metrics_registry)
    return Response(body, media_type=CONTENT_TYPE)


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
                "description": TEST_MODEL_NOTE if info.test_model else f"served by the {info.kind} engine",
            }
        )
    return JSONResponse({"request_id": request_id_of(request), "data": data})
