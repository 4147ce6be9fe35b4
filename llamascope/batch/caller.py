"""How a batch line reaches the API as its batch's key, without the key itself being kept anywhere.

The runner calls the app in process (``httpx.ASGITransport``) through ``as_key``, which puts the key's id and
the batch price in an ASGI scope extension. The authentication middleware takes the caller from it in place
of an Authorization header; the line's tokens are charged at the caller's ``price``. Only code in this
process can set a scope extension: a request from the network gets its scope from uvicorn, which never sets
this one.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from llamascope import errors
from llamascope.accounts.access import key_refusal
from llamascope.accounts.admission import Accounts, Principal
from llamascope.accounts.records import utcnow

KEY_EXTENSION = "llamascope.batch.caller"


@dataclass(frozen=True)
class BatchCaller:
    """Whom a batch line runs as, and the fraction of its tokens it is charged."""

    key_id: int
    price: float


def caller_of(scope: Scope) -> BatchCaller | None:
    """The caller an in-process batch request runs as, or None for any other request."""
    extensions: dict[str, Any] = scope.get("extensions") or {}
    value = extensions.get(KEY_EXTENSION)
    return value if isinstance(value, BatchCaller) else None


@dataclass
class LineCall:
    """One line's request as the request path leaves it: its scope's ``state``, where the request id and the
    reply (what it made, and so what it was charged) are kept; read after a request stopped without an answer."""

    state: dict[str, Any] = field(default_factory=dict)
    written: bool = False  # its result is being written: a stop now changes nothing


# The line a task is running now: set by the runner in the line's own task, read by ``as_key`` in the same task.
current_line: ContextVar[LineCall | None] = ContextVar("llamascope_batch_line", default=None)


def as_key(app: ASGIApp, caller: BatchCaller) -> ASGIApp:
    """``app``, its requests made as ``caller``; a request made for a line (``current_line``) keeps its state there."""

    async def call(scope: Scope, receive: Receive, send: Send) -> None:
        extensions = {**(scope.get("extensions") or {}), KEY_EXTENSION: caller}
        line = current_line.get()
        state = line.state if line is not None else scope.get("state", {})
        await app({**scope, "extensions": extensions, "state": state}, receive, send)

    return call


async def principal_of(accounts: Accounts, caller: BatchCaller) -> Principal:
    """The key a batch runs as, checked as a key in a header is: revoked or expired since, refused."""
    try:
        view = await accounts.read(accounts.store.key, caller.key_id)
    except LookupError:  # deleted since the batch was made
        raise errors.invalid_api_key() from None
    refusal = key_refusal(view, utcnow())
    if refusal is not None:
        raise refusal
    return Principal(view, price=caller.price)
