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
import re

from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Match

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


# The request field an error is about, read from the shared message texts (one place, rather than a field on
# every error): "Invalid value for 'tools[0].type'", "Range of top_p ...", "Parameter stop ...", "messages[1] ...",
# "Model not exist.".
_PARAM_PATTERNS = (
    # structured output: "tools[0].function.name"; a grammar's dead end while decoding, after the engine's prefix
    (re.compile(r"^(?:" + re.escape(errors.ALGO_PREFIX) + r")?Invalid value for '([\w.\[\]-]+)'"), None),
    (re.compile(r"^(?:Range of|Parameter) (\w+)"), None),
    (re.compile(r"messages|last message|image|url error|data-uri|media|multimodal|[Ii]nput length"), "messages"),
    (re.compile(r"^Model not exist|\"model\""), "model"),
)


def openai_param(error: errors.ServiceError) -> str | None:
    if error.status != 400:
        return None
    if error.code == "BadRequest.EmptyInput":  # DashScope's words name no field; here it is always messages
        return "messages"
    for pattern, param in _PARAM_PATTERNS:
        found = pattern.search(error.message)
        if found:
            return param or found.group(1)
    return None


def openai_error_body(error: errors.ServiceError, request_id: str) -> dict[str, object]:
    code, message = _OPENAI_CODES.get(error.code, (error.code, None))
    kind = _OPENAI_TYPES.get(error.status, "server_error" if error.status >= 500 else "invalid_request_error")
    # The native surface's field names, in this surface's words.
    text = (message or error.message).replace("input.messages", "messages")
    return {
        "error": {"code": code, "type": kind, "param": openai_param(error), "message": text},
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
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    error = errors.ServiceError(exc.status_code, code, message, headers=headers)
    return error_response(error, request_id_of(request), request.url.path)


def _allowed_methods(request: Request) -> str:
    """Every method some route answers at this path: Starlette's 405 names only the first route's."""
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= set(route.methods or ())
    return ", ".join(sorted(methods))


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    request.state.error_code = "InternalError"
    error = errors.ServiceError(
        500, "InternalError", "An internal error has occured, please try again later or contact service support."
    )
    return error_response(error, request_id_of(request), request.url.path)
