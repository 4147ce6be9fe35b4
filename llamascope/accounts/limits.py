"""Per-key rate limits: requests and tokens per minute (the ``limits`` library's moving window), and
concurrent requests (a counter). Limits live in this process: several replicas each enforce their own.
"""

from __future__ import annotations

import math
import time
from collections import Counter

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from llamascope import errors
from llamascope.accounts.store import KeyView


def throttled(message: str, retry_after: float) -> errors.ServiceError:
    seconds = max(1, math.ceil(retry_after))
    return errors.ServiceError(
        429,
        "Throttling.RateQuota",
        f"Requests rate limit exceeded, please try again later. ({message})",
        headers={"Retry-After": str(seconds)},
    )


class RateLimits:
    def __init__(self) -> None:
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self.running: Counter[int] = Counter()

    def _retry_after(self, item: RateLimitItemPerMinute, key_id: int) -> float:
        reset, _remaining = self._limiter.get_window_stats(item, str(key_id))
        return reset - time.time()

    def enter(self, key: KeyView) -> None:
        """Count a request in, or raise 429. Pair with ``leave``."""
        if key.max_concurrent is not None and self.running[key.id] >= key.max_concurrent:
            raise throttled(f"at most {key.max_concurrent} concurrent requests", 1)
        if key.tokens_per_minute is not None:
            tokens = RateLimitItemPerMinute(key.tokens_per_minute, namespace="tokens")
            if not self._limiter.test(tokens, str(key.id)):
                raise throttled(f"{key.tokens_per_minute} tokens per minute", self._retry_after(tokens, key.id))
        if key.requests_per_minute is not None:
            requests = RateLimitItemPerMinute(key.requests_per_minute, namespace="requests")
            if not self._limiter.hit(requests, str(key.id)):
                raise throttled(f"{key.requests_per_minute} requests per minute", self._retry_after(requests, key.id))
        self.running[key.id] += 1

    def leave(self, key: KeyView, tokens: int) -> None:
        self.running[key.id] -= 1
        if self.running[key.id] <= 0:
            del self.running[key.id]
        if key.tokens_per_minute is not None and tokens > 0:
            item = RateLimitItemPerMinute(key.tokens_per_minute, namespace="tokens")
            if not self._limiter.hit(item, str(key.id), cost=tokens):
                # More than the window has left: the library would record nothing, so fill the window.
                left = self._limiter.get_window_stats(item, str(key.id)).remaining
                if left > 0:
                    self._limiter.hit(item, str(key.id), cost=left)
