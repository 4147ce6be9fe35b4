"""Administration, shared by the ``llamascope keys``/``usage`` commands and the admin HTTP API.

It reads no settings: the caller (the command line, the admin API) passes each model's default allowance
as ``ModelAllowance`` values, made from the settings where they are read.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from llamascope.accounts.records import EVERY_MODEL, GrantView, KeyView, ModelAllowance, hash_key, utcnow

if TYPE_CHECKING:  # the parsers here run at every command's start (cli.build_parser): no SQLAlchemy for them
    from llamascope.accounts.store import AccountStore

UNLIMITED = "unlimited"
Limit = int | float | str | None  # a number, "unlimited", or None for the model's default

# The largest values a limit may take: beyond them a number means nothing (or overflows the store).
MAX_DAYS = 36_525  # 100 years
MAX_TOKENS = 2**63 - 1  # the ledger's BIGINT
MAX_PER_MINUTE = 2**31 - 1  # INTEGER columns
# A key made without --model gets one grant for every model (EVERY_MODEL), with these unless told otherwise.
DEFAULT_ALLOWANCE_TOKENS = 1_000_000
DEFAULT_ALLOWANCE_DAYS = 180.0
SETTINGS_KEY = "from settings"  # the name of keys from LLAMASCOPE_API_KEYS / api_keys
REMOVED_SETTINGS_KEY = "from settings, since removed"


def _number(value: object, name: str, accepts: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {accepts}; got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {accepts}; got {value!r}") from None
    if math.isnan(number):
        raise ValueError(f"{name} must be {accepts}; got {value!r}")
    return number


def _whole(value: object, name: str, accepts: str, most: int) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        number: float = int(value)  # exactly, however large
    else:
        number = _number(value, name, accepts)
    if not math.isfinite(number) or number != int(number) or not 1 <= number <= most:
        raise ValueError(f"{name} must be {accepts}; got {value!r}")
    return int(number)


def parse_tokens(value: Limit, name: str = "allowance") -> int | str | None:
    """Tokens of an allowance: a whole number from 1, or "unlimited"; None stays None (the default)."""
    if value is None or value == UNLIMITED:
        return value
    accepts = f'a whole number of tokens from 1 to {MAX_TOKENS}, or "{UNLIMITED}"'
    return _whole(value, name, accepts, MAX_TOKENS)


def parse_days(value: Limit, name: str = "days", unlimited: bool = True) -> float | str | None:
    """A number of days above 0 and at most 100 years (or "unlimited" where allowed); None stays None."""
    if value is None or (unlimited and value == UNLIMITED):
        return value
    accepts = f"a number of days above 0 and at most {MAX_DAYS}" + (f', or "{UNLIMITED}"' if unlimited else "")
    number = _number(value, name, accepts)
    if not 0 < number <= MAX_DAYS:
        raise ValueError(f"{name} must be {accepts}; got {value!r}")
    return number


def parse_limit(value: object, name: str) -> int | None:
    """A rate or concurrency limit: a whole number from 1; None: no limit."""
    if value is None:
        return None
    return _whole(value, name, f"a whole number from 1 to {MAX_PER_MINUTE} (leave it out for no limit)", MAX_PER_MINUTE)


def parse_models(models: Iterable[str] | None, name: str = "model") -> list[str]:
    """The models a key is granted, each once; None: every model (``EVERY_MODEL``). An empty list or an
    empty name is refused rather than read as every model, or granted after the key was written."""
    if models is None:
        return [EVERY_MODEL]
    chosen = list(dict.fromkeys(models))
    if not chosen:
        raise ValueError(f"'{name}' must name at least one model (leave it out for every model); got []")
    for model in chosen:
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"'{name}' must be a model's name; got {model!r}")
    return chosen


def _limit(value: Limit, default: Any) -> Any:
    if value is None:
        return default
    if value == UNLIMITED:
        return None
    return value


def model_allowances(models: Mapping[str, Any]) -> dict[str, ModelAllowance]:
    """Each model's default allowance, from model specs that have ``allowance_tokens`` and ``allowance_days``."""
    return {name: ModelAllowance(spec.allowance_tokens, spec.allowance_days) for name, spec in models.items()}


def unknown_models(models: Iterable[str], served: Iterable[str]) -> list[str]:
    """Names this process does not serve (another replica may): worth a warning, not a refusal."""
    known = set(served)
    return [m for m in models if m != EVERY_MODEL and m not in known]


def grant_models(
    store: AccountStore,
    key_id: int,
    models: Iterable[str],
    defaults: Mapping[str, ModelAllowance],
    allowance: Limit = None,
    days: Limit = None,
) -> list[GrantView]:
    """Grant each model (any name: a server may serve models this process's settings do not know; the
    caller warns of those, ``unknown_models``), with a fresh allowance: the given one, else the model's
    default from the settings, else the built-in default."""
    allowance = parse_tokens(allowance)
    days = parse_days(days)
    granted = []
    for model in parse_models(models):
        default = defaults.get(model)
        tokens = _limit(allowance, default.tokens if default else DEFAULT_ALLOWANCE_TOKENS)
        period = _limit(days, default.days if default else DEFAULT_ALLOWANCE_DAYS)
        granted.append(store.grant(key_id, model, None if tokens is None else int(tokens), period))
    return granted


def create_key(
    store: AccountStore,
    defaults: Mapping[str, ModelAllowance],
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
    """A new key granted ``models``; with none, one grant for every model the server serves, whatever it
    is configured with (``EVERY_MODEL``). The key is returned once, never stored."""
    # Every value is checked before anything is written.
    chosen = parse_models(models)
    allowance = parse_tokens(allowance)
    days = parse_days(days)
    lifetime = parse_days(expires_days, "expires_days", unlimited=False)
    key, view = store.create_key(
        name,
        expires_at=utcnow() + timedelta(days=float(lifetime)) if lifetime is not None else None,
        requests_per_minute=parse_limit(requests_per_minute, "requests_per_minute"),
        tokens_per_minute=parse_limit(tokens_per_minute, "tokens_per_minute"),
        max_concurrent=parse_limit(max_concurrent, "max_concurrent"),
    )
    return key, view, grant_models(store, view.id, chosen, defaults, allowance, days)


def seed_keys(store: AccountStore, keys: Iterable[str]) -> list[str]:
    """Bring the store in line with the keys of the settings; returns what changed, for the log.

    A key new to the store is kept (by hash) with one unlimited grant for every model. A key already there
    keeps its grants as they are (``keys grant`` changes them; a restart does not undo that). A key from
    the settings that they no longer name is revoked; named again, it is reinstated. A key revoked by
    ``keys revoke`` stays revoked.

    Replicas starting together on one store each try: a key or grant another stored a moment before (the
    unique constraint refuses the second insert) is taken as it is.
    """
    from sqlalchemy.exc import IntegrityError  # SQLAlchemy only with a store: see the imports above

    changes = []
    wanted = {hash_key(key): key for key in keys}
    for key_hash, view in store.key_hashes(SETTINGS_KEY).items():
        if key_hash not in wanted and view.revoked_at is None:
            store.update_key(view.id, revoked_at=utcnow(), name=REMOVED_SETTINGS_KEY)
            changes.append(f"revoked key {view.id} ({view.prefix}…): the settings no longer name it")
    removed = store.key_hashes(REMOVED_SETTINGS_KEY)
    for key_hash, key in wanted.items():
        if key_hash in removed:
            view = removed[key_hash]
            store.update_key(view.id, revoked_at=None, name=SETTINGS_KEY)
            changes.append(f"reinstated key {view.id} ({view.prefix}…): the settings name it again")
        elif (found := store.find_key(key)) is None:
            try:
                _, view = store.create_key(SETTINGS_KEY, key=key)
            except IntegrityError:  # another replica stored it a moment before
                continue
            with contextlib.suppress(IntegrityError):
                store.grant(view.id, EVERY_MODEL, None, None)
            changes.append(f"added key {view.id} ({view.prefix}…) from the settings, every model granted")
        elif found.revoked_at is not None:
            changes.append(f"key {found.id} ({found.prefix}…) of the settings was revoked (keys revoke): refused")
    return changes


def describe(view: KeyView, grants: list[GrantView]) -> dict[str, Any]:
    """A key and its grants as plain JSON-able data (no hash, no key)."""
    data = asdict(view)
    data["grants"] = [{k: v for k, v in asdict(g).items() if k not in ("id", "key_id")} for g in grants]
    return jsonable(data)


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _limits(view: KeyView) -> str:
    parts = [
        f"{view.requests_per_minute} rpm" if view.requests_per_minute else "",
        f"{view.tokens_per_minute} tpm" if view.tokens_per_minute else "",
        f"{view.max_concurrent} at once" if view.max_concurrent else "",
    ]
    return ", ".join(p for p in parts if p) or "-"


def _model_name(model: str) -> str:
    return "* (every model)" if model == EVERY_MODEL else model


def keys_table(rows: list[tuple[KeyView, list[GrantView]]]) -> str:
    """Keys (prefix only), their state, expiry and rate limits, and a line per grant."""
    # The limits are shown whole (the docs' own `--rpm 60 --tpm 200000 --concurrency 4` is 29 characters).
    wide = max([28, *(len(_limits(view)) for view, _ in rows)])
    head = f"{'id':>4}  {'key':<10} {'name':<20} {'state':<8} {'key expires':<11} {'limits':<{wide}}"
    lines = [f"{head} {'model':<32} {'used':>10} {'allowance':>10}  until"]
    now = utcnow()
    for view, grants in rows:
        state = (
            "revoked" if view.revoked_at else ("expired" if view.expires_at and view.expires_at <= now else "active")
        )
        expires = view.expires_at.strftime("%Y-%m-%d") if view.expires_at else "never"
        for i, g in enumerate(grants or [None]):  # type: ignore[list-item]
            if i == 0:
                key = f"{view.id:>4}  {view.prefix + '…':<10} {view.name[:20]:<20} {state:<8} {expires:<11}"
                key += f" {_limits(view):<{wide}}"
            else:
                key = " " * len(head)
            if g is None:
                lines.append(f"{key} (no models)")
                continue
            allowance = "unlimited" if g.allowance_tokens is None else str(g.allowance_tokens)
            until = g.expires_at.strftime("%Y-%m-%d") if g.expires_at else "-"
            lines.append(f"{key} {_model_name(g.model)[:32]:<32} {g.used_tokens:>10} {allowance:>10}  {until}")
    return "\n".join(lines)


# The columns of `llamascope usage`: (heading, width, the row's field). Add a column here.
USAGE_COLUMNS = (
    ("requests", 8, "requests"),
    ("ok", 6, "ok"),
    ("cancelled", 9, "cancelled"),
    ("failed", 6, "failed"),
    ("interrupted", 11, "interrupted"),  # requests a crash cut short, charged as far as their last checkpoint
    ("input", 10, "input_tokens"),
    ("output", 10, "output_tokens"),
    ("image", 10, "image_tokens"),
    ("refused", 7, "refused"),  # requests refused before they reached the model (no ledger row), ...
)


def _refusals(counts: dict[str, int] | None) -> str:
    """... and by DashScope code: "InvalidParameter=14 Throttling.RateQuota=3"."""
    return " ".join(f"{code}={n}" for code, n in (counts or {}).items())


def usage_table(rows: list[dict[str, Any]]) -> str:
    """Requests (by how they ended, and those refused by code) and tokens per day, key and model."""
    columns = " ".join(f"{h:>{w}}" for h, w, _ in USAGE_COLUMNS)
    lines = [f"{'day':<10}  {'key':<10} {'model':<32} {columns}  refusals"]
    for r in rows:
        counts = " ".join(f"{r.get(field) or 0:>{w}}" for _, w, field in USAGE_COLUMNS)
        model = r["model"][:32] or "-"  # "-": refused before naming a served model
        line = f"{r['day']:<10}  {r['prefix'] + '…':<10} {model:<32} {counts}  {_refusals(r.get('refusals'))}"
        lines.append(line.rstrip())
    if len(lines) == 1:
        lines.append("(no requests yet)")
    return "\n".join(lines)


def requests_table(rows: list[dict[str, Any]]) -> str:
    """Single requests, newest first: when, whose, which model, tokens, and how each ended."""
    lines = [f"{'started (UTC)':<19}  {'key':<10} {'model':<32} {'input':>7} {'output':>7} {'status':<32} request id"]
    for r in rows:
        lines.append(
            f"{r['started_at'].strftime('%Y-%m-%d %H:%M:%S'):<19}  {r['prefix'] + '…':<10} {r['model'][:32]:<32} "
            f"{r['input_tokens']:>7} {r['output_tokens']:>7} {r['status'][:32]:<32} {r['request_id']}"
        )
    if len(lines) == 1:
        lines.append("(no requests yet)")
    return "\n".join(lines)
