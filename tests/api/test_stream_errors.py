"""Errors after the stream began: ``event:error`` frames, read raw and by both SDK generations.

The model cannot be made to fail on demand, so these tests register a real
backend of their own: an engine that implements the Engine protocol, says a
few words, then fails. Everything else (app, service, intake, uvicorn) is
llamascope's, on loopback.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http import HTTPStatus

import httpx
import pytest
import uvicorn

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
from tests.conftest import API_KEY, free_port, run_sdk, user_turn

PATH = "/api/v1/services/aigc/multimodal-generation/generation"


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
