"""Per-key rate limits: requests and tokens per minute (the ``limits`` library's moving window), and
concurrent requests.

``RateLimits`` keeps them in this process (one server). ``SharedRateLimits`` keeps them in Redis, so that
every replica behind a load balancer counts against the same numbers: the moving windows through the
``limits`` library's Redis storage, the concurrency counter in a Redis hash of one field per replica,
changed only by Lua scripts (atomic on the server). Each replica keeps a heartbeat key that expires
``heartbeat_ttl`` seconds after its last beat; a replica that died stops counting once it has expired, so
its requests do not hold a key's concurrency for ever.

When Redis cannot be reached within ``timeout`` seconds, a request is served without the shared limits
(``on_error="open"``, the default: an outage of the limiter is not an outage of the service) or refused
with ``503 ServiceUnavailable`` (``"closed"``); it never waits longer than the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import anyio

from llamascope import errors
from llamascope.accounts.records import KeyView

if TYPE_CHECKING:
    from limits import RateLimitItemPerMinute
    from limits.strategies import MovingWindowRateLimiter

log = logging.getLogger(__name__)
T = TypeVar("T")


async def to_the_end(work: Awaitable[T]) -> T:
    """Await ``work`` to its end though the calling task is cancelled meanwhile, as many times as it is; the
    cancellation is raised once ``work`` has ended, also when ``work`` failed (its error is logged then: raised
    instead, it would end a cancelled task as though nothing had cancelled it). For what must not be cut short:
    a request counted out, a charge saved. anyio's ``CancelScope(shield=True)`` alone does not hold against
    asyncio's own ``Task.cancel``, which the hang-up watch and the batch runner use; it is kept around the wait
    all the same, as without it an anyio scope cancelled outside (Starlette's, a client gone from a stream)
    cancels the task again on every turn of the loop, a busy wait for as long as ``work`` runs."""
    task = asyncio.ensure_future(work)
    cancelled: asyncio.CancelledError | None = None
    with anyio.CancelScope(shield=True):
        while True:
            try:
                result = await asyncio.shield(task)
                break
            except asyncio.CancelledError as exc:
                if task.cancelled():  # ``work`` itself was cancelled (the loop closing): nothing left to wait for
                    raise
                cancelled = exc
            except Exception:
                if cancelled is None:
                    raise
                log.exception("cut short by a cancellation, it ran to its end and failed")
                raise cancelled from None
    if cancelled is not None:
        raise cancelled
    return result


def throttled(message: str, retry_after: float) -> errors.ServiceError:
    seconds = max(1, math.ceil(retry_after))
    return errors.ServiceError(
        429,
        "Throttling.RateQuota",
        f"Requests rate limit exceeded, please try again later. ({message})",
        headers={"Retry-After": str(seconds)},
    )


def at_most_concurrent(key: KeyView) -> errors.ServiceError:
    """A key at its bound of concurrent requests: as ``enter`` refuses it, and as it is refused before its
    request's body is read (``Accounts.refuse_when_full``)."""
    return throttled(f"at most {key.max_concurrent} concurrent requests", 1)


def _items(key: KeyView) -> tuple[RateLimitItemPerMinute | None, RateLimitItemPerMinute | None]:
    if not key.tokens_per_minute and not key.requests_per_minute:
        return None, None
    # why here: the limits library takes a tenth of a second to import, and most keys have no per-minute limit
    from limits import RateLimitItemPerMinute

    tokens = RateLimitItemPerMinute(key.tokens_per_minute, namespace="tokens") if key.tokens_per_minute else None
    requests = (
        RateLimitItemPerMinute(key.requests_per_minute, namespace="requests") if key.requests_per_minute else None
    )
    return tokens, requests


class RateLimits:
    """The limits of one process. ``enter`` before a request runs, ``leave`` once when it ends."""

    shared = False

    def __init__(self) -> None:
        self._moving_window: MovingWindowRateLimiter | None = None  # made when a key first has a per-minute limit
        self.running: Counter[int] = Counter()

    @property
    def _limiter(self) -> MovingWindowRateLimiter:
        if self._moving_window is None:
            # why here: the limits library takes a tenth of a second to import (start-up), see _items
            from limits.storage import MemoryStorage
            from limits.strategies import MovingWindowRateLimiter

            self._moving_window = MovingWindowRateLimiter(MemoryStorage())
        return self._moving_window

    def _retry_after(self, item: RateLimitItemPerMinute, key_id: int) -> float:
        reset, _remaining = self._limiter.get_window_stats(item, str(key_id))
        return reset - time.time()

    async def enter(self, key: KeyView, per_minute: bool = True) -> bool:
        """Count a request in, or raise 429. True: counted (pass it to ``leave``). ``per_minute`` False: the
        request is refused by a full window but not counted in the requests per minute (``/tokenize``)."""
        if key.max_concurrent is not None and self.running[key.id] >= key.max_concurrent:
            raise at_most_concurrent(key)
        tokens, requests = _items(key)
        if tokens is not None and not self._limiter.test(tokens, str(key.id)):
            raise throttled(f"{key.tokens_per_minute} tokens per minute", self._retry_after(tokens, key.id))
        hit = self._limiter.hit if per_minute else self._limiter.test
        if requests is not None and not hit(requests, str(key.id)):
            raise throttled(f"{key.requests_per_minute} requests per minute", self._retry_after(requests, key.id))
        self.running[key.id] += 1
        return True

    async def full(self, key: KeyView) -> bool:
        """Whether the key runs as many requests as it may at once (a look: nothing is counted)."""
        return key.max_concurrent is not None and self.running[key.id] >= key.max_concurrent

    async def leave(self, key: KeyView, tokens: int, counted: bool = True) -> None:
        if counted:
            self.running[key.id] -= 1
            if self.running[key.id] <= 0:
                del self.running[key.id]
        item, _ = _items(key)
        if item is not None and tokens > 0 and not self._limiter.hit(item, str(key.id), cost=tokens):
            # More than the window has left: the library would record nothing, so fill the window.
            left = self._limiter.get_window_stats(item, str(key.id)).remaining
            if left > 0:
                self._limiter.hit(item, str(key.id), cost=left)

    async def aclose(self) -> None:
        pass


# One field per replica in a key's hash; fields of replicas whose heartbeat expired are dropped, not counted.
# ARGV[4] is the moment (Redis's clock) after which the replica has stopped waiting for the answer and serves
# the request uncounted: a script Redis runs only then (it was paused, or stalled) counts nothing (-1), or the
# count would never be taken out again.
_ENTER = """
if redis.replicate_commands then redis.replicate_commands() end -- writes after TIME on Redis before 5
local now = redis.call('TIME')
if tonumber(now[1]) + tonumber(now[2]) / 1000000 > tonumber(ARGV[4]) then return -1 end
local counts = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #counts, 2 do
  if redis.call('EXISTS', ARGV[3] .. counts[i]) == 1 then
    total = total + tonumber(counts[i + 1])
  else
    redis.call('HDEL', KEYS[1], counts[i])
  end
end
if total >= tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], 86400)
return 1
"""
# What _ENTER counts, without counting anything in (the dead replicas' counts are left for _ENTER to drop).
_RUNNING = """
local counts = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #counts, 2 do
  if redis.call('EXISTS', ARGV[1] .. counts[i]) == 1 then total = total + tonumber(counts[i + 1]) end
end
return total
"""
_LEAVE = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
"""


class LimiterUnavailable(Exception):
    """Redis did not answer in time, or refused."""


class SharedRateLimits:
    """The limits of every replica together, kept in Redis (see the module's text)."""

    shared = True

    def __init__(
        self,
        url: str,
        *,
        on_error: Literal["open", "closed"] = "open",
        timeout: float = 0.5,
        heartbeat_ttl: float = 15.0,
        prefix: str = "llamascope",
        replica: str | None = None,
    ) -> None:
        # redis and limits' async storage (about 0.3 s) load only when a Redis URL is set
        import redis.asyncio as redis
        from limits.aio.storage import RedisStorage
        from limits.aio.strategies import MovingWindowRateLimiter as AsyncMovingWindow

        self.url = url
        self.on_error = on_error
        self.timeout = timeout
        self.heartbeat_ttl = heartbeat_ttl
        self.prefix = prefix
        self.replica = replica or uuid.uuid4().hex[:12]
        options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        self._redis = redis.Redis.from_url(url, **options)
        # The limiter on redis-py's own connections: limits parses a URL itself, and refused forms redis-py takes
        # (redis://host/0 without its port, unix://...), a traceback at start-up after the settings passed it.
        # (limits types its options as str, float or bool; its redis-py bridge takes a ``connection_pool`` all the same)
        shared: dict[str, Any] = {"connection_pool": self._redis.connection_pool}
        self._storage = RedisStorage("async+redis://", implementation="redispy", key_prefix=f"{prefix}:rl", **shared)
        self._limiter = AsyncMovingWindow(self._storage)
        self._enter_script = self._redis.register_script(_ENTER)
        self._leave_script = self._redis.register_script(_LEAVE)
        self._running_script = self._redis.register_script(_RUNNING)
        self._beating: asyncio.Task[None] | None = None
        self._clock_offset: float | None = None  # Redis's clock less this one's, as the last beat measured it
        self._last_warning = 0.0
        self._failed_at = -math.inf  # when (monotonic) a call to Redis last failed
        self.unavailable = 0  # requests that met an unreachable Redis

    def _running_key(self, key: KeyView) -> str:
        return f"{self.prefix}:running:{key.id}"

    @property
    def _replica_prefix(self) -> str:
        return f"{self.prefix}:replica:"

    async def _call(self, coroutine: Any) -> Any:
        try:
            return await asyncio.wait_for(coroutine, self.timeout * 2)
        except Exception as exc:  # redis' errors, the limits library's StorageError, timeouts, refused sockets
            raise LimiterUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def _beat(self) -> None:
        await self._call(
            self._redis.set(self._replica_prefix + self.replica, str(time.time()), px=int(self.heartbeat_ttl * 1000))
        )
        seconds, micros = await self._call(self._redis.time())
        # Redis's clock read before this answer came back: the offset errs low by at most the round trip, so
        # the ENTER script's deadline (set in Redis's clock with it) errs early, never late.
        self._clock_offset = seconds + micros / 1e6 - time.time()

    def _enter_deadline(self) -> float:
        """When (Redis's clock) an ENTER script sent now comes too late: a fifth of the socket's timeout (the
        first moment this replica may give up on the answer) before it, for the answer's way back."""
        return time.time() + (self._clock_offset or 0.0) + self.timeout * 0.8

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_ttl / 3)
            try:
                await self._beat()
            except LimiterUnavailable as exc:
                self._warn(exc)

    def _warn(self, exc: Exception) -> None:
        self.unavailable += 1
        now = self._failed_at = time.monotonic()
        if now - self._last_warning > 60:
            self._last_warning = now
            rule = "serving without shared rate limits" if self.on_error == "open" else "refusing requests (503)"
            log.warning("rate limits: Redis at %s is unavailable (%s): %s", _safe(self.url), exc, rule)

    async def _start(self) -> None:
        if self._beating is None or self._beating.done():
            await self._beat()  # this replica counts from its first request on
            self._beating = asyncio.get_running_loop().create_task(self._beat_forever())

    async def enter(self, key: KeyView, per_minute: bool = True) -> bool:
        """Count a request in across replicas, or raise 429 (or 503 with ``on_error="closed"``); ``per_minute``
        as ``RateLimits.enter``.

        Returns False when Redis was unreachable and the request goes on uncounted (``on_error="open"``); True
        when it was counted in by its concurrency before Redis failed (``leave`` takes that count out).
        """
        entered = False  # counted in by the key's concurrency: to be taken out on every path
        try:
            await self._start()
            tokens, requests = _items(key)
            if tokens is not None and not await self._call(self._limiter.test(tokens, str(key.id))):
                reset = (await self._call(self._limiter.get_window_stats(tokens, str(key.id)))).reset_time
                raise throttled(f"{key.tokens_per_minute} tokens per minute", reset - time.time())
            if key.max_concurrent is not None:
                deadline = repr(self._enter_deadline())
                args: list[str | int] = [self.replica, key.max_concurrent, self._replica_prefix, deadline]
                answer = await self._count_in(key, args)
                if answer == -1:  # Redis answered, but too late to count this request in
                    raise LimiterUnavailable("Redis ran the count after its deadline")
                entered = answer == 1
                if not entered:
                    raise at_most_concurrent(key)
            hit = self._limiter.hit if per_minute else self._limiter.test
            if requests is not None and not await self._call(hit(requests, str(key.id))):
                if entered:
                    entered = False  # before the wait: a cancellation meanwhile must not count it out twice
                    await self._count_out(key)
                reset = (await self._call(self._limiter.get_window_stats(requests, str(key.id)))).reset_time
                raise throttled(f"{key.requests_per_minute} requests per minute", reset - time.time())
        except LimiterUnavailable as exc:
            # Counted in by its concurrency, then a later call failed (the per-minute window): served, the
            # request is counted (its leave takes the count out); refused, the count comes out here. Dropped,
            # it held one of the key's slots for as long as this replica lived.
            self._warn(exc)
            if self.on_error == "closed":
                if entered:
                    with contextlib.suppress(LimiterUnavailable):
                        await self._count_out(key)
                raise errors.ServiceError(
                    503,
                    "ServiceUnavailable",
                    "The rate limiter is unavailable; please try again later.",
                    headers={"Retry-After": "5"},
                ) from None
            return entered
        except asyncio.CancelledError:  # the caller gone (a hang-up, a batch line stopped) once counted in
            if entered:
                with contextlib.suppress(LimiterUnavailable):
                    await self._count_out(key)
            raise
        return True

    async def full(self, key: KeyView) -> bool:
        """Whether the key runs as many requests as it may at once on every replica together (a look: nothing
        is counted). Redis unreachable: False, and ``enter`` decides by its ``on_error`` rule. Not asked while
        Redis failed within the last heartbeat: a Redis that hangs (paused, cut off) took this look's timeout on
        top of ``enter``'s for every request of a limited key, doubling what an outage adds to each."""
        if key.max_concurrent is None or time.monotonic() - self._failed_at < self.heartbeat_ttl / 3:
            return False
        try:
            args = [self._replica_prefix]
            running = await self._call(self._running_script(keys=[self._running_key(key)], args=args))
        except LimiterUnavailable:
            self._failed_at = time.monotonic()
            return False
        return int(running) >= key.max_concurrent

    async def _count_in(self, key: KeyView, args: list[str | int]) -> int:
        """The concurrency script's answer (1: counted in, 0: full, -1: too late). Its caller cancelled while
        Redis runs it, the answer is still awaited, and a request it counted in is counted out again: Redis may
        have run the script already, and nothing else would take that count out."""
        counting = asyncio.ensure_future(self._call(self._enter_script(keys=[self._running_key(key)], args=args)))
        try:
            answer: int = await to_the_end(counting)
        except asyncio.CancelledError:
            if counting.done() and not counting.cancelled() and counting.exception() is None and counting.result() == 1:
                with contextlib.suppress(LimiterUnavailable):
                    await self._count_out(key)
            raise
        return answer

    async def leave(self, key: KeyView, tokens: int, counted: bool = True) -> None:
        """Count the request out (only if ``enter`` counted it in) and charge its tokens to the window, to the end
        whatever cancels the caller meanwhile: cut short, it held one of the key's slots for this replica's life."""
        await to_the_end(self._leave(key, tokens, counted))

    async def _count_out(self, key: KeyView) -> None:
        await to_the_end(self._call(self._leave_script(keys=[self._running_key(key)], args=[self.replica])))

    async def _leave(self, key: KeyView, tokens: int, counted: bool) -> None:
        try:
            if counted and key.max_concurrent is not None:
                await self._call(self._leave_script(keys=[self._running_key(key)], args=[self.replica]))
            item, _ = _items(key)
            if (
                item is not None
                and tokens > 0
                and not await self._call(self._limiter.hit(item, str(key.id), cost=tokens))
            ):
                left = (await self._call(self._limiter.get_window_stats(item, str(key.id)))).remaining
                if left > 0:
                    await self._call(self._limiter.hit(item, str(key.id), cost=left))
        except LimiterUnavailable as exc:
            self._warn(exc)

    async def aclose(self) -> None:
        """Stop beating and take this replica's counts out at once (a clean stop need not wait for expiry)."""
        if self._beating is not None:
            self._beating.cancel()
        with contextlib.suppress(LimiterUnavailable):
            await self._call(self._redis.delete(self._replica_prefix + self.replica))
        await self._redis.aclose()


def _safe(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def rate_limits(redis_url: str | None, on_error: Literal["open", "closed"] = "open") -> RateLimits | SharedRateLimits:
    """Shared through Redis when a URL is given, else this process's own."""
    return SharedRateLimits(redis_url, on_error=on_error) if redis_url else RateLimits()
