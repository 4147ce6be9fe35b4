"""Shared fixtures: the built-in model, a loopback image server, real llamascope server processes.

Nothing here stands in for llamascope's own code: servers are started with
the real ``llamascope serve`` command and driven over loopback HTTP.

What a test needs beyond Python is a marker (registered in pyproject.toml): ``server`` for a test that
needs real llamascope server processes (its own, marked where it starts them, or the session's shared ones,
marked here), and one per service it starts on loopback (``postgres``, ``redis``,
``nginx``, ``chromium``, ``prometheus``). A test whose service is missing is skipped with the package to
install; under ``CI=true`` it fails instead, so CI never passes by skipping what it was meant to run.
"""

from __future__ import annotations

import asyncio
import gc
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from PIL import Image

from llamascope.accounts import admin
from llamascope.accounts.admission import Accounts
from llamascope.accounts.store import AccountStore
from llamascope.api.app import create_app
from llamascope.conversation.service import ConversationService
from llamascope.engines.base import Chunk, EngineInfo, FinishReason, PreparedPrompt, SamplingParams, Turn
from llamascope.images.uploads import UploadStore
from llamascope.server import build_intake
from llamascope.settings import Settings
from llamascope.structured.spec import OutputSpec

pytest_plugins = ["pytester"]  # tests/test_conftest.py runs pytest on this file's hooks

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("LLAMASCOPE_TEST_CACHE", ROOT / ".cache"))
API_KEY = "sk-5ca3e903596fc2d3361b8f0ff4bbd2e3c92bab3b"  # keys of the settings must be strong
OTHER_KEY = "sk-ca3f841e3e0d72c1186e960ea862b8f790c201eb"
ADMIN_KEY = "admin-0123456789abcdefghijklmnopqrstuvwxyz"
SEED_MODEL = "llama3.2-90b-vision-instruct"
# The installed `llamascope` command (the console script), or the module when it is not installed.
_SCRIPT = Path(sys.executable).with_name("llamascope")
LLAMASCOPE = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "llamascope"]

# A suite started in the background by a shell without job control (`(make test &)`, nohup in a script)
# inherits Ctrl+C ignored, and so would every process it starts: the tests of what Ctrl+C does (the server's
# drain and exit status 130, the batch client's stop) would then see nothing happen. Python's own handler here
# makes its children start with the default disposition again.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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


# -- what tests need: the services they start on loopback --------------------

IN_CI = os.environ.get("CI") == "true"
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)


def _postgres_missing() -> str | None:
    if PG_BIN is None or not (PG_BIN / "initdb").exists():
        return "PostgreSQL is not installed (Debian package 'postgresql'; .ci/run installs it)"
    if os.geteuid() == 0 and subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
        return "running as root and there is no postgres user to run PostgreSQL as (Debian package 'postgresql')"
    if IN_CI and not os.environ.get("LLAMASCOPE_TEST_DATABASE_URL"):
        return "LLAMASCOPE_TEST_DATABASE_URL is not set (.ci/run starts a PostgreSQL and sets it)"
    return None


def _nginx_missing() -> str | None:
    if shutil.which("nginx") or Path("/usr/sbin/nginx").exists():
        return None
    return "nginx is not installed (Debian package 'nginx'; .ci/run installs it)"


def _chromium_missing() -> str | None:
    if not Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium is not installed (Debian package 'chromium'; .ci/run installs it)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "Playwright is not installed (the test extras: pip install -e '.[test]')"
    return None


def _commands_missing(package: str, *commands: str) -> str | None:
    absent = [c for c in commands if shutil.which(c) is None]
    return f"{', '.join(absent)} not installed (Debian package '{package}'; .ci/run installs it)" if absent else None


# Each service marker, and why its service is missing on this machine (None: it is here).
SERVICES = {
    "postgres": _postgres_missing,
    "redis": lambda: _commands_missing("redis-server", "redis-server"),
    "nginx": _nginx_missing,
    "chromium": _chromium_missing,
    "prometheus": lambda: _commands_missing("prometheus", "prometheus", "promtool"),
}


SHARED_SERVERS = ("server", "text_server")  # session fixtures, one real ``llamascope serve`` each


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test on one of the session's shared servers needs a real server process too: it is marked ``server``."""
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in SHARED_SERVERS):
            item.add_marker(pytest.mark.server)


def _needed(item: pytest.Item) -> list[str]:
    return [name for name in SERVICES if item.get_closest_marker(name) is not None]


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture starts: a missing service fails the test under CI=true and skips it elsewhere."""
    for name in _needed(item):
        why = SERVICES[name]()
        if why is not None:
            message = f"needs {name}: {why}"
            if IN_CI:
                pytest.fail(f"{message} (under CI=true a missing service is a failure)", pytrace=False)
            pytest.skip(message)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under CI=true a test that needs a service may not skip on its own either (an unset database URL)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if IN_CI and report.skipped and _needed(item) and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        report.outcome = "failed"
        report.longrepr = f"under CI=true a test that needs {', '.join(_needed(item))} may not skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """Under CI=true no test module may skip as a whole (the browser tests skip when Chromium is absent)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if IN_CI and report.skipped and isinstance(collector, pytest.Module):
        reason = _skip_reason(report)
        report.outcome = "failed"
        report.longrepr = f"under CI=true {collector.nodeid} may not skip: {reason}"


# -- aiohttp sessions left open ---------------------------------------------------
# Issue 27 (item 8): the run ended with "Unclosed client session" after its pass line. The dashscope SDK's async
# clients keep one aiohttp session per event loop and close it only when asked; after asyncio.run the loop is
# closed and the session can never be. A session left open now fails the run, naming the test where it can.

UNCLOSED = ("Unclosed client session", "Unclosed connector")  # aiohttp's ResourceWarnings, from __del__
_left_open: list[str] = []
T = TypeVar("T")


def run_sdk(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` for the dashscope SDK's async clients: their session is closed before the loop ends."""
    import dashscope

    async def closing() -> T:
        try:
            return await coroutine
        finally:
            await dashscope.close_shared_aio_session()

    return asyncio.run(closing())


def pytest_configure(config: pytest.Config) -> None:
    for message in UNCLOSED:  # Python ignores ResourceWarnings by default: record these ones
        config.addinivalue_line("filterwarnings", f"always:{message}:ResourceWarning")


def pytest_warning_recorded(warning_message: warnings.WarningMessage, nodeid: str) -> None:
    if issubclass(warning_message.category, ResourceWarning) and str(warning_message.message).startswith(UNCLOSED):
        _left_open.append(f"{nodeid or 'outside a test'}: {warning_message.message}")


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session: pytest.Session) -> Iterator[object]:
    """After the last teardown: sessions still open, or collected unclosed, are one failed report."""
    result = yield
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            gc.collect()
        _left_open.extend(f"collected at the end: {w.message}" for w in caught if str(w.message).startswith(UNCLOSED))
        live = [o for o in gc.get_objects() if issubclass(type(o), aiohttp.ClientSession) and not o.closed]
        _left_open.extend(f"still open at the end: {o!r}" for o in live if not any(repr(o) in x for x in _left_open))
    if _left_open:
        why = "aiohttp sessions were left open (close them before their event loop ends; the dashscope SDK's: run_sdk)"
        report = pytest.TestReport(
            nodeid="aiohttp sessions closed",
            location=(__file__, 0, "aiohttp sessions closed"),
            keywords={},
            outcome="failed",
            longrepr="\n".join([why, *_left_open]),
            when="teardown",
        )
        session.config.hook.pytest_runtest_logreport(report=report)
    return result


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


def refused_unread(
    server: Server, path: str, head: str, start: str, length: int, key: str | None = None
) -> tuple[bytes, dict]:
    """Send ``path`` only the headers of a body ``length`` bytes long (``head``: its Content-Type and any other
    header lines) and its ``start``: the answer's status line and headers, and its JSON body, which must come
    while the rest is unsent (the socket times out after 30 s if the server waits for it). A refusal answered
    so was decided before the server read the body."""
    import json

    host, port = server.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            (
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key or server.key}\r\n{head}"
                f"Content-Length: {length}\r\n\r\n{start}"
            ).encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
    status, _, body = answer.partition(b"\r\n\r\n")
    return status, json.loads(body) if body else {}


def form_refused_unread(server: Server) -> tuple[bytes, dict]:
    """Send the Files API only the headers of a 400 MB form (and its first field): ``refused_unread``. A refusal
    answered so was decided before a byte of the file was read."""
    return refused_unread(
        server,
        "/compatible-mode/v1/files",
        "Content-Type: multipart/form-data; boundary=b\r\n",
        '--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n',
        400 * 2**20,
    )


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
        wait_ready(server)
    return server


def wait_ready(server: Server, timeout: float = 120) -> Server:
    """Wait until a server started with ``wait=False`` answers /health. Servers that need not start one after
    the other are started together and then waited for: their seconds of imports overlap."""
    deadline = time.monotonic() + timeout
    # One client for every try: httpx.get makes a client (and its SSL context) each time, tens of ms of CPU
    # taken from the starting server five times a second; this way a try costs well under a millisecond, so
    # the server is asked often and found up within 0.05 s.
    with httpx.Client(timeout=1) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
            try:
                if client.get(server.base + "/health").status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server did not start:\n{server.log()}")


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


# -- a server whose engine fails mid-stream ------------------------------------------------------------


class FailingEngine:
    """Says ``words`` one by one, then raises."""

    info = EngineInfo(kind="scripted", source="tests", context_length=8192)

    def __init__(self, words: list[str]) -> None:
        self.words = words

    async def prepare(self, turns: list[Turn], output: OutputSpec | None = None) -> PreparedPrompt:
        return PreparedPrompt(input_tokens=11, image_tokens=0, max_new_tokens=100)

    async def generate(self, prompt: PreparedPrompt, sampling: SamplingParams) -> AsyncIterator[Chunk]:
        for i, word in enumerate(self.words):
            yield Chunk(word, i + 1)
        raise RuntimeError("the accelerator caught fire")
        yield Chunk("", 0, FinishReason.STOP)  # unreachable; keeps this an async generator

    def image_size(self, width: int, height: int) -> tuple[int, int]:
        return width, height

    def stats(self) -> dict[str, int]:
        return {}

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def failing_server(image_host, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings.load(image_fetch_allow=["127.0.0.1"])
    accounts = AccountStore.for_path(tmp_path_factory.mktemp("accounts") / "accounts.db")
    accounts.migrate()
    admin.seed_keys(accounts, [API_KEY])
    service = ConversationService(
        {"flaky": FailingEngine(["Hello", " there"])}, build_intake(settings), Accounts(accounts)
    )
    store = UploadStore(tmp_path_factory.mktemp("uploads"), b"x" * 32)
    app = create_app(service, store, max_body_bytes=settings.max_body_bytes)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
