"""Health, metrics and the model listing; and what a metrics scrape reads of a service's state."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Literal

import anyio
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from llamascope import errors
from llamascope.accounts.store import AccountStore
from llamascope.api import openapi
from llamascope.api.errors import request_id_of
from llamascope.batch.service import BatchService
from llamascope.conversation.service import ConversationService, Endpoint
from llamascope.observability.facts import Allowance, CacheStats
from llamascope.observability.metrics import CONTENT_TYPE, MetricsEndpoint, StateCollector, exposition

router = APIRouter()

TEST_MODEL_NOTE = "built-in test model: tiny and randomly initialised, its answers are random text"


class EngineLoad(BaseModel):
    """An engine's load right now; engines add counts of their own (vision cache, healthy upstreams)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": {"type": "integer"}})
    running: int = Field(ge=0)
    waiting: int = Field(0, ge=0)


class Health(BaseModel):
    status: Literal["ok"]
    models: dict[str, EngineLoad]


class ModelEntry(BaseModel):
    model: str
    context_length: int
    engine: str
    test_model: bool
    takes_images: bool
    max_images: int
    requires_image: bool
    description: str


class ModelList(BaseModel):
    request_id: str
    data: list[ModelEntry]


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Up, and each served model's load (shared engines are listed under each of their names). "degraded" (still
    200: this server answers, and says why it cannot) while a model has upstream engines and none is healthy."""
    service: ConversationService = request.app.state.service
    models = {name: e.stats() for name, e in service.engines.items()}
    degraded = any(stats.get("healthy_upstreams") == 0 for stats in models.values())
    return JSONResponse({"status": "degraded" if degraded else "ok", "models": models})


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


def service_state(
    service: ConversationService, key_names: frozenset[str] = frozenset(), batches: BatchService | None = None
) -> StateCollector:
    """What a scrape reads of ``service``: its engines, its decoded-image cache, the allowances left of the
    keys named in ``key_names`` (LLAMASCOPE_METRICS_KEYS; none: no per-key figures), and the batch lines of
    ``batches`` (None: no batch figures)."""
    cache = service.intake.cache
    store = service.accounts.store
    return StateCollector(
        engines=lambda: service.engines,
        image_cache=lambda: CacheStats(cache.hits, cache.misses, cache.total),
        allowances=(lambda: allowances_left(store, key_names)) if key_names else None,
        batches=batches.stats if batches is not None else None,
    )


def allowances_left(store: AccountStore, key_names: frozenset[str]) -> Iterator[Allowance]:
    """The limited grants of the live keys named in ``key_names``, each with what is left of it now."""
    for key, grants in store.list_keys():
        if key.name not in key_names or key.revoked_at is not None:
            continue
        for grant in grants:
            if grant.allowance_tokens is None:
                continue
            left = max(0, grant.allowance_tokens - grant.used_tokens - grant.reserved_tokens)
            expires = float(grant.expires_at.timestamp()) if grant.expires_at is not None else None
            yield Allowance(key.name, grant.model, left, grant.allowance_tokens, expires)


@router.get("/api/v1/models")
async def models(request: Request) -> JSONResponse:
    service: ConversationService = request.app.state.service
    data = []
    for name, engine in service.engines.items():
        info = engine.info
        images = service.image_rules(name, Endpoint.MULTIMODAL)
        data.append(
            {
                "model": name,
                "context_length": info.context_length,
                "engine": info.kind,
                "test_model": info.test_model,
                "takes_images": info.takes_images,  # False: a text-only model, for the text-generation API
                "max_images": images.most,  # images per conversation at most (the model's max_images setting)
                # The multimodal endpoint wants an image in the first user message (the require_image setting).
                "requires_image": images.required,
                "description": TEST_MODEL_NOTE if info.test_model else f"served by the {info.kind} engine",
            }
        )
    return JSONResponse({"request_id": request_id_of(request), "data": data})


OPERATIONS = (
    openapi.operation(
        "GET", "/health", "Up, and each model's running and waiting requests", tag="operations", auth=None, ok=Health
    ),
    openapi.operation("GET", "/api/v1/models", "Served models", tag="native", ok=ModelList),
    openapi.operation(
        "GET",
        "/metrics",
        "Prometheus metrics",
        tag="operations",
        auth=None,
        ok="text/plain; version=0.0.4",
        refusals=(401, 404),
        description="Prometheus text format (docs/observability.md). A Bearer key only when LLAMASCOPE_METRICS_KEY "
        "is set; 404 when LLAMASCOPE_METRICS_PORT serves them on another port.",
    ),
)
