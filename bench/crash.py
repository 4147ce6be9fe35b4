"""The books through a crash: streams running, the server killed with SIGKILL, restarted on the same data.

A real ``llamascope serve`` (the built-in test model, default settings unless given) takes --streams
streamed requests; once each has received --after tokens the server gets SIGKILL. The clients read
to the end of what reached them. A second server on the same data directory then charges the
interrupted requests; the table sets the tokens each client received against the output tokens its
ledger row was charged (status ``interrupted``), and says whether each is within the bound
(received - CHECKPOINT_TOKENS <= charged <= received + the one event that was on its way).

    .venv/bin/python bench/crash.py [--streams 8] [--after 150] [--checkpoint-tokens 64]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import signal
import sys
import threading
import time

import httpx
from harness import Processes, free_port, wait_ready
from PIL import Image

from llamascope.accounts.store import AccountStore

KEY = "sk-crash-0123456789abcdefghijklmnopqrstuv"
PATH = "/api/v1/services/aigc/multimodal-generation/generation"


def image() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 120, 200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def stream(base: str, received: dict[str, int]) -> None:
    body = {
        "model": "llama3.2-90b-vision-instruct",
        "input": {"messages": [{"role": "user", "content": [{"image": image()}, {"text": "Tell me a story."}]}]},
        "parameters": {"max_tokens": 4000, "incremental_output": True},
    }
    headers = {"Authorization": f"Bearer {KEY}", "X-DashScope-SSE": "enable"}
    try:
        with httpx.stream("POST", base + PATH, json=body, headers=headers, timeout=300) as r:
            request_id = r.headers["x-request-id"]
            for line in r.iter_lines():
                if line.startswith("data:"):
                    received[request_id] = json.loads(line[5:])["usage"]["output_tokens"]
    except httpx.HTTPError:
        pass  # the server died: what arrived is counted


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--after", type=int, default=150, help="tokens every stream has received before the kill")
    parser.add_argument("--checkpoint-tokens", type=int, default=64)
    args = parser.parse_args()
    with Processes("llamascope-crash-") as children:
        data = children.tmp / "data"
        env = {
            "LLAMASCOPE_API_KEYS": KEY,
            "LLAMASCOPE_DATA_DIR": str(data),
            "LLAMASCOPE_LOG_LEVEL": "warning",
            "LLAMASCOPE_CHECKPOINT_TOKENS": str(args.checkpoint_tokens),
        }
        port = free_port()
        command = [sys.executable, "-m", "llamascope", "serve", "--port", str(port)]
        server = children.spawn(command, env)
        base = f"http://127.0.0.1:{port}"
        wait_ready(base + "/health")
        received: dict[str, int] = {}
        threads = [threading.Thread(target=stream, args=(base, received)) for _ in range(args.streams)]
        for t in threads:
            t.start()
        while len(received) < args.streams or min(received.values()) < args.after:
            time.sleep(0.02)
        server.send_signal(signal.SIGKILL)
        server.wait()
        for t in threads:
            t.join()
        children.spawn(command, env)
        wait_ready(base + "/health")
        rows = {r.request_id: r for r in AccountStore.for_path(data / "llamascope.db").ledger()}

    window = args.checkpoint_tokens
    print(f"{args.streams} streams, SIGKILL once each had {args.after}+ tokens; CHECKPOINT_TOKENS={window}")
    print(f"{'request':<10} {'received':>9} {'charged':>8} {'status':<12} within bound")
    for request_id, got in sorted(received.items()):
        row = rows.get(request_id)
        charged = row.output_tokens if row else 0
        ok = row is not None and got - window <= charged <= got + 8
        print(
            f"{request_id[:8]:<10} {got:>9} {charged:>8} {row.status if row else '(none)':<12} {'yes' if ok else 'NO'}"
        )
    total = sum(r.output_tokens for i, r in rows.items() if i in received)
    print(f"{'total':<10} {sum(received.values()):>9} {total:>8}")


if __name__ == "__main__":
    main()
