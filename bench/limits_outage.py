"""How long the shared rate limits take to decide while Redis is down (tests/accounts/test_limits.py asserts
only what they decide: served uncounted with on_error=open, 503 with closed).

A real redis-server on loopback; a key with limits is let in once, then Redis is killed and the key asks
--tries times under each rule. The target: every decision within the limiter's --timeout and a little more
(the README promises a request never waits longer than it).

    .venv/bin/python bench/limits_outage.py [--timeout 0.3] [--tries 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import UTC, datetime

import redis
from harness import Processes, free_port

from llamascope import errors
from llamascope.accounts.limits import SharedRateLimits
from llamascope.accounts.records import KeyView


async def decisions(url: str, rule: str, timeout: float, tries: int, stop: object) -> list[float]:
    limits = SharedRateLimits(url, on_error=rule, timeout=timeout)  # type: ignore[arg-type]
    key = KeyView(1, "sk-bench", "", datetime.now(UTC), None, None, 100, None, 5)
    await limits.enter(key)
    await limits.leave(key, 1)
    stop()  # type: ignore[operator]
    seconds = []
    for _ in range(tries):
        started = time.monotonic()
        try:
            counted = await limits.enter(key)
            await limits.leave(key, 1, counted)
        except errors.ServiceError:
            pass
        seconds.append(time.monotonic() - started)
    await limits.aclose()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=0.3)
    parser.add_argument("--tries", type=int, default=20)
    args = parser.parse_args()
    print(f"{'rule':<8} {'p50 ms':>8} {'max ms':>8}  within timeout + 0.1 s")
    for rule in ("open", "closed"):
        with Processes("llamascope-limits-") as processes:
            port = free_port()
            server = processes.spawn(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"])
            client = redis.Redis(port=port, socket_connect_timeout=0.2)
            for _ in range(100):
                try:
                    if client.ping():
                        break
                except redis.RedisError:
                    time.sleep(0.05)

            def stop(server=server) -> None:  # type: ignore[no-untyped-def]
                server.kill()
                server.wait()

            seconds = asyncio.run(decisions(f"redis://127.0.0.1:{port}/0", rule, args.timeout, args.tries, stop))
        ok = max(seconds) <= args.timeout + 0.1
        print(f"{rule:<8} {statistics.median(seconds) * 1000:>8.1f} {max(seconds) * 1000:>8.1f}  {ok}")


if __name__ == "__main__":
    main()
