"""What a change costs a request: two versions of llamascope in front of the same stub engine, side by side.

The baseline runs from another checkout's source (``--baseline DIR``, a
directory holding its ``llamascope`` package), this one from this tree; both
in upstream mode in front of bench/gateway.py's stub, with the same streamed
request. Requests alternate between the stub, the baseline and this version
(the order flipped every round), so a busy machine slows all three alike; the
table gives each one's p50, its added p50 over the stub, its CPU time per
request (user + system, from /proc: it hardly moves with the machine's load),
the median of the paired differences, and the ratio of the CPU times.

    git archive main llamascope | tar -x -C /tmp/baseline   # the version to compare with
    .venv/bin/python bench/versions.py --baseline /tmp/baseline [--requests 1500] [--allowance TOKENS]

With --allowance, the key's grant of the model has that many tokens for 30 days instead of none (unlimited):
each request then reserves its tokens before it runs and settles them after, as a metered key's does.
With --tools N, each request offers N function tools (as an agent's requests do, the same ones every time).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
from pathlib import Path

import httpx
from gateway import KEY, MODEL, STUB, body, one
from harness import Processes, cpu_seconds, free_port, wait_ready


def tools(count: int) -> list[dict]:
    """``count`` function tools, each with a small object schema for its arguments."""
    parameters = {
        "type": "object",
        "properties": {"city": {"enum": ["Hangzhou", "Beijing", "Paris"]}, "days": {"type": "integer", "minimum": 1}},
        "required": ["city"],
        "additionalProperties": False,
    }
    return [
        {
            "type": "function",
            "function": {"name": f"forecast_{i}", "description": "The forecast.", "parameters": parameters},
        }
        for i in range(count)
    ]


async def compare(baseline: Path, requests: int, allowance: int | None, offered: int = 0) -> None:
    with Processes("llamascope-versions-") as children:
        stub_port = free_port()
        pids = {"stub engine, called directly": children.spawn([sys.executable, "-c", STUB, str(stub_port)]).pid}
        wait_ready(f"http://127.0.0.1:{stub_port}/v1/models")
        stub = f"http://127.0.0.1:{stub_port}/v1"
        urls = {"stub engine, called directly": f"{stub}/chat/completions"}
        for name, pythonpath in (("llamascope, baseline", str(baseline)), ("llamascope, this tree", None)):
            port = free_port()
            env = {"LLAMASCOPE_API_KEYS": KEY, "LLAMASCOPE_LOG_LEVEL": "warning"}
            env["LLAMASCOPE_DATA_DIR"] = str(children.tmp / str(port))
            if pythonpath:
                env["PYTHONPATH"] = pythonpath
            serve = [
                sys.executable,
                "-m",
                "llamascope",
                "serve",
                "--port",
                str(port),
                "--model",
                f"{MODEL}=openai+{stub}",
            ]
            pids[name] = children.spawn(serve, env).pid
            wait_ready(f"http://127.0.0.1:{port}/health")
            if allowance is not None:  # a limited grant: every request reserves its tokens, then settles
                grant = [sys.executable, "-m", "llamascope", "keys", "grant", KEY, "--model", MODEL]
                grant += ["--allowance", str(allowance), "--days", "30"]
                subprocess.run(grant, env=os.environ | env, check=True, capture_output=True)
            urls[name] = f"http://127.0.0.1:{port}/v1/chat/completions"
        payload = body() | ({"tools": tools(offered)} if offered else {})
        latencies: dict[str, list[float]] = {name: [] for name in urls}
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
            for url in urls.values():
                for _ in range(30):  # warm-up
                    await one(client, url, payload)
            cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
            for i in range(requests):
                order = list(urls.items())
                for name, url in order if i % 2 == 0 else reversed(order):
                    latencies[name].append(await one(client, url, payload))
            cpu = {name: (cpu_seconds(pid) - cpu[name]) / requests * 1000 for name, pid in pids.items()}
    names = list(urls)
    direct = statistics.median(latencies[names[0]]) * 1000
    held = "unlimited grant" if allowance is None else f"a grant of {allowance:,} tokens"
    offer = f"; {offered} tools offered" if offered else ""
    print(f"streamed chat request with a 64x64 image{offer}; {requests} rounds, requests alternating; loopback; {held}")
    print(f"{'target':<30} {'p50':>8} {'added p50':>10} {'CPU/req':>9}")
    for name in names:
        p50 = statistics.median(latencies[name]) * 1000
        print(f"{name:<30} {p50:>6.2f}ms {p50 - direct:>8.2f}ms {cpu[name]:>7.2f}ms")
    paired = [(new - old) * 1000 for old, new in zip(latencies[names[1]], latencies[names[2]], strict=True)]
    print(f"this tree - baseline, median of the paired differences: {statistics.median(paired):+.2f}ms")
    print(f"CPU per request, this tree / baseline: {cpu[names[2]] / cpu[names[1]]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", type=Path, required=True, help="a directory holding the other llamascope package")
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--allowance", type=int, help="tokens of a limited grant for the key (default: unlimited)")
    parser.add_argument("--tools", type=int, default=0, help="function tools each request offers (default: none)")
    args = parser.parse_args()
    if not (args.baseline / "llamascope" / "__init__.py").is_file():
        parser.error(f"{args.baseline} holds no llamascope package")
    asyncio.run(compare(args.baseline.resolve(), args.requests, args.allowance, args.tools))


if __name__ == "__main__":
    main()
