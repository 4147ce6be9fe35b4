"""A soak test against a started llamascope: many concurrent streams for minutes, some hung up midway.

--streams clients (default 200) each send streamed native requests one after another for --minutes
(default 5): a small image as a data: URI, a short question, max_tokens drawn from 8 to --max-tokens. A
share of them (--hangup, default 0.2) hang up at a random event. Meanwhile the server's resident memory
and open file descriptors are read from /proc every few seconds.

Prints requests per second, answers by status and code, time to first token p50/p99 (from the request
to the first event), the server's RSS and open fds at the start, after the first minute, in the middle
at the end of the load and once it is over, and whether /health is back to 0 running and 0 waiting within
2 s of the end. Then the targets: no error but the refusals by design (429, 408); RSS at the end of the
load within 10% of the first minute's; file descriptors flat (once the load and its connections are gone,
within 10 of the start, as counted before any load).

    make serve   # or any started server, on this machine (its /proc is read)
    .venv/bin/python bench/soak.py --key sk-... [--base http://127.0.0.1:8000] [--streams 200] [--minutes 5]
                                   [--hangup 0.2] [--max-tokens 64] [--pid PID]

The server's pid is found from the port it listens on unless --pid is given.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from PIL import Image

PATH = "/api/v1/services/aigc/multimodal-generation/generation"
REFUSALS = {"429", "408"}  # refused by design: the queue is full, or the wait too long


@dataclass
class Tally:
    answers: Counter[str] = field(default_factory=Counter)
    ttft: list[float] = field(default_factory=list)
    done: int = 0


def image_uri() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 120, 200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def one(client: httpx.AsyncClient, url: str, body: dict, hangup_at: int | None, tally: Tally) -> None:
    started = time.perf_counter()
    answer = "?"
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                data = json.loads(await response.aread() or b"{}")
                answer = f"{response.status_code} {data.get('code', '')}"
                return
            events, kind = 0, ""
            answer = "200 ok"
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    kind = line[6:]
                elif line.startswith("data:"):
                    if kind == "error":
                        data = json.loads(line[5:])
                        answer = f"event:error {data.get('code')}"
                        return
                    events += 1
                    if events == 1:
                        tally.ttft.append(time.perf_counter() - started)
                    if hangup_at is not None and events >= hangup_at:
                        answer = "200 hung up by the client"
                        return
    except httpx.HTTPError as exc:
        answer = f"transport {type(exc).__name__}"
    finally:
        tally.answers[answer] += 1
        tally.done += 1


async def client_loop(client: httpx.AsyncClient, args: argparse.Namespace, stop: float, tally: Tally) -> None:
    url = args.base + PATH
    uri = image_uri()
    while time.monotonic() < stop:
        tokens = random.randint(8, args.max_tokens)
        body = {
            "model": args.model,
            "input": {"messages": [{"role": "user", "content": [{"image": uri}, {"text": "What is this?"}]}]},
            "parameters": {"max_tokens": tokens, "incremental_output": True},
        }
        hangup = random.randint(1, tokens) if random.random() < args.hangup else None
        await one(client, url, body, hangup, tally)


def server_pid(base: str) -> int:
    """The process listening on the server's port, from /proc/net/tcp{,6} and each process's fds."""
    port = urlsplit(base).port or 80
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "0A":  # LISTEN
                inodes.add(f"socket:[{parts[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:
            continue
    raise SystemExit(f"no process of this machine listens on port {port}; give --pid")


def footprint(pid: int) -> tuple[float, int]:
    """Resident memory in MB and open file descriptors."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


async def idle_within(client: httpx.AsyncClient, base: str, seconds: float) -> float | None:
    """Seconds until /health shows no running and no waiting request, or None if not within ``seconds``."""
    started = time.monotonic()
    while time.monotonic() - started <= seconds:
        models = (await client.get(base + "/health")).json()["models"]
        if all(m.get("running", 0) == 0 and m.get("waiting", 0) == 0 for m in models.values()):
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    return None


async def soak(args: argparse.Namespace) -> None:
    pid = args.pid or server_pid(args.base)
    headers = {"Authorization": f"Bearer {args.key}", "X-DashScope-SSE": "enable"}
    limits = httpx.Limits(max_connections=args.streams + 8, max_keepalive_connections=args.streams + 8)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(300, connect=30)) as client:
        if not args.model:
            listing = (await client.get(args.base + "/api/v1/models")).json()
            args.model = listing["data"][0]["model"]
        samples: list[tuple[float, float, int]] = [(0.0, *footprint(pid))]
        load = os.getloadavg()
        tally = Tally()
        seconds = args.minutes * 60
        began = time.monotonic()
        stop = began + seconds

        async def sampler() -> None:
            while time.monotonic() < stop:
                await asyncio.sleep(min(5.0, seconds / 12))
                samples.append((time.monotonic() - began, *footprint(pid)))

        watcher = asyncio.create_task(sampler())
        await asyncio.gather(*(client_loop(client, args, stop, tally) for _ in range(args.streams)))
        elapsed = time.monotonic() - began
        watcher.cancel()
        settled = await idle_within(client, args.base, 2.0)
    # After the clients' connections are closed (they are the server's fds too) and it has noticed.
    await asyncio.sleep(1.0)
    after = (time.monotonic() - began, *footprint(pid))

    def at(moment: float) -> tuple[float, float, int]:
        return min(samples, key=lambda s: abs(s[0] - moment))

    first_minute = at(min(60.0, seconds))
    end = at(seconds)  # the last sample under load
    points = [("start (idle)", samples[0]), ("after the first minute", first_minute)]
    points += [("middle", at(seconds / 2)), ("end of the load", end), ("after it (idle)", after)]
    ttft = sorted(tally.ttft)
    print(
        f"soak: {args.streams} streams for {elapsed:.0f} s against {args.base} (pid {pid}), max_tokens 8-"
        f"{args.max_tokens}, {args.hangup:.0%} hung up at a random event; load average before: "
        f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"requests: {tally.done} ({tally.done / elapsed:.1f}/s)")
    for answer, count in tally.answers.most_common():
        print(f"  {answer:<40} {count:>7}")
    if ttft:
        p99 = ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))]
        print(f"TTFT: p50 {statistics.median(ttft) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms ({len(ttft)} streams)")
    print(f"{'server':<24} {'at s':>6} {'RSS MB':>8} {'open fds':>9}")
    for name, (moment, rss, fds) in points:
        print(f"{name:<24} {moment:>6.0f} {rss:>8.0f} {fds:>9}")
    idle = f"after {settled:.2f} s" if settled is not None else "NOT within 2 s"
    print(f"/health at 0 running, 0 waiting: {idle}")

    errors = {a: n for a, n in tally.answers.items() if not a.startswith("200") and a.split()[0] not in REFUSALS}
    rss_growth = end[1] / first_minute[1] - 1
    fd_growth = after[2] - samples[0][2]
    checks = [
        ("no error but 429/408", not errors, str(errors or "none")),
        ("RSS at the end within 10% of the first minute's", abs(rss_growth) <= 0.10, f"{rss_growth:+.1%}"),
        ("open fds flat (idle after as at the start, within 10)", abs(fd_growth) <= 10, f"{fd_growth:+d}"),
        ("/health idle within 2 s of the end", settled is not None, ""),
    ]
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="http://127.0.0.1:8000")
    parser.add_argument(
        "--key", default=os.environ.get("DASHSCOPE_API_KEY"), required="DASHSCOPE_API_KEY" not in os.environ
    )
    parser.add_argument("--model", help="default: the first the server lists")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--hangup", type=float, default=0.2, help="share of requests hung up at a random event")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--pid", type=int, help="the server's process (default: found from the port)")
    args = parser.parse_args()
    asyncio.run(soak(args))


if __name__ == "__main__":
    main()
