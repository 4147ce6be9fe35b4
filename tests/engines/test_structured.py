"""Structured output through the in-process engine (``prepare`` and ``generate``, no HTTP) on the built-in model.

Its weights are random, so a grammar has to hold whatever they say: every answer that ends validates against its
schema, every answer cut by its length is a prefix the grammar accepts, every forced tool call parses. Requests
run concurrently, so constrained rows share their batches (and their masks) with unconstrained ones.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from llamascope.engines.base import Chunk, FinishReason, SamplingParams, Turn
from llamascope.engines.mllama import MllamaEngine
from llamascope.errors import ServiceError
from llamascope.structured.spec import OutputSpec, ResponseFormat, read_request
from tests.engines.helpers import image
from tests.structured.schemas import SCHEMAS

PER_SCHEMA = 17  # 12 schemas: 204 constrained answers
MAX_TOKENS = 48
PLAIN = [f"Tell me about {topic}." for topic in ("dogs", "the sea", "tea", "numbers", "a red chair", "foxes")]

WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Hangzhou", "Beijing", "Paris"]}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 6}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The forecast.", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
PARAMETERS = {"get_weather": WEATHER, "get_time": TIME}


@dataclass
class Answer:
    text: str
    chunks: list[Chunk]

    @property
    def last(self) -> Chunk:
        return self.chunks[-1]


@pytest.fixture(scope="module")
def engine(test_model_dir: Path) -> MllamaEngine:
    return MllamaEngine.load(test_model_dir, test_model=True)


async def answer(
    engine: MllamaEngine, turns: list[Turn], output: OutputSpec | None, sampling: SamplingParams
) -> Answer:
    prompt = await engine.prepare(turns, output)
    chunks = [c async for c in engine.generate(prompt, sampling)]
    return Answer("".join(c.text for c in chunks), chunks)


def schema_spec(schema: dict[str, Any]) -> OutputSpec:
    return read_request(
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        message_texts=["json"],
    )


@pytest.fixture(scope="module")
def mixed_run(engine: MllamaEngine) -> tuple[dict[str, list[Answer]], list[Answer], list[Answer]]:
    """Every schema's answers and greedy unconstrained answers, all at once; and the greedy ones run alone."""
    greedy = SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0)

    async def scenario() -> tuple[dict[str, list[Answer]], list[Answer], list[Answer]]:
        alone = [await answer(engine, [Turn("user", text)], None, greedy) for text in PLAIN]
        constrained = [
            answer(
                engine,
                [Turn("user", f"Answer in JSON ({i}).")],
                schema_spec(schema),
                SamplingParams(
                    max_new_tokens=MAX_TOKENS,
                    min_new_tokens=6 * (i % 2),  # held back from ending, until the grammar ends it
                    temperature=1.0,
                    seed=zlib.crc32(name.encode()) + i,
                ),
            )
            for name, schema in SCHEMAS.items()
            for i in range(PER_SCHEMA)
        ]
        plain = [answer(engine, [Turn("user", text)], None, greedy) for text in PLAIN]
        # Interleaved, so that batches mix constrained and unconstrained rows throughout.
        step = len(constrained) // len(plain)
        order = [*constrained]
        for k, coroutine in enumerate(plain):
            order.insert(k * (step + 1), coroutine)
        done = await asyncio.gather(*order)
        at = {k * (step + 1) for k in range(len(plain))}
        batched = [done[i] for i in sorted(at)]
        rest = [a for i, a in enumerate(done) if i not in at]
        by_schema = {name: rest[j * PER_SCHEMA : (j + 1) * PER_SCHEMA] for j, name in enumerate(SCHEMAS)}
        return by_schema, batched, alone

    return asyncio.run(scenario())


def test_answers_hold_to_their_schemas(engine: MllamaEngine, mixed_run) -> None:
    by_schema, _, _ = mixed_run
    assert sum(len(a) for a in by_schema.values()) >= 200 and len(by_schema) >= 10
    grammars = engine._grammar_cache()
    tokenizer = grammars.backend.tokenizer  # type: ignore[attr-defined]
    stops = 0
    for name, answers in by_schema.items():
        grammar = grammars.get_blocking(schema_spec(SCHEMAS[name]).grammar())  # type: ignore[arg-type]
        for a in answers:
            reason = a.last.finish_reason
            assert reason in (FinishReason.STOP, FinishReason.LENGTH), (name, a.text)
            if reason == FinishReason.STOP:
                stops += 1
                jsonschema.validate(json.loads(a.text), SCHEMAS[name])
            else:
                assert a.last.output_tokens == MAX_TOKENS
                assert grammar.accepts_prefix(tokenizer.tokenize_str(a.text.rstrip("\ufffd"))), (name, a.text)
    assert stops >= 100, "most bounded schemas should end within the tokens allowed"


def test_unconstrained_rows_are_as_alone(mixed_run) -> None:
    _, batched, alone = mixed_run
    assert [a.text for a in batched] == [a.text for a in alone]
    assert all(a.last.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) for a in batched)


def test_rows_leaving_and_joining_mid_answer_keep_every_grammar(engine: MllamaEngine) -> None:
    """A batch's next masks are made as soon as a step's tokens are known; rows that leave (a stream closed) or
    join (a late request) before that step change the batch they were made for. The answers still hold."""
    name = "nested objects"
    spec = schema_spec(SCHEMAS[name])

    async def closed_early(i: int) -> None:
        prompt = await engine.prepare([Turn("user", f"Answer in JSON ({i}).")], spec)
        stream = engine.generate(prompt, SamplingParams(max_new_tokens=MAX_TOKENS, temperature=1.0, seed=i))
        async for chunk in stream:
            if chunk.output_tokens >= 2 + i % 5:
                break
        await stream.aclose()

    async def late(i: int) -> Answer:
        await asyncio.sleep(0.02 * (i % 4))
        sampling = SamplingParams(max_new_tokens=MAX_TOKENS, temperature=1.0, seed=100 + i)
        return await answer(engine, [Turn("user", f"Answer in JSON ({i}).")], spec, sampling)

    async def scenario() -> list[Answer]:
        done = await asyncio.gather(*(closed_early(i) for i in range(6)), *(late(i) for i in range(10)))
        return [a for a in done if a is not None]

    answers = asyncio.run(scenario())
    grammar = engine._grammar_cache().get_blocking(spec.grammar())  # type: ignore[arg-type]
    tokenizer = engine._grammar_cache().backend.tokenizer  # type: ignore[attr-defined]
    for a in answers:
        if a.last.finish_reason == FinishReason.STOP:
            jsonschema.validate(json.loads(a.text), SCHEMAS[name])
        else:
            assert a.last.finish_reason == FinishReason.LENGTH, a.text
            assert grammar.accepts_prefix(tokenizer.tokenize_str(a.text.rstrip("\ufffd"))), a.text
    assert len(answers) == 10


def test_forced_and_named_tool_calls_parse_and_validate(engine: MllamaEngine) -> None:
    required = read_request(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    named = read_request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    auto = read_request(tools=TOOLS)

    async def scenario() -> list[tuple[OutputSpec, Answer]]:
        runs = [(required, i) for i in range(8)] + [(named, i) for i in range(4)] + [(auto, i) for i in range(4)]
        turns = [Turn("user", "What is the weather in Paris?")]
        done = await asyncio.gather(
            *(
                answer(engine, turns, spec, SamplingParams(max_new_tokens=64, temperature=1.0, seed=i))
                for spec, i in runs
            )
        )
        # One with an image: Meta says calls work poorly with images; the grammar still holds the shape.
        pictured = [Turn("user", (image((30, 90, 200)), "Which city is this?"))]
        done.append(await answer(engine, pictured, required, SamplingParams(max_new_tokens=64, temperature=0)))
        return list(zip([spec for spec, _ in runs] + [required], done, strict=True))

    called = 0
    for spec, a in asyncio.run(scenario()):
        last = a.last
        if spec.forces_tool_call:
            assert all(not c.text for c in a.chunks), "a forced call streams no text, not even cut short"
            assert last.finish_reason in (FinishReason.TOOL_CALLS, FinishReason.LENGTH)
        if last.finish_reason == FinishReason.TOOL_CALLS:
            called += 1
            assert last.tool_calls and not a.text
            for call in last.tool_calls:
                if spec.tool_choice.mode == "function":
                    assert call.name == "get_time"
                jsonschema.validate(json.loads(call.arguments), PARAMETERS[call.name])
                assert call.id.startswith("call_")
            assert len(last.tool_calls) == 1 or spec.parallel_tool_calls
        elif last.finish_reason == FinishReason.LENGTH and spec.forces_tool_call:  # the whole calls before the cut
            for call in last.tool_calls or ():
                jsonschema.validate(json.loads(call.arguments), PARAMETERS[call.name])
        else:
            assert last.tool_calls is None
    assert called >= 8, "bounded tools' forced calls should mostly complete"


def test_a_grammar_that_cannot_compile_fails_before_any_chunk(engine: MllamaEngine) -> None:
    # Past read_request's checks (which would refuse it first), as a schema only the model's tokenizer rejects.
    impossible = OutputSpec(ResponseFormat("json_schema", "x", {"type": "integer", "minimum": 5, "maximum": 1}))

    async def scenario() -> list[Chunk]:
        prompt = await engine.prepare([Turn("user", "json")], impossible)
        return [c async for c in engine.generate(prompt, SamplingParams(max_new_tokens=4))]

    with pytest.raises(ServiceError) as caught:
        asyncio.run(scenario())
    assert caught.value.status == 400 and caught.value.code == "InvalidParameter"
    assert "response_format.json_schema.schema" in caught.value.message
    assert engine.active == 0


def test_a_dead_end_while_decoding_is_an_error_not_stop(engine: MllamaEngine) -> None:
    """Past read_request's check (which refuses this schema: it has no finite value): every answer begins "{" or
    "[" and the grammar allows nothing after it. The answer so far is not JSON, so it never ends as "stop" (it
    did, with "{"): a 400, the schema's fault (the SDKs retry a 500), after the token made."""
    branches = {
        "o": {"type": "object", "properties": {"a": {"$ref": "#/$defs/o"}}, "required": ["a"]},
        "l": {"type": "array", "items": {"$ref": "#/$defs/l"}, "minItems": 1},
    }
    endless = OutputSpec(
        ResponseFormat("json_schema", "x", {"$defs": branches, "anyOf": [{"$ref": "#/$defs/o"}, {"$ref": "#/$defs/l"}]})
    )
    chunks: list[Chunk] = []

    async def scenario() -> None:
        prompt = await engine.prepare([Turn("user", "json")], endless)
        async for chunk in engine.generate(prompt, SamplingParams(max_new_tokens=8)):
            chunks.append(chunk)

    with pytest.raises(ServiceError) as caught:
        asyncio.run(scenario())
    assert caught.value.status == 400 and caught.value.code == "InvalidParameter"
    assert "schema allows no next token" in caught.value.message, caught.value.message
    assert "Invalid value for 'response_format.json_schema.schema'" in caught.value.message, caught.value.message
    text = "".join(c.text for c in chunks)  # the tokens before the dead end: "{", '{"', "["...
    assert all(c.finish_reason is None for c in chunks) and text[:1] in ("{", "["), text
    assert engine.active == 0


def test_tools_and_tool_turns_in_the_prompt(engine: MllamaEngine) -> None:
    from llamascope.structured.tools import ToolCall

    call = ToolCall("get_weather", '{"city": "Paris"}', "call_1")
    turns = [
        Turn("user", "Weather in Paris?"),
        Turn("assistant", "", tool_calls=(call,)),
        Turn("tool", "Sunny, 21 C", tool_call_id="call_1"),
    ]
    prompt = asyncio.run(engine.prepare(turns, read_request(tools=TOOLS)))
    text = engine.tokenizer.decode(prompt.payload.inputs["input_ids"][0])
    assert "<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n" in text
    assert '"name": "get_time"' in text and text.index("Given the following functions") < text.index("Weather in")
    assert (
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
        in text
    )
    assert "<|start_header_id|>ipython<|end_header_id|>\n\nSunny, 21 C<|eot_id|>" in text
    # tool_choice "none": the model is told of no tools.
    none = asyncio.run(engine.prepare(turns[:1], read_request(tools=TOOLS, tool_choice="none")))
    assert "Environment" not in engine.tokenizer.decode(none.payload.inputs["input_ids"][0])
