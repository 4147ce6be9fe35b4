"""The scheduler seen over HTTP: hang-ups free the engine, a full queue is a clean 429.

Real ``llamascope serve`` processes on loopback, the engine's load read from /health.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_KEY, SEED_MODEL, Server, generation_body, start_server

PATH = "/api/v1/services/aigc/multimodal-generation/generation"


def load(server: Server) -> dict[str, int]:
    return httpx.get(server.base + "/health", timeout=5).json()["models"][SEED_MODEL]


def wait_idle(server: Server, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        now = load(server)
        if now["running"] == 0 and now["waiting"] == 0:
            return
        assert time.monotonic() < deadline, now
        time.sleep(0.01)


def first_event(server: Server, body: dict) -> None:
    headers = {"Authorization": f"Bearer {server.key}", "X-DashScope-SSE": "enable"}
    with httpx.stream("POST", server.base + PATH, json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                return
    raise AssertionError("no event")


def raw_request(server: Server, body: bytes) -> socket.socket:
    """Send a streamed generation request on a raw socket, to hang up at a chosen moment."""
    host, port = server.base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {server.key}\r\n"
        f"X-DashScope-SSE: enable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def test_hangups_during_prefill_and_mid_stream_free_the_engine(server: Server, image_host) -> None:
    """Behaviour, not speed (bench/engine.py times the engine): each hang-up ends its request, charged what
    it made, and leaves the engine idle for the next."""
    # During prefill: a prompt near the context limit, abandoned before its first token.
    long_prompt = generation_body(image_host.url("/red.png"), max_tokens=4000, temperature=0)
    long_prompt["input"]["messages"][0]["content"][1]["text"] = "describe every detail " * 800
    sock = raw_request(server, json.dumps(long_prompt).encode())
    deadline = time.monotonic() + 10
    while load(server)["running"] == 0:  # it reached the model
        assert time.monotonic() < deadline
        time.sleep(0.002)
    sock.close()
    wait_idle(server, within=60)
    line, deadline = "", time.monotonic() + 15
    while not line and time.monotonic() < deadline:
        line = next((x for x in server.log().splitlines() if "status=499" in x and "output_tokens=" in x), "")
        time.sleep(0.05)
    assert "client=disconnected" in line
    assert int(re.search(r"output_tokens=(\d+)", line).group(1)) <= 1, line

    # Mid-stream: a few events, then gone; it leaves the batch long before its 4000 tokens.
    body = generation_body(image_host.url("/red.png"), max_tokens=4000, min_new_tokens=4000)
    sock = raw_request(server, json.dumps(body).encode())
    received = b""
    while received.count(b"data:") < 5:
        received += sock.recv(65536)
    request_id = re.search(rb"x-request-id: ([\w-]+)", received, re.IGNORECASE).group(1).decode()
    sock.close()
    wait_idle(server, within=60)
    line = server.access_line(request_id)
    assert "client=disconnected" in line and "finish=-" in line, line
    assert 5 <= int(re.search(r"output_tokens=(\d+)", line).group(1)) < 4000, line

    # Nothing of the two is left in the engine: the next request is served.
    first_event(server, generation_body(image_host.url("/red.png"), max_tokens=2))


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory: pytest.TempPathFactory, test_model_dir: Path):
    srv = start_server(
        tmp_path_factory.mktemp("tight"),
        env={"LLAMASCOPE_MAX_BATCH_SIZE": "1", "LLAMASCOPE_MAX_QUEUED": "1", "LLAMASCOPE_MAX_QUEUE_WAIT_SECONDS": "1"},
    )
    yield srv
    srv.stop()


@pytest.mark.server
def test_full_queue_and_long_wait_are_clean_errors(tight_server: Server, image_host) -> None:
    server = tight_server
    headers = {"Authorization": f"Bearer {server.key}"}
    body = generation_body(image_host.url("/red.png"), max_tokens=8000, temperature=0)
    running = raw_request(server, json.dumps(body).encode())
    deadline = time.monotonic() + 10
    while load(server)["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    results: list[httpx.Response] = []
    small = generation_body(image_host.url("/red.png"))
    waiter = threading.Thread(
        target=lambda: results.append(httpx.post(server.base + PATH, json=small, headers=headers, timeout=30))
    )
    waiter.start()
    while load(server)["waiting"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # The queue is full: refused at once, as plain HTTP even when streaming was asked for.
    for extra in ({}, {"X-DashScope-SSE": "enable"}):
        r = httpx.post(server.base + PATH, json=small, headers=headers | extra)
        assert r.status_code == 429, r.text
        assert r.json()["code"] == "Throttling" and r.json()["request_id"]
        assert int(r.headers["retry-after"]) >= 1
    # The one waiting waited longer than allowed.
    waiter.join(30)
    assert results[0].status_code == 408
    assert results[0].json()["code"] == "RequestTimeOut"
    # Refusals are recorded but not charged (the one running is not settled yet).
    usage = httpx.get(server.base + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert sum(row["requests"] for row in usage["data"]) == 3, usage
    assert sum(row["input_tokens"] + row["image_tokens"] for row in usage["data"]) == 0, usage
    running.close()
    wait_idle(server, within=5)


@pytest.mark.server
def test_a_request_whose_client_leaves_while_it_waits_is_not_charged_its_prompt(
    tight_server: Server, image_host
) -> None:
    """Its client gone while it waited in the queue, nothing was run for it: its ledger row and access line say
    0 input and image tokens (its prompt was charged, 6,404 image tokens for one image, as if it had run)."""
    server = tight_server
    running = raw_request(server, json.dumps(generation_body(image_host.url("/red.png"), max_tokens=8000)).encode())
    deadline = time.monotonic() + 10
    while load(server)["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    before = server.log().count("status=499")
    waiting = raw_request(server, json.dumps(generation_body(image_host.url("/blue.png"))).encode())
    while load(server)["waiting"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    waiting.close()  # within MAX_QUEUE_WAIT_SECONDS (1 s): a hang-up, not a 408
    line, deadline = "", time.monotonic() + 15
    while not line and time.monotonic() < deadline:
        line = next((x for x in server.log().splitlines()[::-1] if "status=499" in x), "")
        line = line if server.log().count("status=499") > before else ""
        time.sleep(0.02)
    assert "client=disconnected" in line and "output_tokens=0" in line, line
    assert "input_tokens=0" in line and "image_tokens=0" in line, line
    running.close()
    wait_idle(server, within=5)
