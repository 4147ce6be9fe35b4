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
from llamascope.api import admin, operations, uploads
from llamascope.api import errors as api_errors
from llamascope.api.middleware import Authentication, BodyLimit, RequestContext
from llamascope.api.native import router as native
from llamascope.api.openai import router as openai
from llamascope.api.text import router as text
from llamascope.conversation.service import ConversationService
from llamascope.images.uploads import UploadStore
from llamascope.settings import ModelSpec

log = logging.getLogger(__name__)

# The upload POST carries no key: its signed policy authorises it. The playground page needs none
# (its API calls carry the key typed into it), nor does "/", which sends browsers to it.
PUBLIC_PATHS = frozenset({"/health", uploads.OBJECTS_PATH, "/", web.PLAYGROUND_PATH})
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
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        purge = asyncio.create_task(_purge_uploads(uploads_store))
        yield
        purge.cancel()
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
    app.include_router(native.router)
    app.include_router(openai.router)
    app.include_router(text.router)
    app.include_router(uploads.router)
    app.include_router(operations.router)
    app.include_router(admin.router)
    app.include_router(web.router)
    app.mount(web.PLAYGROUND_PATH, web.playground_files())
    app.add_exception_handler(errors.ServiceError, api_errors.on_service_error)
    app.add_exception_handler(HTTPException, api_errors.on_http_exception)
    app.add_exception_handler(Exception, api_errors.on_unexpected)
    # Added innermost first: a request meets RequestContext, then BodyLimit, then Authentication.
    app.add_middleware(
        Authentication,
        accounts=service.accounts,
        public_paths=PUBLIC_PATHS,
        public_prefixes=PUBLIC_PREFIXES,
        admin_key=admin_key,
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(RequestContext)
    return app
