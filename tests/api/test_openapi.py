"""GET /openapi.json: every route described, and real answers (JSON and each streamed event) as it says."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from tests.api.documented import Document
from tests.conftest import ADMIN_KEY, API_KEY, SEED_MODEL, Server, png_bytes, user_turn

NATIVE = "/api/v1/services/aigc/multimodal-generation/generation"
CHAT = "/compatible-mode/v1/chat/completions"
KEY = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def doc(server: Server) -> Document:
    answer = httpx.get(server.base + "/openapi.json")  # no key
    assert answer.status_code == 200
    return Document(answer.json())


def native_body(image: str, **parameters: Any) -> dict[str, Any]:
    return {"model": SEED_MODEL, "input": {"messages": [user_turn(image)]}, "parameters": parameters}


def chat_body(image: str, **fields: Any) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is it?"}]
    return {"model": SEED_MODEL, "messages": [{"role": "user", "content": content}], **fields}


def stream(url: str, body: dict[str, Any], headers: dict[str, str]) -> list[Any]:
    with httpx.Client(timeout=60) as client, connect_sse(client, "POST", url, json=body, headers=headers) as source:
        assert source.response.status_code == 200
        return list(source.iter_sse())


def test_every_route_is_described(doc: Document) -> None:
    paths = doc.raw["paths"]
    assert doc.raw["openapi"] == "3.1.0"
    undescribed = [f"{m.upper()} {p}" for p, ops in paths.items() for m, op in ops.items() if op.get("x-undescribed")]
    assert not undescribed, f"routes no router's OPERATIONS describe: {undescribed}"
    for path, method in [
        (NATIVE, "post"),
        (CHAT, "post"),
        ("/v1/chat/completions", "post"),
        ("/api/v1/uploads", "get"),
        ("/api/v1/uploads/oss", "post"),
        ("/admin/keys", "post"),
        ("/admin/usage", "get"),
        ("/api/v1/models", "get"),
        ("/v1/models", "get"),
        ("/health", "get"),
        ("/openapi.json", "get"),
    ]:
        assert method in paths[path], f"{method} {path}"
    # Errors in each surface's shape.
    assert paths[NATIVE]["post"]["responses"]["400"] == {"$ref": "#/components/responses/Refusal400"}
    assert paths[CHAT]["post"]["responses"]["400"] == {"$ref": "#/components/responses/OpenAIRefusal400"}


def test_native_answers_and_events_are_as_documented(server: Server, doc: Document, image_host) -> None:
    image = image_host.url("/red.png")
    body = doc.check(
        NATIVE, "POST", httpx.post(server.base + NATIVE, json=native_body(image, max_tokens=3), headers=KEY, timeout=60)
    )
    assert body["output"]["choices"][0]["finish_reason"] == "length"
    for incremental in (False, True):
        events = stream(
            server.base + NATIVE,
            native_body(image, max_tokens=4, incremental_output=incremental),
            {**KEY, "X-DashScope-SSE": "enable"},
        )
        read = doc.check_events(NATIVE, "POST", events)
        assert [e for e, _ in read] == ["result"] * len(read)
        assert [d["output"]["choices"][0]["finish_reason"] for _, d in read][-1] == "length"
    for bad in ({"temperature": -1}, {"max_tokens": 0}, {"stop": ""}):
        refused = httpx.post(server.base + NATIVE, json=native_body(image, **bad), headers=KEY)
        assert doc.check(NATIVE, "POST", refused)["code"] == "InvalidParameter"
    refused = httpx.post(server.base + NATIVE, json=native_body(image), headers={"Authorization": "Bearer sk-nope"})
    assert doc.check(NATIVE, "POST", refused)["code"] == "InvalidApiKey"


def test_compatible_answers_and_chunks_are_as_documented(server: Server, doc: Document, image_host) -> None:
    image = image_host.url("/red.png")
    answer = httpx.post(server.base + CHAT, json=chat_body(image, max_tokens=3), headers=KEY, timeout=60)
    assert doc.check(CHAT, "POST", answer)["object"] == "chat.completion"
    events = stream(
        server.base + CHAT, chat_body(image, max_tokens=4, stream=True, stream_options={"include_usage": True}), KEY
    )
    read = doc.check_events(CHAT, "POST", events)
    assert read[-1] == ("message", "[DONE]")
    assert read[-2][1]["choices"] == [] and read[-2][1]["usage"]["completion_tokens"] == 4
    for bad in ({"n": 2}, {"stream": 0}, {"stream_options": False}, {"stream_options": {"include_usage": 1}}):
        refused = httpx.post(server.base + CHAT, json=chat_body(image, **bad), headers=KEY)
        assert doc.check(CHAT, "POST", refused)["error"]["code"] == "invalid_parameter_error", bad
    refused = httpx.post(server.base + "/v1/chat/completions", json=chat_body(image), headers={})
    assert doc.check("/v1/chat/completions", "POST", refused)["error"]["code"] == "invalid_api_key"


def test_errors_after_the_stream_began_are_documented_events(
    failing_server: str,
    doc: Document,
    image_host,
) -> None:
    image = image_host.url("/red.png")
    body = {"model": "flaky", "input": {"messages": [user_turn(image)]}}
    read = doc.check_events(NATIVE, "POST", stream(failing_server + NATIVE, body, {**KEY, "X-DashScope-SSE": "enable"}))
    assert [e for e, _ in read] == ["result", "result", "error"]
    body = {**chat_body(image), "model": "flaky", "stream": True}
    read = doc.check_events(CHAT, "POST", stream(failing_server + CHAT, body, KEY))
    assert read[-1][1]["error"]["code"] == "InternalError.Algo"


def test_operations_uploads_and_admin_answers_are_as_documented(server: Server, doc: Document) -> None:
    assert doc.check("/health", "GET", httpx.get(server.base + "/health"))["status"] == "ok"
    for path in ("/api/v1/models", "/compatible-mode/v1/models", "/v1/models"):
        doc.check(path, "GET", httpx.get(server.base + path, headers=KEY))
    doc.check("/openapi.json", "GET", httpx.get(server.base + "/openapi.json"))

    policy = doc.check(
        "/api/v1/uploads",
        "GET",
        httpx.get(server.api + "/uploads", params={"action": "getPolicy", "model": SEED_MODEL}, headers=KEY),
    )["data"]
    fields = {"policy": policy["policy"], "Signature": policy["signature"], "key": policy["upload_dir"] + "/a.png"}
    sent = httpx.post(policy["upload_host"], data=fields, files={"file": ("a.png", png_bytes())})
    assert (sent.status_code, sent.content) == (200, b"")
    forged = httpx.post(policy["upload_host"], data={**fields, "Signature": "AAAA"}, files={"file": ("a.png", b"x")})
    assert doc.check("/api/v1/uploads/oss", "POST", forged)["code"] == "AccessDenied"
    doc.check("/api/v1/uploads", "GET", httpx.get(server.api + "/uploads", params={"action": "x"}, headers=KEY))

    created = doc.check(
        "/admin/keys", "POST", httpx.post(server.base + "/admin/keys", json={"name": "doc"}, headers=ADMIN)
    )
    ref = str(created["data"]["id"])
    doc.check("/admin/keys", "GET", httpx.get(server.base + "/admin/keys", headers=ADMIN))
    granted = httpx.post(
        server.base + f"/admin/keys/{ref}/grants", json={"model": SEED_MODEL, "allowance_tokens": 10}, headers=ADMIN
    )
    grants = doc.check("/admin/keys/{ref}/grants", "POST", granted)["data"]["grants"]
    assert next(g for g in grants if g["model"] == SEED_MODEL)["allowance_tokens"] == 10
    revoked = httpx.post(server.base + f"/admin/keys/{ref}/revoke", headers=ADMIN)
    assert doc.check("/admin/keys/{ref}/revoke", "POST", revoked)["data"]["revoked_at"]
    deadline = time.monotonic() + 10
    while not (usage := httpx.get(server.base + "/admin/usage", params={"days": 1}, headers=ADMIN)).json()["data"]:
        assert time.monotonic() < deadline  # the other tests' requests are in the ledger by now
        time.sleep(0.1)
    doc.check("/admin/usage", "GET", usage)
    doc.check("/admin/keys", "GET", httpx.get(server.base + "/admin/keys", headers=KEY))  # 401


@pytest.mark.parametrize(
    ("method", "path", "body", "documented"),
    [
        ("GET", "/admin/usage?days=abc", None, "/admin/usage"),
        ("GET", "/admin/usage?days=1e308", None, "/admin/usage"),
        ("POST", "/admin/keys", {"days": 3.3e16}, "/admin/keys"),
        ("POST", "/admin/keys", {"days": "soon"}, "/admin/keys"),
        ("POST", "/admin/keys", {"requests_per_minute": 2**40}, "/admin/keys"),
        ("POST", "/admin/keys/99999999999999999999/revoke", None, "/admin/keys/{ref}/revoke"),
        ("POST", "/admin/keys/2/grants", {"model": SEED_MODEL, "allowance_tokens": "lots"}, "/admin/keys/{ref}/grants"),
    ],
)
def test_admin_refuses_what_it_cannot_hold(
    server: Server, doc: Document, method: str, path: str, body: Any, documented: str
) -> None:
    """Found by the fuzzer (or beside what it found): 500s, or a string taken as a number."""
    answer = httpx.request(method, server.base + path, json=body, headers=ADMIN)
    assert answer.status_code == 400, answer.text
    assert doc.check(documented, method, answer)["code"] == "InvalidParameter"


def test_a_wrong_method_names_every_allowed_one(server: Server) -> None:
    """Found by the fuzzer: a 405 had no Allow header, and then named only the first route's methods."""
    answer = httpx.request("PUT", server.base + "/admin/keys", headers=ADMIN)
    assert answer.status_code == 405
    assert set(answer.headers["allow"].split(", ")) >= {"GET", "POST"}
    assert answer.json()["code"] == "MethodNotAllowed"


def test_the_document_is_valid_openapi_3_1(doc: Document) -> None:
    from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

    assert [e.message for e in OPENAPI_31_VALIDATOR.iter_errors(doc.raw)] == []


def test_a_new_route_is_described_by_one_declaration_beside_it() -> None:
    """How a route added later gets into the document (and what happens while it is not)."""
    from fastapi import APIRouter, FastAPI
    from pydantic import BaseModel

    from llamascope.api import openapi

    class Thing(BaseModel):
        name: str

    router = APIRouter()
    router.add_api_route("/things/{name:path}", lambda name: {"name": name}, methods=["GET"])
    app = FastAPI()
    app.include_router(router)
    assert openapi.build(app.routes, {})["paths"]["/things/{name}"]["get"]["x-undescribed"] is True
    declared = (openapi.operation("GET", "/things/{name:path}", "A thing", tag="things", ok=Thing, refusals=(404,)),)
    described = openapi.build(app.routes, openapi.collect(declared))["paths"]["/things/{name}"]["get"]
    assert "x-undescribed" not in described
    assert described["parameters"] == [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    assert described["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Thing"
    }
    assert set(described["responses"]) == {"200", "401", "404"}


def test_an_operation_described_twice_is_refused() -> None:
    from llamascope.api import openapi

    once = (openapi.operation("GET", "/things", "Things", tag="things"),)
    with pytest.raises(ValueError, match="described twice"):
        openapi.collect(once, once)
