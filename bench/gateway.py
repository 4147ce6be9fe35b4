"""llamascope as a gateway in front of an OpenAI-compatible engine, against calling it directly and LiteLLM.

A stub engine on loopback streams a fixed answer as fast as it can. The same
streamed chat request (one small image as a data: URI, as llamascope requires
an image) goes to: the stub directly; llamascope in upstream mode (keys,
allowance and ledger on its default SQLite store, image checked and
re-encoded); the LiteLLM proxy in front of the same stub. Each is a separate
process. Latency: sequential requests, full answer read, p50/p99; added
latency is the difference to the direct call. Throughput: requests per second
at a fixed number of concurrent clients. CPU per request: the serving
process's CPU time (user + system, from /proc) over the sequential requests,
divided by their number: unlike latency, it hardly moves when other programs
load the machine, so it compares two versions of llamascope on a busy one.

Start-up and memory of the gateway: the time from starting `llamascope serve`
(every model upstream) to its first answered chat request, and its resident
memory (VmRSS) after --rss-requests requests. A guard prints PASS or FAIL for
each target of the gateway (issue 29): first answer within 1.5 s of start,
at most 150 MB resident after 1,000 requests, added latency at most 1 ms p50
and 2 ms p99, CPU at most 1.0 ms per request. It is a report, not a test:
timings on a shared machine vary.

LiteLLM is not a llamascope dependency: the script uses bench/.venv-litellm
(`python3 -m venv bench/.venv-litellm && bench/.venv-litellm/bin/pip install 'litellm[proxy]'`)
and skips that row if it is missing.

    .venv/bin/python bench/gateway.py [--requests 300] [--concurrency 16] [--seconds 5] [--skip-litellm]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import sys
import time
from pathlib import Path

import httpx
from harness import Processes, cpu_seconds, free_port, wait_ready
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
LITELLM = ROOT / "bench" / ".venv-litellm" / "bin" / "litellm"
KEY = "sk-1e9bb01f134451d1a43b1903784a1916afafe9b0"
MODEL = "stub-vision"
# The gateway's targets (issue 29): name, the measured value's key, the bound, its unit.
TARGETS = (
    ("first answer after start", "startup", 1.5, "s"),
    ("resident memory after {n} requests", "rss", 150.0, "MB"),  # n: at least --rss-requests
    ("added latency p50", "added_p50", 1.0, "ms"),
    ("added latency p99", "added_p99", 2.0, "ms"),
    ("CPU per request", "cpu", 1.0, "ms"),
)

STUB = r"""
import json, sys
import uvicorn

PIECES = ["The ", "picture ", "shows ", "a ", "small ", "red ", "square", "."]

def chunk(text, finish=None):
    return ("data: " + json.dumps({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0,
        "model": "stub", "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
        "finish_reason": finish}]}) + "\n\n").encode()

BODY = b"".join(chunk(p) for p in PIECES[:-1]) + chunk(PIECES[-1], "stop") + ("data: " + json.dumps({
    "id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": "stub", "choices": [],
    "usage": {"prompt_tokens": 20, "completion_tokens": len(PIECES), "total_tokens": 20 + len(PIECES)}})
    + "\n\ndata: [DONE]\n\n").encode()

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    if scope["path"].endswith("/models"):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"object":"list","data":[{"id":"stub"}]}'})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": BODY})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


def body() -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "?"}],
            }
        ],
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def one(client: httpx.AsyncClient, url: str, payload: dict) -> float:
    start = time.perf_counter()
    async with client.stream("POST", url, json=payload) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for _ in response.aiter_bytes():
            pass
    return time.perf_counter() - start


def resident_mb(pid: int) -> float:
    """A process's resident memory (VmRSS) in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmRSS for process {pid}")


def first_answer(url: str, headers: dict[str, str], started: float, seconds: float = 120) -> float:
    """Seconds from ``started`` (time.perf_counter()) to the first answered chat request, asked every 10 ms."""
    payload = body()
    deadline = started + seconds
    # One client for every try: making one (its TLS context) takes tens of ms of CPU, which a poller that
    # made one every 10 ms took from the server starting beside it on a 2-core machine.
    with httpx.Client(headers=headers, timeout=30) as client:
        while time.perf_counter() < deadline:
            try:
                with client.stream("POST", url, json=payload) as r:
                    if r.status_code == 200:
                        r.read()
                        return time.perf_counter() - started
            except httpx.TransportError:  # not listening yet
                pass
            time.sleep(0.01)
    raise RuntimeError(f"{url} did not answer within {seconds:g} s")


async def top_up(url: str, headers: dict[str, str], total: int, concurrency: int) -> None:
    """Send requests until the server has answered ``total`` since it started (run after ``measure``)."""
    payload = body()
    left = total

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one(client, url, payload)

    async with httpx.AsyncClient(headers=headers, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))


async def measure(url: str, headers: dict[str, str], requests: int, concurrency: int, seconds: float, pid: int) -> dict:
    payload = body()
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=30) as client:
        for _ in range(20):  # warm-up: connections, caches
            await one(client, url, payload)
        cpu = cpu_seconds(pid)
        latencies = [await one(client, url, payload) for _ in range(requests)]
        cpu = cpu_seconds(pid) - cpu
        done = 0
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await one(client, url, payload)
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "rps": done / elapsed,
        "cpu": cpu / requests * 1000,
        "requests": 20 + requests + done,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument("--rss-requests", type=int, default=1000, help="requests before the gateway's RSS is read")
    args = parser.parse_args()
    with Processes("llamascope-gateway-") as children:
        tmp = children.tmp
        spawn = children.spawn
        stub_port, ls_port, litellm_port = free_port(), free_port(), free_port()
        stub_pid = spawn([sys.executable, "-c", STUB, str(stub_port)]).pid
        wait_ready(f"http://127.0.0.1:{stub_port}/v1/models")
        stub = f"http://127.0.0.1:{stub_port}/v1"
        gateway = f"http://127.0.0.1:{ls_port}/v1/chat/completions"
        started = time.perf_counter()
        ls_pid = spawn(
            [sys.executable, "-m", "llamascope", "serve", "--port", str(ls_port), "--model", f"{MODEL}=openai+{stub}"],
            {"LLAMASCOPE_API_KEYS": KEY, "LLAMASCOPE_DATA_DIR": str(tmp / "data"), "LLAMASCOPE_LOG_LEVEL": "warning"},
        ).pid
        startup = first_answer(gateway, {"Authorization": f"Bearer {KEY}"}, started)
        targets = [
            ("stub engine, called directly", f"{stub}/chat/completions", {}, stub_pid),
            ("llamascope (upstream mode)", gateway, {"Authorization": f"Bearer {KEY}"}, ls_pid),
        ]
        if LITELLM.exists() and not args.skip_litellm:
            config = tmp / "litellm.yaml"
            # LiteLLM with a master key (it refuses to start without one) and no database: it checks the key.
            config.write_text(
                f"model_list:\n  - model_name: {MODEL}\n    litellm_params:\n      model: openai/stub\n"
                f"      api_base: {stub}\n      api_key: none\ngeneral_settings:\n  master_key: {KEY}\n"
            )
            litellm = spawn([str(LITELLM), "--config", str(config), "--port", str(litellm_port), "--num_workers", "1"])
            wait_ready(f"http://127.0.0.1:{litellm_port}/health/liveliness", seconds=180)
            targets.append(
                (
                    "LiteLLM proxy",
                    f"http://127.0.0.1:{litellm_port}/v1/chat/completions",
                    {"Authorization": f"Bearer {KEY}"},
                    litellm.pid,
                )
            )
        else:
            print(f"(LiteLLM row skipped: {LITELLM} not found)")
        results = [
            (name, asyncio.run(measure(url, h, args.requests, args.concurrency, args.seconds, pid)))
            for name, url, h, pid in targets
        ]
        answered = 1 + results[1][1]["requests"]  # the first answer, then measure's
        if answered < args.rss_requests:
            asyncio.run(top_up(gateway, targets[1][2], args.rss_requests - answered, args.concurrency))
        rss = resident_mb(ls_pid)

    base = results[0][1]
    print(
        f"streamed chat request with a 64x64 image; {args.requests} sequential requests, then "
        f"{args.concurrency} concurrent clients for {args.seconds:g} s; all on this machine's loopback"
    )
    print(f"{'target':<32} {'p50':>8} {'p99':>8} {'added p50':>10} {'added p99':>10} {'req/s':>8} {'CPU/req':>9}")
    for name, r in results:
        print(
            f"{name:<32} {r['p50']:>6.2f}ms {r['p99']:>6.2f}ms {r['p50'] - base['p50']:>8.2f}ms "
            f"{r['p99'] - base['p99']:>8.2f}ms {r['rps']:>8.0f} {r['cpu']:>7.2f}ms"
        )
    names = dict(results)
    if "LiteLLM proxy" in names:
        ratio = names["llamascope (upstream mode)"]["rps"] / names["LiteLLM proxy"]["rps"]
        print(f"llamascope / LiteLLM requests per second: {ratio:.1f}x")
    ours = names["llamascope (upstream mode)"]
    print(
        f"llamascope start-up: first answer {startup:.2f} s after start; {rss:.0f} MB resident after "
        f"{max(answered, args.rss_requests)} requests"
    )
    measured = {
        "startup": startup,
        "rss": rss,
        "added_p50": ours["p50"] - base["p50"],
        "added_p99": ours["p99"] - base["p99"],
        "cpu": ours["cpu"],
    }
    for what, key, bound, unit in TARGETS:
        verdict = "PASS" if measured[key] <= bound else "FAIL"
        value = f"{measured[key]:.2f} {unit}"
        label = what.format(n=max(answered, args.rss_requests))
        print(f"{verdict}  {label:<40} {value:>10}  (target <= {bound:g} {unit})")


if __name__ == "__main__":
    main()
