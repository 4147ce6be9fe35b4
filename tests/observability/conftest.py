"""One llamascope for the package's tests, set up as an operator would watch it: JSON logs, traces sent to
an OTLP receiver, /metrics behind a key, per-key figures for 'alice', and a batch of two so requests queue."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.conftest import Server, start_server

METRICS_KEY = "metrics-0123456789abcdefghijklmnopqrstuvwxyz"


class OtlpReceiver:
    """An OTLP/HTTP traces endpoint on loopback: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                request = ExportTraceServiceRequest()
                request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        receiver.spans.extend(scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait_for(self, trace_id: str, names: set[str], seconds: float = 30) -> list[Any]:
        """The spans of a trace, once those named have all come."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = [s for s in self.spans if s.trace_id.hex() == trace_id]
            if names <= {s.name for s in found}:
                return found
            time.sleep(0.1)
        raise AssertionError(f"spans {names} of {trace_id} never came: {[s.name for s in self.spans]}")


@pytest.fixture(scope="package")
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.httpd.shutdown()


@pytest.fixture(scope="package")
def observed(
    tmp_path_factory: pytest.TempPathFactory, test_model_dir: Path, receiver: OtlpReceiver
) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("observed"),
        env={
            "LLAMASCOPE_LOG_FORMAT": "json",
            "LLAMASCOPE_OTLP_TRACES_ENDPOINT": receiver.url,
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # the SDK's batch: sent within 0.1 s, not 5 s
            "LLAMASCOPE_METRICS_KEY": METRICS_KEY,
            "LLAMASCOPE_METRICS_KEYS": "alice,carol",
            "LLAMASCOPE_MAX_BATCH_SIZE": "2",
            "LLAMASCOPE_MAX_QUEUE_WAIT_SECONDS": "600",  # a loaded machine is slow, not full
        },
    )
    yield srv
    srv.stop()
