"""Whether a finished answer keeps the shape its request asked for (what an upstream engine's answers are held to)."""

from __future__ import annotations

import pytest

from llamascope.structured.conformance import breach
from llamascope.structured.spec import read_request
from llamascope.structured.tools import ToolCall

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
WEATHER = {
    "type": "function",
    "function": {
        "name": "w",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}


@pytest.mark.parametrize(
    ("fields", "text", "calls", "said"),
    [
        ({"response_format": JSON_SCHEMA}, '{"n": 3}', (), None),
        ({"response_format": JSON_SCHEMA}, "Three.", (), "its answer is not JSON"),
        (
            {"response_format": JSON_SCHEMA},
            '{"n": "3"}',
            (),
            "its answer is not as the schema says: '3' is not of type 'integer'",
        ),
        ({"response_format": {"type": "json_object"}}, "[1]", (), "its answer is not a JSON object"),
        ({"response_format": {"type": "text"}}, "Three.", (), None),
        ({"tools": [WEATHER]}, "It is sunny.", (), None),  # auto: text is an answer
        # Python's decoder takes NaN and Infinity; JSON has neither (JSON.parse, Go refuse them)
        ({"tools": [WEATHER]}, "", (ToolCall("w", '{"city": NaN}'),), "the arguments of its call of 'w' are not JSON"),
        ({"response_format": {"type": "json_object"}}, '{"n": Infinity}', (), "its answer is not JSON"),
        (
            {"tools": [WEATHER], "tool_choice": "required"},
            "It is sunny.",
            (),
            "it answered in text, though a tool call was required",
        ),
        ({"tools": [WEATHER]}, "", [ToolCall("w", '{"city": "Paris"}')], None),
        (
            {"tools": [WEATHER]},
            "",
            [ToolCall("launch", "{}")],
            "it called 'launch', which is not a function it was offered",
        ),
        ({}, "", [ToolCall("w", '{"city": "Paris"}')], "it called 'w', which is not a function it was offered"),
        (
            {"tools": [WEATHER], "tool_choice": "none"},
            "",
            [ToolCall("w", '{"city": "Paris"}')],
            "not a function it was offered",
        ),
        ({"tools": [WEATHER]}, "", [ToolCall("w", "not json")], "the arguments of its call of 'w' are not JSON"),
        ({"tools": [WEATHER]}, "", [ToolCall("w", "{}")], "are not as the schema says: 'city' is a required property"),
        (
            {"tools": [WEATHER], "parallel_tool_calls": False},
            "",
            [ToolCall("w", '{"city": "Paris"}'), ToolCall("w", '{"city": "Rome"}')],
            "it made 2 calls, though parallel_tool_calls is false",
        ),
    ],
)
def test_what_breaks_the_shape_asked_for(fields: dict, text: str, calls: list[ToolCall], said: str | None) -> None:
    problem = breach(read_request(**fields, message_texts=["json"]), text, calls)
    assert problem == said if said is None else said in (problem or "")
