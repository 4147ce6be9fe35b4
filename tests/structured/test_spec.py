"""Reading and refusing a request's response_format, tools and tool_choice: each refusal names its field."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from typing import Any

import pytest

from llamascope.errors import ServiceError
from llamascope.structured import spec
from llamascope.structured.spec import GrammarSpec, check_schema, read_request

OBJECT = {"type": "object", "properties": {"a": {"type": "integer"}}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": OBJECT}}


def refusal(**fields: Any) -> str:
    with pytest.raises(ServiceError) as caught:
        read_request(**fields)
    assert (caught.value.status, caught.value.code) == (400, "InvalidParameter")
    return caught.value.message


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)a"}}},
                    },
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nothing"}}}},
            "response_format.json_schema.schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": OBJECT}}},
            "response_format.json_schema.name",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_object"}, "message_texts": ["Describe the image."]}, "response_format"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
            "tools[0].function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
            "tools[0].function.parameters",
        ),
        (
            {
                "tools": [
                    TOOL,
                    {
                        "type": "function",
                        "function": {"name": "g", "parameters": {"type": "object", "properties": {"a": {"type": 3}}}},
                    },
                ]
            },
            "tools[1].function.parameters",
        ),
        ({"tools": [TOOL, TOOL]}, "tools[1].function.name"),
        ({"tools": [TOOL] * 129}, "tools"),  # at most 128, as OpenAI
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "tool_choice.function.name",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
)
def test_refusals_name_the_field(fields: dict[str, Any], named: str) -> None:
    assert f"'{named}'" in refusal(**fields)


def test_a_schema_checked_before_is_refused_again_naming_the_new_field() -> None:
    """check_schema keeps its verdict per schema (the meta-schema check costs milliseconds): the same bad schema
    sent again, in another field, is refused again, naming that field."""
    bad = {"type": "object", "properties": {"a": {"type": 3}}}
    for _ in range(2):
        assert "'response_format.json_schema.schema'" in refusal(
            response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": bad}}
        )
        tool = {"type": "function", "function": {"name": "f", "parameters": bad}}
        assert "'parameters.tools[0].function.parameters': not a JSON Schema" in refusal(
            tools=[tool], prefix="parameters."
        )


def test_a_kept_verdict_counts_the_bytes_of_its_schema() -> None:
    """The verdicts' 8 MB bound is of memory: a schema of 4-byte characters counts 4 bytes each, not 1."""
    schema = {"type": "string", "description": "\U0001f409" * 10_000}
    before = spec._verdicts.total
    check_schema(schema, "s")
    assert spec._verdicts.total - before >= 40_000


def test_native_fields_are_named_with_their_prefix() -> None:
    message = refusal(response_format={"type": "json_object"}, message_texts=["hi"], prefix="parameters.")
    assert "'parameters.response_format'" in message and "json" in message


def test_what_each_request_is_constrained_by() -> None:
    assert read_request().grammar() is None
    assert read_request(response_format={"type": "text"}).grammar() is None
    json_object = read_request(response_format={"type": "json_object"}, message_texts=["Answer in JSON."]).grammar()
    assert json_object == GrammarSpec.json_schema({"type": "object"}, "response_format")
    schema = read_request(
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": OBJECT, "strict": True}}
    )
    assert schema.response_format.strict and schema.grammar() == GrammarSpec.json_schema(OBJECT, "x")
    auto = read_request(
        tools=[TOOL], response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": OBJECT}}
    )
    # auto: the answer held to its schema, or calls (test_tools: the grammar takes both)
    assert auto.calls_tools and not auto.forces_tool_call and auto.grammar().kind == "lark"  # type: ignore[union-attr]
    declined = read_request(
        tools=[TOOL],
        tool_choice="none",
        response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": OBJECT}},
    )
    assert declined.grammar() == schema.grammar()
    none = read_request(tools=[TOOL], tool_choice="none")
    assert not none.calls_tools and none.grammar() is None and none.offered_tools() == ()
    forced = read_request(tools=[TOOL], tool_choice="required", parallel_tool_calls=False)
    assert forced.forces_tool_call and forced.grammar() is not None and forced.grammar().kind == "lark"  # type: ignore[union-attr]
    no_parameters = read_request(tools=[{"type": "function", "function": {"name": "now"}}])
    assert no_parameters.tools[0].parameters == {"type": "object", "properties": {}, "additionalProperties": False}


@pytest.mark.parametrize(
    "schema",
    [
        # llguidance held these as 2**53 and 2**63 - 1: answers that ended with "stop" but broke the schema
        {"type": "integer", "minimum": 2**53 + 1, "maximum": 2**53 + 1},
        {"type": "integer", "minimum": 10**30, "maximum": 10**30 + 5},
        {"type": "object", "properties": {"n": {"type": "number", "exclusiveMaximum": -1e19}}},
        # and these as 2**63 - 1 and 2**53
        {"type": "integer", "const": 2**64},
        {"type": "object", "properties": {"n": {"enum": ["a", [2**53 + 1]]}}},
    ],
)
def test_a_bound_decoding_cannot_hold_exactly_is_refused(schema: dict[str, Any]) -> None:
    message = refusal(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert "'response_format.json_schema.schema'" in message and "2**53" in message


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "pattern": "^a{4294967296}$"},
        {"type": "object", "patternProperties": {"^x{1,99999999999}$": {"type": "integer"}}},
    ],
)
@pytest.mark.parametrize("dialect", [{}, {"$schema": "http://json-schema.org/draft-03/schema#"}])
def test_a_pattern_re_cannot_compile_is_refused_as_no_json_schema(
    schema: dict[str, Any], dialect: dict[str, Any]
) -> None:
    """re raises OverflowError, not re.error, for a repetition past 2**32 - 1: it went through as a 500 (and
    again in draft 3, still checked by jsonschema, once the others were jsonschema_rs's)."""
    parameters = {**dialect, "type": "object", "properties": {"p": schema}}
    message = refusal(tools=[{"type": "function", "function": {"name": "f", "parameters": parameters}}])
    assert "'tools[0].function.parameters': not a JSON Schema" in message and "pattern" in message, message


@pytest.mark.parametrize("dialect", [5, True, ["https://json-schema.org/draft/2020-12/schema"], {}])
def test_a_schema_whose_dialect_is_no_string_is_refused(dialect: object) -> None:
    """jsonschema's validator_for looks "$schema" up as a URI: a number raised AttributeError, a list TypeError."""
    schema = {"$schema": dialect, "type": "object"}
    message = refusal(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert "'response_format.json_schema.schema': not a JSON Schema ($schema" in message, message


DRAFT_07 = "http://json-schema.org/draft-07/schema#"
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"


def schema_refusal(schema: dict[str, Any]) -> str:
    return refusal(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})


def test_a_meta_schema_refusal_says_where_in_the_schema() -> None:
    """jsonschema_rs's error names the place (jsonschema's said only "-1 is less than the minimum of 0")."""
    message = schema_refusal({"type": "object", "properties": {"a": {"type": "string", "minLength": -1}}})
    assert 'not a JSON Schema (-1 is less than the minimum of 0 at schema["properties"]["a"]["minLength"])' in message


def test_a_schema_is_checked_against_its_own_dialect() -> None:
    """A list of schemas under "items" is draft 7's tuple form, and no schema under 2020-12 (the default)."""
    tuple_items = {"type": "array", "items": [{"type": "string"}]}
    check_schema({"$schema": DRAFT_07, **tuple_items}, "s")
    for dialect in ({"$schema": DRAFT_2020_12}, {}):
        message = schema_refusal({**dialect, **tuple_items})
        assert 'not a JSON Schema ([{"type":"string"}] is not of types "boolean", "object" at schema["items"])' in (
            message
        ), message


def test_a_schema_of_an_unknown_dialect_is_refused_and_its_uri_never_fetched() -> None:
    """jsonschema_rs would fetch an unknown "$schema" URI (a ReferencingError: a 500, and a request the server
    makes for its caller); the check reads it as 2020-12, as jsonschema did, and the grammar library refuses it."""
    unknown = "http://127.0.0.1:9/meta-schema"  # the discard port: a fetch would fail
    assert 'is not of types "boolean", "object" at schema["items"])' in schema_refusal(
        {"$schema": unknown, "items": [{"type": "string"}]}
    )
    message = schema_refusal({"$schema": unknown, "type": "object"})
    assert f"the schema cannot be used for decoding: Resource '{unknown}' is not present" in message, message


NO_FETCH = """
import json, sys
from llamascope.errors import ServiceError
from llamascope.structured.spec import check_schema
for schema in json.loads(sys.argv[1]):
    try:
        check_schema(schema, "s")
        print("taken")
    except ServiceError as e:
        print(e.status, e.message)
"""


@pytest.mark.parametrize(
    "schema",
    [
        # jsonschema knows the dialect (it reads the scheme in any case); jsonschema_rs fetched it from
        # json-schema.org, and its ReferencingError was a 500
        {"$schema": "HTTP://json-schema.org/draft-07/schema#", "type": "object"},
        {"$schema": "Https://json-schema.org/draft/2020-12/schema", "type": "object"},
        {"$schema": "https://example.com/meta", "type": "object"},
        {"type": "object", "properties": {"a": {"$ref": "https://example.com/x.json"}}},
        {"$id": "http://example.com/root.json", "type": "object", "properties": {"a": {"$ref": "item.json"}}},
    ],
)
def test_no_schema_makes_the_server_fetch_anything(schema: dict[str, Any]) -> None:
    """Every HTTP client the checks could use (jsonschema_rs's, llguidance's) is sent through a proxy on loopback
    that counts what reaches it: nothing may, and the schema is taken or refused with a 400, never a 500."""
    hits: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as proxy:
        proxy.settimeout(0.2)

        def count() -> None:
            while not done.is_set():
                try:
                    connection, _ = proxy.accept()
                except TimeoutError:
                    continue
                with connection:
                    hits.append(connection.recv(200))

        done = threading.Event()
        counter = threading.Thread(target=count)
        counter.start()
        url = f"http://127.0.0.1:{proxy.getsockname()[1]}"
        env = {key: value for key, value in os.environ.items() if key.lower() != "no_proxy"}
        env.update(HTTP_PROXY=url, HTTPS_PROXY=url, ALL_PROXY=url, http_proxy=url, https_proxy=url, all_proxy=url)
        try:
            run = subprocess.run(
                [sys.executable, "-c", NO_FETCH, json.dumps([schema])], env=env, capture_output=True, text=True
            )
        finally:
            done.set()
            counter.join()
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(("taken", "400 ")), run.stdout
    assert hits == []


def test_a_pattern_that_is_no_regular_expression_is_refused_and_data_is_not_a_pattern() -> None:
    """The meta-schemas' "format": "regex" is not asserted by jsonschema_rs: patterns are compiled with re, as
    jsonschema did; a "pattern" key in const or enum data, or a property named "pattern", is none."""
    message = schema_refusal({"type": "object", "patternProperties": {"(unclosed": {"type": "string"}}})
    assert "not a JSON Schema (the pattern '(unclosed' is not a regular expression" in message, message
    message = schema_refusal({"type": "object", "properties": {"a": {"type": "string", "pattern": "[z-a]"}}})
    assert "the pattern '[z-a]' is not a regular expression" in message, message
    check_schema(
        {
            "type": "object",
            "properties": {"pattern": {"type": "string"}, "b": {"const": {"pattern": "(unclosed"}}},
        },
        "s",
    )


def test_a_schema_past_the_size_bound_is_refused_before_it_is_read() -> None:
    """llguidance reads a schema holding the GIL (22 MB: every other request held 0.26 s); the bound is of its
    JSON's characters, a description's count too, and the one just within it is taken."""
    padding = len(spec.canonical_json({"type": "string", "description": ""}))
    within = {"type": "string", "description": "d" * (spec.MAX_SCHEMA_CHARS - padding)}
    check_schema(within, "s")
    message = refusal(
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "parameters": {
                        "type": "object",
                        "properties": {"a": {**within, "description": within["description"] + "d"}},
                    },
                },
            }
        ]
    )
    assert "'tools[0].function.parameters': the schema is too large (" in message, message
    assert "characters of JSON; at most 1,000,000)" in message, message


def padded(chars: int) -> dict[str, Any]:
    """A tool's parameters whose JSON has ``chars`` characters."""
    empty = {"type": "object", "description": ""}
    return {**empty, "description": "d" * (chars - len(spec.canonical_json(empty)))}


def test_the_size_bound_is_of_a_requests_schemas_together() -> None:
    """Each schema was bounded by itself: 10 tools of 640,000 characters (7 MB) held a schema-check thread 6 s,
    only to be refused as too long a prompt. The bound is of all of a request's schemas, the
    response_format's and every tool's parameters; the refusal names the one past it."""

    def tools(*sizes: int) -> list[dict[str, Any]]:
        return [
            {"type": "function", "function": {"name": f"f{i}", "parameters": padded(n)}} for i, n in enumerate(sizes)
        ]

    half = spec.MAX_SCHEMA_CHARS // 2
    assert len(read_request(tools=tools(half, half)).tools) == 2  # just within, together
    message = refusal(tools=tools(half, half, 1_000)[::-1])
    assert "'tools[2].function.parameters': the request's schemas are too large together (500,000 characters" in (
        message
    ), message
    assert "1,000 in the ones before it; at most 1,000,000 in all)" in message, message
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": padded(600_000)}}
    message = refusal(response_format=response_format, tools=tools(400_001))
    assert "'tools[0].function.parameters': the request's schemas are too large together" in message, message
    message = refusal(response_format=response_format, tools=tools(400_001), prefix="parameters.")
    assert "'parameters.tools[0].function.parameters'" in message, message
    assert read_request(response_format=response_format, tools=tools(400_000)).response_format.schema_chars == 600_000


def test_bounds_within_reach_and_data_named_like_bounds_are_taken() -> None:
    check_schema({"type": "integer", "minimum": -(2**53), "maximum": 2**53}, "s")
    check_schema({"type": "object", "properties": {"minimum": {"type": "integer"}}, "default": {"minimum": 1e30}}, "s")
    check_schema({"type": "object", "properties": {"enum": {"type": "string", "x-limit": 2**60}}}, "s")
    check_schema({"enum": [2**53, -(2**53), {"n": 1.5}]}, "s")


def test_a_bound_that_crashed_the_grammar_library_is_refused_and_the_process_lives() -> None:
    """[-1e20, -1e19] (both saturating to -2**63) crashed llguidance's regex builder with a segmentation fault,
    taking the server down with it: checked in a process of its own, so that the crash fails only this test."""
    code = (
        "from llamascope.errors import ServiceError\n"
        "from llamascope.structured.spec import check_schema\n"
        "try:\n"
        "    schema = {'type': 'integer', 'minimum': -10**20, 'maximum': -10**19}\n"
        "    check_schema(schema, 'tools[0].function.parameters')\n"
        "except ServiceError as e:\n"
        "    print(e.status, e.message)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("400 ") and "'tools[0].function.parameters'" in done.stdout
