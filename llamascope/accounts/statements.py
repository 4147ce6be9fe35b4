"""The statements every request runs (find its key and grant, charge it, write its ledger row), built once:
building them per call was most of their cost. SQLAlchemy Core runs them on PostgreSQL; on SQLite
``sqlite_hot_path`` runs their compiled text through the stdlib driver."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import fields
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, bindparam, case, delete, insert, literal_column, select, update

from llamascope.accounts.records import EVERY_MODEL, GrantView, KeyView, Reservation
from llamascope.accounts.schema import ApiKey, Grant, InFlight, UsageRecord

LEDGER_FIELDS = (
    "request_id",
    "key_id",
    "model",
    "input_tokens",
    "output_tokens",
    "image_tokens",
    "status",
    "started_at",
    "finished_at",
)
# The in-flight row admission writes with its hold.
IN_FLIGHT_FIELDS = (
    "request_id",
    "replica_id",
    "grant_id",
    "key_id",
    "model",
    "reserved_tokens",
    "started_at",
    "checkpoint_at",
    "input_tokens",
    "output_tokens",
    "image_tokens",
)


def upsert_into(table: Any, dialect_name: str) -> Any:
    """An INSERT that can take ON CONFLICT DO UPDATE, in the store's dialect (SQLite's or PostgreSQL's)."""
    # why: PostgreSQL's dialect is 0.1 s of imports that an SQLite store never needs (a PostgreSQL engine
    # has imported it already)
    module: Any = importlib.import_module(
        "sqlalchemy.dialects." + ("sqlite" if dialect_name == "sqlite" else "postgresql")
    )
    return module.insert(table)


def columns(table: Any, view: type) -> list[Any]:
    """The table's columns a view holds, in the view's order."""
    return [table.__table__.c[f.name] for f in fields(view)]


class HotStatements:
    def __init__(self) -> None:
        self.find_key = select(*columns(ApiKey, KeyView)).where(ApiKey.key_hash == bindparam("key_hash"))
        # The model's own grant, else the key's grant for every model.
        # Literal SQL for the constants: these statements are compiled once to text, with only named parameters.
        every: Any = literal_column(f"'{EVERY_MODEL}'")
        matches = (Grant.key_id == bindparam("key_id"), (Grant.model == bindparam("model")) | (Grant.model == every))
        own_first = (Grant.model == every).asc()  # false (the model's own grant) sorts first
        # At most two rows: the first is the one that applies (callers take the first).
        self.find_grant = select(*columns(Grant, GrantView)).where(*matches).order_by(own_first)
        self.grant_id = select(Grant.id).where(*matches).order_by(own_first)
        used: Any = bindparam("used", type_=BigInteger)
        crosses = Grant.allowance_tokens.is_not(None) & (Grant.used_tokens + used >= Grant.allowance_tokens)
        self.charge = (
            update(Grant)
            .where(Grant.id == bindparam("grant_id"))
            .values(
                used_tokens=Grant.used_tokens + used,
                reserved_tokens=Grant.reserved_tokens - bindparam("held"),
                exhausted_at=case((Grant.exhausted_at.is_(None) & crosses, bindparam("now")), else_=Grant.exhausted_at),
            )
        )
        self.ledger_row = insert(UsageRecord).values({name: bindparam(name) for name in LEDGER_FIELDS})
        # Admission's hold (``reserve_rows``, run by AccountStore.reserve and by the SQLite hot path): the grant's
        # room, taken in one conditional UPDATE; the part the allowance has not left given back; the in-flight row.
        room = Grant.allowance_tokens.is_(None) | (Grant.used_tokens + Grant.reserved_tokens < Grant.allowance_tokens)
        valid = Grant.expires_at.is_(None) | (Grant.expires_at > bindparam("now"))
        self.hold = (
            update(Grant)
            .where(Grant.id == bindparam("grant_id"), room, valid)
            .values(reserved_tokens=Grant.reserved_tokens + bindparam("tokens", type_=BigInteger))
            .returning(Grant.allowance_tokens, Grant.used_tokens, Grant.reserved_tokens)
        )
        self.give_back = (
            update(Grant)
            .where(Grant.id == bindparam("grant_id"))
            .values(reserved_tokens=Grant.reserved_tokens - bindparam("excess", type_=BigInteger))
        )
        self.in_flight_row = insert(InFlight).values({name: bindparam(name) for name in IN_FLIGHT_FIELDS})
        self.forget_in_flight = delete(InFlight).where(InFlight.request_id == bindparam("request_id"))


def reserve_rows(
    execute: Callable[[Any, dict[str, Any]], Sequence[Any]],
    hot: HotStatements,
    key_id: int,
    model: str,
    tokens: int,
    now: datetime,
    prompt_tokens: int | None,
    in_flight: tuple[str, str] | None,
) -> Reservation | None:
    """The statements of ``AccountStore.reserve``'s transaction (its text says what they hold), each run by
    ``execute`` (statement, parameters) -> rows, inside a transaction the caller opens and commits: SQLAlchemy's
    connection on any store, the stdlib driver on SQLite's hot path (sqlite_hot_path)."""
    found = execute(hot.grant_id, {"key_id": key_id, "model": model})
    if not found:
        return None
    grant_id = found[0][0]
    held = execute(hot.hold, {"grant_id": grant_id, "tokens": tokens, "now": now})
    if not held:
        return None
    allowance, used, reserved = held[0]
    if prompt_tokens is not None and allowance is not None:
        left = allowance - used - (reserved - tokens)  # what the others left before this hold
        kept = min(tokens, max(left, prompt_tokens + 1))
        if kept < tokens:
            execute(hot.give_back, {"grant_id": grant_id, "excess": tokens - kept})
            tokens = kept
    if in_flight is not None:
        request_id, replica_id = in_flight
        row = {"request_id": request_id, "replica_id": replica_id, "grant_id": grant_id, "key_id": key_id}
        row |= {"model": model, "reserved_tokens": tokens, "input_tokens": 0, "output_tokens": 0}
        execute(hot.in_flight_row, row | {"image_tokens": 0, "started_at": now, "checkpoint_at": now})
    return Reservation(grant_id, key_id, model, tokens, now)
