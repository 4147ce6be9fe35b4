"""Request envelope and response bodies of the DashScope native API.

The response models hold exactly what the SDKs need (wire spec sections 5
and 6.3): ``output.choices[].message`` always has ``role`` and a list
``content``; ``usage`` is all integers; ``request_id`` is in every body; a
success body never carries ``code``.

The request models (``GenerationBody`` and its parts) describe the body for the
OpenAPI document only: the body is checked by hand (``conversation.rules``,
``conversation.parameters``) so that refusals carry DashScope's messages, and the
fuzz tests hold the two to each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from llamascope import errors
from llamascope.api.incoming import envelope
from llamascope.api.openapi import UP_TO_CONTEXT_LENGTH
from llamascope.conversation.parameters import MAX_SEED
from llamascope.conversation.service import Usage
from llamascope.engines.base import TokenLogprob
from llamascope.structured.tools import ToolCall

# The multimodal endpoint answers in the message format either way (its VL callers read output.choices), but
# a value that is neither is refused on both endpoints alike.
RESULT_FORMATS = ("text", "message")


def result_format_of(parameters: Any) -> str | None:
    """The request's ``result_format``, None where it names none; one of RESULT_FORMATS, or a 400."""
    value = parameters.get("result_format") if isinstance(parameters, dict) else None
    if value not in (None, *RESULT_FORMATS):
        raise errors.invalid_parameter('Parameter result_format should be "text" or "message".')
    return value


@dataclass(frozen=True)
class GenerationRequest:
    model: Any
    messages: Any
    parameters: Any

    @classmethod
    def from_body(cls, body: Any) -> GenerationRequest:
        body = envelope(body)
        model = body["model"]
        payload = body.get("input")
        if payload is None:
            raise errors.ServiceError(400, "BadRequest.EmptyInput", "Required input parameter missing from request.")
        if not isinstance(payload, dict):
            raise errors.invalid_parameter("input must be an object with a messages list.")
        result_format_of(body.get("parameters"))
        return cls(model=model, messages=payload.get("messages"), parameters=body.get("parameters"))


# -- the request, as documented ------------------------------------------------

Hint = Annotated[Any, Field(description="Accepted beside an item and ignored (DashScope clients send it).")]
# Marks a bound the served models set: the OpenAPI document puts their largest context length there.
MaxTokens = Annotated[
    int | None,
    Field(
        ge=1,
        description="Most tokens to generate; default 512, at most the model's context length.",
        json_schema_extra=UP_TO_CONTEXT_LENGTH,
    ),
]
MinNewTokens = Annotated[int | None, Field(ge=0, description="Fewest tokens to generate before end-of-turn counts.")]
TopP = Annotated[float | None, Field(gt=0, le=1, description="Nucleus sampling mass; default 1.0.")]
Temperature = Annotated[float | None, Field(ge=0, description="Default 0.8; 0 is greedy decoding.")]
TopK = Annotated[int | None, Field(ge=0, description="None, 0 or a value above 100 turns top-k off.")]
Seed = Annotated[int | None, Field(ge=0, le=MAX_SEED, description="Same seed, same answer.")]
_StopString = Annotated[str, Field(min_length=1)]
Stop = Annotated[
    _StopString | list[_StopString] | None, Field(description="Generation ends before the first of these strings.")
]
RepetitionPenalty = Annotated[float | None, Field(gt=0, description="Default 1.0 (none).")]


class TextContent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    type: Hint = None
    cache_control: Hint = None


class ImageContent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(
        pattern=r"\S",
        description="An http(s) URL, a data: URI, an oss:// upload (with X-DashScope-OssResourceResolve: enable), "
        "or a path in a directory the server allows.",
    )
    min_pixels: Hint = None
    max_pixels: Hint = None
    total_pixels: Hint = None
    type: Hint = None
    cache_control: Hint = None


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The arguments: a JSON object, as a string.")


class ToolCallBody(BaseModel):
    """A tool call, as OpenAI writes it in a whole answer."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class IndexedToolCallBody(ToolCallBody):
    """A tool call with ``index``, its place among the answer's calls: DashScope's always, OpenAI's in a stream."""

    index: int


def tool_call_bodies(calls: Sequence[ToolCall]) -> list[IndexedToolCallBody] | None:
    """An answer's calls for ``message.tool_calls``, or None (the key left out) when it called none."""
    bodies = [
        IndexedToolCallBody(index=i, id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
        for i, c in enumerate(calls)
    ]
    return bodies or None


def whole_tool_call_bodies(calls: Sequence[ToolCall]) -> list[ToolCallBody] | None:
    """As ``tool_call_bodies``, without ``index``: an OpenAI answer's, not streamed."""
    bodies = [ToolCallBody(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]
    return bodies or None


TOOL_CALLS_IN = (
    'An assistant turn\'s calls, as an answer gives them: [{"id", "type": "function", '
    '"function": {"name", "arguments"}}], arguments a JSON object as a string.'
)


class Message(BaseModel):
    """One turn. system first (text), images in user turns (the first carries one), the last turn is user's
    (or the results of the calls the assistant turn before them made)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextContent | ImageContent] | None = Field(
        description="Null only in an assistant turn that called tools."
    )
    # Any: other roles' tool_calls and tool_call_id are ignored, as the hosted service ignores them.
    tool_calls: Any = Field(None, description=TOOL_CALLS_IN)
    tool_call_id: Any = Field(None, description="A tool turn: the id of the call whose result it is (a string).")


class Input(BaseModel):
    messages: list[Message] = Field(min_length=1)


class Sampling(BaseModel):
    """The settings both surfaces take under the same names (the compatible mode at its body's top level)."""

    max_tokens: MaxTokens = None
    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    seed: Seed = None
    stop: Stop = None
    repetition_penalty: RepetitionPenalty = None


class ResponseFormat(BaseModel):
    """``text`` (the default), ``json_object`` (the messages must say "json") or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Any = Field(
        None,
        description='With type "json_schema": {"name" (letters, digits, _ or -, 1 to 64), "schema" (a JSON '
        'Schema the answer is held to as it is made), "strict"}; ignored with the other types.',
    )


class FunctionSpec(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description='A JSON Schema of "type": "object".')


class ToolSpec(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedTool(BaseModel):
    type: Literal["function"] = "function"
    function: dict[str, Any] = Field(description='{"name": ...}, a function in tools.')


class Structured(BaseModel):
    """The answer's shape, under the same names on both surfaces (the compatible mode at its body's top level)."""

    response_format: ResponseFormat | None = None
    tools: list[ToolSpec] | None = Field(None, description="Functions the model may call.")
    tool_choice: Literal["auto", "none", "required"] | NamedTool | None = Field(
        None, description='"auto" (the default), "none", "required" (some call), or one function.'
    )
    parallel_tool_calls: bool | None = Field(None, description="Whether an answer may make several calls.")


class Parameters(Sampling, Structured):
    """Generation settings; unknown ones are ignored, as the hosted service ignores them."""

    model_config = ConfigDict(extra="allow")
    max_new_tokens: MaxTokens = Field(
        None,
        description="Another name of max_tokens: the first sent of max_tokens, max_new_tokens, "
        "max_completion_tokens is the one used.",
    )
    max_completion_tokens: MaxTokens = Field(None, description="Another name of max_tokens.")
    min_new_tokens: MinNewTokens = None
    incremental_output: bool | None = Field(None, description="Stream deltas instead of the whole text so far.")
    result_format: Literal["text", "message"] | None = Field(
        None, description="Either way the multimodal endpoint answers in the message format (output.choices)."
    )
    n: Literal[1] | None = Field(None, description="Choices per request: one only.")


# A 16 x 16 red PNG: the documents' examples run as they are.
EXAMPLE_IMAGE = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAGklEQVR42mM8ISfHQApgYiARjGoY1TB0NAAATx8BJMixHB8"
    "AAAAASUVORK5CYII="
)


class GenerationBody(BaseModel):
    """The body of a multimodal-generation call; ``X-DashScope-SSE: enable`` streams the answer."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "llama3.2-90b-vision-instruct",
                    "input": {
                        "messages": [
                            {"role": "system", "content": [{"text": "You are a helpful assistant."}]},
                            {"role": "user", "content": [{"image": EXAMPLE_IMAGE}, {"text": "What is this?"}]},
                        ]
                    },
                    "parameters": {"max_tokens": 64, "temperature": 0.7, "seed": 1},
                }
            ]
        }
    )

    model: str = Field(min_length=1, description="A served model name (GET /api/v1/models).")
    input: Input
    parameters: Parameters | None = None


# -- the answer -------------------------------------------------------------------


class TextItem(BaseModel):
    text: str


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: list[TextItem] = Field(description="No item when the answer is tool calls.")
    tool_calls: list[IndexedToolCallBody] | None = Field(None, description='With finish_reason "tool_calls".')


FINISH_REASONS: list[JsonValue] = ["stop", "length", "tool_calls"]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobBody(TopLogprob):
    top_logprobs: list[TopLogprob]

    @classmethod
    def of(cls, item: TokenLogprob) -> TokenLogprobBody:
        rivals = [TopLogprob(token=t, logprob=p, bytes=list(t.encode())) for t, p in item.top]
        return cls(token=item.text, logprob=item.logprob, bytes=list(item.text.encode()), top_logprobs=rivals)


class Logprobs(BaseModel):
    """Each token's log-probability with its likeliest rivals: OpenAI's shape, which DashScope's answers share
    (``choices[].logprobs.content``)."""

    content: list[TokenLogprobBody]

    @classmethod
    def of(cls, items: list[TokenLogprob] | None) -> Logprobs | None:
        return None if items is None else cls(content=[TokenLogprobBody.of(i) for i in items])


LOGPROBS_IN = (
    "With parameters.logprobs: the answer's tokens; in a stream with incremental_output those new in each "
    "event, without it all of them in the last event."
)


class Choice(BaseModel):
    finish_reason: str = Field(
        json_schema_extra={"enum": [*FINISH_REASONS, "null"]},
        description='The string "null" until the last event of a stream.',
    )
    message: AssistantMessage
    logprobs: Logprobs | None = Field(None, description=LOGPROBS_IN)


class Output(BaseModel):
    choices: list[Choice]


class UsageBody(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    image_tokens: int

    @classmethod
    def of(cls, usage: Usage) -> UsageBody:
        return cls(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            total_tokens=usage.total_tokens,
            image_tokens=usage.image_tokens,
        )


class GenerationResult(BaseModel):
    output: Output
    usage: UsageBody
    request_id: str

    @classmethod
    def of(
        cls,
        text: str,
        finish_reason: str,
        usage: Usage,
        request_id: str,
        tool_calls: Sequence[ToolCall] = (),
        logprobs: list[TokenLogprob] | None = None,
    ) -> GenerationResult:
        items = [TextItem(text=text)] if text or not tool_calls else []
        message = AssistantMessage(content=items, tool_calls=tool_call_bodies(tool_calls))
        choice = Choice(finish_reason=finish_reason, message=message, logprobs=Logprobs.of(logprobs))
        return cls(
            output=Output(choices=[choice]),
            usage=UsageBody.of(usage),
            request_id=request_id,
        )


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str
