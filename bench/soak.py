"""A soak test against a started llamascope: many concurrent streams for minutes, some hung up midway.

--streams clients (default 200) each send streamed native requests one after another for --minutes
(default 5): a small image as a data: URI, a short question, max_tokens drawn from 8 to --max-tokens. A
share of them (--hangup, default 0.2) hang up at a random event. Meanwhile the server's resident memory
and open file descriptors are read from /proc every few seconds.

Prints requests per second, answers by status and code, time to first token p50/p99 (from the request
to the first event), the curve: per minute the server's RSS, open fds, requests answered and the bounded
caches' fill (the prefix pool's MB and the vision cache's images, from /health), then whether /health is
back to 0 running and 0 waiting within 2 s of the end. Then the targets, each PASS or FAIL, and one line
for all: no error but the refusals by design (429, 408); RSS at the end of the load at most 10% above the
first minute's, not counting what the prefix pool took meanwhile; file descriptors flat (once the load
and its connections are gone, within 10 of the start, as counted before any load). The exit status is 1
if a target is missed.

The prefix pool keeps every answer's keys and values for a next turn that would resend it, so under this
load (each answer new) it fills towards its bound, a tenth of the memory free at start-up unless
LLAMASCOPE_PREFIX_CACHE_BYTES says: on the built-in model about 15 KB a request, which is most of what RSS
gains over a few minutes at tens of requests a second. The RSS target leaves the pool's own growth out
(its MB are in the table). To see the raw curve flat as well, serve with a pool that is full after the
first minute, e.g. LLAMASCOPE_PREFIX_CACHE_BYTES=16000000 at ~30 requests a second.

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
class Sample:
    at: float  # seconds since the load began
    rss: float  # MB
    fds: int
    done: int = 0  # requests answered so far
    pool: float | None = None  # the prefix pool's MB, from /health (None: not an in-process model)
    images: int | None = None  # images in the vision cache


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


async def caches(client: httpx.AsyncClient, base: str, model: str) -> tuple[float | None, int | None]:
    """The bounded caches' fill of ``model`` (in process), from /health: the prefix pool's MB and the vision
    cache's images; None where it does not say."""
    try:
        health = (await client.get(base + "/health", timeout=10)).json()["models"][model]
    except (httpx.HTTPError, ValueError, KeyError):
        return None, None
    pool = health.get("prefix_cache_bytes")
    return (pool / 2**20 if pool is not None else None), health.get("vision_cache_images")


async def soak(args: argparse.Namespace) -> int:
    pid = args.pid or server_pid(args.base)
    headers = {"Authorization": f"Bearer {args.key}", "X-DashScope-SSE": "enable"}
    limits = httpx.Limits(max_connections=args.streams + 8, max_keepalive_connections=args.streams + 8)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(300, connect=30)) as client:
        if not args.model:
            listing = (await client.get(args.base + "/api/v1/models")).json()
            args.model = listing["data"][0]["model"]
        samples = [Sample(0.0, *footprint(pid), 0, *await caches(client, args.base, args.model))]
        load = os.getloadavg()
        tally = Tally()
        seconds = args.minutes * 60
        began = time.monotonic()
        stop = began + seconds

        async def sampler() -> None:
            while time.monotonic() < stop:
                await asyncio.sleep(min(5.0, seconds / 12))
                fill = await caches(client, args.base, args.model)
                samples.append(Sample(time.monotonic() - began, *footprint(pid), tally.done, *fill))

        watcher = asyncio.create_task(sampler())
        await asyncio.gather(*(client_loop(client, args, stop, tally) for _ in range(args.streams)))
        elapsed = time.monotonic() - began
        watcher.cancel()
        settled = await idle_within(client, args.base, 2.0)
    # After the clients' connections are closed (they are the server's fds too) and it has noticed.
    await asyncio.sleep(1.0)
    after = Sample(time.monotonic() - began, *footprint(pid), done=tally.done)

    def at(moment: float) -> Sample:
        return min(samples, key=lambda s: abs(s.at - moment))

    first_minute = at(min(60.0, seconds))
    end = at(seconds)  # the last sample under load
    ttft = sorted(tally.ttft)
    print(
        f"soak: {args.streams} streams for {elapsed:.0f} s against {args.base} (pid {pid}), max_tokens 8-"
        f"{args.max_tokens}, {args.hangup:.0%} hung up at a random event; load average before: "
        f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, after: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
        f"on {os.cpu_count()} CPUs"
    )
    print(f"requests: {tally.done} ({tally.done / elapsed:.1f}/s)")
    for answer, count in tally.answers.most_common():
        print(f"  {answer:<40} {count:>7}")
    if ttft:
        p99 = ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))]
        print(f"TTFT: p50 {statistics.median(ttft) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms ({len(ttft)} streams)")

    # The curve: the start, then the sample nearest each minute's end, the end of the load and after it.
    points = [("start (idle)", samples[0])]
    points += [(f"minute {m}", at(m * 60.0)) for m in range(1, int(seconds // 60) + 1)]
    if seconds % 60:
        points.append(("end of the load", end))
    points.append(("after it (idle)", after))
    header = f"{'server':<18} {'at s':>6} {'RSS MB':>8} {'vs min 1':>9} {'open fds':>9} {'req/s':>6}"
    print(header + f" {'pool MB':>8} {'images':>6}")
    previous = samples[0]
    for name, sample in points:
        rate = (sample.done - previous.done) / (sample.at - previous.at) if sample.at > previous.at else 0.0
        growth = f"{sample.rss / first_minute.rss - 1:+.1%}" if sample is not samples[0] else ""
        pool = f"{sample.pool:.0f}" if sample.pool is not None else "-"
        images = f"{sample.images}" if sample.images is not None else "-"
        print(
            f"{name:<18} {sample.at:>6.0f} {sample.rss:>8.0f} {growth:>9} {sample.fds:>9} {rate:>6.1f} {pool:>8}"
            f" {images:>6}"
        )
        previous = sample
    idle = f"after {settled:.2f} s" if settled is not None else "NOT within 2 s"
    print(f"/health at 0 running, 0 waiting: {idle}")

    errors = {a: n for a, n in tally.answers.items() if not a.startswith("200") and a.split()[0] not in REFUSALS}
    # The prefix pool fills towards its bound (a tenth of the free memory unless set) with every answer it has
    # not seen: memory the operator allowed, not a leak. The target is what grows beyond it.
    pool_mb = end.pool - first_minute.pool if end.pool is not None and first_minute.pool is not None else 0.0
    rss_growth = end.rss / first_minute.rss - 1
    beyond_pool = (end.rss - pool_mb) / first_minute.rss - 1
    fd_growth = after.fds - samples[0].fds
    checks = [
        ("no error but 429/408", not errors, str(errors or "none")),
        (
            "RSS at the end within 10% of the first minute's, beyond the prefix pool's filling",
            beyond_pool <= 0.10,
            f"{beyond_pool:+.1%} (RSS {rss_growth:+.1%}, the pool {pool_mb:+.0f} MB)",
        ),
        ("open fds flat (idle after as at the start, within 10)", abs(fd_growth) <= 10, f"{fd_growth:+d}"),
        ("/health idle within 2 s of the end", settled is not None, ""),
    ]
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}")
    failed = [name for name, ok, _ in checks if not ok]
    print(f"{'FAIL' if failed else 'PASS'}: {len(checks) - len(failed)} of {len(checks)} targets met")
    return 1 if failed else 0


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
    raise SystemExit(asyncio.run(soak(args)))


if __name__ == "__main__":
    main()
