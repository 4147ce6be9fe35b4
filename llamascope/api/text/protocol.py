"""Request envelope and response bodies of DashScope's text-generation and tokenizer APIs.

``docs/text-generation-wire.md`` says what the SDKs send and read. In short:
``input`` holds ``messages`` (content a string or a list of ``{"text"}`` /
``{"image"}`` items), or a ``prompt`` (with the deprecated ``history`` of
``{"user", "bot"}`` pairs before it); ``parameters.result_format`` is
``"text"`` (the default: ``output.text`` and ``output.finish_reason``) or
``"message"`` (``output.choices[0].message`` with string content, and
``tool_calls``: tools need this format, as on the hosted service). Usage has
``input_tokens``, ``output_tokens`` and ``total_tokens``, and ``image_tokens``
when the conversation had an image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llamascope import errors
from llamascope.api.incoming import envelope
from llamascope.api.native.protocol import (
    FINISH_REASONS,
    LOGPROBS_IN,
    GenerationRequest,
    IndexedToolCallBody,
    Logprobs,
    Message,
    Parameters,
    UsageBody,
    result_format_of,
    tool_call_bodies,
)
from llamascope.conversation.service import Usage
from llamascope.engines.base import TokenLogprob
from llamascope.structured.tools import ToolCall


def _empty_input() -> errors.ServiceError:
    return errors.ServiceError(400, "BadRequest.EmptyInput", "Required input parameter missing from request.")


def messages_of(payload: Any) -> Any:
    """``input`` as a list of messages for the conversation rules (which say what is wrong with one)."""
    if payload is None:
        raise _empty_input()
    if not isinstance(payload, dict):
        raise errors.invalid_parameter("input must be an object with a prompt or a messages list.")
    prompt, history, messages = payload.get("prompt"), payload.get("history"), payload.get("messages")
    if prompt is not None and not isinstance(prompt, str):
        raise errors.invalid_parameter("input.prompt must be a string.")
    if messages is not None:
        if not isinstance(messages, list):
            return messages
        turns = [_with_dashscope_items(m) for m in messages]
    elif history is not None:
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise errors.invalid_parameter('input.history must be a list of {"user": ..., "bot": ...} pairs.')
        turns = []
        for i, pair in enumerate(history):
            for said in ("user", "bot"):
                if pair.get(said) is not None and not isinstance(pair[said], str):
                    raise errors.invalid_parameter(f"input.history[{i}].{said} must be a string.")
            turns += [{"role": "user", "content": pair.get("user")}, {"role": "assistant", "content": pair.get("bot")}]
    elif prompt:
        turns = []
    else:
        raise _empty_input()
    if prompt:  # as the SDK does with messages and a prompt: the prompt is the last user turn
        turns.append({"role": "user", "content": prompt})
    return turns


def _with_dashscope_items(message: Any) -> Any:
    """LangChain's standard image blocks as DashScope ``{"image": ...}`` items: ChatTongyi sends a message's
    content as the user wrote it. Anything else is left for the conversation rules to judge."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    items = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "image_url":  # OpenAI's form, which LangChain also takes: {"image_url": {"url": ...}}
            url = item.get("image_url")  # its type kept: the rules name this form, not "image", for a bad URL
            item = {"type": kind, "image": url.get("url") if isinstance(url, dict) else url}
        elif kind == "image" and "image" not in item:  # LangChain's own: {"url": ...} or {"base64", "mime_type"}
            url = item.get("url")
            if url is None and isinstance(item.get("base64"), str):
                url = f"data:{item.get('mime_type') or 'image/png'};base64,{item['base64']}"
            item = {"image": url}
        items.append(item)
    return {**message, "content": items}


@dataclass(frozen=True)
class TextGenerationRequest(GenerationRequest):
    result_format: str = "text"

    @classmethod
    def from_body(cls, body: Any) -> TextGenerationRequest:
        body = envelope(body)
        parameters = body.get("parameters")
        result_format = result_format_of(parameters) or "text"
        if result_format == "text" and _may_call_tools(parameters):
            raise errors.invalid_parameter(
                'Parameter result_format should be "message" when tools are given: tool calls are answered in '
                "output.choices[0].message.tool_calls, which the text format does not have."
            )
        if result_format == "text" and isinstance(parameters, dict) and "logprobs" in parameters:
            # The text format has no place for them: not computed, as before they were served (the SDK's
            # Generation.call(logprobs=True) sends no result_format, and was answered)
            parameters = {k: v for k, v in parameters.items() if k not in ("logprobs", "top_logprobs")}
        return cls(body["model"], messages_of(body.get("input")), parameters, result_format)


def _may_call_tools(parameters: Any) -> bool:
    if not isinstance(parameters, dict):
        return False
    return bool(parameters.get("tools")) and parameters.get("tool_choice") != "none"


@dataclass(frozen=True)
class TokenizationRequest:
    model: Any
    messages: Any

    @classmethod
    def from_body(cls, body: Any) -> TokenizationRequest:
        body = envelope(body)
        return cls(body["model"], messages_of(body.get("input")))


def usage_body(usage: Usage) -> dict[str, int]:
    """The multimodal endpoint's usage, less ``image_tokens`` when the conversation had no image."""
    body = UsageBody.of(usage).model_dump()
    if not usage.image_tokens:
        del body["image_tokens"]
    return body


class TextOutput(BaseModel):
    text: str
    finish_reason: str


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str = Field(description="Empty when the answer is tool calls.")
    tool_calls: list[IndexedToolCallBody] | None = Field(None, description='With finish_reason "tool_calls".')


class Choice(BaseModel):
    finish_reason: str = Field(json_schema_extra={"enum": [*FINISH_REASONS, "null"]})
    message: AssistantMessage
    logprobs: Logprobs | None = Field(None, description=LOGPROBS_IN)


class MessageOutput(BaseModel):
    choices: list[Choice]


class TextGenerationResult(BaseModel):
    output: TextOutput | MessageOutput
    usage: dict[str, int]
    request_id: str

    @classmethod
    def render(
        cls, result_format: str
    ) -> Callable[[str, str, Usage, str, Sequence[ToolCall], list[TokenLogprob] | None], TextGenerationResult]:
        """The body maker for one result format: (text, finish_reason, usage, request_id, tool_calls, logprobs)
        to a result. Only the message format has tool calls and log-probabilities (in the text format
        ``from_body`` refuses tools and drops logprobs)."""

        def of(
            text: str,
            finish_reason: str,
            usage: Usage,
            request_id: str,
            tool_calls: Sequence[ToolCall] = (),
            logprobs: list[TokenLogprob] | None = None,
        ) -> TextGenerationResult:
            output: TextOutput | MessageOutput
            if result_format == "message":
                message = AssistantMessage(content=text, tool_calls=tool_call_bodies(tool_calls))
                choice = Choice(finish_reason=finish_reason, message=message, logprobs=Logprobs.of(logprobs))
                output = MessageOutput(choices=[choice])
            else:
                output = TextOutput(text=text, finish_reason=finish_reason)
            return cls(output=output, usage=usage_body(usage), request_id=request_id)

        return of


class TokenizationOutput(BaseModel):
    token_ids: list[int]
    tokens: list[str]


class TokenizationUsage(BaseModel):
    input_tokens: int


class TokenizationResult(BaseModel):
    output: TokenizationOutput
    usage: TokenizationUsage
    request_id: str

    @classmethod
    def of(cls, ids: list[int], tokens: list[str], request_id: str) -> TokenizationResult:
        return cls(
            output=TokenizationOutput(token_ids=ids, tokens=tokens),
            usage=TokenizationUsage(input_tokens=len(ids)),
            request_id=request_id,
        )


# -- the requests, as documented (for the OpenAPI document; the bodies are checked by hand above) --


class HistoryPair(BaseModel):
    user: str
    bot: str


class TextInput(BaseModel):
    """``messages`` (the multimodal endpoint's, images where the model takes them), or a ``prompt`` after an
    optional ``history``."""

    messages: list[Message] | None = None
    prompt: str | None = None
    history: list[HistoryPair] | None = Field(None, description="Deprecated: earlier turns before the prompt.")


class TextParameters(Parameters):
    model_config = ConfigDict(extra="allow")
    result_format: Literal["text", "message"] | None = Field(None, description='Default "text": output.text.')


class TextGenerationBody(BaseModel):
    """The body of a text-generation call; ``X-DashScope-SSE: enable`` streams the answer."""

    model: str = Field(min_length=1, description="A served model name (GET /api/v1/models).")
    input: TextInput
    parameters: TextParameters | None = None


class TokenizationBody(BaseModel):
    model: str = Field(min_length=1, description="A served model name.")
    input: TextInput
