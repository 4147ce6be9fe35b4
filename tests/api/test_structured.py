"""Structured output through the real SDKs against one real server on the built-in model (issue 24).

JSON mode, JSON Schema and tool calls on all three APIs: the openai SDK's ``parse`` and ``tools`` in compatible
mode, dashscope's ``MultiModalConversation`` and ``Generation``, LangChain's ``ChatTongyi`` (``bind_tools`` and
``with_structured_output``, which go through ``dashscope.Generation``); both wire formats streamed; and the
refusals, each a 400 naming its field before anything streams. The built-in model's weights are random: what
holds here holds because decoding is constrained, whatever the model would say.
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.conftest import SEED_MODEL, Server, png_bytes

NATIVE = "/api/v1/services/aigc/multimodal-generation/generation"
TEXT = "/api/v1/services/aigc/text-generation/generation"
CHAT = "/compatible-mode/v1/chat/completions"
IMAGE = "data:image/png;base64," + base64.b64encode(png_bytes((230, 230, 220), (320, 480))).decode()
ROOM = 400  # max_tokens: room for a bounded answer (and for a few parallel calls) on random weights


class Receipt(BaseModel):
    """Bounded fields: on random weights an unbounded string could run to max_tokens."""

    model_config = ConfigDict(extra="forbid")
    merchant: str = Field(max_length=16)
    total_cents: int = Field(ge=0, le=100_000)
    currency: Literal["CNY", "USD", "EUR"]
    paid: bool


WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Hangzhou", "Beijing", "Shanghai"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The forecast for a city.",
        "parameters": WEATHER_PARAMETERS,
        "strict": True,  # the openai SDK's helpers parse only strict tools' arguments
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CST"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME["function"]["parameters"]}


def openai_messages(text: str = "Read this receipt.") -> list[dict[str, Any]]:
    image = {"type": "image_url", "image_url": {"url": IMAGE}}
    return [{"role": "user", "content": [image, {"type": "text", "text": text}]}]


def native_messages(text: str = "Read this receipt.") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"image": IMAGE}, {"text": text}]}]


def check_calls(calls: list[dict[str, Any]], names: set[str] | None = None) -> None:
    """Every call is OpenAI-shaped, names an offered tool, and its arguments validate against its parameters."""
    assert calls
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_"), call
        name = call["function"]["name"]
        assert name in (names or SCHEMAS), call
        jsonschema.validate(strict_json(call["function"]["arguments"]), SCHEMAS[name])


def strict_json(text: str) -> Any:
    """``json.loads`` without Python's extensions: ``Infinity`` and ``NaN`` are no JSON (JSON.parse refuses them)."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON: {text!r}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(api_key=server.key, base_url=server.base + "/compatible-mode/v1", max_retries=0)


def post(server: Server, path: str, body: dict[str, Any], stream: bool = False) -> httpx.Response:
    headers = {"Authorization": f"Bearer {server.key}"}
    if stream:
        headers["X-DashScope-SSE"] = "enable"
    return httpx.post(server.base + path, json=body, headers=headers, timeout=120)


def events(r: httpx.Response) -> list[dict[str, Any]]:
    """The data of a DashScope stream's result events; an error event fails."""
    assert r.status_code == 200, r.text
    assert "event:error" not in r.text, r.text
    return [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]


# -- refusals: 400 InvalidParameter naming the field, before anything streams ---------------------------------

UNCOMPILABLE = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}}
DEEP: dict[str, Any] = {"type": "integer"}
for _ in range(300):  # past what a request body may nest (api.incoming.MAX_JSON_DEPTH), and the schema checks
    DEEP = {"type": "object", "properties": {"a": DEEP}}
HALF_MB = {"description": "d" * 500_000}  # two such tools are past the bound of a request's schemas
REFUSALS = [
    # (id, fields, messages' text, the field named)
    ("json without json", {"response_format": {"type": "json_object"}}, "Read it.", "'messages' must contain"),
    (
        "uncompilable schema",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": UNCOMPILABLE}}},
        "Read it.",
        "response_format.json_schema.schema",
    ),
    (
        "parameters not an object schema",
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
        "Read it.",
        "tools[0].function.parameters",
    ),
    (
        "unknown function chosen",
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_rain"}}},
        "Read it.",
        "tool_choice.function.name",
    ),
    ("required without tools", {"tool_choice": "required"}, "Read it.", "tool_choice"),
    (
        # jsonschema knows the dialect (the scheme read in any case), jsonschema_rs fetched it: a 500
        "dialect spelled otherwise",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "r", "schema": {"$schema": "HTTP://json-schema.org/draft-07/schema#"}},
            }
        },
        "Read it.",
        "response_format.json_schema.schema",
    ),
    (
        "schemas too large together",
        {
            "tools": [
                {"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object", **HALF_MB}}}
                for i in range(2)
            ]
        },
        "Read it.",
        "tools[1].function.parameters",
    ),
]
DEEP_FIELDS = [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": DEEP}}},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": DEEP}}]},
]


@pytest.mark.parametrize(("fields", "text", "named"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_native_refusals_name_the_field(server: Server, fields: dict, text: str, named: str, stream: bool) -> None:
    parameters = {"max_tokens": 4, **fields}
    body = {"model": SEED_MODEL, "input": {"messages": native_messages(text)}, "parameters": parameters}
    r = post(server, NATIVE, body, stream)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text
    assert r.json()["code"] == "InvalidParameter"
    message = r.json()["message"]
    assert named in message and "parameters." in message, message


@pytest.mark.parametrize("fields", DEEP_FIELDS, ids=["schema", "parameters"])
def test_a_schema_nested_too_deeply_is_refused_as_the_body(server: Server, client: openai.OpenAI, fields: dict) -> None:
    """Nested past what a request body may be (api.incoming.MAX_JSON_DEPTH, 128 levels): refused with the body,
    before the schema checks, which would recurse through it, read it."""
    parameters = {"max_tokens": 4, **fields}
    body = {"model": SEED_MODEL, "input": {"messages": native_messages()}, "parameters": parameters}
    r = post(server, NATIVE, body)
    assert r.status_code == 400 and r.json()["code"] == "InvalidParameter", r.text
    assert "nested too deeply" in r.json()["message"], r.text
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=SEED_MODEL, messages=openai_messages(), max_tokens=4, **fields)
    assert "nested too deeply" in bad.value.body["message"], bad.value.body


@pytest.mark.parametrize(("fields", "text", "named"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_openai_refusals_name_the_field(client: openai.OpenAI, fields: dict, text: str, named: str) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(
                model=SEED_MODEL, messages=openai_messages(text), max_tokens=4, stream=stream, **fields
            )
        body = bad.value.body
        assert body["code"] == "invalid_parameter_error" and named in body["message"], body
        assert "parameters." not in body["message"]
        assert body["param"] == ("messages" if named.startswith("'messages'") else named), body


def test_a_large_schema_and_a_small_request_are_both_answered(client: openai.OpenAI) -> None:
    """A schema seen for the first time is checked in a worker thread, its meta-schema check in Rust
    (jsonschema_rs): what it holds other requests up by is measured by bench/schema_stall.py, not here (no timed
    tests). Sent together, the large one is refused for what it is, the small one answered."""
    fresh = uuid.uuid4().hex  # a schema the server has not checked before (verdicts are kept)
    branches = [
        {"type": "object", "properties": {f"k{i}_{fresh}": {"type": "integer"}}, "additionalProperties": False}
        for i in range(3000)
    ]
    large = {"type": "json_schema", "json_schema": {"name": "large", "schema": {"anyOf": [*branches, UNCOMPILABLE]}}}
    refused: list[str] = []

    def ask_large() -> None:
        with pytest.raises(openai.BadRequestError) as caught:  # refused once checked: the lookbehind does not compile
            client.chat.completions.create(
                model=SEED_MODEL, messages=openai_messages(), max_tokens=4, response_format=large
            )
        refused.append(str(caught.value))

    asking = threading.Thread(target=ask_large)
    asking.start()
    small = client.chat.completions.create(model=SEED_MODEL, messages=openai_messages(), max_tokens=2)
    asking.join()
    assert small.choices[0].message.content is not None
    assert refused and "response_format.json_schema.schema" in refused[0], refused


ENDLESS = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}  # "{" then no way on
# Every answer begins "{" or "[" and comes to a dead end right after: a choice at the start, which the grammar's
# forced start does not show; refused as a schema with no finite value (structured/finite.py).
ENDLESS_EITHER = {
    "$defs": {
        "o": {"type": "object", "properties": {"a": {"$ref": "#/$defs/o"}}, "required": ["a"]},
        "l": {"type": "array", "items": {"$ref": "#/$defs/l"}, "minItems": 1},
    },
    "anyOf": [{"$ref": "#/$defs/o"}, {"$ref": "#/$defs/l"}],
}


@pytest.mark.parametrize(
    ("schema", "found"),
    [
        ({"$ref": "#"}, "no JSON value satisfies it"),
        (
            {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
            "no JSON value satisfies it",
        ),
        (ENDLESS, "no JSON value satisfies it"),
        (ENDLESS_EITHER, "no JSON value satisfies it"),
    ],
    ids=["itself", "a circle", "a required property holding the schema", "each branch holding the schema"],
)
def test_a_schema_nothing_satisfies_is_refused(server: Server, client: openai.OpenAI, schema: dict, found: str) -> None:
    """It compiles, but allows no first token, none after "{", or only answers without end: answered, it ended
    as "stop" with "{" or nothing, not JSON (or ran to "length"). Natively the field is named with "parameters."
    before it, as every refusal there is."""
    json_schema = {"name": "r", "schema": schema}
    fields: dict[str, Any] = {"response_format": {"type": "json_schema", "json_schema": json_schema}}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(
                model=SEED_MODEL, messages=openai_messages(), max_tokens=8, stream=stream, **fields
            )
        assert bad.value.body["param"] == "response_format.json_schema.schema", bad.value.body
        assert found in bad.value.body["message"] and "parameters." not in bad.value.body["message"], bad.value.body
    parameters = {"max_tokens": 8, "result_format": "message", **fields}
    r = post(server, NATIVE, {"model": SEED_MODEL, "input": {"messages": native_messages()}, "parameters": parameters})
    assert r.status_code == 400 and r.json()["code"] == "InvalidParameter", r.text
    assert "'parameters.response_format.json_schema.schema'" in r.json()["message"] and found in r.text, r.text


# null, or an object that can never be finished: past the check (it has a finite value), a dead end once "{" is made
DEAD_END_AFTER_BRACE = {
    "anyOf": [{"type": "null"}, {"type": "object", "properties": {"a": {"$ref": "#/anyOf/1"}}, "required": ["a"]}]
}


def test_a_dead_end_while_decoding_names_the_field(server: Server, client: openai.OpenAI) -> None:
    """Found only while decoding, as a refusal before it: the field in the message (natively after "parameters.")
    and in compatible mode's error.param (it was null, the message saying "response_format or tools")."""
    fields = {"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": DEAD_END_AFTER_BRACE}}}
    refused, natively = [], []
    for seed in range(8):  # an answer that begins "null" ends as "stop"; one that begins "{" comes to the dead end
        try:
            client.chat.completions.create(
                model=SEED_MODEL, messages=openai_messages(), max_tokens=16, seed=seed, **fields
            )
        except openai.BadRequestError as bad:
            refused.append(bad.body)
        parameters = {"max_tokens": 16, "seed": seed, **fields}
        r = post(
            server, NATIVE, {"model": SEED_MODEL, "input": {"messages": native_messages()}, "parameters": parameters}
        )
        if r.status_code != HTTPStatus.OK:
            natively.append(r.json())
    assert refused and natively, "no answer began with '{'"
    for body in refused:
        assert "allows no next token" in body["message"], body
        assert body["param"] == "response_format.json_schema.schema", body
    for body in natively:
        assert body["code"] == "InvalidParameter" and "allows no next token" in body["message"], body
        assert "'parameters.response_format.json_schema.schema'" in body["message"], body


LEGACY = {"name": "get_weather", "parameters": WEATHER_PARAMETERS}


@pytest.mark.parametrize(
    ("fields", "named", "instead"),
    [
        ({"functions": [LEGACY]}, "functions", "tools"),
        ({"function_call": {"name": "get_weather"}}, "function_call", "tool_choice"),
    ],
    ids=["functions", "function_call"],
)
def test_native_apis_refuse_legacy_function_fields(server: Server, fields: dict, named: str, instead: str) -> None:
    """As compatible mode does: answering as if they were heard would make no call and say nothing."""
    for path, messages in ((NATIVE, native_messages()), (TEXT, [{"role": "user", "content": "Weather?"}])):
        parameters = {"max_tokens": 4, "result_format": "message", **fields}
        r = post(server, path, {"model": SEED_MODEL, "input": {"messages": messages}, "parameters": parameters})
        assert r.status_code == 400 and r.json()["code"] == "InvalidParameter", r.text
        assert f"parameters.{named}" in r.json()["message"] and f"parameters.{instead}" in r.json()["message"]
    if named == "function_call":  # "none" asks nothing: taken, as in compatible mode
        parameters["function_call"] = "none"
        r = post(server, TEXT, {"model": SEED_MODEL, "input": {"messages": messages}, "parameters": parameters})
        assert r.status_code == 200, r.text


def test_tool_messages_must_answer_a_call(server: Server, client: openai.OpenAI) -> None:
    orphan = {"role": "tool", "content": "22 degrees", "tool_call_id": "call_1"}
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=SEED_MODEL, messages=[*openai_messages(), orphan], max_tokens=4)
    assert "messages[1] (tool)" in bad.value.body["message"] and bad.value.body["param"] == "messages"
    called = {"role": "assistant", "content": None, "tool_calls": [call("call_1")]}
    wrong = {**orphan, "tool_call_id": "call_2"}
    body = {"model": SEED_MODEL, "input": {"messages": [*native_messages(), called, wrong]}}
    r = post(server, NATIVE, body)
    assert r.status_code == 400 and "messages[2] (tool): tool_call_id 'call_2'" in r.json()["message"], r.text


def test_text_format_with_tools_is_refused(server: Server) -> None:
    """Tool calls are answered in output.choices[0].message: the text format cannot carry them (as DashScope)."""
    body = {"model": SEED_MODEL, "input": {"prompt": "Weather?"}, "parameters": {"tools": [WEATHER]}}
    r = post(server, TEXT, body)
    assert r.status_code == 400 and "result_format" in r.json()["message"], r.text
    body["parameters"] = {"tools": [WEATHER], "tool_choice": "none", "max_tokens": 2}  # no call can be made
    assert post(server, TEXT, body).status_code == 200


def call(call_id: str) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Hangzhou", "days": 2}'},
    }


# -- the openai SDK, compatible mode ---------------------------------------------------------------------------


def test_openai_parse_gives_a_validated_object(client: openai.OpenAI) -> None:
    r = client.chat.completions.parse(
        model=SEED_MODEL, messages=openai_messages(), response_format=Receipt, max_tokens=ROOM, seed=1
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Receipt), choice
    assert Receipt.model_validate_json(choice.message.content or "") == choice.message.parsed


def test_openai_json_mode_streams_as_text(client: openai.OpenAI) -> None:
    kwargs = {
        "model": SEED_MODEL,
        "messages": openai_messages("Answer in JSON."),
        "response_format": {"type": "json_object"},
        "max_tokens": ROOM,
        "seed": 2,
    }
    whole = client.chat.completions.create(**kwargs)
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    if whole.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_never_cut_a_json_answer(client: openai.OpenAI, stream: bool) -> None:
    """A "stop" answer is whole JSON: stop strings apply to free text (a "{" once ended JSON mode's answer as
    "" with finish_reason "stop")."""
    kwargs: dict[str, Any] = {
        "model": SEED_MODEL,
        "messages": openai_messages("Answer in JSON."),
        "response_format": {"type": "json_object"},
        "max_tokens": ROOM,
        "seed": 2,
        "stop": ["{", "}", '"', ":"],
    }
    if stream:
        chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        text, finish = choice.message.content or "", choice.finish_reason
    assert finish == "stop" and isinstance(json.loads(text), dict), text


def test_openai_forced_tool_calls_are_parsed(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=SEED_MODEL,
        messages=openai_messages("What is the weather where this was bought?"),
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=ROOM,
        seed=3,
    )
    sent = raw.http_response.json()["choices"][0]["message"]["tool_calls"]
    assert sent and all("index" not in c for c in sent)  # as OpenAI's: a whole answer's calls have no index
    r = raw.parse()
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    check_calls([c.model_dump() for c in choice.message.tool_calls or []])

    named = client.chat.completions.parse(  # the SDK parses strict function tools' arguments itself
        model=SEED_MODEL,
        messages=openai_messages(),
        tools=[openai.pydantic_function_tool(Receipt)],
        tool_choice={"type": "function", "function": {"name": "Receipt"}},
        parallel_tool_calls=False,
        max_tokens=ROOM,
    )
    calls = named.choices[0].message.tool_calls or []
    assert len(calls) == 1 and isinstance(calls[0].function.parsed_arguments, Receipt), named


def test_openai_streamed_tool_calls_and_history(client: openai.OpenAI) -> None:
    kwargs = {
        "model": SEED_MODEL,
        "messages": openai_messages("Weather?"),
        "tools": [WEATHER],
        "tool_choice": "required",
        "max_tokens": ROOM,
        "seed": 4,
    }
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert [d.index for d in deltas] == list(range(len(deltas)))
    check_calls([d.model_dump(exclude={"index"}) for d in deltas])
    reasons = [c.choices[0].finish_reason for c in chunks]
    assert reasons[-1] == "tool_calls" and all(r is None for r in reasons[:-1])
    # The SDK's own stream helper joins the same into a message.
    with client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls" and message.tool_calls

    # The calls and a result go back in the history; the model answers in text.
    history = [
        *openai_messages("Weather?"),
        message.model_dump(include={"role", "content", "tool_calls"}),
        *({"role": "tool", "tool_call_id": c.id, "content": "Sunny, 22 degrees."} for c in message.tool_calls),
    ]
    after = client.chat.completions.create(
        model=SEED_MODEL, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=4
    )
    assert after.choices[0].message.content and not after.choices[0].message.tool_calls


@pytest.mark.parametrize(
    "parameters",
    [
        {  # a schema with its own $id (as generators write them): its references are relative to it
            "$id": "https://example.com/schemas/lookup.json",
            "$defs": {"code": {"enum": ["A1", "B2"]}},
            "type": "object",
            "properties": {"code": {"$ref": "#/$defs/code"}},
            "required": ["code"],
            "additionalProperties": False,
        },
        {  # a reference to an $anchor (a plain-name fragment, not a JSON pointer)
            "$defs": {"code": {"$anchor": "code", "enum": ["A1", "B2"]}},
            "type": "object",
            "properties": {"code": {"$ref": "#code"}},
            "required": ["code"],
            "additionalProperties": False,
        },
        {  # a subschema with an $id of its own inside one without: its "#/..." is its own
            "$defs": {
                "code": {"$id": "https://example.com/code.json", "$defs": {"c": {"enum": ["A1"]}}, "$ref": "#/$defs/c"}
            },
            "type": "object",
            "properties": {"code": {"$ref": "#/$defs/code"}},
            "required": ["code"],
            "additionalProperties": False,
        },
    ],
    ids=["$id", "$anchor", "nested $id"],
)
def test_tool_parameters_keep_their_references(client: openai.OpenAI, parameters: dict[str, Any]) -> None:
    """A tool's parameters compile and bind as the same schema does as response_format: the call grammar
    wraps them in a schema of its own, and their references must still point where they did."""
    tool = {"type": "function", "function": {"name": "lookup", "parameters": parameters}}
    r = client.chat.completions.create(
        model=SEED_MODEL,
        messages=[{"role": "user", "content": "Look it up."}],
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "lookup"}},
        parallel_tool_calls=False,
        max_tokens=ROOM,
    )
    calls = r.choices[0].message.tool_calls or []
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1, r
    jsonschema.validate(json.loads(calls[0].function.arguments), parameters)


def test_call_arguments_are_json_as_the_model_wrote_them(client: openai.OpenAI) -> None:
    """A number the model writes past a float's range (random weights write 752e4124810271312) stays as written:
    read and written again, it became Infinity, which no JSON parser but Python's takes."""
    tool = {
        "type": "function",
        "function": {
            "name": "measure",
            "parameters": {
                "type": "object",
                "properties": {"v": {"type": "number"}},
                "required": ["v"],
                "additionalProperties": False,
            },
        },
    }
    for seed in range(6):
        raw = client.chat.completions.with_raw_response.create(
            model=SEED_MODEL,
            messages=[{"role": "user", "content": "Measure it."}],
            tools=[tool],
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=80,
            seed=seed,
        )
        for call in raw.http_response.json()["choices"][0]["message"].get("tool_calls") or []:
            assert isinstance(strict_json(call["function"]["arguments"])["v"], (int, float)), call


# -- dashscope, native ---------------------------------------------------------------------------------------


@pytest.fixture
def sdk(server: Server) -> Iterator[Any]:
    import dashscope

    old = dashscope.base_http_api_url, dashscope.api_key
    dashscope.base_http_api_url, dashscope.api_key = server.api, server.key
    yield dashscope
    dashscope.base_http_api_url, dashscope.api_key = old


def receipt_format() -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "receipt", "schema": Receipt.model_json_schema()}}


def test_dashscope_multimodal_json_schema(sdk: Any) -> None:
    r = sdk.MultiModalConversation.call(
        model=SEED_MODEL, messages=native_messages(), response_format=receipt_format(), max_tokens=ROOM, seed=5
    )
    assert r.status_code == HTTPStatus.OK, r
    choice = r.output.choices[0]
    assert choice.finish_reason == "stop" and "tool_calls" not in choice.message
    Receipt.model_validate_json(choice.message.content[0]["text"])


def test_dashscope_multimodal_tool_calls(sdk: Any) -> None:
    kwargs = {
        "model": SEED_MODEL,
        "messages": native_messages("Weather?"),
        "tools": [WEATHER, TIME],
        "tool_choice": "required",
        "max_tokens": ROOM,
        "seed": 6,
    }
    whole = sdk.MultiModalConversation.call(**kwargs)
    assert whole.status_code == HTTPStatus.OK, whole
    choice = whole.output.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == []
    check_calls(choice.message.tool_calls)
    assert [c["index"] for c in choice.message.tool_calls] == list(range(len(choice.message.tool_calls)))
    # Streamed, incremental or merged by the SDK (incremental_output=False: true on the wire, joined client-side).
    for incremental in (True, False):
        parts = list(sdk.MultiModalConversation.call(stream=True, incremental_output=incremental, **kwargs))
        assert all(p.status_code == HTTPStatus.OK for p in parts), parts
        last = parts[-1].output.choices[0]
        assert last.finish_reason == "tool_calls" and [c["function"] for c in last.message.tool_calls] == [
            c["function"] for c in choice.message.tool_calls
        ]


def test_dashscope_wire_streams_cumulative_and_incremental(server: Server) -> None:
    body = {
        "model": SEED_MODEL,
        "input": {"messages": native_messages()},
        "parameters": {"tools": [WEATHER], "tool_choice": "required", "max_tokens": ROOM, "seed": 7},
    }
    cumulative = events(post(server, NATIVE, body, stream=True))
    body["parameters"]["incremental_output"] = True
    incremental = events(post(server, NATIVE, body, stream=True))
    for stream in (cumulative, incremental):
        choices = [e["output"]["choices"][0] for e in stream]
        assert [c["finish_reason"] for c in choices][-1] == "tool_calls"
        assert all("tool_calls" not in c["message"] for c in choices[:-1])
        check_calls(choices[-1]["message"]["tool_calls"])
    assert cumulative[-1]["output"]["choices"][0]["message"]["tool_calls"][0]["index"] == 0


def test_dashscope_generation_tools_and_history(sdk: Any) -> None:
    kwargs = {
        "model": SEED_MODEL,
        "messages": [{"role": "user", "content": "What is the weather in Hangzhou?"}],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "result_format": "message",
        "max_tokens": ROOM,
    }
    r = sdk.Generation.call(**kwargs)
    assert r.status_code == HTTPStatus.OK, r
    message = r.output.choices[0].message
    assert r.output.choices[0].finish_reason == "tool_calls" and message.content == ""
    assert len(message.tool_calls) == 1
    check_calls(message.tool_calls, {"get_weather"})
    streamed = list(sdk.Generation.call(stream=True, incremental_output=True, **kwargs))
    assert streamed[-1].output.choices[0].finish_reason == "tool_calls"
    check_calls(streamed[-1].output.choices[0].message.tool_calls)

    result = {"role": "tool", "content": "Sunny.", "tool_call_id": message.tool_calls[0]["id"]}
    history = [*kwargs["messages"], {"role": "assistant", "content": "", "tool_calls": message.tool_calls}, result]
    after = sdk.Generation.call(model=SEED_MODEL, messages=history, result_format="message", max_tokens=4)
    assert after.status_code == HTTPStatus.OK, after
    assert after.output.choices[0].message.content


# -- LangChain's ChatTongyi: dashscope.Generation with tools ------------------------------------------------------


class GetWeather(BaseModel):
    """The forecast for a city."""

    model_config = ConfigDict(extra="forbid")
    city: Literal["Hangzhou", "Beijing"]
    days: int = Field(ge=1, le=7)


def test_chat_tongyi_bind_tools_and_structured_output(sdk: Any) -> None:
    from langchain_community.chat_models.tongyi import ChatTongyi
    from langchain_core.messages import HumanMessage

    options = {"model": SEED_MODEL, "dashscope_api_key": sdk.api_key, "max_retries": 1}
    question = [HumanMessage(content=[{"image": IMAGE}, {"text": "Weather where this was bought?"}])]
    llm = ChatTongyi(model_kwargs={"max_tokens": ROOM}, **options)
    answer = llm.bind_tools([GetWeather], tool_choice="required").invoke(question)
    assert answer.tool_calls and answer.response_metadata["finish_reason"] == "tool_calls", answer
    assert all(GetWeather.model_validate(c["args"]) for c in answer.tool_calls)
    streamed = ChatTongyi(streaming=True, model_kwargs={"max_tokens": ROOM}, **options)
    chunks = list(streamed.bind_tools([GetWeather], tool_choice="required").stream(question))
    joined = chunks[0]
    for chunk in chunks[1:]:
        joined += chunk
    assert joined.tool_calls and GetWeather.model_validate(joined.tool_calls[0]["args"])

    # with_structured_output binds the model as a tool and takes no tool_choice: "required" rides in
    # model_kwargs, so the answer is always the call.
    forced = ChatTongyi(model_kwargs={"max_tokens": ROOM, "tool_choice": "required"}, **options)
    receipt = forced.with_structured_output(Receipt).invoke(question)
    assert isinstance(receipt, Receipt)


# -- tool calls cut by max_tokens: the whole calls as calls, "length", never the raw format as text ------------

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}},  # room for one call in 64 tokens, not two
    "required": ["city"],
    "additionalProperties": False,
}
W = {"type": "function", "function": {"name": "w", "parameters": CITY}}
ASK = [{"role": "user", "content": "Weather in Hangzhou?"}]


def test_forced_calls_cut_by_length_keep_the_whole_ones(client: openai.OpenAI, sdk: Any) -> None:
    def ask(seed: int, **more: Any) -> Any:
        return client.chat.completions.create(
            model=SEED_MODEL, messages=ASK, tools=[W], tool_choice="required", max_tokens=64, seed=seed, **more
        )

    # Whether the random model begins a second call is up to its seed: find one that does (most do).
    for seed in range(12):
        whole = ask(seed)
        choice = whole.choices[0]
        calls = [c.model_dump() for c in choice.message.tool_calls or []]
        assert choice.message.content is None and calls, choice  # never the raw format as text
        assert all(c["function"]["name"] == "w" for c in calls)
        for c in calls:
            jsonschema.validate(json.loads(c["function"]["arguments"]), CITY)
        if choice.finish_reason == "length":
            break
        assert choice.finish_reason == "tool_calls", choice
    else:
        pytest.fail("no seed began a second call")
    chunks = [c for c in ask(seed, stream=True) if c.choices]
    streamed = [d.function.model_dump() for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert streamed == [c["function"] for c in calls] and chunks[-1].choices[0].finish_reason == "length"
    assert not any(c.choices[0].delta.content for c in chunks)

    # The native API, streamed and not: the same answer.
    native = {"model": SEED_MODEL, "messages": ASK, "tools": [W], "tool_choice": "required", "max_tokens": 64}
    native.update(seed=seed, result_format="message")
    for stream in (False, True):
        r = sdk.Generation.call(stream=stream, incremental_output=stream, **native)
        last = list(r)[-1] if stream else r
        assert last.status_code == HTTPStatus.OK, last
        answer = last.output.choices[0]
        assert answer.finish_reason == "length" and answer.message.content == "", answer
        assert [c["function"] for c in answer.message.tool_calls] == [c["function"] for c in calls]


def test_a_call_cut_before_it_is_whole_is_no_text(client: openai.OpenAI, sdk: Any) -> None:
    """Cut in the first call (forced, or begun under "auto"): no call, no text, "length"."""
    schema = {
        "type": "object",
        "properties": {"name": {"const": "w"}, "parameters": CITY},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }
    call_shape = {"type": "json_schema", "json_schema": {"name": "call", "schema": schema}}
    for fields in ({"tool_choice": "required"}, {"response_format": call_shape}):  # the schema begins a call
        for stream in (False, True):
            r = client.chat.completions.create(
                model=SEED_MODEL, messages=ASK, tools=[W], max_tokens=8, stream=stream, **fields
            )
            if stream:
                chunks = [c for c in r if c.choices]
                assert not any(c.choices[0].delta.content or c.choices[0].delta.tool_calls for c in chunks), chunks
                assert chunks[-1].choices[0].finish_reason == "length"
            else:
                message = r.choices[0].message
                assert r.choices[0].finish_reason == "length" and not message.content, r
                assert not message.tool_calls
        native = sdk.Generation.call(
            model=SEED_MODEL, messages=ASK, tools=[W], max_tokens=8, result_format="message", **fields
        )
        answer = native.output.choices[0]
        assert answer.finish_reason == "length" and answer.message.content == "", native
        assert "tool_calls" not in answer.message
