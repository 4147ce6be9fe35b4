"""The server's life as an operator meets it: start-up, keys on first start, config, shutdown, hang-ups."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import LLAMASCOPE, Server, generation_body, start_server

PATH = "/api/v1/services/aigc/multimodal-generation/generation"
CONFIG_KEY = "sk-b374df758f8b4666dcc68ec4c1415b891881f369"


@pytest.mark.server
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


@pytest.mark.server
def test_a_busy_port_stops_start_up_before_anything_is_loaded_or_written(tmp_path: Path) -> None:
    """Issue 13: a port in use was found only after the model had loaded and a first key was written."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = start_server(tmp_path, ["--port", str(port)], env={"LLAMASCOPE_API_KEYS": ""}, wait=False)
        assert server.process.wait(120) == 2
    log = server.log()
    assert f"cannot listen on 127.0.0.1:{port}" in log and "in use" in log
    assert "loading" not in log and "API key" not in log and "Traceback" not in log
    assert not (tmp_path / "data" / "llamascope.db").exists()


@pytest.mark.server
def test_first_start_makes_a_key_then_shutdown_lets_streams_finish(
    tmp_path: Path, test_model_dir: Path, image_host
) -> None:
    # Issue 13, item 3: a start that fails uses up no first key; the first start that serves shows it.
    failed = start_server(tmp_path, ["--model", "x=/nonexistent/llama"], env={"LLAMASCOPE_API_KEYS": ""}, wait=False)
    assert failed.process.wait(120) == 2 and "API key" not in failed.log()
    server = start_server(tmp_path, env={"LLAMASCOPE_API_KEYS": ""})
    key = re.search(r"API key: (sk-\w+)", server.log()).group(1)
    assert len(key) >= 35 and "shown only now" in server.log()
    assert key.encode() not in (tmp_path / "data" / "llamascope.db").read_bytes()  # only its hash is kept
    assert "built-in test model: tiny and random" in server.log()

    # Long enough to be mid-stream when the signal lands (it is sent after the second event), short enough to
    # stream fast: the drain lets it finish, all its tokens, before the server ends.
    body = generation_body(image_host.url("/red.png"), max_tokens=160, incremental_output=True)
    headers = {"Authorization": f"Bearer {key}", "X-DashScope-SSE": "enable"}
    events: list[dict] = []
    with httpx.stream("POST", server.base + PATH, json=body, headers=headers, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if len(events) == 2:
                    server.process.send_signal(signal.SIGTERM)
    assert events[-1]["output"]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"]["output_tokens"] == 160
    # uvicorn re-raises SIGTERM after a graceful shutdown, as service managers expect.
    assert server.process.wait(30) in (0, -signal.SIGTERM)
    log = server.log()
    assert log.index("shutting down: 1 requests running") < log.index("output_tokens=160") < log.index("Finished")
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.base + "/health")

    again = start_server(tmp_path, env={"LLAMASCOPE_API_KEYS": ""})
    try:
        assert key not in again.log() and "API keys: 1 active in sqlite" in again.log()
        r = httpx.get(again.base + "/api/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
    finally:
        again.stop()


def _sse_blocks(text: str) -> list[dict[str, str]]:
    blocks = []
    for raw in text.strip().split("\n\n"):
        fields = dict(line.split(":", 1) for line in raw.split("\n") if not line.startswith(":"))
        blocks.append(fields)
    return blocks


@pytest.mark.server
def test_sigterm_drains_then_ends_what_still_runs_with_an_error_event(
    tmp_path: Path, test_model_dir: Path, image_host
) -> None:
    """Issues 12 and 13 (item 9): on SIGTERM, running streams get SHUTDOWN_GRACE_SECONDS to finish and new
    requests get 503 meanwhile; a stream still running when the grace ends gets a last event:error (DashScope
    shape, a code that says the server is shutting down) and is charged; no traceback in the log."""
    # Long enough for the short stream, already streaming when the signal is sent (3 tokens left), to finish on
    # a loaded machine; the long one runs out the grace, so the test lasts at least this long.
    grace = 4
    server = start_server(tmp_path, env={"LLAMASCOPE_SHUTDOWN_GRACE_SECONDS": str(grace)})
    headers = {"Authorization": f"Bearer {server.key}", "X-DashScope-SSE": "enable"}
    long_body = generation_body(image_host.url("/red.png"), max_tokens=8000, min_new_tokens=8000)
    short_body = generation_body(image_host.url("/red.png"), max_tokens=4, min_new_tokens=4)
    texts: dict[str, str] = {}
    request_ids: dict[str, str] = {}
    started = {name: threading.Event() for name in ("long", "short")}

    def stream(name: str, body: dict) -> None:
        with httpx.stream("POST", server.base + PATH, json=body, headers=headers, timeout=120) as r:
            request_ids[name] = r.headers["x-request-id"]
            chunks = []
            for chunk in r.iter_text():
                chunks.append(chunk)
                started[name].set()
            texts[name] = "".join(chunks)

    threads = [threading.Thread(target=stream, args=a) for a in (("long", long_body), ("short", short_body))]
    threads[0].start()
    assert started["long"].wait(60)
    threads[1].start()
    assert started["short"].wait(60)
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    refused = None
    while time.monotonic() - signalled < grace:  # the signal lands a moment later: until then requests run
        r = httpx.get(server.base + "/api/v1/models", headers={"Authorization": f"Bearer {server.key}"})
        if r.status_code == 503:
            refused = r
            break
        time.sleep(0.05)
    assert refused is not None, server.log()[-2000:]
    assert refused.json()["code"] == "ServiceUnavailable.ShuttingDown" and refused.json()["request_id"]
    assert refused.headers["retry-after"] == "1"
    for t in threads:
        t.join(60)
    assert server.process.wait(30) in (0, -signal.SIGTERM)
    assert time.monotonic() - signalled < grace + 10

    short = json.loads(_sse_blocks(texts["short"])[-1]["data"])
    assert short["output"]["choices"][0]["finish_reason"] == "length" and short["usage"]["output_tokens"] == 4
    blocks = _sse_blocks(texts["long"])
    assert [b["event"] for b in blocks[:-1]] == ["result"] * (len(blocks) - 1) and len(blocks) > 2
    last = blocks[-1]
    assert last["event"] == "error" and last["status"] == "503"
    error = json.loads(last["data"])
    assert error["code"] == "ServiceUnavailable.ShuttingDown" and "shut down" in error["message"]
    assert error["request_id"] == request_ids["long"]
    log = server.log()
    assert "Traceback" not in log and "CancelledError" not in log
    line = server.access_line(request_ids["long"])
    assert "error=ServiceUnavailable.ShuttingDown" in line
    made = int(re.search(r"output_tokens=(\d+)", line).group(1))
    assert 0 < made < 8000
    # Charged what it made, with the shutdown as its status.
    out = subprocess.run(
        [*LLAMASCOPE, "usage", "--requests", "5"],
        capture_output=True,
        text=True,
        env={**os.environ, "LLAMASCOPE_DATA_DIR": str(tmp_path / "data")},
    )
    [row] = [x for x in out.stdout.splitlines() if request_ids["long"] in x]
    assert "ServiceUnavailable.ShuttingDown" in row and f" {made} " in row


@pytest.mark.server
def test_a_second_ctrl_c_ends_streams_with_an_error_event_and_exits_at_once(
    tmp_path: Path, test_model_dir: Path, image_host
) -> None:
    """Issue 27, item 4: a second SIGINT while a stream runs (the first one drains, with a long grace) ended in
    "timeout graceful shutdown exceeded", a CancelledError and a KeyboardInterrupt traceback, 6 s later, and the
    client got no closing event. It ends the stream with its event:error and exits at once, quietly."""
    server = start_server(tmp_path, env={"LLAMASCOPE_SHUTDOWN_GRACE_SECONDS": "60"})
    headers = {"Authorization": f"Bearer {server.key}", "X-DashScope-SSE": "enable"}
    body = generation_body(image_host.url("/red.png"), max_tokens=8000, min_new_tokens=8000)
    chunks: list[str] = []
    started = threading.Event()

    def stream() -> None:
        with (
            httpx.stream("POST", server.base + PATH, json=body, headers=headers, timeout=120) as r,
            contextlib.suppress(httpx.HTTPError),  # cut short: the assertions below say what was missing
        ):
            for chunk in r.iter_text():
                chunks.append(chunk)
                started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60)
    server.process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 30
    while httpx.get(server.base + "/api/v1/models", headers=headers).status_code != 503:  # the drain has begun
        assert time.monotonic() < deadline, server.log()[-2000:]
        time.sleep(0.05)
    server.process.send_signal(signal.SIGINT)
    second = time.monotonic()
    status = server.process.wait(30)
    exited = time.monotonic() - second
    reader.join(30)
    log = server.log()
    assert exited < 4, f"exited {exited:.1f} s after the second Ctrl+C:\n{log[-800:]}"  # generous: a busy machine
    assert "Traceback" not in log and "CancelledError" not in log and "timeout graceful shutdown" not in log, log
    last = _sse_blocks("".join(chunks))[-1]
    assert last["event"] == "error" and json.loads(last["data"])["code"] == "ServiceUnavailable.ShuttingDown"
    assert status == 130  # as a shell reports a command Ctrl+C ended


@pytest.mark.server
def test_config_file_and_model_flag(tmp_path: Path, test_model_dir: Path) -> None:
    config = tmp_path / "llamascope.toml"
    config.write_text(
        f'api_keys = ["{CONFIG_KEY}"]\n[models."my-vision"]\npath = "{test_model_dir}"\ncontext_length = 4096\n'
    )
    server = start_server(tmp_path, ["--config", str(config)], env={"LLAMASCOPE_API_KEYS": None})
    try:
        r = httpx.get(server.base + "/api/v1/models", headers={"Authorization": f"Bearer {CONFIG_KEY}"})
        [model] = r.json()["data"]
        assert model["model"] == "my-vision" and model["context_length"] == 4096
        assert model["test_model"] is True  # the directory is the test model's, so listings say so
    finally:
        server.stop()


def test_stream_hangup_stops_generation(server: Server, image_host) -> None:
    body = generation_body(image_host.url("/red.png"), max_tokens=4000, temperature=0)
    line = server.hang_up_after(PATH, body)
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

    before = sum("status=499" in x for x in server.log().splitlines())  # earlier tests' hang-ups
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.base + PATH,
            json=body,
            headers={"Authorization": f"Bearer {server.key}"},
            timeout=httpx.Timeout(30, read=1.5),
        )
    # No response came back, so find the request by its log line: the first 499 after those before it.
    deadline = time.monotonic() + 15
    line = ""
    while time.monotonic() < deadline and not line:
        candidates = [x for x in server.log().splitlines() if "status=499" in x]
        line = candidates[before] if len(candidates) > before else ""
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


@pytest.mark.server
def test_the_banner_gives_clients_the_public_address(tmp_path: Path) -> None:
    """Found following docs/deploy.md: a replica with `host = "0.0.0.0"` and `public_base_url` printed
    `DASHSCOPE_HTTP_BASE_URL=http://0.0.0.0:PORT/api/v1`, an address no client reaches; the banner's SDK and
    playground lines now give the address clients use."""
    public = "https://llm.example.com"
    server = start_server(tmp_path, ["--host", "0.0.0.0"], env={"LLAMASCOPE_PUBLIC_BASE_URL": public})
    try:
        log = server.log()
        assert f"DASHSCOPE_HTTP_BASE_URL={public}/api/v1 " in log and f"Playground: {public}/ in a browser" in log
        assert "on http://0.0.0.0:" in log  # the first line still says where it listens
    finally:
        server.stop()
