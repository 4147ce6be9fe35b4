"""Build the ASGI application from a ready conversation service and key store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import anyio
from fastapi import FastAPI
from starlette.exceptions import HTTPException

from llamascope import __version__, errors, web
from llamascope.api import admin, openapi, operations, uploads
from llamascope.api import errors as api_errors
from llamascope.api.drain import Drain, Draining
from llamascope.api.middleware import Authentication, BodyLimit, RequestContext
from llamascope.api.native import router as native
from llamascope.api.openai import router as openai
from llamascope.api.text import router as text
from llamascope.conversation.service import ConversationService
from llamascope.images.uploads import UploadStore
from llamascope.observability.metrics import MetricsEndpoint, registry_for, serve_on_port
from llamascope.observability.request import routes_of
from llamascope.settings import ModelSpec

log = logging.getLogger(__name__)

# The upload POST carries no key: its signed policy authorises it. The playground page needs none
# (its API calls carry the key typed into it), nor does "/", which sends browsers to it. /metrics checks
# its own key, if any.
PUBLIC_PATHS = frozenset({"/health", "/metrics", openapi.PATH, uploads.OBJECTS_PATH, "/", web.PLAYGROUND_PATH})
PUBLIC_PREFIXES = (web.PLAYGROUND_PATH + "/",)
PURGE_EVERY_SECONDS = 600


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
    model_specs: dict[str, ModelSpec] | None = None,
    metrics: MetricsEndpoint | None = None,
    drain: Drain | None = None,
) -> FastAPI:
    """The app. ``drain`` is the shutdown state ``DrainingServer`` shares with it (see ``api.drain``)."""
    metrics = metrics or MetricsEndpoint()
    registry = registry_for(operations.service_state(service, metrics.key_names))
    drain = drain or Drain(grace_seconds=0)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        purge = asyncio.create_task(_purge_uploads(uploads_store))
        metrics_server = None
        if metrics.enabled and metrics.port is not None:
            metrics_server = serve_on_port(registry, metrics.host, metrics.port)
        yield
        purge.cancel()
        if metrics_server is not None:
            metrics_server.shutdown()
        # Several names may share one engine: close each once (upstream sessions, model threads).
        for engine in {id(e): e for e in service.engines.values()}.values():
            await engine.close()
        service.intake.close()
        service.accounts.close()
        await service.accounts.limits.aclose()

    app = FastAPI(
        title="llamascope", version=__version__, docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.service = service
    app.state.uploads = uploads_store
    app.state.public_base_url = public_base_url
    app.state.model_specs = model_specs or {}
    app.state.metrics = metrics
    app.state.metrics_registry = registry
    app.state.drain = drain
    routers = (
        native.router,
        openai.router,
        text.router,
        uploads.router,
        operations.router,
        admin.router,
        openapi.router,
        web.router,
    )
    for router in routers:
        app.include_router(router)
    app.mount(web.PLAYGROUND_PATH, web.playground_files())
    playground = app.router.routes[-1]  # the Mount just made
    routes_of(app, [route for router in routers for route in router.routes] + [playground])  # for metrics
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
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(Draining, drain=drain)
    app.add_middleware(RequestContext)
    return app
