"""Tool calls in Llama 3.1's JSON format, read out of an answer and written back into a prompt.

The model calls a function by answering ``{"name": "get_weather", "parameters": {"city": "Hangzhou"}}`` (Meta's
prompt format for JSON-based tool calling, which Llama 3.2 Vision shares); with parallel calls, several such
objects separated by ";" (as vLLM's ``llama3_json`` parser reads them). ``parse_answer`` splits an answer into
text and OpenAI-shaped calls (an answer cut short keeps its whole calls and drops the one cut); ``CallStream`` does
it for a streamed answer; ``tools_prompt``, ``call_text`` and
``TOOL_RESULT_ROLE`` say how tools, calls and results go into the chat template.
"""

from __future__ import annotations

import json
import json.scanner
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from llamascope.structured.spec import MAX_PARALLEL_CALLS, PARALLEL_SEPARATOR, Tool

# The special token Llama 3.1 may put before a call (for its built-in tools); vLLM's parser skips it too.
PYTHON_TAG = "<|python_tag|>"
# Meta's template renders a tool's result in an "ipython" turn.
TOOL_RESULT_ROLE = "ipython"


def call_id() -> str:
    """An id for a tool call, as OpenAI's look: "call_" and 24 hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str = field(default_factory=call_id)

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        """The call as OpenAI and DashScope write it in ``message.tool_calls`` (with ``index`` in a stream)."""
        out: dict[str, Any] = {} if index is None else {"index": index}
        out.update({"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}})
        return out


@dataclass(frozen=True)
class Answer:
    """An answer read for tool calls: either calls (``calls``, no text) or ``text``.

    ``cut``: the answer was calls but was cut short (by ``max_tokens``) in the middle of one; that call's
    arguments are not JSON yet, so it is dropped and ``calls`` holds those before it (maybe none).
    """

    text: str
    calls: tuple[ToolCall, ...] = ()
    cut: bool = False

    @property
    def is_calls(self) -> bool:
        """Whether the answer is tool calls (then it has no text), whole or cut short."""
        return bool(self.calls) or self.cut

    @property
    def finish_reason(self) -> str | None:
        """ "tool_calls" when the answer is calls, none cut; otherwise the engine's own reason stands."""
        return "tool_calls" if self.calls and not self.cut else None


# How a call begins, up to its function's name (and the quote closing it, if it came).
_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"([^"]*)(")?')
# What is shorter than that: a prefix of '{"name": "'.
_SHORT_HEAD = re.compile(r'\{\s*(?:"(?:n(?:a(?:m(?:e(?:"\s*(?::\s*)?)?)?)?)?)?)?')


def parse_answer(text: str, tools: Iterable[Tool], *, cut: bool = False, most: int = MAX_PARALLEL_CALLS) -> Answer:
    """The tool calls in ``text`` if it is nothing but calls of known tools, else ``text`` as it is.

    Like vLLM's ``llama3_json`` parser: the answer (after an optional ``<|python_tag|>``) is one JSON object or
    several separated by ";", each with a "name" and its "parameters" (or "arguments") as an object. With
    ``cut`` (the answer ran out of tokens), the last of them may be the beginning of a call of a known tool: the
    answer is then the calls before it, ``Answer.cut``. An answer of more than ``most`` calls (an unconstrained
    one, under "auto") keeps its first ``most``: the request allows no more (``parallel_tool_calls``); cut
    after them, it is whole.
    """
    names = {t.name for t in tools}
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG) :].lstrip()
    if not body.startswith("{"):
        return Answer(text)
    decoder = STRICT_JSON
    calls: list[ToolCall] = []
    at = 0
    while at < len(body):
        begun = at
        try:
            value, at = decoder.raw_decode(body, at)
        except ValueError:  # not JSON (NaN and Infinity included: ``STRICT_JSON``)
            if cut and _begins_call(body[at:], names):
                return Answer("", tuple(calls[:most]), cut=len(calls) < most)
            return Answer(text)
        call = _call(value, names, body[begun:at], decoder)
        if call is None:
            return Answer(text)
        calls.append(call)
        at = _skip(body, at)
        if at < len(body):
            if body[at] != ";":
                return Answer(text)
            at = _skip(body, at + 1)
    return Answer("", tuple(calls[:most]))


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


# JSON as RFC 8259 has it: Python's decoder also takes NaN, Infinity and -Infinity, which a call's arguments, passed
# on as written, must not hold (JSON.parse, Go and the other SDKs' decoders refuse them).
STRICT_JSON = json.JSONDecoder(parse_constant=_not_json)


def _begins_call(text: str, names: set[str]) -> bool:
    """Whether ``text`` (not yet JSON) may be the beginning of a call of one of the functions ``names``."""
    head = _CALL_HEAD.match(text)
    if head is None:
        return _SHORT_HEAD.fullmatch(text) is not None
    name, closed = head.groups()
    return name in names if closed else any(n.startswith(name) for n in names)


def _call(value: Any, names: set[str], written: str, decoder: json.JSONDecoder) -> ToolCall | None:
    """The call ``value`` (parsed from ``written``) makes, its arguments the text the model wrote for them."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    key = "parameters" if "parameters" in value else "arguments"
    if not isinstance(value.get(key), dict):
        return None
    return ToolCall(value["name"], _member_texts(written, decoder)[key])


def _member_texts(written: str, decoder: json.JSONDecoder) -> dict[str, str]:
    """Each member's value in ``written`` (a JSON object's text) as written, the last of a repeated name winning,
    as in ``json.loads``.

    Why by hand: the json module gives values, not where they are written, and a value written again is not the
    model's: a number past a float's range (1e999) would come back as ``Infinity``, which is no JSON.
    """
    # a value at an index: (the value, the index past its text); typeshed types the decoder it takes wrongly
    scan = json.scanner.make_scanner(decoder)  # type: ignore[arg-type]
    out: dict[str, str] = {}
    at = _skip(written, 1)  # past "{"
    while written[at] == '"':
        name, at = scan(written, at)
        at = _skip(written, _skip(written, at) + 1)  # past ":"
        _, end = scan(written, at)
        out[name] = written[at:end]
        at = _skip(written, end)
        if written[at] == ",":
            at = _skip(written, at + 1)
    return out


def _skip(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


class CallStream:
    """A streamed answer that may be tool calls: text is let through as soon as it cannot be a call, held back
    while it may be one.

    ``push(delta)`` returns the text to send now; ``finish(cut)`` returns the held-back text to send (when it was
    not a call after all) and the answer (``cut``: the answer ran out of tokens, see ``parse_answer``). A forced
    call (``forced``) is always held back and always calls. The calls go out whole, one delta each:
    ``ToolCall.to_openai(index)``, which the OpenAI SDKs and DashScope's incremental mode join as they do any
    ``tool_calls`` delta.
    """

    def __init__(self, tools: Iterable[Tool], forced: bool = False, most: int = MAX_PARALLEL_CALLS) -> None:
        self.tools = tuple(tools)
        self.forced = forced
        self.most = most  # calls an answer may make (OutputSpec.most_calls)
        self._text = ""
        self._holding: bool | None = True if forced else None  # None: not yet known

    def push(self, delta: str) -> str:
        self._text += delta
        if self._holding is False:
            return delta
        if self._holding:  # forced, or begun as a call ("{", the whole tag): held to the end
            return ""
        head = self._text.lstrip()
        if not head or (len(head) < len(PYTHON_TAG) and PYTHON_TAG.startswith(head)):
            return ""  # may still become the tag: decided when it is whole or has parted from it
        self._holding = head.startswith("{") or head.startswith(PYTHON_TAG)
        return "" if self._holding else self._text

    def finish(self, cut: bool = False) -> tuple[str, Answer]:
        answer = parse_answer(self._text, self.tools, cut=cut, most=self.most)
        held = self._text if self._holding is not False else ""
        return ("" if answer.is_calls else held), answer


def tools_prompt(tools: Iterable[Tool]) -> str:
    """Meta's instruction for JSON tool calling, which its template puts before the first user message."""
    listed = "".join(json.dumps(t.to_openai(), indent=4) + "\n\n" for t in tools)
    return (
        "Given the following functions, please respond with a JSON for a function call with its proper arguments "
        "that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
        "Do not use variables.\n\n" + listed
    )


def call_text(calls: Iterable[Mapping[str, Any]]) -> str:
    """An assistant message's OpenAI ``tool_calls`` as the model writes them (for the history in a prompt)."""
    out = []
    for call in calls:
        function = call.get("function", {})
        arguments = function.get("arguments", "{}")
        parameters = json.loads(arguments) if isinstance(arguments, str) else arguments
        out.append(json.dumps({"name": function.get("name"), "parameters": parameters}, ensure_ascii=False))
    return PARALLEL_SEPARATOR.join(out)
