"""Request envelope and response bodies of the DashScope native API.

The response models hold exactly what the SDKs need (wire spec sections 5
and 6.3): ``output.choices[].message`` always has ``role`` and a list
``content``; ``usage`` is all integers; ``request_id`` is in every body; a
success body never carries ``code``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from llamascope import errors
from llamascope.api.incoming import envelope
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


class TextItem(BaseModel):
    text: str


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: list[TextItem]


class Choice(BaseModel):
    finish_reason: str
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
