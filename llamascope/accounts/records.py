"""The accounts' value records: a key, a grant, a reservation, and how keys are made and matched.

Plain frozen dataclasses and pure functions, no database: the pure decisions (``access``, ``limits``) and
the request path pass these around; ``store`` reads and writes them.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, TypeVar

PREFIX_LENGTH = 7  # the characters of a key kept in clear ("sk-" and 4 more), for listings and logs
EVERY_MODEL = "*"  # a grant for this model name covers every served model without a grant of its own
INTERRUPTED = "interrupted"  # the ledger status of a request its replica did not live to settle
# The shortest whole key: "sk-" and 32 hex digits, as DashScope makes them (see access.key_weakness).
MIN_WHOLE_KEY = len("sk-") + 32


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime | None) -> datetime | None:
    """A datetime in UTC: SQLite hands datetimes back without their zone; they are stored as UTC."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "sk-" + secrets.token_hex(20)


def is_whole_key(text: str) -> bool:
    """A string as long as the shortest key the settings accept ("sk-" and 32 hex) or longer: matched by
    hash, never by prefix."""
    return text.startswith("sk-") and len(text) >= MIN_WHOLE_KEY


@dataclass(frozen=True)
class KeyView:
    id: int
    prefix: str
    name: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrent: int | None


@dataclass(frozen=True)
class GrantView:
    id: int
    key_id: int
    model: str
    allowance_tokens: int | None
    used_tokens: int
    reserved_tokens: int
    granted_at: datetime
    expires_at: datetime | None
    exhausted_at: datetime | None


@dataclass(frozen=True)
class Reservation:
    grant_id: int
    key_id: int
    model: str
    tokens: int
    started_at: datetime


@dataclass(frozen=True)
class ModelAllowance:
    """What ``keys create``/``keys grant`` give a key for a model unless told otherwise (None: unlimited)."""

    tokens: int | None
    days: float | None


V = TypeVar("V")
_DATE_FIELDS: dict[type, list[int]] = {}


def _date_fields(view: type) -> list[int]:
    if view not in _DATE_FIELDS:
        _DATE_FIELDS[view] = [i for i, f in enumerate(fields(view)) if "datetime" in str(f.type)]
    return _DATE_FIELDS[view]


def view_of(view: type[V], row: Any) -> V | None:
    """A view from a row holding its fields in order (None: no row); datetimes in UTC, also from text
    (SQLite through the stdlib driver)."""
    if row is None:
        return None
    values = list(row)
    for i in _date_fields(view):
        if isinstance(values[i], str):
            values[i] = datetime.fromisoformat(values[i])
        values[i] = aware(values[i])
    return view(*values)
