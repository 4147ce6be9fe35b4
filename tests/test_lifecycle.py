"""The server's life as an operator meets it: start-up, keys on first start, config, shutdown, hang-ups."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, generation_body, start_server

PATH = "/api/v1/services/aigc/multimodal-generation/generation"


@pytest.mark.parametrize(
    ("model_arg", "message"),
    [
        ("x=/nonexistent/llama", "model 'x': /nonexistent/llama does not exist"),
        ("x={tmp}", "is not a Hugging Face model directory: it has no config.json"),
        ("x={textonly}", "has a config.json but no weights"),  # a text-only Llama is served: it needs weights
        ("x={other}", "has model_type 'gpt2'; llamascope serves Llama 3.2 Vision"),
    ],
)
def test_bad_model_fails_at_start_with_a_reason(tmp_path: Path, model_arg: str, message: str) -> None:
    textonly, other = tmp_path / "textonly", tmp_path / "other"
    for folder, model_type in ((textonly, "llama"), (other, "gpt2")):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    arg = model_arg.format(tmp=tmp_path, textonly=textonly, other=other)
    server = start_server(tmp_path, ["--model", arg], wait=False)
    assert server.process.wait(120) == 2
    assert message in server.log()
    assert "Traceback" not in server.log()


def test_first_start_makes_a_key_then_shutdown_lets_streams_finish(
    tmp_path: Path, test_model_dir: Path, image_host
) -> None:
    server = start_server(tmp_path, env={"LLAMASCOPE_API_KEYS": ""})
    key = re.search(r"API key: (sk-\w+)", server.log()).group(1)
    assert len(key) >= 35 and "shown only now" in server.log()
    assert key.encode() not in (tmp_path / "data" / "llamascope.db").read_bytes()  # only its hash is kept
    assert "built-in test model: tiny and random" in server.log()

    body = generation_body(image_host.url("/red.png"), max_tokens=300, incremental_output=True)
    headers = {"Authorization": f"Bearer {key}", "X-DashScope-SSE": "enable"}
    events: list[dict] = []
    with httpx.stream("POST", server.base + PATH, json=body, headers=headers, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if len(events) == 2:
                    server.process.send_signal(signal.SIGTERM)
    assert events[-1]["output"]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"]["output_tokens"] == 300
    # uvicorn re-raises SIGTERM after a graceful shutdown, as service managers expect.
    assert server.process.wait(30) in (0, -signal.SIGTERM)
    log = server.log()
    assert log.index("Waiting for connections to close") < log.index("output_tokens=300") < log.index("Finished")
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.base + "/health")

    again = start_server(tmp_path, env={"LLAMASCOPE_API_KEYS": ""})
    try:
        assert key not in again.log() and "API keys: 1 in sqlite" in again.log()
        r = httpx.get(again.base + "/api/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
    finally:
        again.stop()


def test_config_file_and_model_flag(tmp_path: Path, test_model_dir: Path) -> None:
    config = tmp_path / "llamascope.toml"
    config.write_text(
        f'api_keys = ["sk-from-config-0000000000000000000000"]\n'
        f'[models."my-vision"]\npath = "{test_model_dir}"\ncontext_length = 4096\n'
    )
    server = start_server(tmp_path, ["--config", str(config)], env={"LLAMASCOPE_API_KEYS": None})
    try:
        r = httpx.get(
            server.base + "/api/v1/models", headers={"Authorization": "Bearer sk-from-config-0000000000000000000000"}
        )
        [model] = r.json()["data"]
        assert model["model"] == "my-vision" and model["context_length"] == 4096
        assert model["test_model"] is True  # the directory is the test model's, so listings say so
    finally:
        server.stop()


def test_stream_hangup_stops_generation(server: Server, image_host) -> None:
    body = generation_body(image_host.url("/red.png"), max_tokens=4000, temperature=0)
    headers = {"Authorization": f"Bearer {server.key}", "X-DashScope-SSE": "enable"}
    with httpx.stream("POST", server.base + PATH, json=body, headers=headers, timeout=60) as r:
        request_id = r.headers["x-request-id"]
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data:")
            if seen == 3:
                break
    line = server.access_line(request_id)
    assert "client=disconnected" in line
    produced = int(re.search(r"output_tokens=(\d+)", line).group(1))
    assert 3 <= produced < 400, line
    # The engine is free for the next request at once.
    r = httpx.post(
        server.base + PATH,
        json=generation_body(image_host.url("/red.png"), max_tokens=2),
        headers={"Authorization": f"Bearer {server.key}"},
        timeout=30,
    )
    assert r.status_code == 200


def test_non_streamed_hangup_stops_generation(server: Server, image_host) -> None:
    body = generation_body(image_host.url("/red.png"), max_tokens=8000, temperature=0)
    request_ids: list[str] = []

    def on_response(response: httpx.Response) -> None:
        request_ids.append(response.headers.get("x-request-id", ""))

    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.base + PATH,
            json=body,
            headers={"Authorization": f"Bearer {server.key}"},
            timeout=httpx.Timeout(30, read=1.5),
        )
    # No response came back, so find the request by its log line: the newest one for this model with 499.
    deadline = time.monotonic() + 15
    line = ""
    while time.monotonic() < deadline and not line:
        candidates = [x for x in server.log().splitlines() if "status=499" in x]
        line = candidates[-1] if candidates else ""
        time.sleep(0.1)
    assert line, server.log()[-2000:]
    assert "client=disconnected" in line
    produced = int(re.search(r"output_tokens=(\d+)", line).group(1))
    assert produced < 8000
    assert time.monotonic() - started < 15


def test_concurrent_requests_all_answer(server: Server, image_host) -> None:
    results: list[int] = []

    def call() -> None:
        r = httpx.post(
            server.base + PATH,
            json=generation_body(image_host.url("/red.png"), max_tokens=5),
            headers={"Authorization": f"Bearer {server.key}"},
            timeout=60,
        )
        results.append(r.json()["usage"]["output_tokens"])

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [5] * 6
