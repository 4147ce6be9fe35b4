"""A conversation as the client holds it: model, system prompt, the one image, the turns, the parameters.

It becomes exactly the request body the API accepts (``body()``), and a saved
body is read back (``from_body()``): a saved conversation is that body, the
next question not yet in it, so ``/save`` writes what ``curl -d @file``
would send once a user message is appended.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llamascope.client.native import DEFAULT_MODEL


def _integer(value: str) -> int:
    return int(value)


def _boolean(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _stop(value: str) -> str | list[str]:
    """A string, or a JSON list of strings (``["\\n\\n", "END"]``)."""
    if value.startswith("["):
        items = json.loads(value)
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ValueError("expected a string or a JSON list of strings")
        return items
    return value


def _as_given(value: str) -> Any:
    """A parameter the client does not know: JSON if it reads as JSON, else the string."""
    try:
        return json.loads(value)
    except ValueError:
        return value


@dataclass(frozen=True)
class Parameter:
    parse: Callable[[str], Any]
    meaning: str


# Every parameter of the API (the seed reference's and those llamascope adds); values are only parsed
# here, their ranges are the server's to check, so that its own error says what is allowed.
PARAMETERS: dict[str, Parameter] = {
    "max_tokens": Parameter(_integer, "most tokens the answer may have (default 512)"),
    "max_new_tokens": Parameter(_integer, "the same, by its older name"),
    "min_new_tokens": Parameter(_integer, "fewest tokens before the model may stop"),
    "temperature": Parameter(float, "sampling temperature, >= 0 (default 0.8; 0 is greedy)"),
    "top_p": Parameter(float, "nucleus sampling, in (0, 1] (default 1.0)"),
    "top_k": Parameter(_integer, "candidates to sample from (none, 0 or above 100: off)"),
    "seed": Parameter(_integer, "the same seed gives the same answer"),
    "repetition_penalty": Parameter(float, "above 1 discourages repeating (default 1.0)"),
    "stop": Parameter(_stop, 'end the answer at this string, or any of a JSON list: ["\\n\\n", "END"]'),
    "incremental_output": Parameter(_boolean, "stream deltas instead of the whole text so far (true/false)"),
}


def parse_parameter(name: str, value: str) -> Any:
    """The value of ``/set NAME VALUE``; ValueError says what was expected."""
    parameter = PARAMETERS.get(name)
    if parameter is None:
        return _as_given(value)
    try:
        return parameter.parse(value)
    except (ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"{name}: {exc}") from None


def _text_of(content: Any) -> tuple[str, str | None]:
    """(text, image) of a message's content: a string or a list of text and image items."""
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        raise ValueError("a message's content must be a string or a list of items")
    texts, image = [], None
    for item in content:
        if not isinstance(item, dict):
            raise ValueError("a content item must be an object")
        if isinstance(item.get("image"), str):
            image = item["image"]
        elif isinstance(item.get("text"), str):
            texts.append(item["text"])
    return "".join(texts), image


@dataclass
class Conversation:
    model: str = DEFAULT_MODEL
    system: str | None = None
    image: str | None = None  # as sent: an http(s) URL, a data: URI or an oss:// key
    turns: list[tuple[str, str]] = field(default_factory=list)  # (role, text): user, assistant, ...
    parameters: dict[str, Any] = field(default_factory=dict)

    def messages(self) -> list[dict[str, Any]]:
        """The messages the API takes: the system prompt, then the turns, the image in the first user turn."""
        messages: list[dict[str, Any]] = []
        if self.system:
            messages.append({"role": "system", "content": [{"text": self.system}]})
        first_user = True
        for role, text in self.turns:
            content: list[dict[str, str]] = [{"text": text}]
            if role == "user" and first_user:
                first_user = False
                if self.image:
                    content.insert(0, {"image": self.image})
            messages.append({"role": role, "content": content})
        return messages

    def body(self) -> dict[str, Any]:
        return {"model": self.model, "input": {"messages": self.messages()}, "parameters": dict(self.parameters)}

    def ask(self, text: str) -> None:
        self.turns.append(("user", text))

    def answered(self, text: str) -> None:
        self.turns.append(("assistant", text))

    def unanswered(self) -> None:
        """Drop the question that got no answer (the call failed), so the conversation stays valid."""
        if self.turns and self.turns[-1][0] == "user":
            self.turns.pop()

    def last_question(self) -> str | None:
        """For /retry: drop the last answer and return the question it answered (None: nothing to retry)."""
        if self.turns and self.turns[-1][0] == "assistant":
            self.turns.pop()
        if self.turns and self.turns[-1][0] == "user":
            return self.turns.pop()[1]
        return None

    def undo(self) -> bool:
        """Drop the last question and its answer; False when there is nothing to drop."""
        if not self.turns:
            return False
        if self.turns[-1][0] == "assistant":
            self.turns.pop()
        if self.turns and self.turns[-1][0] == "user":
            self.turns.pop()
        return True

    def save(self) -> str:
        return json.dumps(self.body(), ensure_ascii=False, indent=2) + "\n"

    @classmethod
    def load(cls, text: str, model: str | None = None) -> Conversation:
        """A saved conversation: a request body, ``{"messages": [...]}`` or a bare list of messages."""
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("input"), dict):
            messages, saved_model, parameters = data["input"].get("messages"), data.get("model"), data.get("parameters")
        elif isinstance(data, dict):
            messages, saved_model, parameters = data.get("messages"), data.get("model"), data.get("parameters")
        else:
            messages, saved_model, parameters = data, None, None
        if not isinstance(messages, list):
            raise ValueError('expected a request body with input.messages, {"messages": [...]} or a list of messages')
        conversation = cls(model=str(saved_model or model or DEFAULT_MODEL))
        if isinstance(parameters, dict):
            conversation.parameters = dict(parameters)
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"messages[{i}]: expected an object with role system, user or assistant")
            text, image = _text_of(message.get("content"))
            if message["role"] == "system":
                conversation.system = text
                continue
            if image is not None:
                if conversation.image is not None:
                    raise ValueError(f"messages[{i}]: a second image; a conversation has one")
                conversation.image = image
            conversation.turns.append((message["role"], text))
        return conversation
