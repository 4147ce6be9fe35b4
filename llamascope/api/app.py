"""Build the ASGI application from a ready conversation service and key store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from llamascope import __version__, errors
from llamascope.accounts.records import ModelAllowance
from llamascope.api import admin, openapi, operations, playground, uploads
from llamascope.api import errors as api_errors
from llamascope.api.batch import router as batch
from llamascope.api.drain import Drain, Draining
from llamascope.api.middleware import Authentication, BodyLimit, RequestContext
from llamascope.api.native import router as native
from llamascope.api.native.protocol import ErrorBody as NativeErrorBody
from llamascope.api.openai import router as openai
from llamascope.api.openai.protocol import ErrorBody as OpenAIErrorBody
from llamascope.api.text import router as text
from llamascope.batch.lines import MAX_FILE_BYTES
from llamascope.batch.service import BatchService
from llamascope.conversation.service import ConversationService
from llamascope.images.uploads import UploadStore
from llamascope.observability.metrics import MetricsEndpoint, registry_for, serve_on_port
from llamascope.observability.request import routes_of

log = logging.getLogger(__name__)

# The upload POST carries no key: its signed policy authorises it. The playground page needs none
# (its API calls carry the key typed into it), nor does "/", which sends browsers to it. /metrics checks
# its own key, if any.
PUBLIC_PATHS = frozenset({"/health", "/metrics", openapi.PATH, uploads.OBJECTS_PATH, "/", playground.PLAYGROUND_PATH})
PUBLIC_PREFIXES = (playground.PLAYGROUND_PATH + "/",)
# Each HTTP surface: its router and the operations it declares for the OpenAPI document.
SURFACES = (native, openai, text, batch, uploads, operations, admin, openapi, playground)
# The order /openapi.json lists the surfaces' operations in (as it always has).
DOCUMENT_ORDER = (openapi, playground, admin, operations, uploads, native, openai, text, batch)
PURGE_EVERY_SECONDS = 600
TELEMETRY_RECHECK_SECONDS = 1.0
# The generation routes, which every model call takes: see App.
HOT_PATHS = (
    native.GENERATION_PATH,
    text.TEXT_GENERATION_PATH,
    *(f"{prefix}/chat/completions" for prefix in openai.PREFIXES),
)


class App(FastAPI):
    """FastAPI, but a POST to a generation route (``HOT_PATHS``) goes straight to its route, through the same
    error handling and middleware (ours, between Starlette's outer error handler and its exception handlers).

    FastAPI's own stack wraps every request in six more layers (its telemetry and body-limit middleware, an
    exit stack for uploaded files, and a router that tries each route in turn), none of which a plain
    Starlette route with no files and no FastAPI body limit uses; a streamed request resumes through all of
    them at every wait (about 5% of the gateway's CPU a request in bench/gateway.py). FastAPI's native
    telemetry, when an OpenTelemetry provider turns it on, keeps the full stack."""

    _hot: Mapping[str, tuple[Route, ASGIApp]] = {}  # set by take_hot_paths
    _telemetry_off_at = -math.inf  # when FastAPI's telemetry was last found off (time.monotonic())
    # Every route in the order the router tries them (FastAPI keeps included routers' routes inside them).
    routes_in_order: tuple[BaseRoute, ...] = ()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            found = self._hot.get(scope["path"])
            if found is not None and "fastapi.telemetry" not in scope and not self._telemetry_on():
                route, stack = found
                scope["app"] = self
                scope["router"] = self.router
                scope["route"] = route
                scope["endpoint"] = route.endpoint
                scope["path_params"] = {}
                await stack(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def _telemetry_on(self) -> bool:
        """Whether FastAPI's own telemetry is on (an OpenTelemetry provider is configured). Its check reads three
        global providers, 18 us a request; a provider once set stays set (OpenTelemetry sets each only once), so
        "off" is only checked again once a second: one set later is seen within a second."""
        now = time.monotonic()
        if now - self._telemetry_off_at < TELEMETRY_RECHECK_SECONDS:
            return False
        telemetry = getattr(self, "_native_telemetry", None)  # FastAPI's own (private): unknown, assume on
        on = telemetry is None or bool(telemetry.enabled())
        if not on:
            self._telemetry_off_at = now
        return on

    def take_hot_paths(self) -> None:
        """Once routes, handlers and middleware are all added: each hot path's route (the one the router would
        pick) and the stack that leads to it. Only where FastAPI's own layers are those this skips, known to do
        nothing for these routes (``FASTAPI_LAYERS``; tests/api/test_app.py checks them): else the full stack."""
        self._hot = {}
        if self.max_body_size is not None or fastapi_layers(self) != FASTAPI_LAYERS:
            return
        error_handler = None
        handlers = {}
        for key, value in self.exception_handlers.items():
            if key in (500, Exception):
                error_handler = value
            else:
                handlers[key] = value
        hot: dict[str, tuple[Route, ASGIApp]] = {}
        for path in HOT_PATHS:
            probe = {"type": "http", "path": path, "method": "POST", "root_path": "", "headers": []}
            first = next((r for r in self.routes_in_order if r.matches(probe)[0] == Match.FULL), None)
            if not isinstance(first, Route) or first.param_convertors:
                continue  # not a plain route: the router handles it
            stack: ASGIApp = ExceptionMiddleware(first.app, handlers=handlers, debug=self.debug)
            for cls, args, kwargs in reversed(self.user_middleware):
                stack = cls(stack, *args, **kwargs)
            hot[path] = (first, ServerErrorMiddleware(stack, handler=error_handler, debug=self.debug))
        self._hot = hot


# FastAPI's layers around the user middleware and the router, outermost first, as its build_middleware_stack
# makes them in the pinned version: the hot path keeps the first and the last but one (Starlette's).
FASTAPI_LAYERS = (
    "ServerErrorMiddleware",
    "ExceptionTelemetryMiddleware",
    "AppBodyLimitMiddleware",
    "ExceptionMiddleware",
    "AsyncExitStackMiddleware",
)


def fastapi_layers(app: FastAPI) -> tuple[str, ...]:
    """The class names of the layers FastAPI's stack puts around the user middleware and the router."""
    ours = {middleware.cls.__name__ for middleware in app.user_middleware}  # type: ignore[attr-defined]
    names = []
    layer: Any = app.build_middleware_stack()
    while layer is not app.router and hasattr(layer, "app"):
        if type(layer).__name__ not in ours:
            names.append(type(layer).__name__)
        layer = layer.app
    return tuple(names)


async def _purge_uploads(store: UploadStore) -> None:
    while True:
        removed = await anyio.to_thread.run_sync(store.purge_expired)
        if removed:
            log.info("removed %d expired uploads", removed)
        await asyncio.sleep(PURGE_EVERY_SECONDS)


def create_app(
    service: ConversationService,
    uploads_store: UploadStore,
    *,
    max_body_bytes: int,
    public_base_url: str | None = None,
    admin_key: str | None = None,
    model_allowances: Mapping[str, ModelAllowance] | None = None,
    metrics: MetricsEndpoint | None = None,
    drain: Drain | None = None,
    batches: BatchService | None = None,
) -> App:
    """The app. ``model_allowances``: each served model's default allowance (the admin API grants it; its
    names are the served models). ``drain`` is the shutdown state ``DrainingServer`` shares with it (see
    ``api.drain``). ``batches``: the Batch API and its runner (None: not served)."""
    metrics = metrics or MetricsEndpoint()
    registry = registry_for(operations.service_state(service, metrics.key_names, batches))
    drain = drain or Drain(grace_seconds=0)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        purge = asyncio.create_task(_purge_uploads(uploads_store))
        for engine in {id(e): e for e in service.engines.values()}.values():
            engine.start()  # an upstream's health checks
        if batches is not None:
            batches.start(app)  # lines run through this very app, in process
        metrics_server = None
        if metrics.enabled and metrics.port is not None:
            metrics_server = serve_on_port(registry, metrics.host, metrics.port)
        yield
        if batches is not None:
            await batches.stop()
        purge.cancel()
        if metrics_server is not None:
            metrics_server.shutdown()
        # Several names may share one engine: close each once (upstream sessions, model threads).
        for engine in {id(e): e for e in service.engines.values()}.values():
            await engine.close()
        await service.intake.aclose()
        service.accounts.close()
        await service.accounts.limits.aclose()

    app = App(
        title="llamascope", version=__version__, docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.service = service
    app.state.uploads = uploads_store
    app.state.public_base_url = public_base_url
    app.state.model_allowances = dict(model_allowances or {})  # each served model's, for the admin API
    app.state.metrics = metrics
    app.state.metrics_registry = registry
    app.state.drain = drain
    app.state.batches = batches
    app.state.operations = openapi.collect(*(surface.OPERATIONS for surface in DOCUMENT_ORDER))
    app.state.error_bodies = (NativeErrorBody, OpenAIErrorBody)  # the refusals' bodies in the document
    for surface in SURFACES:
        app.include_router(surface.router)
    app.mount(playground.PLAYGROUND_PATH, playground.playground_files())
    files = app.router.routes[-1]  # the Mount just made
    app.routes_in_order = (*(route for surface in SURFACES for route in surface.router.routes), files)
    routes_of(app, list(app.routes_in_order))  # for metrics
    app.add_exception_handler(errors.ServiceError, api_errors.on_service_error)
    app.add_exception_handler(HTTPException, api_errors.on_http_exception)
    app.add_exception_handler(Exception, api_errors.on_unexpected)
    # Added innermost first: a request meets RequestContext, Draining, BodyLimit, then Authentication.
    app.add_middleware(
        Authentication,
        accounts=service.accounts,
        public_paths=PUBLIC_PATHS,
        public_prefixes=PUBLIC_PREFIXES,
        admin_key=admin_key,
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, larger=dict.fromkeys(batch.FILES_PATHS, MAX_FILE_BYTES))
    app.add_middleware(Draining, drain=drain)
    app.add_middleware(RequestContext)
    app.take_hot_paths()
    return app
