"""The admin HTTP API (``/admin/...``, the admin key as Bearer): the same operations as ``llamascope keys``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import anyio
from fastapi import APIRouter, Request
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from starlette.responses import JSONResponse

from llamascope import errors
from llamascope.accounts import admin
from llamascope.accounts.records import ModelAllowance, utcnow
from llamascope.accounts.store import AccountStore
from llamascope.api import openapi
from llamascope.api.errors import request_id_of

router = APIRouter(prefix="/admin")


class _Strict(BaseModel):
    """Refuses what it does not know: a misspelt limit must not make a key without that limit."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _Allowance(_Strict):
    """A grant's allowance: tokens and days (each a number, "unlimited", or left out for the model's)."""

    allowance: Any = Field(None, validation_alias=AliasChoices("allowance", "allowance_tokens"))
    days: Any = None

    @field_validator("allowance")
    @classmethod
    def _allowance(cls, value: Any) -> Any:
        return admin.parse_tokens(value, "allowance")

    @field_validator("days")
    @classmethod
    def _days(cls, value: Any) -> Any:
        return admin.parse_days(value, "days")


# Field names are the CLI's options' (allowance, days, expires_days, rpm, tpm, concurrency, model); the longer
# names the API has always taken (allowance_tokens, requests_per_minute, ...) are accepted too.
class NewKey(_Allowance):
    name: str = ""
    models: list[str] | None = Field(
        None,
        validation_alias=AliasChoices("models", "model"),
        # one name or a list of them (see _one_or_many)
        json_schema_extra={
            "anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}, {"type": "null"}]
        },
    )
    expires_days: Any = None
    rpm: Any = Field(None, validation_alias=AliasChoices("rpm", "requests_per_minute"))
    tpm: Any = Field(None, validation_alias=AliasChoices("tpm", "tokens_per_minute"))
    concurrency: Any = Field(None, validation_alias=AliasChoices("concurrency", "max_concurrent"))

    @field_validator("models", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("expires_days")
    @classmethod
    def _expires(cls, value: Any) -> Any:
        return admin.parse_days(value, "expires_days", False)

    @field_validator("rpm", "tpm", "concurrency")
    @classmethod
    def _per_minute(cls, value: Any, info: ValidationInfo) -> Any:
        return admin.parse_limit(value, str(info.field_name))


class NewGrant(_Allowance):
    model: str


def _fields(model: type[BaseModel]) -> str:
    names = []
    for name, info in model.model_fields.items():
        aliases = getattr(info.validation_alias, "choices", [name])
        names.append(" or ".join(dict.fromkeys([name, *aliases])))
    return ", ".join(names)


class GrantDescription(BaseModel):
    model: str
    allowance_tokens: int | None = Field(description="None: unlimited")
    used_tokens: int
    reserved_tokens: int
    granted_at: str
    expires_at: str | None
    exhausted_at: str | None


class KeyDescription(BaseModel):
    """A key and its grants (never the key or its hash)."""

    id: int
    prefix: str
    name: str
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrent: int | None
    grants: list[GrantDescription]


class NewKeyDescription(KeyDescription):
    api_key: str = Field(description="The new key, shown this once.")
    warnings: list[str] | None = Field(None, description="Names granted that this server does not serve.")


class UsageRow(BaseModel):
    """Requests and tokens of one key, model and day (UTC); model "" for refusals of requests that named no
    served model."""

    key_id: int
    prefix: str
    model: str
    day: str
    requests: int
    ok: int = Field(0, description="Requests that ended as asked.")
    cancelled: int = Field(0, description="Requests whose client hung up.")
    failed: int = Field(0, description="Requests that ended with an error code.")
    interrupted: int = Field(0, description="Requests a crash cut short, charged to their last checkpoint.")
    input_tokens: int
    output_tokens: int
    image_tokens: int
    refused: int = Field(0, description="Requests refused before they reached the model (not in requests).")
    refusals: dict[str, int] = Field(default_factory=dict, description="The refused requests per DashScope code.")


class RequestRow(BaseModel):
    """One request of the ledger (``?requests=N``): its tokens and how it ended."""

    request_id: str
    key_id: int
    prefix: str
    model: str
    input_tokens: int
    output_tokens: int
    image_tokens: int
    status: str = Field(description="ok, cancelled, interrupted, or the error code")
    started_at: str
    finished_at: str


class KeysAnswer(BaseModel):
    request_id: str
    data: list[KeyDescription]


class KeyAnswer(BaseModel):
    request_id: str
    data: KeyDescription


class NewKeyAnswer(BaseModel):
    request_id: str
    data: NewKeyDescription


class UsageAnswer(BaseModel):
    request_id: str
    data: list[UsageRow] | list[RequestRow] = Field(description="Per day, key and model; with ?requests=N, requests.")


class UsageQuery(BaseModel):
    """The query of /admin/usage, for the document (``usage`` checks each parameter itself)."""

    key: str | None = Field(None, description="A key's id, the whole key, or a prefix.")
    days: float | None = Field(None, gt=0, le=36_525, allow_inf_nan=False, description="The last so many days.")
    requests: int | None = Field(None, ge=1, le=2**31 - 1, description="List this many single requests instead.")


def _store(request: Request) -> AccountStore:
    return request.app.state.service.accounts.store


def _served(request: Request) -> list[str]:
    return list(request.app.state.model_allowances)


def _allowances(request: Request) -> dict[str, ModelAllowance]:
    """Each served model's default allowance, as the composition root gave create_app."""
    return dict(request.app.state.model_allowances)


async def _body(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    if not raw.strip():  # as documented: a JSON object, {} for every default
        raise errors.invalid_parameter("The request body must be a JSON object ({} takes every default).")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "the body"
        if error["type"] == "extra_forbidden":
            message = f"Unknown field {where!r} in the request body; the fields are: {_fields(model)}."
        elif error["type"] == "missing":
            message = f"Field {where!r} is required; the fields are: {_fields(model)}."
        elif error["type"].startswith("json"):
            message = f"The request body is not a valid JSON object: {error['msg']}."
        else:
            said = error["msg"].removeprefix("Value error, ")
            message = f"Field {where!r} {said[said.index('must be') :] if 'must be' in said else said}."
        raise errors.invalid_parameter(message) from None


def _key_ref(ref: str) -> str:
    """A key's id or prefix as the store can look it up (ids are 32-bit)."""
    if ref.isdigit() and (not ref.isascii() or int(ref) >= 2**31):
        raise errors.invalid_parameter(f"no key {ref!r}")
    return ref


def _answer(request: Request, data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse({"request_id": request_id_of(request), "data": data}, status_code=status)


async def _run(call: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return await anyio.to_thread.run_sync(lambda: call(*args, **kwargs))
    except (LookupError, ValueError) as exc:
        raise errors.invalid_parameter(str(exc)) from None


@router.get("/keys")
async def list_keys(request: Request) -> JSONResponse:
    rows = await _run(_store(request).list_keys)
    return _answer(request, [admin.describe(view, grants) for view, grants in rows])


@router.post("/keys")
async def create_key(request: Request) -> JSONResponse:
    body: NewKey = await _body(request, NewKey)
    key, view, grants = await _run(
        admin.create_key,
        _store(request),
        _allowances(request),
        name=body.name,
        models=body.models,
        allowance=body.allowance,
        days=body.days,
        expires_days=body.expires_days,
        requests_per_minute=body.rpm,
        tokens_per_minute=body.tpm,
        max_concurrent=body.concurrency,
    )
    data = {"api_key": key, **admin.describe(view, grants)}
    return _answer(request, data | _warnings(request, body.models or []), status=200)


def _warnings(request: Request, models: list[str]) -> dict[str, Any]:
    unknown = admin.unknown_models(models, _served(request))
    if not unknown:
        return {}
    served = ", ".join(_served(request))
    return {"warnings": [f"{m!r} is not served by this server (it serves {served}); granted anyway" for m in unknown]}


@router.post("/keys/{ref}/revoke")
async def revoke_key(request: Request, ref: str) -> JSONResponse:
    view = await _run(_store(request).revoke, _key_ref(ref))
    return _answer(request, admin.describe(view, []))


@router.post("/keys/{ref}/grants")
async def grant(request: Request, ref: str) -> JSONResponse:
    body: NewGrant = await _body(request, NewGrant)
    store = _store(request)
    view = await _run(store.key, _key_ref(ref))
    await _run(admin.grant_models, store, view.id, [body.model], _allowances(request), body.allowance, body.days)
    rows = await _run(store.list_keys)
    data = next(admin.describe(v, g) for v, g in rows if v.id == view.id)
    return _answer(request, data | _warnings(request, [body.model]))


@router.get("/usage")
async def usage(request: Request) -> JSONResponse:
    """Totals per day, key and model; with ``requests=N``, the N newest requests one by one."""
    store = _store(request)
    unknown = set(request.query_params) - {"key", "days", "requests"}
    if unknown:
        raise errors.invalid_parameter(
            f"Unknown query parameter {sorted(unknown)[0]!r}; the parameters are: key, days, requests."
        )
    key = request.query_params.get("key")
    days = _query(admin.parse_days, request.query_params.get("days"), "days", False)
    count = _query(admin.parse_limit, request.query_params.get("requests"), "requests")
    key_id = (await _run(store.key, _key_ref(key))).id if key else None
    since = utcnow() - timedelta(days=float(days)) if days is not None else None
    if count is not None:
        return _answer(request, admin.jsonable(await _run(store.requests, key_id, since, count)))
    rows = await _run(store.usage, key_id, since)
    # ``data`` keeps the ledger's rows (each with its refusals); a day, key and model with refusals only (no
    # request reached a model) is listed apart, so existing readers of ``data`` see the rows they always did.
    return JSONResponse(
        {
            "request_id": request_id_of(request),
            "data": [row for row in rows if row["requests"]],
            "refused_only": [row for row in rows if not row["requests"]],
        }
    )


def _query(parse: Any, value: str | None, name: str, *args: Any) -> Any:
    try:
        return parse(value, name, *args)
    except ValueError as exc:
        raise errors.invalid_parameter(f"Query parameter {exc}.") from None


OPERATIONS = (
    openapi.operation("GET", "/admin/keys", "Keys and their grants", tag="admin", auth="admin_key", ok=KeysAnswer),
    openapi.operation("POST", "/admin/keys", "A new key", tag="admin", auth="admin_key", body=NewKey, ok=NewKeyAnswer),
    openapi.operation(
        "POST",
        "/admin/keys/{ref}/revoke",
        "Revoke a key (by id or prefix)",
        tag="admin",
        auth="admin_key",
        ok=KeyAnswer,
        refusals=(400,),
    ),
    openapi.operation(
        "POST",
        "/admin/keys/{ref}/grants",
        "Grant a key a model",
        tag="admin",
        auth="admin_key",
        body=NewGrant,
        ok=KeyAnswer,
    ),
    openapi.operation(
        "GET",
        "/admin/usage",
        "Requests and tokens per day, key and model",
        tag="admin",
        auth="admin_key",
        query=UsageQuery,
        ok=UsageAnswer,
        refusals=(400,),
    ),
)
