"""The memory a waiting request holds: the figure the engine's queue is sized by (MAX_QUEUED_BYTES).

A real ``llamascope serve`` (the built-in model, one request decoded at a time) runs one long request;
then N requests are sent at once and wait. The server's resident memory before and after, over N, is
what one waiting request holds: about one image (its vision states cached: no pixel tensors), or an
image each (four tiles of pixel tensors). Images go as data: URIs, so nothing else is fetched.

    .venv/bin/python bench/queue_memory.py [N] [same|distinct]
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import sys
import time

import httpx
import psutil
from harness import Processes, free_port, wait_ready
from PIL import Image

PATH = "/api/v1/services/aigc/multimodal-generation/generation"
KEY = "sk-" + "0" * 40


def image(i: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (1120, 840), (i % 256, (i * 7) % 256, 40)).save(buffer, format="PNG")  # four tiles
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def body(uri: str, tokens: int) -> dict:
    messages = [{"role": "user", "content": [{"image": uri}, {"text": "What is it?"}]}]
    return {
        "model": "llama3.2-11b-vision",
        "input": {"messages": messages},
        "parameters": {"max_tokens": tokens, "min_new_tokens": tokens},
    }


async def measure(base: str, pid: int, n: int, distinct: bool) -> tuple[int, float, float]:
    headers = {"Authorization": f"Bearer {KEY}"}
    uris = [image(i) for i in range(n if distinct else 1)]
    process = psutil.Process(pid)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=n + 1)) as client:
        await client.post(base + PATH, json=body(uris[0], 1), headers=headers)
        long = asyncio.create_task(client.post(base + PATH, json=body(uris[0], 8000), headers=headers))
        await asyncio.sleep(2)
        before = process.memory_info().rss
        waiting = [
            asyncio.create_task(client.post(base + PATH, json=body(uris[i % len(uris)], 1), headers=headers))
            for i in range(n)
        ]
        queued = 0
        for _ in range(1200):
            async with httpx.AsyncClient() as health:
                queued = (await health.get(base + "/health")).json()["models"]["llama3.2-11b-vision"]["waiting"]
            if queued >= n:
                break
            await asyncio.sleep(0.5)
        after = process.memory_info().rss
        for task in [long, *waiting]:
            task.cancel()
        return queued, before / 2**20, after / 2**20


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    distinct = (sys.argv[2] if len(sys.argv) > 2 else "same") == "distinct"
    port = free_port()
    with Processes("llamascope-queue-") as processes:
        env = {
            "LLAMASCOPE_API_KEYS": KEY,
            "LLAMASCOPE_DATA_DIR": str(processes.tmp / "data"),
            "LLAMASCOPE_MAX_BATCH_SIZE": "1",
            "LLAMASCOPE_MAX_QUEUE_WAIT_SECONDS": "600",
        }
        child = processes.spawn([sys.executable, "-m", "llamascope", "serve", "--port", str(port)], env)
        base = f"http://127.0.0.1:{port}"
        wait_ready(base + "/health")
        started = time.monotonic()
        queued, before, after = asyncio.run(measure(base, child.pid, n, distinct))
    kind = "an image each" if distinct else "one image"
    print("| waiting requests | about | RSS before | RSS after | per waiting request |")
    print("| --- | --- | --- | --- | --- |")
    each = (after - before) * 1024 / max(queued, 1)
    print(f"| {queued} | {kind} | {before:.0f} MiB | {after:.0f} MiB | {each:.0f} KiB |")
    print(f"({time.monotonic() - started:.0f} s; cores: {os.cpu_count()})")


if __name__ == "__main__":
    main()
