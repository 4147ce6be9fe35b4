"""Tool calls: forced by the grammar (whatever the weights), read from free answers, streamed."""

from __future__ import annotations

import json
import zlib

import jsonschema
import pytest

from llamascope.structured.compiler import GrammarCache
from llamascope.structured.guidance import GuidanceBackend
from llamascope.structured.spec import read_request
from llamascope.structured.tools import Answer, CallStream, call_text, parse_answer, tools_prompt
from tests.structured.decoding import random_decode

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Hangzhou", "Beijing"]}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
RECEIPT = {
    "type": "function",
    "function": {
        "name": "save_receipt",
        "parameters": {
            "$defs": {"money": {"type": "integer", "minimum": 0, "maximum": 9999}},
            "type": "object",
            "properties": {"total": {"$ref": "#/$defs/money"}, "tip": {"$ref": "#/$defs/money"}},
            "required": ["total"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, RECEIPT]


def test_a_forced_call_of_a_function_without_parameters_has_empty_arguments(
    backend: GuidanceBackend, grammars: GrammarCache
) -> None:
    """A tool given without "parameters" takes none: its arguments are {}, never keys the model made up (the
    default schema let them in, and on random weights most calls ran to max_tokens adding them)."""
    spec = read_request(tools=[{"type": "function", "function": {"name": "now"}}], tool_choice="required")
    grammar_spec = spec.grammar()
    assert grammar_spec is not None
    grammar = grammars.get_blocking(grammar_spec)
    rows, _ = random_decode(backend, [grammar] * 12, 7, 200, torch_path=False)
    for row in rows:
        text = backend.decode(row.tokens)
        assert row.finish_reason == "stop", text
        answer = parse_answer(text, spec.tools)
        assert answer.calls and {call.arguments for call in answer.calls} == {"{}"}, text


@pytest.mark.parametrize(
    ("choice", "parallel"),
    [("required", False), ("required", True), ({"type": "function", "function": {"name": "save_receipt"}}, False)],
)
def test_forced_calls_parse_and_validate(
    choice: object, parallel: bool, backend: GuidanceBackend, grammars: GrammarCache
) -> None:
    spec = read_request(tools=TOOLS, tool_choice=choice, parallel_tool_calls=parallel)
    grammar_spec = spec.grammar()
    assert grammar_spec is not None and spec.forces_tool_call
    grammar = grammars.get_blocking(grammar_spec)
    rows, _ = random_decode(backend, [grammar] * 20, zlib.crc32(repr(choice).encode()), 200, torch_path=False)
    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    allowed = {t.name for t in spec.offered_tools()}
    counts = set()
    for row in rows:
        text = backend.decode(row.tokens)
        if row.finish_reason == "length":
            assert grammar.accepts_prefix(row.tokens), text
            continue
        answer = parse_answer(text, spec.tools)
        assert answer.calls and answer.finish_reason == "tool_calls", text
        counts.add(len(answer.calls))
        for call in answer.calls:
            assert call.name in allowed and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.arguments), parameters[call.name])
    assert counts and (max(counts) > 1) == parallel


VERDICT = {
    "type": "object",
    "properties": {"verdict": {"enum": ["yes", "no"]}},
    "required": ["verdict"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("response_format", "schema"),
    [
        ({"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT}}, VERDICT),
        ({"type": "json_object"}, {"type": "object"}),
    ],
    ids=["json_schema", "json_object"],
)
def test_auto_with_a_response_format_may_call_or_answer(
    response_format: dict, schema: dict, backend: GuidanceBackend, grammars: GrammarCache
) -> None:
    """tool_choice "auto" with a response_format, as agents ask ("call tools as you need, then answer in this
    shape"): the grammar holds the answer to its format, but lets the model call tools instead. Held to the
    answer's format alone, it could never call one (a call, or two, is no answer of that schema)."""
    spec = read_request(tools=TOOLS, response_format=response_format, message_texts=["Answer in JSON."])
    grammar_spec = spec.grammar()
    assert grammar_spec is not None and spec.calls_tools and not spec.forces_tool_call
    grammar = grammars.get_blocking(grammar_spec)
    tokens = backend.tokenizer.tokenize_str
    call = '{"name": "get_weather", "parameters": {"city": "Beijing"}}'
    assert grammar.accepts(tokens(call)) and grammar.accepts(tokens(f"{call}; {call}"))
    assert grammar.accepts(tokens('{"verdict": "yes"}'))
    assert not grammar.accepts(tokens("yes"))
    assert not grammar.accepts(tokens('{"name": "get_weather", "parameters": {"city": "Paris"}}; 1'))

    rows, _ = random_decode(backend, [grammar] * 30, zlib.crc32(repr(response_format).encode()), 200, torch_path=False)
    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    kinds = set()
    for row in rows:
        text = backend.decode(row.tokens)
        if row.finish_reason == "length":
            assert grammar.accepts_prefix(row.tokens), text
            continue
        answer = parse_answer(text, spec.tools)
        kinds.add("calls" if answer.calls else "answer")
        for made in answer.calls:
            jsonschema.validate(json.loads(made.arguments), parameters[made.name])
        if not answer.calls:
            jsonschema.validate(json.loads(text), schema)
    assert "answer" in kinds and ("calls" in kinds or response_format["type"] == "json_object"), kinds


def test_auto_answers_are_read_like_vllms_llama3_json() -> None:
    spec = read_request(tools=TOOLS)
    one = parse_answer('{"name": "get_weather", "parameters": {"city": "Hangzhou"}}', spec.tools)
    assert [(c.name, json.loads(c.arguments)) for c in one.calls] == [("get_weather", {"city": "Hangzhou"})]
    two = parse_answer(
        '<|python_tag|>{"name": "get_weather", "arguments": {}}; {"name": "save_receipt", "parameters": {"total": 3}}',
        spec.tools,
    )
    assert [c.name for c in two.calls] == ["get_weather", "save_receipt"] and two.text == ""
    for text in (
        "It is sunny.",
        '{"name": "unknown", "parameters": {}}',
        '{"name": "get_weather"',
        '{"a": 1} and more',
    ):
        assert parse_answer(text, spec.tools) == parse_answer(text, spec.tools).__class__(text)
    call = one.calls[0].to_openai(index=0)
    assert call["type"] == "function" and call["index"] == 0 and isinstance(call["function"]["arguments"], str)


def test_a_calls_arguments_are_the_models_own_json() -> None:
    """Not parsed and written again: 1e999 would come back as Infinity (no JSON), 0.10 as 0.1."""
    spec = read_request(tools=TOOLS)
    text = '{"parameters": {"total": 1e999, "tip": 0.10,\n "note": "\\u00e9"}, "name": "save_receipt"}; '
    answer = parse_answer(text + '{"name": "get_weather", "arguments": {"city": "Beijing"}}', spec.tools)
    assert [c.arguments for c in answer.calls] == [
        '{"total": 1e999, "tip": 0.10,\n "note": "\\u00e9"}',
        '{"city": "Beijing"}',
    ]
    # NaN and Infinity, which Python's decoder takes, are no JSON: such an answer is text, not a call
    for constant in ("NaN", "Infinity", "-Infinity"):
        text = '{"name": "get_weather", "parameters": {"city": ' + constant + "}}"
        assert parse_answer(text, spec.tools) == Answer(text)


def test_an_answer_under_auto_makes_no_more_calls_than_the_request_allows() -> None:
    """Under "auto" no grammar holds the answer (free text, read for calls once made, as the engine's CallStream
    does): a model that writes two calls where parallel_tool_calls is false, or more than 8, gives its first."""
    call = '{"name": "get_weather", "parameters": {"city": "Hangzhou"}}'
    other = '{"name": "save_receipt", "parameters": {"total": 3}}'
    single = read_request(tools=TOOLS, parallel_tool_calls=False)
    stream = CallStream(single.offered_tools(), forced=single.forces_tool_call, most=single.most_calls)
    assert stream.push(f"{call}; {other}") == ""
    held, answer = stream.finish()
    assert held == "" and [c.name for c in answer.calls] == ["get_weather"] and answer.finish_reason == "tool_calls"
    # Cut in a second call it may not make: the one it may is whole.
    stream = CallStream(single.offered_tools(), most=single.most_calls)
    stream.push(f'{call}; {{"name": "save_rec')
    _, whole = stream.finish(cut=True)
    assert [c.name for c in whole.calls] == ["get_weather"] and not whole.cut and whole.finish_reason == "tool_calls"
    many = read_request(tools=TOOLS)
    stream = CallStream(many.offered_tools(), most=many.most_calls)
    stream.push("; ".join([call] * 10))
    assert len(stream.finish()[1].calls) == 8


def test_an_answer_cut_short_keeps_its_whole_calls() -> None:
    spec = read_request(tools=TOOLS)
    one = '{"name": "get_weather", "parameters": {"city": "Hangzhou"}}'
    for rest in ("; ", '; {"name": "save_re', '; {"na', ";{"):
        answer = parse_answer(one + rest, spec.tools, cut=True)
        assert answer.text == "" and [c.name for c in answer.calls] == ["get_weather"], rest
    first = parse_answer('<|python_tag|>{"name": "get_weather", "parameters": {"ci', spec.tools, cut=True)
    assert first.is_calls and first.cut and not first.calls and first.finish_reason is None
    for text in ('{"a": 1', '{"name": "get_time", "p', '{"name": "unknown"', one + "; more"):  # not calls: text
        assert parse_answer(text, spec.tools, cut=True) == Answer(text), text
    assert parse_answer(one + '; {"na', spec.tools) == Answer(one + '; {"na')  # not cut: a malformed answer
    stream = CallStream(spec.tools, forced=True)
    stream.push('{"name": "save_receipt", "parameters": {"tot')
    held, answer = stream.finish(cut=True)
    assert held == "" and answer.cut and not answer.calls


def test_a_stream_lets_text_through_and_holds_calls_back() -> None:
    spec = read_request(tools=TOOLS)
    text = CallStream(spec.tools)
    assert [text.push(d) for d in (" ", "It is", " sunny")] == ["", " It is", " sunny"]
    assert text.finish()[0] == "" and not text.finish()[1].calls
    call = CallStream(spec.tools)
    assert [call.push(d) for d in ('{"name": "get_weather", ', '"parameters": {"city": "Beijing"}}')] == ["", ""]
    held, answer = call.finish()
    assert held == "" and answer.calls[0].name == "get_weather"
    not_a_call = CallStream(spec.tools)
    not_a_call.push('{"just": "json"}')
    assert not_a_call.finish() == ('{"just": "json"}', parse_answer('{"just": "json"}', spec.tools))
    # "<" may begin <|python_tag|>: held only until it cannot (it held an answer of HTML to its end)
    tag_like = CallStream(spec.tools)
    assert [tag_like.push(d) for d in ("<", "|py", "thon>1</", "b> text")] == ["", "", "<|python>1</", "b> text"]
    assert tag_like.finish() == ("", parse_answer("<|python>1</b> text", spec.tools))


def test_calls_and_tools_go_back_into_the_prompt() -> None:
    spec = read_request(tools=[WEATHER])
    history = [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Hangzhou"}'}}
    ]
    assert call_text(history) == '{"name": "get_weather", "parameters": {"city": "Hangzhou"}}'
    prompt = tools_prompt(spec.tools)
    assert '"name": "get_weather"' in prompt and prompt.startswith("Given the following functions")
