"""Chat-completions requests and responses (wire spec section 7).

Requests are translated to the DashScope message form (``{"image": url}`` /
``{"text": ...}`` items and a ``parameters`` object), so the conversation rules
and parameter checks are the native surface's, with the same messages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from llamascope import errors
from llamascope.api.incoming import envelope
from llamascope.conversation.service import Usage

# Sampling fields that mean the same in both dialects; DashScope extras ride at the top level.
_SAME = ("temperature", "top_p", "seed", "stop", "top_k", "repetition_penalty")


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
        if body.get("n") not in (None, 1):
            raise errors.invalid_parameter("Parameter n: only one choice per request is supported.")
        parameters = {name: body[name] for name in _SAME if body.get(name) is not None}
        for name in ("max_completion_tokens", "max_tokens"):  # the first given, under its own name for errors
            if body.get(name) is not None:
                parameters[name] = body[name]
                break
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise errors.invalid_parameter("Parameter stream should be true or false.")
        options = body.get("stream_options") or {}
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        return cls(body["model"], _messages(body.get("messages")), parameters, stream, include_usage)


def _messages(messages: Any) -> Any:
    if not isinstance(messages, list):
        return messages  # the conversation rules say what is wrong with it
    return [{**m, "content": _content(m.get("content"))} if isinstance(m, dict) else m for m in messages]


def _content(content: Any) -> Any:
    if not isinstance(content, list):
        return content
    items = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            items.append({"text": part.get("text")})
        elif kind == "image_url":
            url = part.get("image_url")
            items.append({"image": url.get("url") if isinstance(url, dict) else url})
        elif kind in ("video_url", "video"):
            items.append({"video": part.get(kind)})
        elif kind in ("input_audio", "audio"):
            items.append({"audio": part.get(kind)})
        else:
            items.append(part)  # refused by the rules, with their message
    return items


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
            prompt_tokens=usage.input_tokens, completion_tokens=usage.output_tokens, total_tokens=usage.total_tokens
        )


class Message(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: Message
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: UsageBody
    system_fingerprint: None = None

    @classmethod
    def of(cls, request_id: str, model: str, text: str, finish: str, usage: Usage) -> ChatCompletion:
        return cls(
            id=completion_id(request_id),
            created=int(time.time()),
            model=model,
            choices=[Choice(message=Message(content=text), finish_reason=finish)],
            usage=UsageBody.of(usage),
        )


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Message  # a delta has a message's shape: role and (new) content
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageBody | None = None
    system_fingerprint: None = None
