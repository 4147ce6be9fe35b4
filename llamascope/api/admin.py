"""The admin HTTP API (``/admin/...``, the admin key as Bearer): the same operations as ``llamascope keys``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import anyio
from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse

from llamascope import errors
from llamascope.accounts import admin
from llamascope.accounts.store import AccountStore, utcnow
from llamascope.api.errors import request_id_of
from llamascope.settings import ModelSpec

router = APIRouter(prefix="/admin")


class NewKey(BaseModel):
    name: str = ""
    models: list[str] | None = None
    allowance_tokens: int | str | None = None  # a number, "unlimited", or the model's default
    days: float | str | None = None
    expires_days: float | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None


class NewGrant(BaseModel):
    model: str
    allowance_tokens: int | str | None = None
    days: float | str | None = None


def _store(request: Request) -> AccountStore:
    return request.app.state.service.accounts.store


def _specs(request: Request) -> dict[str, ModelSpec]:
    return request.app.state.model_specs


async def _body(request: Request, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise errors.invalid_parameter(f"Invalid admin request: {exc.errors()[0]['msg']}") from None


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
    view = await _run(_store(request).revoke, ref)
    return _answer(request, admin.describe(view, []))


@router.post("/keys/{ref}/grants")
async def grant(request: Request, ref: str) -> JSONResponse:
    body: NewGrant = await _body(request, NewGrant)
    store = _store(request)
    view = await _run(store.key, ref)
    await _run(admin.grant_models, store, view.id, [body.model], _specs(request), body.allowance_tokens, body.days)
    rows = await _run(store.list_keys)
    return _answer(request, next(admin.describe(v, g) for v, g in rows if v.id == view.id))


@router.get("/usage")
async def usage(request: Request) -> JSONResponse:
    store = _store(request)
    key = request.query_params.get("key")
    days = request.query_params.get("days")
    key_id = (await _run(store.key, key)).id if key else None
    since = utcnow() - timedelta(days=float(days)) if days else None
    return _answer(request, await _run(store.usage, key_id, since))
