"""Errors after the stream began: ``event:error`` frames, read raw and by both SDK generations.

The model cannot be made to fail on demand, so these tests run on the ``failing_server`` fixture
(tests/conftest.py): a real backend of their own, an engine that implements the Engine protocol, says a
few words, then fails. Everything else (app, service, intake, uvicorn) is llamascope's, on loopback.
"""

from __future__ import annotations

import json
from http import HTTPStatus

import httpx
import pytest

from tests.conftest import API_KEY, run_sdk, user_turn

PATH = "/api/v1/services/aigc/multimodal-generation/generation"


def messages(image_host) -> list[dict]:
    return [user_turn(image_host.url("/red.png"))]


def test_error_frame_bytes(failing_server: str, image_host) -> None:
    body = {"model": "flaky", "input": {"messages": messages(image_host)}}
    r = httpx.post(
        failing_server + PATH,
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}", "X-DashScope-SSE": "enable"},
    )
    assert r.status_code == 200
    blocks = r.text.split("\n\n")
    assert blocks[-1] == ""
    assert [b.split("\n")[1] for b in blocks[:-1]] == ["event:result", "event:result", "event:error"]
    lines = blocks[2].split("\n")
    assert lines[0] == "id:3"
    assert lines[1:4] == ["event:error", ":HTTP_STATUS/500", "status:500"]
    assert lines[4].startswith("data:")
    data = json.loads(lines[4].removeprefix("data:"))
    assert data == {
        "code": "InternalError.Algo",
        "message": data["message"],
        "request_id": r.headers["x-request-id"],
    }
    assert "fire" not in data["message"]  # internals stay in the server log


def test_sdk_reports_the_in_stream_error(failing_server: str, image_host) -> None:
    from dashscope import MultiModalConversation

    events = list(
        MultiModalConversation.call(
            model="flaky",
            messages=messages(image_host),
            stream=True,
            api_key=API_KEY,
            base_address=failing_server + "/api/v1",
        )
    )
    assert [e.status_code for e in events] == [HTTPStatus.OK, HTTPStatus.OK, 500]
    assert events[1].output.choices[0].message.content[0]["text"] == "Hello there"
    assert events[2].code == "InternalError.Algo" and events[2].message


def test_async_sdk_reports_the_in_stream_error(failing_server: str, image_host) -> None:
    from dashscope import AioMultiModalConversation

    async def run() -> list[object]:
        stream = await AioMultiModalConversation.call(
            model="flaky",
            messages=messages(image_host),
            stream=True,
            api_key=API_KEY,
            base_address=failing_server + "/api/v1",
        )
        return [event async for event in stream]

    events = run_sdk(run())
    assert events[-1].code == "InternalError.Algo"
    assert events[-1].status_code == 500


def test_v2_client_raises_on_the_in_stream_error(failing_server: str, image_host) -> None:
    import dashscope
    from dashscope.v2 import errors as v2errors

    client = dashscope.Client(api_key=API_KEY, base_url=failing_server + "/api/v1", max_retries=0)
    stream = client.multimodal.chat.create(model="flaky", messages=messages(image_host), stream=True)
    with pytest.raises(v2errors.DashScopeError):
        for _ in stream:
            pass


def test_non_streamed_failure_is_a_500_that_is_not_retried(failing_server: str, image_host) -> None:
    body = {"model": "flaky", "input": {"messages": messages(image_host)}}
    r = httpx.post(failing_server + PATH, json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 500
    assert r.json()["code"] == "InternalError.Algo"
    assert r.headers["x-should-retry"] == "false"
