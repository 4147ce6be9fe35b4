"""Shared fixtures: the built-in model, a loopback image server, real llamascope server processes.

Nothing here stands in for llamascope's own code: servers are started with
the real ``llamascope serve`` command and driven over loopback HTTP.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("LLAMASCOPE_TEST_CACHE", ROOT / ".cache"))
API_KEY = "sk-5ca3e903596fc2d3361b8f0ff4bbd2e3c92bab3b"  # keys of the settings must be strong
OTHER_KEY = "sk-ca3f841e3e0d72c1186e960ea862b8f790c201eb"
ADMIN_KEY = "admin-0123456789abcdefghijklmnopqrstuvwxyz"
SEED_MODEL = "llama3.2-90b-vision-instruct"
# The installed `llamascope` command (the console script), or the module when it is not installed.
_SCRIPT = Path(sys.executable).with_name("llamascope")
LLAMASCOPE = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "llamascope"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(
    color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (640, 480), fmt: str = "PNG"
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def test_model_dir() -> Path:
    from llamascope.engines.builtin_model import ensure_test_model

    return ensure_test_model(CACHE_DIR)


# -- a loopback image host ---------------------------------------------------


class ImageHost:
    """Serves images and misbehaviours on 127.0.0.1 for the server under test to fetch."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {
            "/dog_and_girl.jpeg": (png_bytes((30, 120, 200), (800, 600), "JPEG"), "image/jpeg"),
            "/red.png": (png_bytes((200, 30, 30)), "image/png"),
            "/blue.png": (png_bytes((20, 40, 220), (300, 900)), "image/png"),
            "/anim.gif": (png_bytes((0, 200, 0), fmt="GIF"), "image/gif"),
            "/broken.png": (png_bytes()[:200], "image/png"),
        }
        host = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.startswith("/redirect-to-private"):
                    self.send_response(302)
                    self.send_header("Location", "http://10.0.0.1/secret.png")
                    self.end_headers()
                    return
                if self.path in host.files:
                    data, ctype = host.files[self.path]
                    self.send_response(200)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_response(404)
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture(scope="session")
def image_host() -> Iterator[ImageHost]:
    host = ImageHost()
    yield host
    host.httpd.shutdown()


# -- llamascope server processes ---------------------------------------------


@dataclass
class Server:
    base: str
    process: subprocess.Popen[str]
    log_path: Path
    key: str = API_KEY
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return self.base + "/api/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_line(self, request_id: str, timeout: float = 15) -> str:
        """The access-log line of a request; it is written when the request ends, after its last byte."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if f"request_id={request_id}" in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no access line for {request_id}:\n{self.log()[-3000:]}")

    def hang_up_after(self, path: str, body: dict[str, object], events: int = 3) -> str:
        """Stream ``body`` to ``path``, hang up after ``events`` events; the request's access-log line."""
        headers = {"Authorization": f"Bearer {self.key}", "X-DashScope-SSE": "enable"}
        with httpx.stream("POST", self.base + path, json=body, headers=headers, timeout=60) as r:
            request_id = r.headers["x-request-id"]
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data:")
                if seen == events:
                    break
        return self.access_line(request_id)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(
    tmp: Path, args: list[str] | None = None, env: dict[str, str] | None = None, wait: bool = True
) -> Server:
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    full_env = {
        **os.environ,
        "LLAMASCOPE_CACHE_DIR": str(CACHE_DIR),
        "LLAMASCOPE_DATA_DIR": str(tmp / "data"),
        "LLAMASCOPE_API_KEYS": f"{API_KEY},{OTHER_KEY}",
        "LLAMASCOPE_IMAGE_FETCH_ALLOW": "127.0.0.1",
        "LLAMASCOPE_ADMIN_KEY": ADMIN_KEY,
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    full_env = {k: v for k, v in full_env.items() if v is not None}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llamascope", "serve", "--port", str(port), *(args or [])],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=tmp,
            text=True,
        )
    server = Server(base=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    if wait:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
            try:
                if httpx.get(server.base + "/health", timeout=1).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        server.stop(signal.SIGKILL)
        raise RuntimeError(f"server did not start:\n{server.log()}")
    return server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, test_model_dir: Path) -> Iterator[Server]:
    """One llamascope with default settings but a known key and loopback images allowed."""
    srv = start_server(tmp_path_factory.mktemp("server"))
    yield srv
    srv.stop()


@pytest.fixture
def dashscope_sdk(server: Server) -> Iterator[object]:
    """The official SDK pointed at the test server the way the README tells users to."""
    import dashscope

    old = dashscope.base_http_api_url, dashscope.api_key
    dashscope.base_http_api_url = server.api
    dashscope.api_key = server.key
    yield dashscope
    dashscope.base_http_api_url, dashscope.api_key = old


def user_turn(image: str, text: str = "What is in the picture?") -> dict[str, object]:
    return {"role": "user", "content": [{"image": image}, {"text": text}]}


def generation_body(image: str, **parameters: object) -> dict[str, object]:
    return {"model": SEED_MODEL, "input": {"messages": [user_turn(image)]}, "parameters": parameters}


# -- the text-generation API and a text-only Llama ----------------------------

TEXT_MODEL = "llama3.1-8b-instruct"


@pytest.fixture(scope="session")
def text_model_dir() -> Path:
    from llamascope.engines.builtin_model import ensure_text_test_model

    return ensure_text_test_model(CACHE_DIR)


@pytest.fixture(scope="session")
def text_server(
    tmp_path_factory: pytest.TempPathFactory, test_model_dir: Path, text_model_dir: Path
) -> Iterator[Server]:
    """Both seed names on the built-in vision model, and a text-only Llama directory served by --model."""
    models = [f"{SEED_MODEL}=builtin", "llama3.2-11b-vision=builtin", f"{TEXT_MODEL}={text_model_dir}"]
    srv = start_server(tmp_path_factory.mktemp("text-server"), [arg for m in models for arg in ("--model", m)])
    yield srv
    srv.stop()
