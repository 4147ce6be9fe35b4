"""The hop to an upstream engine alone: CPU per request of llamascope's HTTP/1.1 client against aiohttp's.

bench/gateway.py's stub engine on loopback; in this process, the same streamed chat request (its body
already JSON) sent one after another and read to its end, by each client in turn over a kept connection,
with the event loop the server runs (uvloop). CPU time is this process's (user + system: the client's
Python and its socket calls), divided by the requests; rounds alternate the clients, so a busy machine
slows both alike. aiohttp is not a llamascope dependency (the test set-up brings it, with the dashscope SDK):
its row is skipped without it.

    .venv/bin/python bench/upstream_http.py [--requests 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import uvloop
from gateway import STUB, body
from harness import Processes, free_port, wait_ready

from llamascope.engines.upstream_http import Client

HEADERS = {"x-request-id": "bench"}


async def llamascope_client(url: str, payload: bytes, requests: int) -> float:
    client = Client({"Authorization": "Bearer bench"})
    started = time.process_time()
    for _ in range(requests):
        async with client.request("POST", url, 300, payload, HEADERS) as response:
            async for _data in response:
                pass
    spent = time.process_time() - started
    await client.close()
    return spent / requests


async def aiohttp_client(url: str, payload: bytes, requests: int) -> float:
    import aiohttp  # why here: not a llamascope dependency

    async with aiohttp.ClientSession(
        headers={"Authorization": "Bearer bench", "Content-Type": "application/json"},
        timeout=aiohttp.ClientTimeout(total=300, connect=5),
        connector=aiohttp.TCPConnector(limit=1000),
    ) as session:
        started = time.process_time()
        for _ in range(requests):
            async with session.post(url, data=payload, headers=HEADERS, allow_redirects=False) as response:
                async for _data in response.content.iter_any():
                    pass
        return (time.process_time() - started) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per client per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    Run = Callable[[str, bytes, int], Awaitable[float]]
    clients: dict[str, Run] = {"llamascope (upstream_http)": llamascope_client}
    try:
        import aiohttp  # noqa: F401  # why here: only to know whether its row can run
    except ImportError:
        print("(aiohttp row skipped: aiohttp is not installed)")
    else:
        clients["aiohttp"] = aiohttp_client
    payload = json.dumps(body()).encode()
    with Processes("llamascope-upstream-http-") as children:
        port = free_port()
        children.spawn([sys.executable, "-c", STUB, str(port)])
        wait_ready(f"http://127.0.0.1:{port}/v1/models")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"

        async def measure() -> dict[str, list[float]]:
            for run in clients.values():  # warm: connections made, code paths taken
                await run(url, payload, 200)
            spent: dict[str, list[float]] = {name: [] for name in clients}
            for round_ in range(args.rounds):
                order = list(clients.items())
                for name, run in order if round_ % 2 == 0 else reversed(order):
                    spent[name].append(await run(url, payload, args.requests))
            return spent

        spent = uvloop.run(measure())
    print(f"streamed chat request to a stub engine; {args.requests} sequential requests x {args.rounds} rounds")
    print(f"{'client':28} {'CPU/req (median)':>17} {'rounds':>24}")
    for name, values in spent.items():
        rounds = " ".join(f"{v * 1e6:.0f}" for v in values)
        print(f"{name:28} {statistics.median(values) * 1e6:14.0f} us {rounds:>24}")
    if len(spent) == 2:
        ours, theirs = (statistics.median(v) for v in spent.values())
        print(f"llamascope / aiohttp: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
