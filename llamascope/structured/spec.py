"""What a request asks of its answer's shape: ``response_format``, ``tools``, ``tool_choice``, ``parallel_tool_calls``.

``read_request`` turns the wire fields (the same in DashScope's ``parameters`` and in OpenAI's body) into an
``OutputSpec`` and refuses, with ``InvalidParameter`` naming the field, what cannot be served: a schema the grammar
library cannot compile, ``json_object`` without the word "json" in the messages, a tool whose parameters are not a
JSON Schema object, a ``tool_choice`` naming an unknown function. ``OutputSpec.grammar()`` then says which grammar,
if any, constrains decoding. Nothing here needs the model or its tokenizer: the surfaces call it before a request
is queued.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from llamascope.caching import SizedLRU
from llamascope.errors import ServiceError, invalid_parameter
from llamascope.structured.finite import has_finite_value
from llamascope.structured.meta import DATA_KEYWORDS as _DATA_KEYWORDS
from llamascope.structured.meta import NAMED as _NAMED
from llamascope.structured.meta import meta_problem

# OpenAI's rule for function and schema names.
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# JSON as people read it, and as Llama 3.1 writes its tool calls: one line, ", " and ": ". A flexible
# whitespace rule would let a weak model pad an answer with newlines until it runs out of tokens.
JSON_STYLE: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT: dict[str, Any] = {"type": "object"}
# Llama 3.1's JSON tool calls are one object; vLLM's llama3_json parser also takes several separated by ";".
PARALLEL_SEPARATOR = "; "
MAX_PARALLEL_CALLS = 8


@dataclass(frozen=True)
class GrammarSpec:
    """A grammar to compile: ``kind`` is "json_schema" (``source`` a schema) or "lark" (llguidance's Lark).

    ``key`` identifies the compiled grammar in the cache; ``field`` names the request field it came from, for
    the error if it cannot be compiled.
    """

    kind: Literal["json_schema", "lark"]
    source: str
    field: str = field(default="response_format", compare=False)

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.kind}\0{self.source}".encode()).hexdigest()

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any], field: str) -> GrammarSpec:
        return cls("json_schema", canonical_json(schema), field)

    def llguidance_grammar(self) -> str:
        """This grammar in llguidance's own form (cheap: compiling happens when a matcher is built)."""
        import llguidance  # why: only requests that ask for an answer's shape need it (see check_schema)

        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.source, overrides=JSON_STYLE)  # type: ignore[arg-type]
        return llguidance.LLMatcher.grammar_from_lark(self.source)


@dataclass(frozen=True)
class ResponseFormat:
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema: Mapping[str, Any] | None = None
    strict: bool = False
    schema_chars: int = field(default=0, compare=False)  # of the schema's JSON: counted in the request's bound


@dataclass(frozen=True)
class Tool:
    """A function the model may call; ``parameters`` is a JSON Schema of type object."""

    name: str
    parameters: Mapping[str, Any]
    description: str | None = None

    def to_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = dict(self.parameters)
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """``auto``, ``none``, ``required``, or ``function`` with the ``name`` of the one function to call."""

    mode: Literal["auto", "none", "required", "function"] = "auto"
    name: str | None = None


@dataclass(frozen=True)
class OutputSpec:
    """A request's wishes about the shape of its answer, checked."""

    response_format: ResponseFormat = ResponseFormat()
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    parallel_tool_calls: bool = True
    # Before the field names in a refusal made once the grammar is compiled ("parameters." natively), as
    # ``read_request``'s own refusals have it; not part of what is asked.
    prefix: str = field(default="", compare=False)

    @property
    def calls_tools(self) -> bool:
        """Whether the answer may be tool calls (the output is then parsed for them)."""
        return bool(self.tools) and self.tool_choice.mode != "none"

    @property
    def forces_tool_call(self) -> bool:
        """Whether the answer must be tool calls (the grammar makes it one; ``finish_reason`` "tool_calls")."""
        return bool(self.tools) and self.tool_choice.mode in ("required", "function")

    @property
    def most_calls(self) -> int:
        """How many calls an answer may make: one without ``parallel_tool_calls``, else ``MAX_PARALLEL_CALLS``."""
        return MAX_PARALLEL_CALLS if self.parallel_tool_calls else 1

    def offered_tools(self) -> tuple[Tool, ...]:
        """The tools the model is told of: all, or the one ``tool_choice`` names, or none for ``none``."""
        if not self.calls_tools:
            return ()
        if self.tool_choice.mode == "function":
            return tuple(t for t in self.tools if t.name == self.tool_choice.name)
        return self.tools

    def grammar(self) -> GrammarSpec | None:
        """The grammar that constrains decoding, or None for free text.

        A forced tool call wins over ``response_format``. With ``auto`` the model may answer or call a tool (the
        output is parsed for calls afterwards): with a ``response_format`` too, the grammar is either, the answer
        held to its format (held to the format alone, the model could never call a tool); without one, free text.
        """
        if self.forces_tool_call:
            return tool_call_grammar(
                self.offered_tools(), parallel=self.parallel_tool_calls, field=f"{self.prefix}tools"
            )
        fmt = self.response_format
        schema: Mapping[str, Any]
        if fmt.type == "json_object":
            schema, where = ANY_OBJECT, f"{self.prefix}response_format"
        elif fmt.type == "json_schema":
            assert fmt.schema is not None
            schema, where = fmt.schema, f"{self.prefix}response_format.json_schema.schema"
        else:
            return None
        if self.calls_tools:
            return tool_call_grammar(
                self.offered_tools(), parallel=self.parallel_tool_calls, field=where, answer=schema
            )
        return GrammarSpec.json_schema(schema, where)


def tool_call_grammar(
    tools: tuple[Tool, ...], *, parallel: bool, field: str = "tools", answer: Mapping[str, Any] | None = None
) -> GrammarSpec:
    """A grammar for one call of one of ``tools`` in the Llama 3.1 JSON format, or with ``parallel`` up to
    ``MAX_PARALLEL_CALLS`` of them separated by "; ": ``{"name": "...", "parameters": {...}}``, the
    parameters valid against the tool's schema. With ``answer`` (a JSON Schema), the calls or an answer of it."""
    alternatives = " | ".join(f"call_{i}" for i in range(len(tools)))
    separator = json.dumps(PARALLEL_SEPARATOR)
    calls = f"call ({separator} call){{0,{MAX_PARALLEL_CALLS - 1}}}" if parallel else "call"
    if answer is None:
        lines = [f"start: {calls}"]
    else:
        lines = ["start: calls | answer", f"calls: {calls}", f"answer: %json {canonical_json(answer_schema(answer))}"]
    lines.append(f"call: {alternatives}")
    for i, tool in enumerate(tools):
        lines.append(f"call_{i}: %json {canonical_json(call_schema(tool))}")
    return GrammarSpec("lark", "\n".join(lines), field)


def answer_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """``schema`` as a Lark grammar's ``%json`` takes it: in the JSON style a schema's own grammar is compiled in."""
    return {**schema, "x-guidance": JSON_STYLE}


def call_schema(tool: Tool) -> dict[str, Any]:
    """The JSON Schema of one call of ``tool``: its parameters' own ``$ref``s re-rooted under ``$defs``."""
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "parameters": {"$ref": "#/$defs/parameters"}},
        "required": ["name", "parameters"],
        "additionalProperties": False,
        "$defs": {"parameters": _reroot(tool.parameters, "#/$defs/parameters")},
        "x-guidance": JSON_STYLE,
    }


def _reroot(schema: Any, root: str) -> Any:
    """``schema`` with every JSON-pointer ``$ref`` ("#", "#/...") pointing into ``root`` instead of the top.

    Left as they are: a subschema with an ``$id`` of its own (at the top too), a resource whose references
    resolve against that ``$id`` wherever it is put; and a plain-name fragment ("#name", an ``$anchor``), which
    names a place in the same resource, not a path from its top."""
    if isinstance(schema, Mapping):
        if isinstance(schema.get("$id"), str):
            return schema
        out: dict[str, Any] = {}
        for key, value in schema.items():
            if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
                out[key] = root + value[1:]
            elif key in _DATA_KEYWORDS:
                out[key] = value
            else:
                out[key] = _reroot(value, root)
        return out
    if isinstance(schema, list):
        return [_reroot(item, root) for item in schema]
    return schema


def canonical_json(value: Any) -> str:
    """One line of JSON, keys in their given order: a schema's ``properties`` order is the answer's order."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def legacy_functions(functions: Any, function_call: Any) -> tuple[str, str] | None:
    """OpenAI's deprecated ``functions`` / ``function_call``, where a request uses them: (the field, the field to use
    instead); None for neither (no functions, or function_call "none", asks nothing). Refused on every surface."""
    if functions:
        return "functions", "tools"
    if function_call not in (None, "none"):
        return "function_call", "tool_choice"
    return None


def read_request(
    *,
    response_format: Any = None,
    tools: Any = None,
    tool_choice: Any = None,
    parallel_tool_calls: Any = None,
    functions: Any = None,
    function_call: Any = None,
    message_texts: Iterable[str] = (),
    prefix: str = "",
) -> OutputSpec:
    """The checked ``OutputSpec`` of a request's fields (each None when absent).

    ``message_texts`` are the texts of the request's messages (for ``json_object``'s "json" rule); ``prefix``
    goes before field names in messages ("parameters." for DashScope's native body). OpenAI's legacy
    ``functions`` and ``function_call`` are refused for ``tools`` and ``tool_choice``: answering as if they were
    heard (no call ever made) would mislead.
    """
    legacy = legacy_functions(functions, function_call)
    if legacy is not None:
        field, instead = legacy
        raise invalid_parameter(
            f"Parameter {prefix}{field}: the deprecated function calls are not supported; use {prefix}{instead}."
        )
    fmt = _response_format(response_format, prefix)
    if fmt.type == "json_object" and not any("json" in text.lower() for text in message_texts):
        raise invalid_parameter(
            f"'messages' must contain the word 'json' in some form, to use '{prefix}response_format' of type "
            "'json_object'."
        )
    tool_list = _tools(tools, prefix, MAX_SCHEMA_CHARS - fmt.schema_chars)
    choice = _tool_choice(tool_choice, tool_list, prefix)
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise _bad(prefix, "parallel_tool_calls", "expected a boolean")
    return OutputSpec(fmt, tool_list, choice, True if parallel_tool_calls is None else parallel_tool_calls, prefix)


def _bad(prefix: str, name: str, why: str) -> ServiceError:
    return invalid_parameter(f"Invalid value for '{prefix}{name}': {why}.")


def _response_format(value: Any, prefix: str) -> ResponseFormat:
    if value is None:
        return ResponseFormat()
    if not isinstance(value, Mapping) or not isinstance(value.get("type"), str):
        raise _bad(prefix, "response_format", 'expected an object with a "type"')
    kind = value["type"]
    if kind in ("text", "json_object"):
        return ResponseFormat(kind)
    if kind != "json_schema":
        raise _bad(prefix, "response_format.type", f"'{kind}' is not one of 'text', 'json_object', 'json_schema'")
    spec = value.get("json_schema")
    if not isinstance(spec, Mapping):
        raise _bad(prefix, "response_format.json_schema", "expected an object with a 'name' and a 'schema'")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise _bad(prefix, "response_format.json_schema.name", "expected a string of letters, digits, _ or -, 1 to 64")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _bad(prefix, "response_format.json_schema.strict", "expected a boolean")
    schema = spec.get("schema", ANY_OBJECT)
    chars = check_schema(schema, f"{prefix}response_format.json_schema.schema")
    return ResponseFormat("json_schema", name, schema, bool(strict), chars)


# A function given without "parameters" takes none (OpenAI: "omitting parameters defines a function with an empty
# parameter list"): its arguments are {}. Without additionalProperties false the grammar let the model add keys of
# its own, which the built-in model did until max_tokens, most forced calls of such a tool ending with no call.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


# OpenAI's own limit. Each tool goes into the prompt and the grammar: thousands held the event loop for seconds.
MAX_TOOLS = 128


def _tools(value: Any, prefix: str, budget: int) -> tuple[Tool, ...]:
    """The checked tools; ``budget`` the characters of JSON their parameters may have together (what
    ``response_format``'s schema left of ``MAX_SCHEMA_CHARS``)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _bad(prefix, "tools", "expected a list of tools")
    if len(value) > MAX_TOOLS:
        raise _bad(prefix, "tools", f"expected at most {MAX_TOOLS} tools; got {len(value)}")
    tools: list[Tool] = []
    for i, item in enumerate(value):
        at = f"tools[{i}]"
        if not isinstance(item, Mapping) or item.get("type", "function") != "function":
            raise _bad(prefix, f"{at}.type", "expected 'function'")
        function = item.get("function")
        if not isinstance(function, Mapping):
            raise _bad(prefix, f"{at}.function", "expected an object with a 'name'")
        name = function.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise _bad(prefix, f"{at}.function.name", "expected a string of letters, digits, _ or -, 1 to 64")
        if any(t.name == name for t in tools):
            raise _bad(prefix, f"{at}.function.name", f"the name '{name}' is given to two tools")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise _bad(prefix, f"{at}.function.description", "expected a string")
        parameters = function.get("parameters", NO_PARAMETERS)
        where = f"{prefix}{at}.function.parameters"
        if not isinstance(parameters, Mapping) or parameters.get("type") != "object":
            raise invalid_parameter(f"Invalid value for '{where}': expected a JSON Schema of type 'object'.")
        budget -= check_schema(parameters, where, budget)
        tools.append(Tool(name, parameters, description))
    return tuple(tools)


def _tool_choice(value: Any, tools: tuple[Tool, ...], prefix: str) -> ToolChoice:
    if value is None:
        return ToolChoice("auto")
    if value in ("auto", "none"):
        return ToolChoice(value)
    if value == "required":
        if not tools:
            raise _bad(prefix, "tool_choice", "'required' needs 'tools'")
        return ToolChoice("required")
    if isinstance(value, Mapping) and value.get("type", "function") == "function":
        function = value.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str):
            raise _bad(prefix, "tool_choice.function.name", "expected the name of a function in 'tools'")
        if not any(t.name == name for t in tools):
            raise _bad(prefix, "tool_choice.function.name", f"no function named '{name}' is in 'tools'")
        return ToolChoice("function", name)
    raise _bad(prefix, "tool_choice", "expected 'auto', 'none', 'required' or a function")


# What check_schema found for each schema seen lately (by its canonical JSON): the same tools and schemas come with
# every request of a program, and the meta-schema check alone costs milliseconds of the event loop.
SCHEMA_VERDICTS_BYTES = 8 << 20
_verdicts: SizedLRU[str, tuple[str, int]] = SizedLRU(SCHEMA_VERDICTS_BYTES, lambda verdict: verdict[1])


NESTED_TOO_DEEPLY = "the schema is nested too deeply."
# The most characters of a schema's JSON (as canonical_json writes it). llguidance reads a schema holding the GIL:
# 22 MB held every other request of the server 0.26 s (2 MB: 0.02 s), only to refuse it as "schema too large";
# an anyOf of 5,000 small objects, which it compiles, is 0.7 MB. OpenAI bounds a schema by its parts (5,000
# properties, 1,000 enum values, 120,000 characters of names and values) with much the same effect. It bounds a
# request's schemas together too (response_format's and every tool's parameters): each was checked by itself, and
# 10 tools of 640,000 characters that llguidance compiles (7 MB; a 32 MiB body holds 49) held a schema-check thread
# 6 s on two cores, four such requests every thread, only to be refused as too long a prompt. Within the bound the
# grammar of them all (a forced call of 128 tools, or of two just under half) compiles in 0.8 s.
MAX_SCHEMA_CHARS = 1_000_000


def check_schema(schema: Any, where: str, budget: int = MAX_SCHEMA_CHARS) -> int:
    """Refuse a schema that is not a JSON Schema, that the grammar library cannot compile, or that no finite
    JSON value satisfies (whose answers could never end), or whose JSON is over ``budget`` characters (what the
    request's schemas before it left of ``MAX_SCHEMA_CHARS``); else say how many characters its JSON has."""
    if not isinstance(schema, Mapping):
        raise invalid_parameter(f"Invalid value for '{where}': expected a JSON Schema object.")
    try:
        key = canonical_json(schema)
    except RecursionError:  # deeper than any request body is read: checked, not kept
        key = ""
    if len(key) > MAX_SCHEMA_CHARS:
        raise invalid_parameter(
            f"Invalid value for '{where}': the schema is too large ({len(key):,} characters of JSON; at most "
            f"{MAX_SCHEMA_CHARS:,})."
        )
    if len(key) > budget:
        raise invalid_parameter(
            f"Invalid value for '{where}': the request's schemas are too large together ({len(key):,} characters "
            f"of JSON here, {MAX_SCHEMA_CHARS - budget:,} in the ones before it; at most {MAX_SCHEMA_CHARS:,} in "
            "all)."
        )
    known = _verdicts.get(key) if key else None
    if known is None:
        verdict = _schema_verdict(schema, where)
        known = (verdict, sys.getsizeof(key) + sys.getsizeof(verdict))  # bytes: a character may take 4
        if key and verdict != NESTED_TOO_DEEPLY:  # that one depends on the stack's depth at the time: not kept
            _verdicts.put(key, known)
    if known[0]:
        raise invalid_parameter(f"Invalid value for '{where}': {known[0]}")
    return len(key)


def _schema_verdict(schema: Mapping[str, Any], where: str) -> str:
    """What is wrong with ``schema``, as the end of an error message, or "" if nothing is."""
    try:
        meta = meta_problem(schema)
        if meta:
            return f"not a JSON Schema ({meta})."
        problem = _inexact_bound(schema) or compile_problem(GrammarSpec.json_schema(schema, where))
        if not problem and not has_finite_value(schema):
            problem = "no JSON value satisfies it (a value would have to hold the schema again, without end)"
    except RecursionError:  # the checks recurse: a schema nested a few hundred deep is the caller's, not a 500
        return NESTED_TOO_DEEPLY
    return f"the schema cannot be used for decoding: {problem}" if problem else ""


# llguidance reads a schema's numbers as 64-bit floats, and an integer's bounds then as 64-bit integers, saturating:
# past 2**53 a number is not held exactly. Minimum 2**53 + 1 let 2**53 through, [1e30, 1e30 + 5] only 2**63 - 1, an
# integer const 2**64 gave 2**63 - 1 and a const 2**53 + 1 gave 2**53: answers that ended with "stop" yet broke the
# schema. And [-1e20, -1e19] crashed the process in its regex builder.
EXACT_BOUND = 2**53
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_VALUES = ("const", "enum")  # data the answer must equal: every number in them, at any depth


def _inexact_bound(schema: Mapping[str, Any]) -> str:
    """Why a number in ``schema`` (a JSON Schema, checked as one), a bound or a value of ``const`` or ``enum``,
    cannot be held, or "" if none is past ``EXACT_BOUND``. Walked with a stack, not recursion; "default" and
    "examples" are data the answer need not hold to."""
    stack: list[tuple[Any, str]] = [(schema, "")]  # a node, and the keyword of the values it is in ("" in schemas)
    while stack:
        node, within = stack.pop()
        if _is_number(node) and within and abs(node) > EXACT_BOUND:
            return f"{within} {node} is past what decoding holds exactly (2**53 = {EXACT_BOUND} either way)"
        if isinstance(node, Mapping):
            for key, value in node.items():
                if within:
                    stack.append((value, within))
                elif key in _NAMED and isinstance(value, Mapping):
                    stack.extend((subschema, "") for subschema in value.values())
                elif key in _BOUNDS or key in _VALUES:
                    stack.append((value, key))
                elif key not in _DATA_KEYWORDS:
                    stack.append((value, ""))
        elif isinstance(node, list):
            stack.extend((item, within) for item in node)
    return ""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def compile_problem(spec: GrammarSpec) -> str:
    """Why llguidance cannot compile ``spec`` (its first line), or "" if it can; no tokenizer needed."""
    try:
        grammar = spec.llguidance_grammar()
    except ValueError as e:
        return str(e).strip().splitlines()[0]
    import llguidance  # why: see check_schema

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return messages[0].strip().splitlines()[0] if is_error and messages else ""
