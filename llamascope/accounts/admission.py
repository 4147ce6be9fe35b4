"""What the request path asks of accounts, in async form: who is calling, may they call this
model, hold their allowance while the request runs, and charge it when the request ends.

Store calls run in worker threads; the decisions are the pure functions of ``access``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anyio

from llamascope import errors
from llamascope.accounts.access import bearer_key, grant_refusal, key_refusal
from llamascope.accounts.limits import RateLimits
from llamascope.accounts.store import AccountStore, KeyView, Reservation, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Principal:
    """Who a request is from, as far as the rest of llamascope needs to know."""

    key: KeyView

    @property
    def key_id(self) -> str:
        return str(self.key.id)

    @property
    def key_prefix(self) -> str:
        return self.key.prefix + "…"


@dataclass
class Admission:
    """A running request's hold on an allowance; ``settle`` exactly once when it ends."""

    accounts: Accounts
    principal: Principal
    reservation: Reservation
    request_id: str
    settled: bool = field(default=False)

    async def settle(self, input_tokens: int, output_tokens: int, image_tokens: int, status: str) -> None:
        if self.settled:
            return
        self.settled = True
        with anyio.CancelScope(shield=True):  # a client hanging up must not skip the charge
            try:
                await anyio.to_thread.run_sync(
                    self.accounts.store.settle,
                    self.reservation,
                    self.request_id,
                    input_tokens,
                    output_tokens,
                    image_tokens,
                    status,
                )
            finally:
                self.accounts.limits.leave(self.principal.key, input_tokens + output_tokens)


class Accounts:
    def __init__(self, store: AccountStore, limits: RateLimits | None = None) -> None:
        self.store = store
        self.limits = limits or RateLimits()

    async def authenticate(self, authorization: str | None) -> Principal:
        key = bearer_key(authorization)
        view = await anyio.to_thread.run_sync(self.store.find_key, key) if key else None
        refusal = key_refusal(view, utcnow())
        if refusal is not None:
            raise refusal
        assert view is not None
        return Principal(view)

    async def check(self, principal: Principal, model: str) -> None:
        """Refuse early (before any image is fetched) if the key may not call the model now."""
        grant = await anyio.to_thread.run_sync(self.store.find_grant, principal.key.id, model)
        refusal = grant_refusal(model, grant, utcnow())
        if refusal is not None:
            raise refusal

    async def admit(self, principal: Principal, model: str, tokens: int, request_id: str) -> Admission:
        """Hold ``tokens`` (the request's most) of the allowance and count the request in, or refuse."""
        self.limits.enter(principal.key)
        try:
            grant = await anyio.to_thread.run_sync(self.store.find_grant, principal.key.id, model)
            refusal = grant_refusal(model, grant, utcnow())
            if refusal is not None:
                raise refusal
            assert grant is not None
            reservation = await anyio.to_thread.run_sync(self.store.reserve, grant, tokens)
            if reservation is None:  # another request took the rest in the meantime
                latest = await anyio.to_thread.run_sync(self.store.find_grant, principal.key.id, model)
                raise grant_refusal(model, latest, utcnow()) or errors.internal_error()
        except BaseException:
            self.limits.leave(principal.key, 0)
            raise
        return Admission(self, principal, reservation, request_id)
