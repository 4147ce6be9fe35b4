"""The chat client against a real llamascope on loopback: streaming, errors as one type, cancelling."""

from __future__ import annotations

import time

import httpx
import pytest

from llamascope.client import APIError, Client
from tests.conftest import API_KEY, SEED_MODEL, ImageHost, Server, free_port, user_turn

GREEDY = {"temperature": 0, "max_tokens": 16}


def running(server: Server) -> int:
    return httpx.get(server.base + "/health", timeout=5).json()["models"][SEED_MODEL]["running"]


def test_the_stream_joins_to_the_unstreamed_answer(server: Server, image_host: ImageHost) -> None:
    messages = [user_turn(image_host.url("/red.png"))]
    with Client(server.api, server.key) as client:
        with client.stream(SEED_MODEL, messages, GREEDY) as stream:
            pieces = list(stream)
        whole = client.generate(SEED_MODEL, messages, GREEDY)
        with client.stream(SEED_MODEL, messages, {**GREEDY, "incremental_output": True}) as deltas:
            assert "".join(deltas) == whole.text
        assert {m["model"] for m in client.models()} >= {SEED_MODEL}
    streamed = stream.answer
    assert len(pieces) > 1 and "".join(pieces) == streamed.text == whole.text
    assert streamed.finish_reason == whole.finish_reason and streamed.usage == whole.usage
    assert streamed.usage["output_tokens"] > 0 and streamed.usage["image_tokens"] > 0
    assert streamed.time_to_first_token is not None and streamed.time_to_first_token > 0
    assert streamed.final_body()["output"] == whole.body["output"]  # type: ignore[index]


def test_refusals_and_failures_are_one_error_type(server: Server, image_host: ImageHost) -> None:
    messages = [user_turn(image_host.url("/red.png"))]
    with Client(server.api, "sk-wrong") as client, pytest.raises(APIError) as wrong_key:
        client.generate(SEED_MODEL, messages, GREEDY)
    assert (wrong_key.value.status, wrong_key.value.code) == (401, "InvalidApiKey") and wrong_key.value.request_id
    with (
        Client(server.api, server.key) as client,
        pytest.raises(APIError) as gif,
        client.stream(SEED_MODEL, [user_turn(image_host.url("/anim.gif"))], GREEDY) as stream,
    ):
        list(stream)
    assert (gif.value.status, gif.value.code) == (400, "InvalidParameter.DataInspection")
    assert "GIF" in gif.value.message
    with Client(f"http://127.0.0.1:{free_port()}/api/v1", server.key) as client, pytest.raises(APIError) as down:
        client.models()
    assert down.value.status is None and down.value.code == "ConnectionError"
    assert "cannot reach" in down.value.describe()


def test_an_error_in_the_stream_comes_after_the_text_so_far(failing_server: str, image_host: ImageHost) -> None:
    pieces: list[str] = []
    with (
        Client(failing_server + "/api/v1", API_KEY) as client,
        pytest.raises(APIError) as error,
        client.stream("flaky", [user_turn(image_host.url("/red.png"))]) as stream,
    ):
        pieces.extend(stream)
    assert "".join(pieces) == "Hello there"
    assert error.value.code == "InternalError.Algo" and error.value.message and error.value.request_id


def test_leaving_a_stream_stops_the_generation_on_the_server(server: Server, image_host: ImageHost) -> None:
    long = {"max_tokens": 8000, "min_new_tokens": 8000}
    with Client(server.api, server.key) as client:  # still open: the stream alone is closed
        with client.stream(SEED_MODEL, [user_turn(image_host.url("/red.png"))], long) as stream:
            for n, _ in enumerate(stream):
                if n == 5:
                    assert running(server) == 1
                    break
        deadline = time.monotonic() + 30
        while running(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert running(server) == 0
    request_id = stream.answer.request_id
    assert request_id and "client=disconnected" in server.access_line(request_id)
    assert stream.answer.finish_reason is None and stream.answer.text
    assert stream.answer.tokens_per_second  # of the part that arrived
