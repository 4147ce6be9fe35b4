"""The composition root: a gateway (every model upstream) built and served by ``llamascope.server``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from tests.conftest import API_KEY, free_port, png_bytes

PIECES = ["A ", "red ", "square."]


def _chunk(text: str, finish: str | None = None) -> bytes:
    delta = {"role": "assistant", "content": text}
    body = {"id": "stub", "object": "chat.completion.chunk", "created": 0, "model": "stub"}
    return (
        f"data: {json.dumps(body | {'choices': [{'index': 0, 'delta': delta, 'finish_reason': finish}]})}\n\n".encode()
    )


STREAM = b"".join(_chunk(p) for p in PIECES[:-1]) + _chunk(PIECES[-1], "stop") + b"data: [DONE]\n\n"


async def stub_engine(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    """An OpenAI-compatible engine that streams a fixed answer (and has no /tokenize: the gateway estimates)."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    if scope["path"].endswith("/models"):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"object":"list","data":[{"id":"stub"}]}'})
    elif scope["path"].endswith("/chat/completions"):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": STREAM})
    else:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(stub_engine, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(10)


# Builds and serves a gateway as `llamascope serve` does, answers one chat request through it, and prints what
# the process has imported by then.
GATEWAY = """
import json, os, sys, threading, time
import httpx
from llamascope import server
from llamascope.settings import ModelSpec, Settings

upstream, data_dir, key, image = sys.argv[1:]
settings = Settings.load(data_dir=data_dir, api_keys=[key], models={"stub": ModelSpec(upstreams=[upstream])})
built = server.build(settings)
sock = server.listen("127.0.0.1", 0)
threading.Thread(target=server.run, args=(built, sock), daemon=True).start()
body = {"model": "stub", "messages": [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is it?"}]}]}
url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions"
deadline = time.monotonic() + 60
while True:
    try:
        answer = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        break
    except httpx.TransportError:
        assert time.monotonic() < deadline
        time.sleep(0.05)
print(json.dumps({"status": answer.status_code, "text": answer.text, "modules": sorted(sys.modules),
    "jpeg2000_threads": os.environ.get("OPJ_NUM_THREADS")}))
sys.stdout.flush()
"""


def test_a_gateway_never_imports_pytorch_or_transformers(upstream: str, tmp_path: Path) -> None:
    """Issue 29: with every model upstream, the server starts without the in-process engine's stack."""
    import base64

    image = "data:image/png;base64," + base64.b64encode(png_bytes((200, 30, 30), (64, 64))).decode()
    out = subprocess.run(
        [sys.executable, "-c", GATEWAY, upstream, str(tmp_path / "data"), API_KEY, image],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "OPJ_NUM_THREADS"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == 200, result["text"]
    assert json.loads(result["text"])["choices"][0]["message"]["content"] == "".join(PIECES)
    heavy = [m for m in result["modules"] if m.split(".")[0] in ("torch", "transformers", "torchvision")]
    assert heavy == []
    # Nor what only some requests or stores need: Alembic (a new store is made at the head without it), the
    # structured-output libraries (no request asked for a shape).
    assert [m for m in result["modules"] if m.split(".")[0] in ("alembic", "jsonschema", "llguidance")] == []
    assert int(result["jpeg2000_threads"]) >= 1  # set at start: OpenJPEG decodes on every usable core


BAD_MODEL = """
import json, sys
from llamascope import server
from llamascope.engines.base import ModelLoadError
from llamascope.settings import ModelSpec, Settings

settings = Settings.load(models={"x": ModelSpec(path=sys.argv[1])}, data_dir=sys.argv[2], api_keys=[])
try:
    server.build(settings)
except ModelLoadError as exc:
    print(json.dumps({"error": str(exc), "modules": sorted(sys.modules)}))
"""


def test_a_bad_model_directory_stops_start_up_before_pytorch_loads(tmp_path: Path) -> None:
    """A wrong --model path is found from the directory alone, before PyTorch's seconds of imports; and before
    anything is written."""
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    for path, message in ((tmp_path / "missing", "does not exist"), (tmp_path / "gpt2", "model_type 'gpt2'")):
        out = subprocess.run(
            [sys.executable, "-c", BAD_MODEL, str(path), str(tmp_path / "data")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["error"].startswith("model 'x': ") and message in result["error"]
        assert [m for m in result["modules"] if m.split(".")[0] in ("torch", "transformers")] == []
    assert not (tmp_path / "data" / "llamascope.db").exists()
