"""Watching a server drain: Prometheus goes on scraping /metrics while the requests still running finish."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import generation_body, start_server

PATH = "/api/v1/services/aigc/multimodal-generation/generation"


@pytest.mark.server
def test_metrics_are_scraped_while_the_server_drains(tmp_path: Path, test_model_dir: Path, image_host) -> None:
    grace = 4
    server = start_server(tmp_path, env={"LLAMASCOPE_SHUTDOWN_GRACE_SECONDS": str(grace)})
    headers = {"Authorization": f"Bearer {server.key}", "X-DashScope-SSE": "enable"}
    body = generation_body(image_host.url("/red.png"), max_tokens=8000, min_new_tokens=8000)
    started = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", server.base + PATH, json=body, headers=headers, timeout=120) as r:
            for _ in r.iter_text():
                started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        assert started.wait(60)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        health = None
        while time.monotonic() - signalled < grace:  # the signal lands a moment later
            health = httpx.get(server.base + "/health")
            if health.status_code == 503:
                break
            time.sleep(0.05)
        assert health is not None and health.status_code == 503, "the drain never began"
        assert health.json()["code"] == "ServiceUnavailable.ShuttingDown"  # a load balancer takes it out
        scrape = httpx.get(server.base + "/metrics")  # ... while Prometheus still sees what runs
        assert scrape.status_code == 200, scrape.text
        assert 'llamascope:num_requests_running{model_name="llama3.2-11b-vision"} 1.0' in scrape.text
    finally:
        thread.join(60)
        server.process.wait(30)
