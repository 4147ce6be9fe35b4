"""Chat-completions requests and responses (wire spec section 7).

Requests are translated to the DashScope message form (``{"image": url}`` /
``{"text": ...}`` items and a ``parameters`` object), so the conversation rules
and parameter checks are the native surface's, with the same messages.
``ChatBody`` and its parts describe the request for the OpenAPI document only.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, SerializerFunctionWrapHandler, model_serializer

from llamascope import errors
from llamascope.api.incoming import envelope
from llamascope.api.native.protocol import (
    EXAMPLE_IMAGE,
    FINISH_REASONS,
    TOOL_CALLS_IN,
    IndexedToolCallBody,
    Logprobs,
    MaxTokens,
    Sampling,
    Structured,
    ToolCallBody,
    whole_tool_call_bodies,
)
from llamascope.conversation.service import Usage
from llamascope.engines.base import TokenLogprob
from llamascope.structured.spec import legacy_functions
from llamascope.structured.tools import ToolCall

# Fields that mean the same in both dialects (DashScope's in ``parameters``); DashScope extras ride at the top
# level.
_SAME = (
    *("temperature", "top_p", "seed", "stop", "top_k", "repetition_penalty", "logprobs", "top_logprobs"),
    *("response_format", "tools", "tool_choice", "parallel_tool_calls", "presence_penalty", "frequency_penalty"),
)


@dataclass(frozen=True)
class ChatRequest:
    model: Any
    messages: Any
    parameters: dict[str, Any]
    stream: bool
    include_usage: bool

    @classmethod
    def from_body(cls, body: Any) -> ChatRequest:
        body = envelope(body)
        # Here, not only by parse_parameters (the native surfaces' check): /tokenize reads a chat request too.
        if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
            raise errors.invalid_parameter("Parameter n: only one choice per request is supported.")
        _refuse_unserved(body)
        parameters = {name: body[name] for name in _SAME if body.get(name) is not None}
        for name in ("max_completion_tokens", "max_tokens"):  # the first given, under its own name for errors
            if body.get(name) is not None:
                parameters[name] = body[name]
                break
        stream = body.get("stream")
        stream = False if stream is None else stream
        if not isinstance(stream, bool):
            raise errors.invalid_parameter("Parameter stream should be true or false.")
        options = body.get("stream_options")
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise errors.invalid_parameter("Parameter stream_options should be an object.")
        include_usage = options.get("include_usage")
        include_usage = False if include_usage is None else include_usage
        if not isinstance(include_usage, bool):
            raise errors.invalid_parameter("Parameter stream_options.include_usage should be true or false.")
        return cls(body["model"], _messages(body.get("messages")), parameters, stream, include_usage)


def _unserved(body: dict[str, Any]) -> tuple[str, str] | None:
    """The first field of the request this server cannot honour, and why; None if it can honour them all.

    Answering as if it had been honoured (a tool call never made, text where JSON was promised, no log
    probabilities) would mislead the caller; fields that change nothing when left alone are accepted."""
    legacy = legacy_functions(body.get("functions"), body.get("function_call"))
    if legacy is not None:
        return legacy[0], f"the deprecated function calls are not supported; use {legacy[1]}"
    if body.get("logit_bias"):
        return "logit_bias", "logit biases are not supported"
    modalities = body.get("modalities")
    if modalities not in (None, ["text"]):
        return "modalities", 'only ["text"] is supported'
    if body.get("audio") is not None:
        return "audio", "audio output is not supported"
    if body.get("prediction") is not None:
        return "prediction", "predicted outputs are not supported"
    return None


def _refuse_unserved(body: dict[str, Any]) -> None:
    unserved = _unserved(body)
    if unserved is not None:
        name, why = unserved
        raise errors.invalid_parameter(f"Parameter {name}: {why}.")


def _messages(messages: Any) -> Any:
    if not isinstance(messages, list):
        return messages  # the conversation rules say what is wrong with it
    return [_message(m) if isinstance(m, dict) else m for m in messages]


def _message(message: dict[str, Any]) -> dict[str, Any]:
    # "developer" is newer OpenAI clients' name for the system message.
    role = "system" if message.get("role") == "developer" else message.get("role")
    return {**message, "role": role, "content": _content(message.get("content"))}


def _content(content: Any) -> Any:
    if not isinstance(content, list):
        return content
    items = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            items.append({"text": part.get("text")})
        elif kind == "image_url":  # the type kept: the rules name this form, not "image", when the URL is bad
            url = part.get("image_url")
            items.append({"type": kind, "image": url.get("url") if isinstance(url, dict) else url})
        elif kind in ("video_url", "video"):
            items.append({"video": part.get(kind)})
        elif kind in ("input_audio", "audio"):
            items.append({"audio": part.get(kind)})
        else:
            items.append(part)  # refused by the rules, with their message
    return items


# -- the request, as documented ------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str = Field(pattern=r"\S", description="An http(s) URL, a data: URI or an oss:// upload.")


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL | str


class ChatMessage(BaseModel):
    """One turn, with the native surface's rules: system first, images in user turns, user last
    (or the results of the calls the assistant turn before them made)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart] | None = Field(
        description="Null only in an assistant turn that called tools."
    )
    # Any: other roles' tool_calls and tool_call_id are ignored.
    tool_calls: Any = Field(None, description=TOOL_CALLS_IN)
    tool_call_id: Any = Field(None, description="A tool turn: the id of the call whose result it is (a string).")


class StreamOptions(BaseModel):
    include_usage: bool | None = Field(None, description="A last chunk with no choices and the usage.")


EXAMPLE_MESSAGES: list[JsonValue] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": EXAMPLE_IMAGE}},
            {"type": "text", "text": "What is this?"},
        ],
    },
]


class ChatInput(BaseModel):
    """What every chat-shaped body is checked for; ``POST /tokenize`` reads no more but the tools and
    response_format a completion would put in the prompt (sampling is ignored)."""

    model_config = ConfigDict(
        extra="allow", json_schema_extra={"examples": [{"model": "llama3.2-11b-vision", "messages": EXAMPLE_MESSAGES}]}
    )
    model: str = Field(min_length=1, description="A served model name (GET /compatible-mode/v1/models).")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = Field(None, description="One choice per request.")


class ChatBody(ChatInput, Sampling, Structured):
    """A chat-completions request; DashScope extras (top_k, repetition_penalty) ride at the top level."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "model": "llama3.2-11b-vision",
                    "messages": EXAMPLE_MESSAGES,
                    "max_tokens": 64,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
            ]
        },
    )
    max_completion_tokens: MaxTokens = Field(None, description="The same as max_tokens, which it overrides.")


# -- the answer -------------------------------------------------------------------


def completion_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


class UsageBody(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] = {"cached_tokens": 0}

    @classmethod
    def of(cls, usage: Usage) -> UsageBody:
        return cls(
            prompt_tokens=usage.input_tokens,
            completion_tokens=usage.output_tokens,
            total_tokens=usage.total_tokens,
            prompt_tokens_details={"cached_tokens": usage.cached_tokens},
        )


class Message(BaseModel):
    """The answer (or, in a stream, what is new in it): text, or tool calls with null content."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallBody] | None = Field(None, description='With finish_reason "tool_calls".')

    @model_serializer(mode="wrap")
    def _without_absent_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        body: dict[str, object] = handler(self)
        if body.get("tool_calls") is None:
            body.pop("tool_calls", None)  # as OpenAI: the key only when there are calls
        return body

    @classmethod
    def of(cls, text: str, tool_calls: list[ToolCall]) -> Message:
        if tool_calls:
            return cls(content=text or None, tool_calls=whole_tool_call_bodies(tool_calls))
        return cls(content=text)


class Choice(BaseModel):
    index: int = 0
    message: Message
    finish_reason: str = Field(json_schema_extra={"enum": FINISH_REASONS})
    logprobs: Logprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: UsageBody
    system_fingerprint: None = None

    @classmethod
    def of(
        cls,
        request_id: str,
        model: str,
        text: str,
        finish: str,
        usage: Usage,
        logprobs: list[TokenLogprob] | None = None,
        tool_calls: list[ToolCall] | None = None,
    ) -> ChatCompletion:
        message = Message.of(text, tool_calls or [])
        choice = Choice(message=message, finish_reason=finish, logprobs=Logprobs.of(logprobs))
        return cls(
            id=completion_id(request_id),
            created=int(time.time()),
            model=model,
            choices=[choice],
            usage=UsageBody.of(usage),
        )


class Delta(BaseModel):
    """What is new in a streamed answer; a key only when it has news, as OpenAI streams it: ``role`` in the
    first chunk alone (the openai SDK's stream helper joins every string it is sent, the role too)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[IndexedToolCallBody] | None = None

    @model_serializer(mode="wrap")
    def _only_news(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = Field(None, json_schema_extra={"enum": [*FINISH_REASONS, None]})
    logprobs: Logprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageBody | None = None
    system_fingerprint: None = None


class TextChunks:
    """A stream's plain chunks (text, no tool calls, no logprobs) and its usage chunk, as ``data:`` frames: the
    bytes ``ChatCompletionChunk`` writes (tests/api/openai/test_frames.py compares them), joined from parts
    made once a stream instead of a model built and dumped per chunk (9 us a chunk; this takes 1 to 2)."""

    def __init__(self, id: str, created: int, model: str) -> None:
        shared = (
            f'data: {{"id":{_json(id)},"object":"chat.completion.chunk","created":{created},"model":{_json(model)},'
        )
        self._text = shared + '"choices":[{"index":0,"delta":{'
        self._usage = shared + '"choices":[],"usage":'

    def text(self, content: str, finish: str | None, role: bool) -> bytes | None:
        """A chunk with ``content`` (the first names the role); None for text JSON cannot carry (a lone
        surrogate), which ``ChatCompletionChunk`` refuses as it always did."""
        reason = "null" if finish is None else _json(finish)
        news = '"role":"assistant",' if role else ""
        frame = f'{self._text}{news}"content":{_json(content)}}},"finish_reason":{reason},"logprobs":null}}],'
        try:
            return (frame + '"usage":null,"system_fingerprint":null}\n\n').encode()
        except UnicodeEncodeError:
            return None

    def usage(self, usage: Usage) -> bytes:
        return (
            f'{self._usage}{{"prompt_tokens":{usage.input_tokens},"completion_tokens":{usage.output_tokens},'
            f'"total_tokens":{usage.total_tokens},"prompt_tokens_details":{{"cached_tokens":{usage.cached_tokens}}}}},'
            '"system_fingerprint":null}\n\n'
        ).encode()


# json.dumps(text, ensure_ascii=False), without making an encoder each call
_json = json.JSONEncoder(ensure_ascii=False).encode


class ErrorDetail(BaseModel):
    code: str
    type: str
    param: str | None = None
    message: str


class ErrorBody(BaseModel):
    """An error in the OpenAI shape: an HTTP answer, or a ``data:`` event once a stream has started."""

    error: ErrorDetail
    request_id: str


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "llamascope"
    test_model: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelEntry]


class TokenCount(BaseModel):
    count: int = Field(description="The prompt's input_tokens.")
    max_model_len: int = Field(description="The model's context length.")
