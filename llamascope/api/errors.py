"""ServiceError to each surface's wire shape, in one place.

Native DashScope routes answer ``{"code", "message", "request_id"}``; the
OpenAI-compatible routes (``/compatible-mode/v1/...``, ``/v1/...``) answer
``{"error": {"code", "type", "param", "message"}, "request_id"}``, as the
hosted compatible mode does. Both use the error's HTTP status and an
``x-request-id`` header. 5xx errors say ``x-should-retry: false``: the 2.x
SDK would otherwise repeat a request that fails for a reason a retry does not fix.
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


OPENAI_PREFIXES = ("/compatible-mode/", "/v1/", "/tokenize")

# DashScope codes as the hosted compatible mode spells them; others keep their DashScope code.
_OPENAI_CODES = {
    "InvalidApiKey": ("invalid_api_key", "Incorrect API key provided."),
    "InvalidParameter": ("invalid_parameter_error", None),
    "InvalidParameter.DataInspection": ("invalid_parameter_error", None),
    "BadRequest.EmptyInput": ("invalid_parameter_error", None),
    "BadRequest.EmptyModel": ("invalid_parameter_error", None),
}
_OPENAI_TYPES = {
    401: "invalid_request_error",
    403: "access_denied",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error_body(error: errors.ServiceError, request_id: str) -> dict[str, object]:
    code, message = _OPENAI_CODES.get(error.code, (error.code, None))
    kind = _OPENAI_TYPES.get(error.status, "server_error" if error.status >= 500 else "invalid_request_error")
    return {
        "error": {"code": code, "type": kind, "param": None, "message": message or error.message},
        "request_id": request_id,
    }


def error_response(error: errors.ServiceError, request_id: str, path: str = "") -> JSONResponse:
    headers = {"x-request-id": request_id, **error.headers}
    if error.status >= 500:
        headers.setdefault("x-should-retry", "false")
    if path.startswith(OPENAI_PREFIXES):
        body: dict[str, object] = openai_error_body(error, request_id)
    else:
        body = {"code": error.code, "message": error.message, "request_id": request_id}
    return JSONResponse(body, status_code=error.status, headers=headers)


async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.ServiceError)
    request.state.error_code = exc.code
    return error_response(exc, request_id_of(request), request.url.path)


async def on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code, message = _HTTP_CODES.get(exc.status_code, ("InvalidParameter", str(exc.detail)))
    request.state.error_code = code
    return error_response(errors.ServiceError(exc.status_code, code, message), request_id_of(request), request.url.path)


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    request.state.error_code = "InternalError"
    error = errors.ServiceError(
        500, "InternalError", "An internal error has occured, please try again later or contact service support."
    )
    return error_response(error, request_id_of(request), request.url.path)
