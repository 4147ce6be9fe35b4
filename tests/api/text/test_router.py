"""Raw HTTP against a real server: the text-generation and tokenizer APIs (docs/text-generation-wire.md).

The server (conftest's ``text_server``) serves the seed names on the built-in vision model and a text-only
Llama directory, given by ``--model NAME=PATH``, on the built-in text model.
"""

from __future__ import annotations

import base64
import itertools
import time

import httpx
import pytest

from tests.api.wire import sse_events
from tests.conftest import ADMIN_KEY, SEED_MODEL, TEXT_MODEL, Server, png_bytes

PATH = "/api/v1/services/aigc/text-generation/generation"
MULTIMODAL = "/api/v1/services/aigc/multimodal-generation/generation"
DATA_URI = "data:image/png;base64," + base64.b64encode(png_bytes((10, 200, 90), (320, 240))).decode()


def post(server: Server, body: object, *, path: str = PATH, stream: bool = False, key: str | None = None):
    headers = {"Authorization": f"Bearer {key or server.key}"}
    if stream:
        headers["X-DashScope-SSE"] = "enable"
    return httpx.post(server.base + path, json=body, headers=headers, timeout=60)


def body(model: str, payload: dict[str, object], **parameters: object) -> dict[str, object]:
    return {"model": model, "input": payload, "parameters": parameters}


HI = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("model", [TEXT_MODEL, SEED_MODEL])
def test_text_format_by_default_and_message_format(text_server: Server, model: str) -> None:
    text = post(text_server, body(model, HI, max_tokens=5, temperature=0))
    assert text.status_code == 200, text.text
    got = text.json()
    assert set(got) == {"output", "usage", "request_id"} and got["request_id"] == text.headers["x-request-id"]
    assert set(got["output"]) == {"text", "finish_reason"} and got["output"]["finish_reason"] == "length"
    assert got["usage"] == {
        "input_tokens": got["usage"]["input_tokens"],
        "output_tokens": 5,
        "total_tokens": 5 + got["usage"]["input_tokens"],
    }

    message = post(text_server, body(model, HI, max_tokens=5, temperature=0, result_format="message")).json()
    choice = message["output"]["choices"][0]
    assert set(message["output"]) == {"choices"} and choice["finish_reason"] == "length"
    assert choice["message"] == {"role": "assistant", "content": got["output"]["text"]}  # a string, greedy: the same
    assert message["usage"] == got["usage"]


def test_prompt_history_and_messages_are_one_conversation(text_server: Server) -> None:
    def answer(payload: dict[str, object]) -> dict:
        r = post(text_server, body(TEXT_MODEL, payload, max_tokens=4, temperature=0))
        assert r.status_code == 200, r.text
        return r.json()

    as_prompt, as_messages = answer({"prompt": "hi"}), answer(HI)
    assert (as_prompt["output"], as_prompt["usage"]) == (as_messages["output"], as_messages["usage"])
    history = answer({"history": [{"user": "hello", "bot": "hi!"}], "prompt": "how are you?"})
    messages = answer(
        {
            "messages": [
                {"role": "user", "content": [{"text": "hello"}]},
                {"role": "assistant", "content": "hi!"},
                {"role": "user", "content": [{"type": "text", "text": "how are you?"}]},
            ]
        }
    )
    assert history["output"] == messages["output"] and history["usage"] == messages["usage"]
    prompt_after = answer(
        {
            "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi!"}],
            "prompt": "how are you?",
        }
    )
    assert prompt_after["usage"] == messages["usage"]


@pytest.mark.parametrize("result_format", ["text", "message"])
def test_streams_cumulative_by_default_and_increments_on_request(text_server: Server, result_format: str) -> None:
    def texts(**extra: object) -> tuple[list[str], list[str], list[dict]]:
        r = post(
            text_server,
            body(TEXT_MODEL, HI, max_tokens=8, temperature=0, result_format=result_format, **extra),
            stream=True,
        )
        assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream;charset=UTF-8"
        events = sse_events(r.text)
        if result_format == "text":
            return [e["output"]["text"] for e in events], [e["output"]["finish_reason"] for e in events], events
        choices = [e["output"]["choices"][0] for e in events]
        return [c["message"]["content"] for c in choices], [c["finish_reason"] for c in choices], events

    whole, reasons, events = texts()
    assert reasons[:-1] == ["null"] * (len(reasons) - 1) and reasons[-1] == "length"
    for before, after in itertools.pairwise(whole):
        assert after.startswith(before)
    assert [e["usage"]["output_tokens"] for e in events][-1] == 8
    deltas, _, _ = texts(incremental_output=True)
    assert "".join(deltas) == whole[-1]
    assert post(text_server, body(TEXT_MODEL, HI, max_tokens=8, temperature=0)).json()["output"]["text"] == whole[-1]


def test_vision_model_text_only_and_with_an_image(text_server: Server, image_host) -> None:
    text_only = post(text_server, body(SEED_MODEL, HI, max_tokens=3)).json()
    assert "image_tokens" not in text_only["usage"]
    for image in (DATA_URI, image_host.url("/red.png")):
        later = {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": [{"image": image}, {"text": "what is this?"}]},
            ]
        }
        r = post(text_server, body(SEED_MODEL, later, max_tokens=3, result_format="message"))
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["image_tokens"] == 6404
        assert isinstance(r.json()["output"]["choices"][0]["message"]["content"], str)


@pytest.mark.parametrize(
    ("model", "payload", "parameters", "status", "code", "says"),
    [
        (
            TEXT_MODEL,
            {"messages": [{"role": "user", "content": [{"image": DATA_URI}, {"text": "?"}]}]},
            {},
            400,
            "InvalidParameter",
            "messages[0]: this model is a text-only model",
        ),
        (
            SEED_MODEL,
            {"messages": [{"role": "user", "content": [{"image": DATA_URI}] * 5}]},
            {},
            400,
            "InvalidParameter",
            "at most 4 images per conversation",
        ),
        (TEXT_MODEL, HI, {"result_format": "json"}, 400, "InvalidParameter", "result_format"),
        (TEXT_MODEL, HI, {"n": 3}, 400, "InvalidParameter", "Parameter n: only one choice"),
        (TEXT_MODEL, {"history": [{"user": 5}], "prompt": "hi"}, {}, 400, "InvalidParameter", "input.history[0].user"),
        (TEXT_MODEL, {}, {}, 400, "BadRequest.EmptyInput", "input"),
        (TEXT_MODEL, {"prompt": 3}, {}, 400, "InvalidParameter", "input.prompt"),
        (TEXT_MODEL, HI, {"top_p": 3}, 400, "InvalidParameter", "top_p"),
        (TEXT_MODEL, HI, {"max_tokens": 9000}, 400, "InvalidParameter", "max_tokens"),
        (
            TEXT_MODEL,
            {"prompt": "word " * 9000},
            {},
            400,
            "InvalidParameter",
            "Range of input length should be [1, 8191]",
        ),
        ("llama3.3-70b-instruct", HI, {}, 400, "InvalidParameter", "Model not exist."),
        (TEXT_MODEL, {"messages": "hi"}, {}, 400, "InvalidParameter", "input.messages must be a list"),
        (
            TEXT_MODEL,
            {"history": [{"user": None, "bot": "x"}], "prompt": "hi"},
            {},
            400,
            "InvalidParameter",
            "no content",
        ),
        (
            SEED_MODEL,
            {"messages": [{"role": "user", "content": [{"type": "image"}]}]},
            {},
            400,
            "InvalidParameter",
            "URL",
        ),
        (SEED_MODEL, {"messages": [{"role": "user", "content": ["hi"]}]}, {}, 400, "InvalidParameter", "content[0]"),
    ],
)
def test_errors_name_what_is_wrong(text_server: Server, model, payload, parameters, status, code, says) -> None:
    for stream in (False, True):  # found before the stream starts: plain HTTP errors either way
        r = post(text_server, body(model, payload, **parameters), stream=stream)
        assert (r.status_code, r.json()["code"]) == (status, code), r.text
        assert says in r.json()["message"] and r.json()["request_id"]


def test_the_model_list_says_which_take_images(text_server: Server) -> None:
    """Which models take images, how many a conversation may carry, and whether the multimodal endpoint wants one
    in the first user message (the playground reads these)."""
    listed = httpx.get(text_server.api + "/models", headers={"Authorization": f"Bearer {text_server.key}"}).json()
    images = {m["model"]: (m["takes_images"], m["max_images"], m["requires_image"]) for m in listed["data"]}
    vision = (True, 4, True)
    assert images == {SEED_MODEL: vision, "llama3.2-11b-vision": vision, TEXT_MODEL: (False, 0, False)}


def test_the_multimodal_endpoint_keeps_its_rule_and_refuses_text_only_models(text_server: Server, image_host) -> None:
    r = post(text_server, body(TEXT_MODEL, HI), path=MULTIMODAL)
    assert (r.status_code, r.json()["code"]) == (400, "InvalidParameter")
    assert (
        "llama3.1-8b-instruct is a text-only model" in r.json()["message"] and "text-generation" in r.json()["message"]
    )
    r = post(text_server, body(SEED_MODEL, HI), path=MULTIMODAL)
    assert r.status_code == 400 and "must carry an image" in r.json()["message"]


def test_tokenizer_counts_what_generation_charges(text_server: Server) -> None:
    conversation = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "这是什么? 🐶"}]
    }
    for model in (TEXT_MODEL, SEED_MODEL):
        tokens = post(text_server, body(model, conversation), path="/api/v1/tokenizer")
        assert tokens.status_code == 200, tokens.text
        got = tokens.json()
        assert set(got) == {"output", "usage", "request_id"}
        ids = got["output"]["token_ids"]
        assert got["usage"] == {"input_tokens": len(ids)} and len(got["output"]["tokens"]) == len(ids)
        assert ids[0] == 128000 and got["output"]["tokens"][0] == "<|begin_of_text|>"
        generated = post(text_server, body(model, conversation, max_tokens=1)).json()
        assert generated["usage"]["input_tokens"] == len(ids)
    with_image = {"messages": [{"role": "user", "content": [{"image": DATA_URI}, {"text": "?"}]}]}
    counted = post(text_server, body(SEED_MODEL, with_image), path="/api/v1/tokenizer").json()
    assert counted["output"]["token_ids"].count(128256) == 1  # the one <|image|> token
    assert (
        counted["usage"]["input_tokens"]
        == post(text_server, body(SEED_MODEL, with_image, max_tokens=1)).json()["usage"]["input_tokens"]
    )
    refused = post(text_server, body(TEXT_MODEL, with_image), path="/api/v1/tokenizer")
    assert refused.status_code == 400 and "text-only" in refused.json()["message"]


def test_grants_allowances_and_ledger(text_server: Server) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    created = httpx.post(
        text_server.base + "/admin/keys", headers=admin, json={"models": [SEED_MODEL], "allowance_tokens": 50}
    )
    key = created.json()["data"]["api_key"]
    for path in (PATH, "/api/v1/tokenizer"):
        r = post(text_server, body(TEXT_MODEL, HI), path=path, key=key)
        assert (r.status_code, r.json()["code"]) == (403, "AccessDenied.Unpurchased"), r.text
    first = post(text_server, body(SEED_MODEL, HI, max_tokens=2), key=key)
    assert first.status_code == 200
    made = first.json()["usage"]["output_tokens"]  # 1 or 2: the allowance caps max_tokens at what is left
    r = post(text_server, body(SEED_MODEL, HI, max_tokens=2), key=key)  # the first used all the 50 granted
    assert (r.status_code, r.json()["code"]) == (403, "AllocationQuota.FreeTierOnly"), r.text
    assert (post(text_server, {"model": SEED_MODEL, "input": HI}, key="sk-" + "0" * 40)).status_code == 401
    usage = httpx.get(
        text_server.base + "/admin/usage", params={"key": str(created.json()["data"]["id"])}, headers=admin
    ).json()["data"]
    assert [(row["model"], row["requests"], row["output_tokens"]) for row in usage] == [(SEED_MODEL, 1, made)]


def test_a_client_that_hangs_up_stops_the_text_model(text_server: Server) -> None:
    """The text-only engine stops when its caller leaves, is charged what it made, and frees its place."""
    long = body(TEXT_MODEL, HI, max_tokens=4000, min_new_tokens=4000, incremental_output=True)
    line = text_server.hang_up_after(PATH, long)
    assert "client=disconnected" in line and f"model={TEXT_MODEL}" in line
    made = int(line.split("output_tokens=")[1].split()[0])
    assert 3 <= made < 4000
    for _ in range(500):  # it leaves the batch at the model thread's next step
        health = httpx.get(text_server.base + "/health").json()["models"][TEXT_MODEL]
        if health["running"] == 0:
            break
        time.sleep(0.02)
    assert health["running"] == 0 and "vision_cache_images" not in health
