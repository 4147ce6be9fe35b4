"""Traces and logs through a chain of two: a client, a llamascope in front, a llamascope as its upstream engine.

The front runs in this process, its spans going to the SDK's in-memory
exporter; the upstream is a ``llamascope serve`` process whose spans go,
through the real OTLP/HTTP exporter, to a receiver on loopback. The trace the
client starts must run through both, the upstream call's ``traceparent`` must
be the parent of the upstream's request span, and the upstream's JSON log
line must name the front's request id.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import uvicorn
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from llamascope.accounts import admin
from llamascope.accounts.admission import Accounts
from llamascope.accounts.store import AccountStore
from llamascope.api.app import create_app
from llamascope.conversation.service import ConversationService
from llamascope.images.uploads import UploadStore
from llamascope.observability import tracing
from llamascope.observability.logs import RequestFilter, TextFormatter
from llamascope.observability.metrics import MetricsEndpoint
from llamascope.server import build_intake, load_engines
from llamascope.settings import ModelSpec, Settings
from tests.conftest import API_KEY, CACHE_DIR, Server, free_port, generation_body
from tests.observability.conftest import METRICS_KEY, OtlpReceiver

pytestmark = pytest.mark.server
PATH = "/api/v1/services/aigc/multimodal-generation/generation"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


@dataclass
class Front:
    base: str
    metrics_port: int
    spans: InMemorySpanExporter
    log: io.StringIO
    server: uvicorn.Server = field(repr=False)


class DyingEngine(ThreadingHTTPServer):
    """An engine that answers GET /models (a health check) until it is shut down."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Listing)
        self.daemon_threads = True
        self.checked = threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Listing(BaseHTTPRequestHandler):
    server: DyingEngine

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": "llama3.2-11b-vision", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.server.checked.set()


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, observed: Server) -> Iterator[Front]:
    """llamascope in this process, serving 'chain' through a dead upstream and the upstream llamascope. The dead
    one answers the health check made as the server starts, then dies: the first request finds it dead."""
    tmp = tmp_path_factory.mktemp("front")
    dying = DyingEngine()
    dead = f"http://127.0.0.1:{dying.server_address[1]}/v1"
    settings = Settings.load(
        data_dir=tmp / "data",
        cache_dir=CACHE_DIR,
        image_fetch_allow=["127.0.0.1"],
        models={
            "chain": ModelSpec(
                upstreams=[dead, observed.base + "/v1"],
                upstream_model="llama3.2-11b-vision",
                upstream_api_key=API_KEY,
            )
        },
    )
    settings.data_dir.mkdir(parents=True)
    store = AccountStore(settings.database)
    store.migrate()
    admin.seed_keys(store, [API_KEY])
    uploads = UploadStore(tmp / "uploads", b"0" * 32)
    service = ConversationService(load_engines(settings), build_intake(settings, uploads), Accounts(store))
    metrics_port = free_port()
    app = create_app(
        service, uploads, max_body_bytes=settings.max_body_bytes, metrics=MetricsEndpoint(port=metrics_port)
    )
    spans = InMemorySpanExporter()
    tracing.configure(None, exporter=spans)
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setFormatter(TextFormatter())
    handler.addFilter(RequestFilter())
    logging.getLogger("llamascope").addHandler(handler)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    assert dying.checked.wait(30)  # the start's health check found it well
    dying.shutdown()
    dying.server_close()
    yield Front(f"http://127.0.0.1:{port}", metrics_port, spans, log, server)
    server.should_exit = True
    thread.join(30)
    logging.getLogger("llamascope").removeHandler(handler)
    tracing.configure(None)


def call(front: Front, image: str, traceparent: str) -> httpx.Response:
    body = generation_body(image, max_tokens=6, temperature=0)
    body["model"] = "chain"
    headers = {"Authorization": f"Bearer {API_KEY}", "traceparent": traceparent}
    r = httpx.post(front.base + PATH, json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return r


def json_lines(server: Server) -> list[dict]:
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def test_a_trace_runs_from_the_client_through_both_servers(
    front: Front, observed: Server, receiver: OtlpReceiver, image_host
) -> None:
    r = call(front, image_host.url("/dog_and_girl.jpeg"), f"00-{TRACE_ID}-{CLIENT_SPAN}-01")
    usage = r.json()["usage"]
    request_id = r.headers["x-request-id"]

    # The front's spans, from the in-memory exporter.
    # A request's span ends once its last byte is sent, which may be just after the client has read it.
    deadline = time.monotonic() + 30
    while True:
        mine = [s for s in front.spans.get_finished_spans() if f"{s.context.trace_id:032x}" == TRACE_ID]
        servers = [s for s in mine if s.kind == SpanKind.SERVER]
        if servers or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    (root,) = servers
    assert root.parent is not None and f"{root.parent.span_id:016x}" == CLIENT_SPAN and root.parent.is_remote
    assert root.name == f"POST {PATH}"
    attributes = root.attributes or {}
    assert attributes["gen_ai.request.model"] == "chain"
    assert attributes["gen_ai.usage.input_tokens"] == usage["input_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == usage["output_tokens"] == 6
    assert attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert attributes["http.response.status_code"] == 200 and attributes["llamascope.request_id"] == request_id
    children = {s.name: s for s in mine if s.parent is not None and s.parent.span_id == root.context.span_id}
    assert {"image.fetch", "image.decode"} <= children.keys()
    assert (children["image.fetch"].attributes or {})["llamascope.image.source"] == "url"
    # The dead upstream failed when the prompt was counted (POST /tokenize), so the live one answers.
    (call_span,) = [s for s in mine if s.name == "upstream chat"]
    assert call_span.kind == SpanKind.CLIENT and call_span.parent.span_id == root.context.span_id
    assert call_span.status.status_code != StatusCode.ERROR

    # The upstream's spans, through OTLP: its request span is the child of the front's upstream call.
    stages = {"queue", "vision_encoder", "prefill", "decode", "image.fetch", "image.decode", "image.preprocess"}
    theirs = receiver.wait_for(TRACE_ID, {"POST /v1/chat/completions", "POST /tokenize", *stages})
    (server_span,) = [s for s in theirs if s.name == "POST /v1/chat/completions"]
    assert server_span.kind == server_span.SPAN_KIND_SERVER
    assert server_span.parent_span_id.hex() == f"{call_span.context.span_id:016x}"
    their_children = {s.name for s in theirs if s.parent_span_id == server_span.span_id}
    # Counting the prompt carried the request's trace too: a child of the front's request span.
    (tokenize,) = [s for s in theirs if s.name == "POST /tokenize"]
    assert tokenize.parent_span_id.hex() == f"{root.context.span_id:016x}"
    assert stages <= their_children

    # The upstream's JSON access line names the front's request id and the trace.
    deadline = time.monotonic() + 30

    def lines_of_the_call() -> list[dict]:
        return [
            e
            for e in json_lines(observed)
            if e.get("client_request_id") == request_id and e.get("path") == "/v1/chat/completions"
        ]

    while not (lines := lines_of_the_call()):
        assert time.monotonic() < deadline, "no access line in the upstream's log"
        time.sleep(0.05)
    (line,) = lines
    assert line["trace_id"] == TRACE_ID and line["status"] == 200 and line["logger"] == "llamascope.access"
    assert line["output_tokens"] == 6 and line["model"] == "llama3.2-11b-vision" and line["latency_ms"] > 0
    assert line["request_id"] != request_id and line["key"] == API_KEY[:7] + "…"

    # The front's warning about the dead upstream names the request it happened in.
    (warning,) = [x for x in front.log.getvalue().splitlines() if "out of rotation" in x]
    assert warning.endswith(f"(request {request_id})")


def test_with_traces_off_the_callers_traceparent_goes_on_unchanged(
    front: Front, observed: Server, receiver: OtlpReceiver, image_host
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    tracing.configure(None)
    try:
        call(front, image_host.url("/red.png"), f"00-{trace_id}-00f067aa0ba902b7-01")
    finally:
        tracing.configure(None, exporter=front.spans)
    servers = [s for s in receiver.wait_for(trace_id, {"decode", "POST /tokenize"}) if s.kind == s.SPAN_KIND_SERVER]
    assert {s.name for s in servers} == {"POST /tokenize", "POST /v1/chat/completions"}
    assert all(s.parent_span_id.hex() == "00f067aa0ba902b7" for s in servers)


def test_upstream_metrics_and_where_metrics_are_served(front: Front, observed: Server) -> None:
    text = httpx.get(f"http://127.0.0.1:{front.metrics_port}/metrics").text  # on a port of its own
    assert httpx.get(front.base + "/metrics").status_code == 404  # so not here
    dead, live = [line for line in text.splitlines() if line.startswith("llamascope:upstream_healthy{")]
    assert dead.endswith(" 0.0") and live.endswith(" 1.0")
    # The dead one's errors, none of the live one's (the registry is this process's: other tests' engines too)
    errors = [x for x in text.splitlines() if x.startswith("llamascope:upstream_errors_total{")]
    dead_url = dead.split('upstream="')[1].split('"')[0]
    assert [x for x in errors if f'upstream="{dead_url}"' in x] and not [x for x in errors if observed.base in x]
    assert 'llamascope:upstream_request_seconds_count{upstream="' + observed.base + '/v1"}' in text
    # The upstream asks for its metrics key.
    assert httpx.get(observed.base + "/metrics").status_code == 401
    assert httpx.get(observed.base + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 401
    scraped = httpx.get(observed.base + "/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
    assert scraped.status_code == 200 and "llamascope:time_to_first_token_seconds_bucket" in scraped.text


def test_json_logs(observed: Server) -> None:
    log = observed.log()
    entries = json_lines(observed)
    assert any(e["logger"] == "uvicorn.error" and "Application startup complete" in e["message"] for e in entries)
    for line in log.splitlines():  # whatever is not the start-up banner is one JSON object
        if not line.startswith("{") and (" INFO " in line or " WARNING " in line or "llamascope.access" in line):
            raise AssertionError(f"a text log line in JSON mode: {line}")
