"""What the request path asks of accounts, in async form: who is calling, may they call this
model, hold their allowance while the request runs, and charge it when the request ends.

Store writes (and every call on PostgreSQL) run in a small thread pool; SQLite reads run inline (see
``Accounts.read``). The decisions are the pure functions of ``access``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from llamascope import errors
from llamascope.accounts.access import bearer_key, grant_refusal, key_refusal
from llamascope.accounts.limits import RateLimits, SharedRateLimits
from llamascope.accounts.store import AccountStore, GrantView, KeyView, Reservation, utcnow

log = logging.getLogger(__name__)
T = TypeVar("T")


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
    counted: bool = True  # by the rate limits (False: Redis was down and the request went on uncounted)
    settled: bool = field(default=False)

    async def settle(self, input_tokens: int, output_tokens: int, image_tokens: int, status: str) -> None:
        if self.settled:
            return
        self.settled = True
        store = self.accounts.store
        charge = (self.reservation, self.request_id, input_tokens, output_tokens, image_tokens, status)
        with anyio.CancelScope(shield=True):  # a client hanging up must not skip the charge
            try:
                if store.settle(*charge, wait=False):  # SQLite with the write lock free: done, no thread hop
                    if store.checkpoint_due:
                        self.accounts.background(store.checkpoint)
                else:
                    await self.accounts.run(store.settle, *charge)
            finally:
                await self.accounts.limits.leave(self.principal.key, input_tokens + output_tokens, self.counted)


class Accounts:
    def __init__(self, store: AccountStore, limits: RateLimits | SharedRateLimits | None = None) -> None:
        self.store = store
        self.limits = limits or RateLimits()
        # Store calls block (SQLite, or a PostgreSQL round trip): a small pool of their own keeps them off the
        # event loop and never queued behind other thread work.
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="llamascope-accounts")

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(call, *args))

    def background(self, call: Callable[..., Any]) -> None:
        """Run ``call`` on the pool without waiting for it (its failure is logged)."""

        def logged(future: Any) -> None:
            if future.exception() is not None:
                log.error("accounts store: %s failed: %s", getattr(call, "__name__", call), future.exception())

        self._pool.submit(call).add_done_callback(logged)

    async def read(self, call: Callable[..., T], *args: Any) -> T:
        """A lookup. On SQLite in WAL mode a read never waits for a writer and takes under 0.1 ms, less than
        the hop to a thread, so it runs right here; elsewhere (a PostgreSQL round trip) it goes to the pool."""
        if self.store.is_sqlite:
            return call(*args)
        return await self.run(call, *args)

    def close(self) -> None:
        """Wait for charges still being written, then stop the pool (at server stop)."""
        self._pool.shutdown(wait=True)

    async def authenticate(self, authorization: str | None) -> Principal:
        key = bearer_key(authorization)
        view = await self.read(self.store.find_key, key) if key else None
        refusal = key_refusal(view, utcnow())
        if refusal is not None:
            raise refusal
        assert view is not None
        return Principal(view)

    async def check(self, principal: Principal, model: str) -> GrantView:
        """Refuse early (before any image is fetched) if the key may not call the model now."""
        grant = await self.read(self.store.find_grant, principal.key.id, model)
        refusal = grant_refusal(model, grant, utcnow())
        if refusal is not None:
            raise refusal
        assert grant is not None
        return grant

    async def admit(self, principal: Principal, grant: GrantView, tokens: int, request_id: str) -> Admission:
        """Hold ``tokens`` (the request's most) of the allowance and count the request in, or refuse."""
        counted = await self.limits.enter(principal.key)
        model = grant.model
        try:
            if grant.allowance_tokens is None and grant.expires_at is None:
                # Nothing to protect: no write on the request's path (check() has just read the grant).
                reservation: Reservation | None = Reservation(grant.id, grant.key_id, model, 0, utcnow())
            else:
                # One conditional UPDATE decides (see AccountStore.reserve); a refusal is worded from a fresh read.
                reservation = await self.run(self.store.reserve, principal.key.id, model, tokens)
            if reservation is None:
                latest = await self.read(self.store.find_grant, principal.key.id, model)
                raise grant_refusal(model, latest, utcnow()) or errors.internal_error()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.limits.leave(principal.key, 0, counted)
            raise
        return Admission(self, principal, reservation, request_id, counted)
