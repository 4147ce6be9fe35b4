"""Whether a finished answer keeps the shape its request asked for (an ``OutputSpec``).

The in-process engine makes such answers by construction: its grammar allows nothing else. An upstream engine
is sent the same fields (vLLM and SGLang constrain their decoding with them) but may ignore them: an engine
without guided decoding, or one that drops a field. Its answers are checked here as they end, so that what
docs/structured-output.md promises holds through a gateway too: an answer that ends with "stop" is JSON that
validates, and every tool call names a function offered, with arguments that validate against its parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llamascope.structured.spec import OutputSpec
from llamascope.structured.tools import STRICT_JSON, ToolCall


def breach(spec: OutputSpec, text: str, calls: Sequence[ToolCall]) -> str | None:
    """What in a finished answer (its text, or its calls) breaks ``spec``, in words; None if nothing does."""
    if calls:
        offered = {tool.name: tool for tool in spec.offered_tools()}
        if len(calls) > 1 and not spec.parallel_tool_calls:
            return f"it made {len(calls)} calls, though parallel_tool_calls is false"
        for call in calls:
            tool = offered.get(call.name)
            if tool is None:
                return f"it called {call.name[:80]!r}, which is not a function it was offered"
            problem = _problem(call.arguments, tool.parameters, object_only=True)
            if problem:
                return f"the arguments of its call of {call.name!r} are {problem}"
        return None
    if spec.forces_tool_call:
        return "it answered in text, though a tool call was required"
    fmt = spec.response_format
    if fmt.type == "json_object":
        problem = _problem(text, None, object_only=True)
    elif fmt.type == "json_schema":
        problem = _problem(text, fmt.schema or {}, object_only=False)
    else:
        return None
    return f"its answer is {problem}" if problem else None


def _problem(text: str, schema: Mapping[str, Any] | None, object_only: bool) -> str | None:
    try:
        value = STRICT_JSON.decode(text)
    except ValueError:
        return "not JSON"
    if object_only and not isinstance(value, dict):
        return "not a JSON object"
    if not schema:
        return None
    # why: jsonschema is 0.1 s of imports, for requests that ask for a shape only (a gateway starts without it)
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(value))
    return f"not as the schema says: {error.message[:200]}" if error is not None else None
