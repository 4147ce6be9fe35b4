"""What a large, first-seen response schema costs the server's other requests while it is checked.

One llamascope in upstream mode in front of bench/gateway.py's stub engine (``--baseline DIR`` runs another
checkout's source beside this tree's, alternating). Each round sends one request whose ``response_format`` is a
new JSON Schema (an ``anyOf`` of --branches small objects, a new name in every round, so no cache holds its
verdict) and, while it is being checked, a small plain-text request ("ping") every 20 ms. The table gives, per
version, the big request's own time, and over the rounds the median of the slowest ping of each round and the
median of all pings; the pings of an idle server are the floor.

    .venv/bin/python bench/schema_stall.py [--branches 3000] [--rounds 7] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx
from gateway import KEY, MODEL, STUB, body, one
from harness import Processes, free_port, wait_ready


def big_schema(branches: int, variant: int) -> dict:
    return {
        "anyOf": [
            {
                "type": "object",
                "properties": {f"k{i}_{variant}": {"type": "string"}, "n": {"type": "integer"}},
                "required": [f"k{i}_{variant}"],
                "additionalProperties": False,
            }
            for i in range(branches)
        ]
    }


async def timed(client: httpx.AsyncClient, url: str, payload: dict) -> tuple[float, int]:
    began = time.perf_counter()
    response = await client.post(url, json=payload)
    return time.perf_counter() - began, response.status_code


async def round_(
    client: httpx.AsyncClient, url: str, branches: int, variant: int, ping: dict
) -> tuple[float, int, list[float]]:
    payload = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Answer in json."}],
        "max_tokens": 4,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "big", "schema": big_schema(branches, variant)},
        },
    }
    big = asyncio.create_task(timed(client, url, payload))
    pings: list[float] = []
    while not big.done():
        await asyncio.sleep(0.02)
        if big.done():
            break
        pings.append(await one(client, url, ping))
    took, status = await big
    return took, status, pings


async def compare(baseline: Path | None, branches: int, rounds: int) -> None:
    with Processes("llamascope-schema-stall-") as children:
        stub_port = free_port()
        children.spawn([sys.executable, "-c", STUB, str(stub_port)])
        wait_ready(f"http://127.0.0.1:{stub_port}/v1/models")
        stub = f"http://127.0.0.1:{stub_port}/v1"
        versions = ([("baseline", str(baseline))] if baseline else []) + [("this tree", None)]
        urls: dict[str, str] = {}
        for name, pythonpath in versions:
            port = free_port()
            env = {"LLAMASCOPE_API_KEYS": KEY, "LLAMASCOPE_LOG_LEVEL": "warning"}
            env["LLAMASCOPE_DATA_DIR"] = str(children.tmp / str(port))
            if pythonpath:
                env["PYTHONPATH"] = pythonpath
            serve = [sys.executable, "-m", "llamascope", "serve", "--port", str(port)]
            serve += ["--model", f"{MODEL}=openai+{stub}"]
            children.spawn(serve, env)
            wait_ready(f"http://127.0.0.1:{port}/health")
            urls[name] = f"http://127.0.0.1:{port}/v1/chat/completions"
        idle: dict[str, list[float]] = {name: [] for name in urls}
        bigs: dict[str, list[float]] = {name: [] for name in urls}
        worst: dict[str, list[float]] = {name: [] for name in urls}
        during: dict[str, list[float]] = {name: [] for name in urls}
        statuses: dict[str, set[int]] = {name: set() for name in urls}
        ping = body() | {"stream": True}  # bench/gateway.py's streamed request with a 64x64 image
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
            for url in urls.values():  # warm: imports (jsonschema, llguidance), the first requests
                await round_(client, url, 10, -1, ping)
            for r in range(rounds):
                order = list(urls.items())
                for name, url in order if r % 2 == 0 else reversed(order):
                    for _ in range(5):
                        idle[name].append(await one(client, url, ping))
                    took, status, pings = await round_(client, url, branches, r, ping)
                    bigs[name].append(took)
                    statuses[name].add(status)
                    if pings:
                        worst[name].append(max(pings))
                        during[name] += pings
    print(f"a new anyOf of {branches} objects per round, pings every 20 ms while it is checked; {rounds} rounds")
    print("(the big request's status: 500 once checked, the stub's answer being no JSON; 400 if refused)")
    columns = ("version", "big request", "status", "idle ping", "ping, median", "slowest ping (median of rounds)")
    print(f"{columns[0]:<12} {columns[1]:>12} {columns[2]:>8} {columns[3]:>10} {columns[4]:>13} {columns[5]:>32}")
    for name in urls:
        status = ",".join(map(str, sorted(statuses[name])))
        row = (ms(bigs[name]), status, ms(idle[name]), ms(during[name]), ms(worst[name]))
        print(f"{name:<12} {row[0]:>12} {row[1]:>8} {row[2]:>10} {row[3]:>13} {row[4]:>32}")


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f}ms" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", type=Path, help="a directory holding another llamascope package to compare")
    parser.add_argument("--branches", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(compare(args.baseline.resolve() if args.baseline else None, args.branches, args.rounds))


if __name__ == "__main__":
    main()
