"""What an operator sees of requests refused (once a stream was asked for, or as they were read), and of the
playground's files:
a server whose only model is an upstream engine that cannot be reached (so every generation ends in 503
before its first event), with JSON logs."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ADMIN_KEY, API_KEY, OTHER_KEY, Server, free_port, png_bytes, start_server

pytestmark = pytest.mark.server
NATIVE = "/api/v1/services/aigc/multimodal-generation/generation"
IMAGE = "data:image/png;base64," + base64.b64encode(png_bytes(size=(32, 32))).decode()


@pytest.fixture(scope="module")
def down(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    upstream = f"openai+http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    srv = start_server(
        tmp_path_factory.mktemp("down"), args=["--model", f"down={upstream}"], env={"LLAMASCOPE_LOG_FORMAT": "json"}
    )
    yield srv
    srv.stop()


def metric(server: Server, series: str) -> float:
    found = re.search(rf"^{re.escape(series)} (\S+)$", httpx.get(server.base + "/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def access_record(server: Server, request_id: str) -> dict:
    """The JSON access-log line of a request (written after its last byte)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for line in server.log().splitlines():
            if line.startswith("{") and f'"request_id": "{request_id}"' in line and '"llamascope.access"' in line:
                return json.loads(line)
        time.sleep(0.05)
    raise AssertionError(f"no access line for {request_id}")


def test_a_stream_refused_before_its_first_event_counts_its_error_code(down: Server) -> None:
    errors = 'llamascope:request_errors_total{code="ServiceUnavailable"}'
    before = metric(down, errors)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    native = {"model": "down", "input": {"messages": [{"role": "user", "content": [{"image": IMAGE}, {"text": "hi"}]}]}}
    compatible = {"model": "down", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    calls = [
        (NATIVE, native, {}),
        (NATIVE, native, {"X-DashScope-SSE": "enable"}),
        ("/compatible-mode/v1/chat/completions", compatible, {}),
    ]
    for path, body, headers in calls:
        r = httpx.post(down.base + path, json=body, headers={**auth, **headers}, timeout=60)
        assert r.status_code == 503, r.text
        assert access_record(down, r.headers["x-request-id"])["error"] == "ServiceUnavailable"
    assert metric(down, errors) - before == len(calls)


def test_the_playground_files_count_under_their_route_template(down: Server) -> None:
    series = 'llamascope:http_requests_total{method="GET",route="/playground/{path}",status="200"}'
    before = metric(down, series)
    for path in ("/playground/", "/playground/playground.js"):
        assert httpx.get(down.base + path).status_code == 200
    assert metric(down, series) - before == 2
    assert 'route="other"' not in httpx.get(down.base + "/metrics").text


def test_a_request_refused_before_it_ran_names_the_served_model_it_asked_for(down: Server) -> None:
    """New-user trial: a 400 showed model=- in the access log and the usage table though it named a served
    model. A name not served stays unnamed (the counts of refusals stay bounded)."""
    messages = [{"role": "user", "content": [{"image": IMAGE}, {"text": "hi"}]}]
    calls = [
        (NATIVE, {"model": "down", "input": "x"}),  # refused as the body is read
        (NATIVE, {"model": "down", "input": {"messages": messages}, "parameters": {"temperature": -1}}),
        ("/compatible-mode/v1/chat/completions", {"model": "down", "messages": [], "n": 2}),
        (NATIVE, {"model": "not-served", "input": "x"}),
    ]
    models = []
    for path, body in calls:
        r = httpx.post(down.base + path, json=body, headers={"Authorization": f"Bearer {OTHER_KEY}"}, timeout=60)
        assert r.status_code == 400, r.text
        models.append(access_record(down, r.headers["x-request-id"]).get("model"))
    assert models == ["down", "down", "down", None]
    usage = httpx.get(down.base + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    refused = {r["model"]: r["refused"] for r in usage["data"] + usage["refused_only"] if r["prefix"] == OTHER_KEY[:7]}
    assert refused == {"down": 3, "": 1}
