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

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llamascope import errors
from llamascope.api.incoming import envelope
from llamascope.api.openapi import UP_TO_CONTEXT_LENGTH
from llamascope.conversation.parameters import MAX_SEED
from llamascope.conversation.service import Usage


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


class Message(BaseModel):
    """One turn. system first (text), the first user turn carries exactly one image, the last turn is user's."""

    role: Literal["system", "user", "assistant"]
    content: str | list[TextContent | ImageContent]


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


class Parameters(Sampling):
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
    content: list[TextItem]


class Choice(BaseModel):
    finish_reason: str = Field(
        json_schema_extra={"enum": ["stop", "length", "null"]},
        description='The string "null" until the last event of a stream.',
    )
    message: AssistantMessage


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
    def of(cls, text: str, finish_reason: str, usage: Usage, request_id: str) -> GenerationResult:
        message = AssistantMessage(content=[TextItem(text=text)])
        return cls(
            output=Output(choices=[Choice(finish_reason=finish_reason, message=message)]),
            usage=UsageBody.of(usage),
            request_id=request_id,
        )


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str
