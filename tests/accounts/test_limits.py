"""Per-key rate limits on the real limiter: in this process, and shared by replicas through a real Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from llamascope import errors
from llamascope.accounts.limits import RateLimits, SharedRateLimits
from llamascope.accounts.records import KeyView
from tests.services import RedisServer

HANG = 60.0  # seconds after which a call that should have answered is taken for hung


def key(**limits: int) -> KeyView:
    now = datetime.now(UTC)
    return KeyView(1, "sk-test", "", now, None, None, limits.get("rpm"), limits.get("tpm"), limits.get("concurrent"))


def test_concurrency() -> None:
    async def scenario() -> None:
        limits, k = RateLimits(), key(concurrent=2)
        await limits.enter(k)
        await limits.enter(k)
        with pytest.raises(errors.ServiceError) as info:
            await limits.enter(k)
        assert info.value.status == 429 and info.value.headers["Retry-After"] == "1"
        await limits.leave(k, 0)
        await limits.enter(k)  # a slot is free again

    asyncio.run(scenario())


def test_tokens_per_minute_are_charged_after_the_fact() -> None:
    async def scenario() -> None:
        limits, k = RateLimits(), key(tpm=100)
        await limits.enter(k)
        await limits.leave(k, 60)
        await limits.enter(k)  # 40 left: still admitted
        await limits.leave(k, 500)  # more than was left: the window is full now
        with pytest.raises(errors.ServiceError, match="100 tokens per minute") as info:
            await limits.enter(k)
        assert info.value.code == "Throttling.RateQuota"
        assert 1 <= int(info.value.headers["Retry-After"]) <= 60

    asyncio.run(scenario())


def test_requests_per_minute() -> None:
    async def scenario() -> None:
        limits, k = RateLimits(), key(rpm=3)
        for _ in range(3):
            await limits.enter(k)
            await limits.leave(k, 1)
        with pytest.raises(errors.ServiceError, match="3 requests per minute"):
            await limits.enter(k)
        assert limits.running[k.id] == 0

    asyncio.run(scenario())


async def uncounted_per_minute(limits: RateLimits | SharedRateLimits, k: KeyView) -> None:
    """A request that is not to count per minute (``/tokenize``): refused by a full window, holding a slot."""
    for _ in range(3):
        counted = await limits.enter(k, per_minute=False)
        await limits.leave(k, 0, counted)
    assert await limits.enter(k) and await limits.enter(k)  # the two a minute, both still free
    with pytest.raises(errors.ServiceError, match="at most 2 concurrent"):
        await limits.enter(k, per_minute=False)  # it takes a slot like any request
    await limits.leave(k, 0)
    await limits.leave(k, 0)
    with pytest.raises(errors.ServiceError, match="2 requests per minute"):
        await limits.enter(k, per_minute=False)  # the window is full


def test_a_request_need_not_count_per_minute() -> None:
    asyncio.run(uncounted_per_minute(RateLimits(), key(rpm=2, concurrent=2)))


# -- shared through Redis ------------------------------------------------------------------------------


@pytest.mark.redis
def test_a_request_need_not_count_per_minute_across_replicas(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        limits = SharedRateLimits(redis_server.url, prefix="uncounted")
        try:
            await uncounted_per_minute(limits, key(rpm=2, concurrent=2))
        finally:
            await limits.aclose()

    asyncio.run(scenario())


@pytest.mark.redis
def test_replicas_share_requests_tokens_and_concurrency(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        a, b = SharedRateLimits(redis_server.url), SharedRateLimits(redis_server.url)
        try:
            rpm = key(rpm=3)
            assert await a.enter(rpm) and await b.enter(rpm) and await a.enter(rpm)
            with pytest.raises(errors.ServiceError, match="3 requests per minute") as info:
                await b.enter(rpm)  # 3 in total, not 3 each
            assert 1 <= int(info.value.headers["Retry-After"]) <= 60

            two = KeyView(2, "sk-two", "", datetime.now(UTC), None, None, None, None, 2)
            await a.enter(two)
            await b.enter(two)
            with pytest.raises(errors.ServiceError, match="at most 2 concurrent"):
                await a.enter(two)
            await b.leave(two, 0)
            await a.enter(two)  # b's slot, taken by a

            tpm = KeyView(3, "sk-tpm", "", datetime.now(UTC), None, None, None, 100, None)
            await a.enter(tpm)
            await a.leave(tpm, 60)
            await b.enter(tpm)  # 40 left, seen by the other replica
            await b.leave(tpm, 500)
            with pytest.raises(errors.ServiceError, match="100 tokens per minute"):
                await a.enter(tpm)
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(scenario())


@pytest.mark.redis
def test_a_dead_replicas_requests_stop_counting_when_its_heartbeat_expires(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        live = SharedRateLimits(redis_server.url, heartbeat_ttl=0.6)
        dying = SharedRateLimits(redis_server.url, heartbeat_ttl=0.6)
        one = key(concurrent=1)
        await dying.enter(one)
        with pytest.raises(errors.ServiceError, match="at most 1 concurrent"):
            await live.enter(one)
        assert dying._beating is not None
        dying._beating.cancel()  # the replica dies: no more beats, its request never leaves
        await asyncio.sleep(0.9)
        assert await live.enter(one)  # its slot came back without it
        await live.leave(one, 0)
        await live.aclose()

    asyncio.run(scenario())


@pytest.mark.redis
def test_a_look_at_the_shared_concurrency_counts_every_live_replica_and_nothing_in(redis_server: RedisServer) -> None:
    """``full`` (what refuses a key at its bound before its request's body is read) sees another replica's
    requests, counts nothing in, and stops seeing a dead replica's; in this process, the same."""

    async def scenario() -> None:
        one, free = key(concurrent=1), key()
        local = RateLimits()
        assert not await local.full(one)
        await local.enter(one)
        assert await local.full(one) and not await local.full(free)
        live = SharedRateLimits(redis_server.url, heartbeat_ttl=0.6)
        dying = SharedRateLimits(redis_server.url, heartbeat_ttl=0.6)
        assert not await live.full(one) and not await live.full(one)  # looking twice takes no slot
        await dying.enter(one)
        assert await live.full(one) and not await live.full(free)
        assert dying._beating is not None
        dying._beating.cancel()  # the replica dies: its request stops counting when its heartbeat expires
        await asyncio.sleep(0.9)
        assert not await live.full(one)
        await live.aclose()

    asyncio.run(scenario())


@pytest.mark.redis
def test_the_look_before_the_body_does_not_wait_on_a_redis_that_just_failed(redis_server: RedisServer) -> None:
    """Redis paused: ``full`` (before each body of a limited key) waited its own timeout on top of ``enter``'s,
    doubling what a hung Redis added to every request. Once a call has failed, the look is not sent: the paused
    Redis, resumed, accepted no connection made for it (the timed-out one is dropped, so a look opens another)."""
    import redis.asyncio as redis

    assert redis_server.process is not None
    pid = redis_server.process.pid

    async def accepted(client: redis.Redis) -> int:
        return int((await client.info("stats"))["total_connections_received"])

    async def scenario() -> None:
        client = redis.Redis.from_url(redis_server.url)
        limits = SharedRateLimits(redis_server.url, timeout=0.2)
        one = key(concurrent=1)
        assert await limits.enter(one) is True
        await limits.leave(one, 0)
        before = await accepted(client)
        os.kill(pid, signal.SIGSTOP)
        try:
            assert await asyncio.wait_for(limits.enter(one), HANG) is False  # served, uncounted
            await limits.leave(one, 0, counted=False)
            assert await asyncio.wait_for(limits.full(one), HANG) is False
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await accepted(client) == before
        await client.aclose()
        await limits.aclose()

    asyncio.run(scenario())


@pytest.mark.redis
@pytest.mark.parametrize("rule", ["open", "closed"])
def test_redis_down_is_served_or_refused_by_the_rule_never_hung(redis_server: RedisServer, rule: str) -> None:
    async def scenario() -> None:
        limits = SharedRateLimits(redis_server.url, on_error=rule, timeout=0.3)  # type: ignore[arg-type]
        k = key(rpm=100, concurrent=5)
        assert await limits.enter(k)
        await limits.leave(k, 1)
        redis_server.stop()
        # Within the limiter's timeout (0.3 s); the bound here only keeps a hang from stalling the suite.
        # How long the decision takes with Redis down: bench/limits_outage.py.
        if rule == "open":
            assert await asyncio.wait_for(limits.enter(k), HANG) is False  # served, uncounted
            await limits.leave(k, 1, counted=False)
        else:
            with pytest.raises(errors.ServiceError) as info:
                await asyncio.wait_for(limits.enter(k), HANG)
            assert (info.value.status, info.value.code) == (503, "ServiceUnavailable")
        redis_server.start()  # back: counted again, with nothing to do by hand
        assert await limits.enter(k) is True
        await limits.leave(k, 1)
        await limits.aclose()

    asyncio.run(scenario())


@pytest.mark.redis
def test_a_request_counted_in_after_its_replica_gave_up_on_redis_does_not_hold_a_slot(
    redis_server: RedisServer,
) -> None:
    """New-user trial: Redis paused (SIGSTOP) past the limiter's timeout; the request was served uncounted, as
    the rule says, but the count Redis ran once it resumed was never taken out again: a key limited to one
    concurrent request got 429 from then on, on every replica, for as long as this replica lived."""
    assert redis_server.process is not None
    pid = redis_server.process.pid

    async def scenario() -> None:
        limits = SharedRateLimits(redis_server.url, timeout=0.2)
        one = key(concurrent=1)
        assert await limits.enter(one) is True  # the heartbeat is up, and the clocks compared
        await limits.leave(one, 0)
        os.kill(pid, signal.SIGSTOP)
        try:
            assert await asyncio.wait_for(limits.enter(one), HANG) is False  # served, uncounted
            await limits.leave(one, 0, counted=False)
        finally:
            os.kill(pid, signal.SIGCONT)  # Redis now runs what it was sent while paused
        await asyncio.sleep(0.3)
        assert await limits.enter(one) is True  # the slot is free
        await limits.leave(one, 0)
        await limits.aclose()

    asyncio.run(scenario())


@pytest.mark.redis
@pytest.mark.parametrize("rule", ["open", "closed"])
def test_a_failure_after_the_concurrency_count_does_not_keep_the_slot(redis_server: RedisServer, rule: str) -> None:
    """Redis counted the request in (its concurrency), then failed the per-minute window: the request was served
    uncounted (or refused 503), and the concurrency it was counted in by was never taken out again: a key
    limited to one concurrent request got 429 from then on, for as long as this replica lived."""

    async def scenario() -> None:
        import redis.asyncio as redis

        limits = SharedRateLimits(redis_server.url, on_error=rule, prefix=f"broken-{rule}")  # type: ignore[arg-type]
        one = key(rpm=100, concurrent=1)
        assert await limits.enter(one) is True
        await limits.leave(one, 0)
        client = redis.Redis.from_url(redis_server.url)
        windows = await client.keys(f"broken-{rule}:rl:*requests*")
        assert windows, await client.keys("*")
        for window in windows:  # the window is no list now: Redis answers the limiter WRONGTYPE, as a failure
            await client.delete(window)
            await client.set(window, "not a window")
        if rule == "open":
            counted = await limits.enter(one)  # served: counted in or not, as leave is told
            await limits.leave(one, 0, counted)
        else:
            with pytest.raises(errors.ServiceError, match="unavailable"):
                await limits.enter(one)
        for window in windows:
            await client.delete(window)
        assert await limits.enter(one) is True  # the slot is free
        await limits.leave(one, 0)
        await client.aclose()
        await limits.aclose()

    asyncio.run(scenario())


@pytest.mark.redis
def test_every_url_form_redis_takes_is_taken(tmp_path: Path) -> None:
    """Review: the settings take what redis-py takes (redis://, rediss://, unix://), but the limiter's own URL
    parser (limits) refused a URL without its port (`redis://redis/0`) and every unix:// one: start-up ended in
    a ConfigurationError traceback. Here the limits are counted through a Unix socket."""
    for url in ("redis://redis.internal/0", "rediss://:pw@redis.internal/1", "redis://[::1]/0"):
        SharedRateLimits(url)  # made, not refused; nothing connects until a request comes
    socket_path = tmp_path / "redis.sock"
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(socket_path), "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    async def scenario() -> None:
        while not socket_path.exists():
            await asyncio.sleep(0.05)
        limits = SharedRateLimits(f"unix://{socket_path}?db=1")
        try:
            rpm = key(rpm=1)
            assert await limits.enter(rpm)
            with pytest.raises(errors.ServiceError, match="1 requests per minute"):
                await limits.enter(rpm)
        finally:
            await limits.aclose()

    try:
        asyncio.run(asyncio.wait_for(scenario(), HANG))
    finally:
        server.kill()
        server.wait()
