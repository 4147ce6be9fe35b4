"""Build the ASGI application from a ready conversation service and key store."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.exceptions import HTTPException

from llamascope import __version__, errors
from llamascope.accounts.keys import KeyStore
from llamascope.api import errors as api_errors
from llamascope.api import operations
from llamascope.api.middleware import Authentication, BodyLimit, RequestContext
from llamascope.api.native import router as native
from llamascope.conversation.service import ConversationService

PUBLIC_PATHS = frozenset({"/health"})


def create_app(service: ConversationService, keys: KeyStore, *, max_body_bytes: int) -> FastAPI:
    app = FastAPI(title="llamascope", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.include_router(native.router)
    app.include_router(operations.router)
    app.add_exception_handler(errors.ServiceError, api_errors.on_service_error)
    app.add_exception_handler(HTTPException, api_errors.on_http_exception)
    app.add_exception_handler(Exception, api_errors.on_unexpected)
    # Added innermost first: a request meets RequestContext, then BodyLimit, then Authentication.
    app.add_middleware(Authentication, keys=keys, public_paths=PUBLIC_PATHS)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(RequestContext)
    return app
