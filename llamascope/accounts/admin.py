"""Administration, shared by the ``llamascope keys``/``usage`` commands and the admin HTTP API."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from llamascope.accounts.store import AccountStore, GrantView, KeyView, utcnow
from llamascope.settings import ModelSpec

UNLIMITED = "unlimited"
Limit = int | float | str | None  # a number, "unlimited", or None for the model's default


def _limit(value: Limit, default: Any) -> Any:
    if value is None:
        return default
    if value == UNLIMITED:
        return None
    return value


def grant_models(
    store: AccountStore,
    key_id: int,
    models: Iterable[str],
    specs: Mapping[str, ModelSpec],
    allowance: Limit = None,
    days: Limit = None,
) -> list[GrantView]:
    granted = []
    for model in models:
        if model not in specs:
            raise ValueError(f"{model!r} is not a served model; served: {', '.join(specs)}")
        spec = specs[model]
        tokens = _limit(allowance, spec.allowance_tokens)
        period = _limit(days, spec.allowance_days)
        granted.append(store.grant(key_id, model, None if tokens is None else int(tokens), period))
    return granted


def create_key(
    store: AccountStore,
    specs: Mapping[str, ModelSpec],
    *,
    name: str = "",
    models: Iterable[str] | None = None,
    allowance: Limit = None,
    days: Limit = None,
    expires_days: float | None = None,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
    max_concurrent: int | None = None,
) -> tuple[str, KeyView, list[GrantView]]:
    """A new key granted ``models`` (default: every served model). The key is returned once, never stored."""
    chosen = list(models) if models else list(specs)
    for model in chosen:
        if model not in specs:
            raise ValueError(f"{model!r} is not a served model; served: {', '.join(specs)}")
    key, view = store.create_key(
        name,
        expires_at=utcnow() + timedelta(days=expires_days) if expires_days else None,
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
        max_concurrent=max_concurrent,
    )
    return key, view, grant_models(store, view.id, chosen, specs, allowance, days)


def seed_keys(store: AccountStore, keys: Iterable[str], specs: Mapping[str, ModelSpec]) -> None:
    """Keys from settings: stored (by hash) if new, and granted every served model without limit.

    Replicas starting together on one store each try: a key or grant another stored a moment before (the
    unique constraint refuses the second insert) is taken as it is.
    """
    from sqlalchemy.exc import IntegrityError

    for key in keys:
        view = store.find_key(key)
        if view is None:
            try:
                view = store.create_key("from settings", key=key)[1]
            except IntegrityError:
                view = store.find_key(key)
        assert view is not None
        for model in specs:
            grant = store.find_grant(view.id, model)
            if grant is None or grant.allowance_tokens is not None or grant.expires_at is not None:
                with contextlib.suppress(IntegrityError):
                    store.grant(view.id, model, None, None)


def describe(view: KeyView, grants: list[GrantView]) -> dict[str, Any]:
    """A key and its grants as plain JSON-able data (no hash, no key)."""
    data = asdict(view)
    data["grants"] = [{k: v for k, v in asdict(g).items() if k not in ("id", "key_id")} for g in grants]
    return _jsonable(data)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def keys_table(rows: list[tuple[KeyView, list[GrantView]]]) -> str:
    lines = [f"{'id':>4}  {'key':<10} {'name':<20} {'state':<8} {'model':<32} {'used':>10} {'allowance':>10}  until"]
    now = utcnow()
    for view, grants in rows:
        state = (
            "revoked" if view.revoked_at else ("expired" if view.expires_at and view.expires_at <= now else "active")
        )
        for i, g in enumerate(grants or [None]):  # type: ignore[list-item]
            head = f"{view.id:>4}  {view.prefix + '…':<10} {view.name[:20]:<20} {state:<8}" if i == 0 else " " * 45
            if g is None:
                lines.append(f"{head} (no models)")
                continue
            allowance = "unlimited" if g.allowance_tokens is None else str(g.allowance_tokens)
            until = g.expires_at.strftime("%Y-%m-%d") if g.expires_at else "-"
            lines.append(f"{head} {g.model[:32]:<32} {g.used_tokens:>10} {allowance:>10}  {until}")
    return "\n".join(lines)


def usage_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'day':<10}  {'key':<10} {'model':<32} {'requests':>8} {'input':>10} {'output':>10} {'image':>10}"]
    for r in rows:
        lines.append(
            f"{r['day']:<10}  {r['prefix'] + '…':<10} {r['model'][:32]:<32} {r['requests']:>8} "
            f"{r['input_tokens']:>10} {r['output_tokens']:>10} {r['image_tokens']:>10}"
        )
    if len(lines) == 1:
        lines.append("(no requests yet)")
    return "\n".join(lines)
