"""bench/gateway.py's llamascope row for two versions at once: paired, so that a shared machine's load
falls on both alike.

A stub engine and two ``llamascope serve`` processes in upstream mode, one from this checkout and one
from --before (another checkout's root, e.g. ``git archive main | tar -x -C /tmp/main``), each on its
default SQLite store. Sequential streamed requests go to the stub directly, then to both servers, in
alternating order, --requests times; the table gives each one's p50/p99 and its p50 added to the direct
call's. On a busy machine single runs of bench/gateway.py wander by milliseconds; the difference between
the two paired rows does not.

    .venv/bin/python bench/gateway_ab.py --before /tmp/main [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

import httpx
from gateway import KEY, MODEL, STUB, body, one
from harness import Processes, free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", type=Path, required=True, help="the root of the checkout to compare against")
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    with Processes("llamascope-gateway-ab-") as children:
        stub_port = free_port()
        children.spawn([sys.executable, "-c", STUB, str(stub_port)])
        stub = f"http://127.0.0.1:{stub_port}/v1"
        wait_ready(f"{stub}/models")
        urls = {}
        for name, root in ((f"before ({args.before})", args.before.resolve()), ("this checkout", ROOT)):
            port = free_port()
            env = {
                "LLAMASCOPE_API_KEYS": KEY,
                "LLAMASCOPE_DATA_DIR": str(children.tmp / f"data-{port}"),
                "LLAMASCOPE_LOG_LEVEL": "warning",
                "PYTHONPATH": str(root),  # ahead of the installed (editable) llamascope
            }
            command = [sys.executable, "-m", "llamascope", "serve", "--port", str(port)]
            children.spawn([*command, "--model", f"{MODEL}=openai+{stub}"], env)
            urls[name] = f"http://127.0.0.1:{port}"
        for url in urls.values():
            wait_ready(url + "/health")
        direct, timings = asyncio.run(paired(stub, urls, args.requests))
    base = statistics.median(direct) * 1000
    print(
        f"paired: {args.requests} sequential streamed requests each, alternating; the stub directly p50 {base:.2f} ms"
    )
    print(f"{'target':<40} {'p50':>8} {'p99':>8} {'added p50':>10}")
    for name, values in timings.items():
        values.sort()
        p50, p99 = statistics.median(values) * 1000, values[int(len(values) * 0.99) - 1] * 1000
        print(f"{name:<40} {p50:>6.2f}ms {p99:>6.2f}ms {p50 - base:>8.2f}ms")


async def paired(stub: str, urls: dict[str, str], requests: int) -> tuple[list[float], dict[str, list[float]]]:
    payload = body()
    timings: dict[str, list[float]] = {name: [] for name in urls}
    direct = []
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
        for url in urls.values():
            for _ in range(50):  # warm-up: connections, caches
                await one(client, url + "/v1/chat/completions", payload)
        for i in range(requests):
            direct.append(await one(client, f"{stub}/chat/completions", payload))
            order = list(urls.items())
            for name, url in order if i % 2 else order[::-1]:
                timings[name].append(await one(client, url + "/v1/chat/completions", payload))
    return direct, timings


if __name__ == "__main__":
    main()
