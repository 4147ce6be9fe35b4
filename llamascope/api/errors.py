"""ServiceError to the DashScope wire shape, in one place.

Every error body is ``{"code", "message", "request_id"}`` with the error's
HTTP status and an ``x-request-id`` header. 5xx errors say
``x-should-retry: false``: the 2.x SDK would otherwise repeat a request that
fails for a reason a retry does not fix.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from llamascope import errors

log = logging.getLogger("llamascope.api")

_HTTP_CODES = {
    404: ("NotFound", "The requested resource does not exist."),
    405: ("MethodNotAllowed", "This method is not allowed on this resource."),
}


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", "") or ""


def error_response(error: errors.ServiceError, request_id: str) -> JSONResponse:
    headers = {"x-request-id": request_id, **error.headers}
    if error.status >= 500:
        headers.setdefault("x-should-retry", "false")
    body = {"code": error.code, "message": error.message, "request_id": request_id}
    return JSONResponse(body, status_code=error.status, headers=headers)


async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.ServiceError)
    request.state.error_code = exc.code
    return error_response(exc, request_id_of(request))


async def on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code, message = _HTTP_CODES.get(exc.status_code, ("InvalidParameter", str(exc.detail)))
    request.state.error_code = code
    return error_response(errors.ServiceError(exc.status_code, code, message), request_id_of(request))


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    request.state.error_code = "InternalError"
    error = errors.ServiceError(
        500, "InternalError", "An internal error has occured, please try again later or contact service support."
    )
    return error_response(error, request_id_of(request))
