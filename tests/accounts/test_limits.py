"""Per-key rate limits on the real limiter."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from llamascope import errors
from llamascope.accounts.limits import RateLimits
from llamascope.accounts.store import KeyView


def key(**limits: int) -> KeyView:
    now = datetime.now(timezone.utc)
    return KeyView(1, "sk-test", "", now, None, None, limits.get("rpm"), limits.get("tpm"), limits.get("concurrent"))


def test_concurrency() -> None:
    limits, k = RateLimits(), key(concurrent=2)
    limits.enter(k)
    limits.enter(k)
    with pytest.raises(errors.ServiceError) as info:
        limits.enter(k)
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "1"
    limits.leave(k, 0)
    limits.enter(k)  # a slot is free again


def test_tokens_per_minute_are_charged_after_the_fact() -> None:
    limits, k = RateLimits(), key(tpm=100)
    limits.enter(k)
    limits.leave(k, 60)
    limits.enter(k)  # 40 left: still admitted
    limits.leave(k, 500)  # more than was left: the window is full now
    with pytest.raises(errors.ServiceError, match="100 tokens per minute") as info:
        limits.enter(k)
    assert info.value.code == "Throttling.RateQuota"
    assert 1 <= int(info.value.headers["Retry-After"]) <= 60


def test_requests_per_minute() -> None:
    limits, k = RateLimits(), key(rpm=3)
    for _ in range(3):
        limits.enter(k)
        limits.leave(k, 1)
    with pytest.raises(errors.ServiceError, match="3 requests per minute"):
        limits.enter(k)
    assert limits.running[k.id] == 0
