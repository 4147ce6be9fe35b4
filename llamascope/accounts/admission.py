"""What the request path asks of accounts, in async form: who is calling, may they call this
model, hold their allowance while the request runs, and charge it when the request ends.

Every call on PostgreSQL runs in a small thread pool. On SQLite, reads run inline (see ``Accounts.read``),
and so do a request's reservation and charge when the write lock is free at once (else the pool waits for
it). The decisions are the pure functions of ``access``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError

from llamascope import errors
from llamascope.accounts.access import bearer_key, grant_refusal, key_refusal
from llamascope.accounts.checkpoints import Checkpoints, Progress
from llamascope.accounts.limits import RateLimits, SharedRateLimits, at_most_concurrent, to_the_end
from llamascope.accounts.records import GrantView, KeyView, Reservation, utcnow
from llamascope.accounts.store import AccountStore

log = logging.getLogger(__name__)
T = TypeVar("T")
# What a store that cannot be reached raises (PostgreSQL down, a connection cut, SQLite's disk gone).
UNREACHABLE = (OperationalError, InterfaceError, sqlite3.OperationalError)


class _Reachable:
    """A store that does not answer is a clear 503 for the caller, not a 500 with a traceback.

    A class, not a generator-based context manager: it wraps three calls of every request, and costs 0.6 us
    where that cost 2.8 us."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _tb: object) -> None:
        if kind is not None and issubclass(kind, UNREACHABLE):
            log.error("accounts store unreachable: %s", str(exc).splitlines()[0] if str(exc) else kind.__name__)
            raise errors.store_unavailable() from None


@dataclass(frozen=True)
class Principal:
    """Who a request is from, as far as the rest of llamascope needs to know."""

    key: KeyView
    # The fraction of its tokens a request is charged: 1 for a call, the operator's batch price for a batch line.
    price: float = 1.0

    def charged(self, tokens: int) -> int:
        """What ``tokens`` tokens cost this caller, rounded up (so a priced line is never free by rounding)."""
        return tokens if self.price == 1.0 else math.ceil(tokens * self.price)

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
    progress: Progress | None = None  # what is on disk of it, when the accounts keep checkpoints
    settled: bool = field(default=False)

    def record(self, input_tokens: int, output_tokens: int, image_tokens: int) -> bool:
        """The request has made this much (no store call); True if it must ``await saved()`` before it
        delivers more (see accounts/checkpoints.py)."""
        checkpoints, progress = self.accounts.checkpoints, self.progress
        if checkpoints is None or progress is None:
            return False
        price = self.principal.charged
        return checkpoints.record(progress, price(input_tokens), price(output_tokens), price(image_tokens))

    async def saved(self) -> None:
        if self.accounts.checkpoints is not None and self.progress is not None:
            await self.accounts.checkpoints.saved(self.progress)

    async def settle(self, input_tokens: int, output_tokens: int, image_tokens: int, status: str) -> None:
        """Charge what was used, and count the request out; whatever cancels the calling task meanwhile (a client
        hanging up, a batch cancelled, the server stopping), both are done before the cancellation is raised."""
        if self.settled:
            return
        self.settled = True
        used = input_tokens + output_tokens  # the rate limits count the tokens made, whatever they cost
        price = self.principal.charged
        input_tokens, output_tokens, image_tokens = price(input_tokens), price(output_tokens), price(image_tokens)
        store, progress = self.accounts.store, self.progress
        charge = (self.reservation, self.request_id, input_tokens, output_tokens, image_tokens, status)
        if progress is not None:
            progress.settling = True  # before the charge commits: a checkpoint written meanwhile is undone
        in_flight = progress is not None and progress.written
        failure: Exception | None = None
        try:
            # SQLite with the write lock free: charged here, without a thread hop
            charged = store.settle(*charge, wait=False, in_flight=in_flight)
        except UNREACHABLE:
            charged = False  # tried again off the loop, where a store that does not answer is dealt with
        except Exception as exc:  # failed for good (a damaged database): counted out all the same, then raised
            charged, failure = False, exc
        if charged and store.checkpoint_due:
            self.accounts.background(store.checkpoint)
        ending = self._settle(charge, charged, in_flight, used, failure)
        if charged and not self.accounts.limits.shared:
            # Nothing in it waits (the charge is done, this process's limits never wait), so nothing can cut it
            # short: awaited as it is, without the task to_the_end costs.
            await ending
        else:
            await to_the_end(ending)

    async def _settle(
        self,
        charge: tuple[Reservation, str, int, int, int, str],
        charged: bool,
        in_flight: bool,
        used: int,
        failure: Exception | None = None,
    ) -> None:
        store, checkpoints, progress = self.accounts.store, self.accounts.checkpoints, self.progress
        try:
            if failure is not None:
                raise failure  # the charge tried on the loop: the count-out below is done before it is raised
            if not charged:
                await self.accounts.run(functools.partial(store.settle, *charge, in_flight=in_flight))
            if progress is not None and progress.written and not in_flight:  # a first checkpoint raced the settle
                await self.accounts.run(store.forget_checkpoints, [self.request_id])
        except UNREACHABLE as exc:
            if checkpoints is None:
                raise
            log.error("request %s: charge not saved, retrying until the store answers: %s", self.request_id, exc)
            checkpoints.defer(progress, charge)
            progress = None  # the writer finishes it once the charge is saved
        finally:
            await self.accounts.limits.leave(self.principal.key, used, self.counted)
            if checkpoints is not None and progress is not None:
                checkpoints.finish(progress)


class Accounts:
    def __init__(
        self,
        store: AccountStore,
        limits: RateLimits | SharedRateLimits | None = None,
        checkpoints: Checkpoints | None = None,
    ) -> None:
        self.store = store
        self.limits = limits or RateLimits()
        self.checkpoints = checkpoints
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
        """Wait for charges still being written, then stop the pool and the checkpoint writer, and save the
        refusals counted (at server stop)."""
        self._pool.shutdown(wait=True)
        if self.checkpoints is not None:
            self.checkpoints.stop()  # saves the refusals counted since its last tick
        else:
            with contextlib.suppress(*UNREACHABLE):
                self.store.save_refusals()

    async def authenticate(self, authorization: str | None) -> Principal:
        key = bearer_key(authorization)
        with _Reachable():
            view = await self.read(self.store.find_key, key) if key else None
        refusal = key_refusal(view, utcnow())
        if refusal is not None:
            raise refusal
        assert view is not None
        return Principal(view)

    async def check(self, principal: Principal, model: str) -> GrantView:
        """Refuse early (before any image is fetched) if the key may not call the model now."""
        with _Reachable():
            grant = await self.read(self.store.find_grant, principal.key.id, model)
        refusal = grant_refusal(model, grant, utcnow())
        if refusal is not None:
            raise refusal
        assert grant is not None
        return grant

    async def enter(self, principal: Principal, per_minute: bool = True) -> bool:
        """Count the request in by its key's rate limits (requests and tokens per minute, concurrency), or raise
        429: before any image is fetched, so a key over its limits costs no fetch. Its result goes to ``admit``,
        or, when the request ends before that (refused, failed, its caller gone), to ``leave``.
        A request counted in counts toward the key's requests per minute, whatever refuses it afterwards;
        with ``per_minute`` False (a prompt only counted), it holds a concurrent slot but is not counted there."""
        return await self.limits.enter(principal.key, per_minute)

    async def refuse_when_full(self, principal: Principal) -> None:
        """Refuse (the 429 ``enter`` gives) a key already running as many requests as it may at once, before its
        request's body is read: waiting for it, a key at its bound made the server read and hold a body of up
        to MAX_BODY_BYTES for each request it sent on. A look, counting nothing: ``enter`` still decides (requests
        sent at once may all pass this)."""
        if await self.limits.full(principal.key):
            raise at_most_concurrent(principal.key)

    async def leave(self, principal: Principal, counted: bool) -> None:
        """Count out a request ``enter`` let in that never reached ``admit``; a cancellation cannot cut it short
        (this process's limits never wait; Redis's are waited for to the end)."""
        await self.limits.leave(principal.key, 0, counted)

    async def admit(
        self,
        principal: Principal,
        model: str,
        grant: GrantView,
        tokens: int,
        request_id: str,
        prompt_tokens: int | None = None,
        counted: bool | None = None,
    ) -> Admission:
        """Hold ``tokens`` (the request's most) of the allowance, or refuse.

        With ``prompt_tokens``, the hold is cut to what the allowance has left (at least the prompt and one
        token): ``Admission.reservation.tokens`` minus the prompt is then the most the request may make.
        ``counted`` is what ``enter`` returned for the request (None: it is counted in here); from this call on
        the count is the admission's to take out, or this call's when it refuses."""
        if counted is None:
            counted = await self.limits.enter(principal.key)
        checkpoints = self.checkpoints
        in_flight = (request_id, checkpoints.replica_id) if checkpoints is not None else None
        try:
            with _Reachable():
                if grant.allowance_tokens is None and grant.expires_at is None:
                    # Nothing to protect: no write on the request's path (check() has just read the grant);
                    # its in-flight row, if it runs long enough to need one, comes from the checkpoint writer.
                    reservation: Reservation | None = Reservation(grant.id, grant.key_id, model, 0, utcnow())
                    in_flight = None
                else:
                    # One conditional UPDATE decides (see AccountStore.reserve), writing the in-flight row with
                    # it; a refusal is worded from a fresh read. SQLite with the write lock free: no thread hop.
                    args = (principal.key.id, model, tokens)
                    done, reservation = self.store.reserve_at_once(*args, prompt_tokens, in_flight)
                    if not done:
                        reserve = functools.partial(
                            self.store.reserve, prompt_tokens=prompt_tokens, in_flight=in_flight
                        )
                        reservation = await self.run(reserve, *args)
                if reservation is None:
                    latest = await self.read(self.store.find_grant, principal.key.id, model, True)
                    raise grant_refusal(model, latest, utcnow()) or errors.internal_error()
        except BaseException:
            await self.leave(principal, counted)
            raise
        progress = checkpoints.track(request_id, reservation, in_flight is not None) if checkpoints else None
        return Admission(self, principal, reservation, request_id, counted, progress)
