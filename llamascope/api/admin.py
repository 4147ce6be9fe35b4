"""The admin HTTP API (``/admin/...``, the admin key as Bearer): the same operations as ``llamascope keys``."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse

from llamascope import errors
from llamascope.accounts import admin
from llamascope.accounts.store import AccountStore, utcnow
from llamascope.api import openapi
from llamascope.api.errors import request_id_of
from llamascope.settings import ModelSpec

router = APIRouter(prefix="/admin")


# Bounds the store can hold: dates stay within the calendar, counts within its integer columns.
MAX_DAYS = 36_500
Allowance = Annotated[int, Field(ge=0, le=2**63 - 1)] | Literal["unlimited"] | None
Days = Annotated[float, Field(gt=0, le=MAX_DAYS, allow_inf_nan=False)] | Literal["unlimited"] | None
PerKeyLimit = Annotated[int | None, Field(ge=1, le=2**31 - 1)]


class NewKey(BaseModel):
    model_config = ConfigDict(strict=True)  # numbers as JSON numbers, as documented
    name: str = Field("", max_length=200)
    models: list[str] | None = Field(None, description="Default: every served model.")
    allowance_tokens: Allowance = Field(None, description='Tokens, "unlimited", or the model\'s default.')
    days: Days = Field(None, description="The allowance's period, \"unlimited\", or the model's default.")
    expires_days: float | None = Field(None, gt=0, le=MAX_DAYS, allow_inf_nan=False)
    requests_per_minute: PerKeyLimit = None
    tokens_per_minute: PerKeyLimit = None
    max_concurrent: PerKeyLimit = None


class NewGrant(BaseModel):
    model_config = ConfigDict(strict=True)
    model: str
    allowance_tokens: Allowance = None
    days: Days = None


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


class UsageRow(BaseModel):
    """Requests and tokens of one key, model and day (UTC)."""

    key_id: int
    prefix: str
    model: str
    day: str
    requests: int
    input_tokens: int
    output_tokens: int
    image_tokens: int


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
    data: list[UsageRow]


class UsageQuery(BaseModel):
    key: str | None = Field(None, description="A key's id or prefix.")
    days: float | None = Field(None, gt=0, le=MAX_DAYS, allow_inf_nan=False, description="The last so many days.")


def _store(request: Request) -> AccountStore:
    return request.app.state.service.accounts.store


def _specs(request: Request) -> dict[str, ModelSpec]:
    return request.app.state.model_specs


def _invalid(exc: ValidationError) -> errors.ServiceError:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"] if not isinstance(part, int) or part)
    return errors.invalid_parameter(f"Invalid admin request: {where + ': ' if where else ''}{first['msg']}")


async def _body(request: Request, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise _invalid(exc) from None


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
        _specs(request),
        name=body.name,
        models=body.models,
        allowance=body.allowance_tokens,
        days=body.days,
        expires_days=body.expires_days,
        requests_per_minute=body.requests_per_minute,
        tokens_per_minute=body.tokens_per_minute,
        max_concurrent=body.max_concurrent,
    )
    return _answer(request, {"api_key": key, **admin.describe(view, grants)}, status=200)


@router.post("/keys/{ref}/revoke")
async def revoke_key(request: Request, ref: str) -> JSONResponse:
    view = await _run(_store(request).revoke, _key_ref(ref))
    return _answer(request, admin.describe(view, []))


@router.post("/keys/{ref}/grants")
async def grant(request: Request, ref: str) -> JSONResponse:
    body: NewGrant = await _body(request, NewGrant)
    store = _store(request)
    view = await _run(store.key, _key_ref(ref))
    await _run(admin.grant_models, store, view.id, [body.model], _specs(request), body.allowance_tokens, body.days)
    rows = await _run(store.list_keys)
    return _answer(request, next(admin.describe(v, g) for v, g in rows if v.id == view.id))


@router.get("/usage")
async def usage(request: Request) -> JSONResponse:
    store = _store(request)
    try:
        query = UsageQuery.model_validate(dict(request.query_params))
    except ValidationError as exc:
        raise _invalid(exc) from None
    key_id = (await _run(store.key, _key_ref(query.key))).id if query.key else None
    since = utcnow() - timedelta(days=query.days) if query.days else None
    return _answer(request, await _run(store.usage, key_id, since))


openapi.operation("GET", "/admin/keys", "Keys and their grants", tag="admin", auth="admin_key", ok=KeysAnswer)
openapi.operation("POST", "/admin/keys", "A new key", tag="admin", auth="admin_key", body=NewKey, ok=NewKeyAnswer)
openapi.operation(
    "POST",
    "/admin/keys/{ref}/revoke",
    "Revoke a key (by id or prefix)",
    tag="admin",
    auth="admin_key",
    ok=KeyAnswer,
    refusals=(400,),
)
openapi.operation(
    "POST",
    "/admin/keys/{ref}/grants",
    "Grant a key a model",
    tag="admin",
    auth="admin_key",
    body=NewGrant,
    ok=KeyAnswer,
)
openapi.operation(
    "GET",
    "/admin/usage",
    "Requests and tokens per day, key and model",
    tag="admin",
    auth="admin_key",
    query=UsageQuery,
    ok=UsageAnswer,
    refusals=(400,),
)
