"""A conversation as the client holds it: model, system prompt, the turns with their images, the parameters.

It becomes exactly the request body the API accepts (``body()``), and a saved
body is read back (``from_body()``): a saved conversation is that body, the
next question not yet in it, so ``/save`` writes what ``curl -d @file``
would send once a user message is appended.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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
    "presence_penalty": Parameter(float, "in [-2, 2]: above 0 discourages the tokens the answer has made"),
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


def _text_of(content: Any) -> tuple[str, list[str]]:
    """(text, images) of a message's content: a string or a list of text and image items, images in order."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ValueError("a message's content must be a string or a list of items")
    texts, images = [], []
    for item in content:
        if not isinstance(item, dict):
            raise ValueError("a content item must be an object")
        if isinstance(item.get("image"), str):
            images.append(item["image"])
        elif isinstance(item.get("text"), str):
            texts.append(item["text"])
    return "".join(texts), images


class Turn(NamedTuple):
    role: str  # user or assistant
    text: str
    images: tuple[str, ...] = ()  # a user turn's images, in order, as sent


@dataclass
class Conversation:
    """``images`` wait for the next question: ``ask`` takes them into its message (several, in order),
    so an image joins the conversation at any turn. Each turn keeps the images it carried."""

    model: str = DEFAULT_MODEL
    system: str | None = None
    images: list[str] = field(default_factory=list)  # as sent: http(s) URLs, data: URIs or oss:// keys
    turns: list[Turn] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)

    def messages(self) -> list[dict[str, Any]]:
        """The messages the API takes: the system prompt, then the turns, each user turn's images before its text."""
        messages: list[dict[str, Any]] = []
        if self.system:
            messages.append({"role": "system", "content": [{"text": self.system}]})
        for turn in self.turns:
            content = [{"image": image} for image in turn.images]
            content.append({"text": turn.text})
            messages.append({"role": turn.role, "content": content})
        return messages

    def sent_images(self) -> list[str]:
        """The images already in the conversation, in the order they were sent."""
        return [image for turn in self.turns for image in turn.images]

    def body(self) -> dict[str, Any]:
        return {"model": self.model, "input": {"messages": self.messages()}, "parameters": dict(self.parameters)}

    def ask(self, text: str) -> None:
        """A question, with the images waiting for it."""
        self.turns.append(Turn("user", text, tuple(self.images)))
        self.images = []

    def answered(self, text: str) -> None:
        self.turns.append(Turn("assistant", text))

    def unanswered(self, keep_images: bool = True) -> tuple[str, ...]:
        """Drop the question that got no answer, so the conversation stays valid; its images wait for the next
        question again, or (``keep_images`` false: a refusal, most often of an image) are dropped too. Returns
        the images it carried."""
        if not self.turns or self.turns[-1].role != "user":
            return ()
        images = self.turns.pop().images
        if keep_images:
            self.images[:0] = images
        return images

    def last_question(self) -> str | None:
        """For /retry: drop the last answer and return the question it answered, its images waiting again
        (None: nothing to retry)."""
        if self.turns and self.turns[-1].role == "assistant":
            self.turns.pop()
        if self.turns and self.turns[-1].role == "user":
            turn = self.turns.pop()
            self.images[:0] = turn.images
            return turn.text
        return None

    def undo(self) -> bool:
        """Drop the last question and its answer (its images wait for the next question); False when there is
        nothing to drop."""
        if not self.turns:
            return False
        if self.turns[-1].role == "assistant":
            self.turns.pop()
        self.unanswered()
        return True

    def clear(self) -> None:
        """Start again: the turns go, their images wait for the first question of the new conversation."""
        self.images[:0] = self.sent_images()
        self.turns.clear()

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
            text, images = _text_of(message.get("content"))
            if message["role"] == "system":
                conversation.system = text
                continue
            if images and message["role"] != "user":
                raise ValueError(f"messages[{i}]: only a user message carries images")
            conversation.turns.append(Turn(message["role"], text, tuple(images)))
        return conversation
