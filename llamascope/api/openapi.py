"""The OpenAPI 3.1 document of every route, served at ``GET /openapi.json`` (no key needed).

The hot routes are plain Starlette routes, so FastAPI's own document would not
see them, and every route answers a ``JSONResponse`` whose shape FastAPI cannot
know. So each router's module declares its operations beside its routes, in a
constant ``OPERATIONS``, naming the pydantic models that make or describe their
bodies::

    OPERATIONS = (
        openapi.operation("POST", GENERATION_PATH, "Multimodal generation", tag="native",
                          body=GenerationBody, ok=GenerationResult, stream=sse.EVENTS),
        openapi.operation("GET", "/metrics", "Prometheus metrics", tag="operations", auth=None,
                          ok="text/plain; version=0.0.4"),
    )

The app collects them (``api.app``) and keeps them in ``app.state.operations``,
with each surface's error body in ``app.state.error_bodies``;
``document(app)`` builds the document from those whose routes the app has, with
schemas from pydantic's ``models_json_schema``; a route nobody described is
listed as ``x-undescribed`` (and the tests fail on it). Errors get
the surface's shape: DashScope's ``{"code", "message", "request_id"}``, or the
OpenAI shape under ``/compatible-mode/`` and ``/v1/`` (as ``api.errors`` sends
them). A streamed answer is described under ``text/event-stream`` one event at
a time, as OpenAPI 3.2 and Schemathesis read a stream's schema: ``{event, id,
data}``, the data a JSON string with its ``contentSchema``. ``max_tokens`` is
bounded by the largest served context length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, models_json_schema
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Mount

from llamascope import __version__
from llamascope.api.errors import OPENAI_PREFIXES

PATH = "/openapi.json"
# A field's json_schema_extra marking it as bounded by the served context length (max_tokens).
UP_TO_CONTEXT_LENGTH = {"x-maximum": "context_length"}
Auth = Literal["api_key", "admin_key"] | None
Model = type[BaseModel]

# What each refusal means, for the responses of every operation that can give it.
STATUS_TEXT = {
    400: "Invalid request; the message names the parameter or message at fault.",
    401: "No key, or an unknown, revoked or expired one (InvalidApiKey).",
    403: "Not allowed: model not granted (AccessDenied.Unpurchased), allowance used up or expired "
    "(AllocationQuota.FreeTierOnly), or a bad upload policy (AccessDenied).",
    404: "Not found (the admin API is off while LLAMASCOPE_ADMIN_KEY is unset).",
    408: "Waited too long for a place in the engine's queue (RequestTimeOut).",
    409: "The object already exists (FileAlreadyExists).",
    413: "The body is over the limit (BadRequest.TooLarge).",
    429: "The engine's queue is full (Throttling) or a per-key limit was reached (Throttling.RateQuota; see "
    "Retry-After), or the key keeps as many uploads as it may (Throttling.AllocationQuota).",
    500: "The model failed (InternalError.Algo).",
    503: "The server is shutting down, or no engine is available (ServiceUnavailable).",
    507: "The server's disk is nearly full: it stores no more files for now (MIN_FREE_DISK_BYTES).",
}
REQUEST_ID_HEADER = {
    "description": "The request's id, also in every JSON body as request_id.",
    "required": True,
    "schema": {"type": "string"},
}


@dataclass(frozen=True)
class Stream:
    """A ``text/event-stream`` answer: its possible events, each an SSE event name and its data."""

    events: tuple[tuple[str, Model | dict[str, Any]], ...]
    description: str = ""


@dataclass(frozen=True)
class Header:
    """A request header the operation reads."""

    name: str
    description: str
    example: str = "enable"


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    tag: str
    auth: Auth = "api_key"
    body: Model | None = None
    form: Model | None = None  # a multipart/form-data body
    query: Model | None = None  # its fields are the query parameters
    ok: Model | str | Literal[False] | None = None  # a JSON body's model, a media type, None: empty, False: no 200
    stream: Stream | None = None
    refusals: tuple[int, ...] = ()
    description: str = ""
    headers: tuple[Header, ...] = ()
    others: tuple[tuple[int, str], ...] = ()  # other answers without a body, such as redirects


Operations = dict[tuple[str, str], Operation]  # by (method, path), in the order the document lists them


def operation(
    method: str,
    path: str,
    summary: str,
    *,
    tag: str,
    auth: Auth = "api_key",
    body: Model | None = None,
    form: Model | None = None,
    query: Model | None = None,
    ok: Model | str | Literal[False] | None = None,
    stream: Stream | None = None,
    refusals: tuple[int, ...] = (),
    description: str = "",
    headers: tuple[Header, ...] = (),
    others: dict[int, str] | None = None,
) -> Operation:
    """A route's operation, for its router's ``OPERATIONS``.

    ``auth``: ``"api_key"`` (a Bearer API key), ``"admin_key"`` or None (public). Refusals every such
    route can give are added by themselves: 401 with a key, 400 and 413 with a body; ``refusals`` adds
    others (403, 408, 429, 500, 503...); ``others`` answers without a body ({307: "why"}). ``{name}`` in
    the path is a string path parameter; a mounted app's files are ``GET <mount path>/{path}``.
    """
    return Operation(
        method.upper(),
        _plain(path),
        summary,
        tag,
        auth,
        body,
        form,
        query,
        ok,
        stream,
        refusals,
        description,
        headers,
        tuple(sorted((others or {}).items())),
    )


def collect(*declared: tuple[Operation, ...]) -> Operations:
    """The operations of several routers, in the order given; a (method, path) declared twice is an error."""
    found: Operations = {}
    for ops in declared:
        for op in ops:
            key = (op.method, op.path)
            if key in found:
                raise ValueError(f"{op.method} {op.path} is described twice")
            found[key] = op
    return found


def _plain(path: str) -> str:
    """A route's path as OpenAPI writes it: Starlette's ``{model:path}`` is ``{model}``."""
    return re.sub(r"{(\w+):\w+}", r"{\1}", path)


def routed(routes: list[BaseRoute]) -> set[tuple[str, str]]:
    """(method, path) of every route an app answers, HEAD aside (FastAPI's included routers opened)."""
    found = set()
    for route in iter_route_contexts(routes):
        if isinstance(route.original_route, Mount):  # static files and the like
            found.add(("GET", f"{route.path}/{{path}}"))
        for method in route.methods or ():
            if method != "HEAD":
                found.add((method, _plain(route.path or "")))
    return found


# -- building the document ----------------------------------------------------------

# The surfaces each have a UsageBody, a Choice, an ErrorBody...: all but the multimodal one's get a prefix.
_PREFIXES = {"llamascope.api.openai.": "OpenAI", "llamascope.api.text.": "Text"}


class _Names(GenerateJsonSchema):
    def get_defs_ref(self, core_mode_ref: Any) -> Any:
        core_ref, mode = core_mode_ref
        for module, prefix in _PREFIXES.items():
            if core_ref.startswith(module):
                head, _, name = core_ref.rpartition(".")
                core_ref = f"{head}.{name if name.startswith(prefix) else prefix + name}"
        return super().get_defs_ref((core_ref, mode))


class _Schemas:
    """Every model's schema, named once in components (requests validated, answers serialised)."""

    def __init__(self, ops: list[Operation], error_bodies: tuple[Model, ...]) -> None:
        models: list[tuple[Model, Literal["validation", "serialization"]]] = []
        for op in ops:
            for model in (op.body, op.form, op.query):
                if model is not None:
                    models.append((model, "validation"))
            if isinstance(op.ok, type):
                models.append((op.ok, "serialization"))
            for _, data in op.stream.events if op.stream else ():
                if isinstance(data, type):
                    models.append((data, "serialization"))
        models += [(body, "serialization") for body in error_bodies]
        unique = list(dict.fromkeys(models))
        self.refs, defs = models_json_schema(
            unique, ref_template="#/components/schemas/{model}", schema_generator=_Names
        )
        self.components: dict[str, Any] = defs.get("$defs", {})

    def ref(self, model: Model, mode: Literal["validation", "serialization"]) -> dict[str, Any]:
        return dict(self.refs[(model, mode)])

    def name(self, model: Model, mode: Literal["validation", "serialization"]) -> str:
        return str(self.refs[(model, mode)]["$ref"]).rsplit("/", 1)[1]


def _refusal(status: int, path: str) -> str:
    """The name in components.responses of a refusal with this status on this path's surface."""
    return f"{'OpenAI' if path.startswith(OPENAI_PREFIXES) else ''}Refusal{status}"


def _refusal_response(name: str, status: int) -> dict[str, Any]:
    schema = "OpenAIErrorBody" if name.startswith("OpenAI") else "ErrorBody"
    headers: dict[str, Any] = {"x-request-id": {"$ref": "#/components/headers/RequestId"}}
    if status == 429:
        headers["Retry-After"] = {"description": "Seconds to wait.", "schema": {"type": "string"}}
    return {
        "description": STATUS_TEXT.get(status, "Refused."),
        "headers": headers,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def _stream_content(stream: Stream, schemas: _Schemas, op: Operation) -> dict[str, Any]:
    """Each event as OpenAPI 3.2 and Schemathesis read a stream's schema: ``{event, id, data}``, the data
    a string whose JSON has the given schema (``contentMediaType``/``contentSchema``) or a constant."""
    variants = []
    for event, data in stream.events:
        if isinstance(data, type):
            data_schema = {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": schemas.ref(data, "serialization"),
            }
        else:
            data_schema = data
        name = _event_name(op, event, data, schemas)
        known = schemas.components.get(name)
        if known is not None and known["properties"]["event"] != {"const": event}:
            raise ValueError(f"{name} is already an event named {known['properties']['event']['const']}")
        schemas.components.setdefault(
            name,
            {
                "title": name,
                "type": "object",
                "description": f"A server-sent event `{event}`, as an SSE parser reads it.",
                "properties": {"event": {"const": event}, "id": {"type": "string"}, "data": data_schema},
                "required": ["event", "data"],
            },
        )
        variants.append({"$ref": f"#/components/schemas/{name}"})
    description = (stream.description + " " if stream.description else "") + "Each event is one of these."
    # anyOf, not oneOf: a validator that leaves contentSchema unchecked sees several match.
    return {"text/event-stream": {"schema": {"description": description, "anyOf": variants}}}


def _event_name(op: Operation, event: str, data: Model | dict[str, Any], schemas: _Schemas) -> str:
    if isinstance(data, type):
        return schemas.name(data, "serialization") + "Event"
    surface = "OpenAI" if op.path.startswith(OPENAI_PREFIXES) else ""
    return f"{surface}{event.capitalize()}{re.sub(r'[^A-Za-z]', '', str(data.get('const', '')).title())}Event"


def _parameters(op: Operation, schemas: _Schemas) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{(\w+)}", op.path)
    ]
    for header in op.headers:
        params.append(
            {
                "name": header.name,
                "in": "header",
                "description": header.description,
                "schema": {"type": "string"},
                "example": header.example,
            }
        )
    if op.query is not None:
        schema = schemas.components.get(schemas.name(op.query, "validation"), {})
        required = set(schema.get("required", []))
        for name, prop in schema.get("properties", {}).items():
            params.append({"name": name, "in": "query", "required": name in required, "schema": prop})
    return params


def _operation(op: Operation, schemas: _Schemas) -> dict[str, Any]:
    out: dict[str, Any] = {"summary": op.summary, "tags": [op.tag], "operationId": _operation_id(op)}
    if op.description:
        out["description"] = op.description
    out["security"] = [{"apiKey": []}] if op.auth == "api_key" else [{"adminKey": []}] if op.auth else []
    params = _parameters(op, schemas)
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schemas.ref(op.body, "validation")}},
        }
    elif op.form is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"multipart/form-data": {"schema": schemas.ref(op.form, "validation")}},
        }
    ok: dict[str, Any] = {"description": "OK", "headers": {"x-request-id": {"$ref": "#/components/headers/RequestId"}}}
    content: dict[str, Any] = {}
    if isinstance(op.ok, type):
        content["application/json"] = {"schema": schemas.ref(op.ok, "serialization")}
    elif isinstance(op.ok, str):
        content[op.ok] = {"schema": {"type": "object" if op.ok.endswith("json") else "string"}}
    if op.stream is not None:
        content.update(_stream_content(op.stream, schemas, op))
    if content:
        ok["content"] = content
    responses: dict[str, Any] = {} if op.ok is False else {"200": ok}
    for status, why in op.others:
        responses[str(status)] = {
            "description": why,
            "headers": {"x-request-id": {"$ref": "#/components/headers/RequestId"}},
        }
    statuses = set(op.refusals)
    if op.auth:
        statuses.add(401)
    if op.auth == "admin_key":
        statuses.add(404)
    if op.body is not None or op.form is not None:
        statuses |= {400, 413}
    for status in sorted(statuses):
        responses[str(status)] = {"$ref": f"#/components/responses/{_refusal(status, op.path)}"}
    out["responses"] = responses
    return out


def _operation_id(op: Operation) -> str:
    words = re.findall(r"[A-Za-z0-9]+", op.path.replace("{", "by-"))
    return op.method.lower() + ("".join(w[:1].upper() + w[1:] for w in words) or "Root")


def _bound(schema: Any, context_length: int | None) -> None:
    """Put the served context length where a schema is marked as bounded by it."""
    if isinstance(schema, dict):
        marker, value = next(iter(UP_TO_CONTEXT_LENGTH.items()))
        if schema.get(marker) == value:
            del schema[marker]
            if context_length is not None:
                schema["maximum"] = context_length
        for child in schema.values():
            _bound(child, context_length)
    elif isinstance(schema, list):
        for child in schema:
            _bound(child, context_length)


def build(
    routes: list[BaseRoute],
    operations: Operations,
    title: str = "llamascope",
    context_length: int | None = None,
    error_bodies: tuple[Model, ...] = (),
) -> dict[str, Any]:
    """The document of the given operations these routes answer, in the operations' order.

    ``context_length``: the largest of the served models', the bound of max_tokens. ``error_bodies``: each
    surface's error body (``ErrorBody``, ``OpenAIErrorBody``), which the refusals name."""
    present = routed(routes)
    ops = [op for key, op in operations.items() if key in present]
    schemas = _Schemas(ops, error_bodies)
    _bound(schemas.components, context_length)
    paths: dict[str, dict[str, Any]] = {}
    refusals: dict[str, Any] = {}
    for method, path in sorted(present - set(operations)):  # a route nobody described: listed, and flagged
        paths.setdefault(path, {})[method.lower()] = {
            "summary": "Not described yet",
            "x-undescribed": True,
            "responses": {"default": {"description": "Not described yet."}},
        }
    for op in ops:
        paths.setdefault(op.path, {})[op.method.lower()] = described = _operation(op, schemas)
        for status in described["responses"]:
            if status != "200":
                name = _refusal(int(status), op.path)
                refusals[name] = _refusal_response(name, int(status))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": __version__,
            "description": "The Alibaba Cloud DashScope (Model Studio) multimodal-generation API and its "
            "OpenAI-compatible mode for the Llama 3.2 Vision models, served from your own hardware.",
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "responses": dict(sorted(refusals.items())),
            "headers": {"RequestId": REQUEST_ID_HEADER},
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "An API key, sk-..."},
                "adminKey": {"type": "http", "scheme": "bearer", "description": "LLAMASCOPE_ADMIN_KEY"},
            },
        },
    }


def document(app: FastAPI) -> dict[str, Any]:
    """The app's document, built on first use (every route and model is known by then) from the operations
    the app collected in ``app.state.operations``."""
    cached = getattr(app.state, "openapi", None)
    if cached is None:
        service = getattr(app.state, "service", None)
        lengths = [engine.info.context_length for engine in service.engines.values()] if service else []
        operations = getattr(app.state, "operations", {})
        error_bodies = getattr(app.state, "error_bodies", ())
        cached = app.state.openapi = build(app.routes, operations, app.title, max(lengths, default=None), error_bodies)
    return cached


router = APIRouter()


@router.get(PATH)
async def openapi_json(request: Request) -> JSONResponse:
    return JSONResponse(document(request.app))


OPERATIONS = (operation("GET", PATH, "This document", tag="operations", auth=None, ok="application/json"),)
