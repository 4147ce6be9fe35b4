"""How a batch line reaches the API as its batch's key, without the key itself being kept anywhere.

The runner calls the app in process (``httpx.ASGITransport``) through ``as_key``, which puts the key's id and
the batch price in an ASGI scope extension. The authentication middleware takes the caller from it in place
of an Authorization header; the line's tokens are charged at the caller's ``price``. Only code in this
process can set a scope extension: a request from the network gets its scope from uvicorn, which never sets
this one.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def as_key(app: ASGIApp, caller: BatchCaller) -> ASGIApp:
    """``app``, its requests made as ``caller``."""

    async def call(scope: Scope, receive: Receive, send: Send) -> None:
        extensions = {**(scope.get("extensions") or {}), KEY_EXTENSION: caller}
        await app({**scope, "extensions": extensions}, receive, send)

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
