"""Requests of a key refused before they reached a model (a bad parameter, a rate limit, a spent allowance):
they have no ledger row, so ``llamascope usage`` counts them here, per key, model, DashScope code and day.

Counting is on the request path, so it is a dictionary increment under a lock, no store call; ``save``
adds what was counted since its last call in one transaction of upserts (the checkpoint writer calls it
every tick, and at a clean stop). A process killed before its next tick loses at most that tick's counts.
"""

from __future__ import annotations

import threading
from collections import Counter
from datetime import date, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from llamascope.accounts.records import utcnow
from llamascope.accounts.schema import ApiKey, Refusals
from llamascope.accounts.statements import upsert_into

_MODEL_CHARS = Refusals.__table__.c.model.type.length  # type: ignore[attr-defined]
_CODE_CHARS = Refusals.__table__.c.code.type.length  # type: ignore[attr-defined]


class RefusalCounts:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._counts: Counter[tuple[int, str, str, date]] = Counter()
        self._lock = threading.Lock()

    def count(self, key_id: int, model: str, code: str, now: datetime | None = None) -> None:
        day = (now or utcnow()).date()
        with self._lock:
            self._counts[(key_id, model[:_MODEL_CHARS], code[:_CODE_CHARS], day)] += 1

    def save(self) -> None:
        """Add the counts since the last save to the store; kept for the next save if the store fails."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
        if not counts:
            return
        rows = [{"key_id": k, "model": m, "code": c, "day": d, "count": n} for (k, m, c, d), n in counts.items()]
        insert = upsert_into(Refusals, self.engine.dialect.name)
        upsert = insert.on_conflict_do_update(
            index_elements=["key_id", "model", "code", "day"], set_={"count": Refusals.count + insert.excluded.count}
        )
        try:
            with self.engine.begin() as connection:
                connection.execute(upsert, rows)
        except BaseException:
            with self._lock:
                self._counts.update(counts)
            raise

    def totals(self, key_id: int | None, since: datetime | None) -> list[tuple[int, str, str, str, str, int]]:
        """Saved counts: key id, key prefix, model, day (YYYY-MM-DD), code, count."""
        query = (
            select(
                Refusals.key_id, ApiKey.prefix, Refusals.model, Refusals.day, Refusals.code, func.sum(Refusals.count)
            )
            .join(ApiKey, ApiKey.id == Refusals.key_id)
            .group_by(Refusals.key_id, ApiKey.prefix, Refusals.model, Refusals.day, Refusals.code)
        )
        if key_id is not None:
            query = query.where(Refusals.key_id == key_id)
        if since is not None:
            query = query.where(Refusals.day >= since.date())
        with self.engine.connect() as connection:
            return [(r[0], r[1], r[2], str(r[3]), r[4], int(r[5])) for r in connection.execute(query)]


def with_refusals(
    usage: list[dict[str, Any]], totals: list[tuple[int, str, str, str, str, int]]
) -> list[dict[str, Any]]:
    """The ledger's rows per day, key and model, each with ``refused`` (how many) and ``refusals`` (how many
    per code); a day, key and model with refusals only gets a row of its own, with no requests."""
    rows = {(r["day"], r["key_id"], r["model"]): r | {"refused": 0, "refusals": {}} for r in usage}
    for key_id, prefix, model, day, code, count in totals:
        row = rows.get((day, key_id, model))
        if row is None:
            row = rows[(day, key_id, model)] = {
                "key_id": key_id,
                "prefix": prefix,
                "model": model,
                "day": day,
                **dict.fromkeys(_LEDGER_COUNTS, 0),
                "refused": 0,
                "refusals": {},
            }
        row["refused"] += count
        row["refusals"][code] = row["refusals"].get(code, 0) + count
    for row in rows.values():
        row["refusals"] = dict(sorted(row["refusals"].items()))
    return [rows[k] for k in sorted(rows)]


_LEDGER_COUNTS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "image_tokens",
    "ok",
    "cancelled",
    "failed",
    "interrupted",
)
