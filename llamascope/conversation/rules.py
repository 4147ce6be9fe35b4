"""The conversation rules of the Llama models, as the hosted service states them.

- ``system``, if present, is the first message and carries text only;
- images follow the ``Images`` rule the request is under: on the multimodal
  endpoint the first ``user`` message carries exactly one image (no text-only
  input) and later user messages are text; on the text-generation endpoint a
  vision model takes a text-only conversation or one image in a user message;
  a text-only model takes no image. Never an image list, video or audio;
- ``assistant`` messages are earlier replies, text only; one that called tools
  carries ``tool_calls`` (OpenAI's shape) and may have no content;
- ``tool`` messages are the results of those calls, text only, each after an
  assistant message that called tools (``tool_call_id`` names its call);
- ``content`` is a string or a list of ``{"text": ...}`` / ``{"image": ...}``
  items; sibling hints such as ``min_pixels`` are accepted and ignored;
- the conversation ends with a user message, or with tool results (the model
  answers them).

``parse_messages`` checks all of this on the raw JSON and returns a ``Draft``
whose image is still a reference; every violation is a 400 InvalidParameter
that names the message and the problem.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

from llamascope import errors
from llamascope.engines.base import Turn
from llamascope.images import PreparedImage
from llamascope.structured.tools import ToolCall

ROLES = ("system", "user", "assistant", "tool")
# Keys that may ride beside "image" or "text" in a content item; DashScope clients send them.
_HINTS = {"min_pixels", "max_pixels", "total_pixels", "cache_control", "type"}


class Images(Enum):
    """Where a conversation may (or must) carry its one image."""

    REQUIRED = "required"  # the multimodal endpoint: the first user message carries exactly one
    OPTIONAL = "optional"  # a vision model on the text-generation endpoint: none, or one in a user message
    NONE = "none"  # a text-only model


@dataclass(frozen=True)
class DraftTurn:
    role: str
    text: str  # the text after the image, or all the text if the turn has no image
    has_image: bool = False
    text_before_image: str = ""
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn's call


@dataclass(frozen=True)
class Draft:
    turns: tuple[DraftTurn, ...]
    image_ref: str | None  # None: a text-only conversation

    def texts(self) -> Iterator[str]:
        """Every text of the conversation, calls included (``response_format`` json_object looks for "json")."""
        for turn in self.turns:
            yield turn.text_before_image
            yield turn.text
            for call in turn.tool_calls:
                yield call.arguments

    def with_image(self, image: PreparedImage | None) -> list[Turn]:
        return [
            Turn(
                role=t.role,  # type: ignore[arg-type]
                text=t.text,
                image=image if t.has_image else None,
                text_before_image=t.text_before_image,
                tool_calls=t.tool_calls,
                tool_call_id=t.tool_call_id,
            )
            for t in self.turns
        ]


def _bad(message: str) -> errors.ServiceError:
    return errors.invalid_parameter(message)


def _content_parts(index: int, role: str, content: Any) -> tuple[list[str], list[str], list[str]]:
    """Return (text before the first image, text after it, image references) of one message."""
    where = f"messages[{index}] ({role})"
    if isinstance(content, str):
        return [], [content], []
    if not isinstance(content, list):
        raise _bad(f'{where}: content must be a string or a list of {{"text": ...}} / {{"image": ...}} items.')
    before: list[str] = []
    after: list[str] = []
    images: list[str] = []
    for j, item in enumerate(content):
        at = f"{where} content[{j}]"
        if not isinstance(item, dict):
            raise _bad(f'{at}: The item of `content` should be a message of a certain modal, like {{"text": "..."}}.')
        for modal in ("video", "audio"):
            if modal in item:
                raise _bad(f"{at}: this model takes no {modal}; it understands one image and text.")
        kinds = [k for k in ("text", "image") if k in item]
        unknown = set(item) - {"text", "image"} - _HINTS
        if len(kinds) != 1 or unknown:
            raise _bad(
                f"{at}: The item of `content` should be a message of a certain modal: exactly one of "
                f'"text" or "image"{"; unknown key " + repr(sorted(unknown)[0]) if unknown else ""}.'
            )
        value = item[kinds[0]]
        if kinds[0] == "image":
            if isinstance(value, list):
                raise _bad(f"{at}: image lists are not supported; send one image per conversation.")
            if not isinstance(value, str) or not value.strip():
                raise _bad(f'{at}: "image" must be a URL string.')
            images.append(value.strip())
        else:
            if not isinstance(value, str):
                raise _bad(f'{at}: "text" must be a string.')
            (after if images else before).append(value)
    if not images:
        return [], before, images
    return before, after, images


def _tool_calls(index: int, value: Any) -> tuple[ToolCall, ...]:
    """An assistant message's ``tool_calls`` (OpenAI's shape, DashScope's too) as calls."""
    if value is None:
        return ()
    where = f"messages[{index}] (assistant) tool_calls"
    if not isinstance(value, list):
        raise _bad(f"{where}: must be a list of calls.")
    calls = []
    for j, call in enumerate(value):
        at = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise _bad(f'{at}: expected {{"id", "type": "function", "function": {{"name", "arguments"}}}}.')
        assert isinstance(call, dict) and isinstance(function, dict)
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise _bad(f"{at}.function.arguments: not valid JSON.") from None
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise _bad(f"{at}.function.arguments: must be a JSON object (as a string).")
        text = json.dumps(arguments, ensure_ascii=False)
        given = call.get("id")
        if given is not None and not isinstance(given, str):
            raise _bad(f"{at}.id: must be a string.")
        calls.append(ToolCall(name, text, given) if given else ToolCall(name, text))
    return tuple(calls)


def _tool_call_id(index: int, message: dict[str, Any], calls: tuple[ToolCall, ...]) -> str | None:
    """A tool message's ``tool_call_id``, which names one of ``calls`` (the calls it answers) when given."""
    where = f"messages[{index}] (tool)"
    if not calls:
        raise _bad(
            f"{where}: a tool message must answer a call: it follows an assistant message with 'tool_calls' "
            "(or another tool message)."
        )
    value = message.get("tool_call_id")
    if value is None or value == "":  # LangChain sends "" for a result it has no id for
        return None
    if not isinstance(value, str):
        raise _bad(f"{where}: tool_call_id must be a string.")
    if all(call.id != value for call in calls):
        raise _bad(f"{where}: tool_call_id {value!r:.80} is not the id of a call in the assistant message before it.")
    return value


def parse_messages(messages: Any, rule: Images = Images.REQUIRED) -> Draft:
    if messages is None or messages == []:
        raise errors.ServiceError(400, "BadRequest.EmptyInput", "Required input parameter missing from request.")
    if not isinstance(messages, list):
        raise _bad("input.messages must be a list of messages.")
    turns: list[DraftTurn] = []
    image_ref: str | None = None
    seen_user = False
    answering: tuple[ToolCall, ...] = ()  # the calls of the assistant message the tool messages now answer
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f'messages[{i}] must be an object with "role" and "content".')
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}]: role {role!r} is not supported; use system, user, assistant or tool.")
        calls = _tool_calls(i, message.get("tool_calls")) if role == "assistant" else ()
        content = message.get("content")
        if content is None and calls:
            content = ""  # OpenAI's assistant message that only calls tools has null content
        if content is None:
            raise _bad(f"messages[{i}] ({role}) has no content.")
        before, after, images = _content_parts(i, role, content)
        call_id = None
        if role == "system":
            if i != 0:
                raise _bad(f"messages[{i}]: the system message must be the first message.")
            if images:
                raise _bad("messages[0]: the system message takes text only; put the image in the first user message.")
        elif role == "assistant":
            if images:
                raise _bad(f"messages[{i}]: assistant messages take text only.")
        elif role == "tool":
            if images:
                raise _bad(f"messages[{i}]: tool messages take text only.")
            call_id = _tool_call_id(i, message, answering)
        elif images and rule is Images.NONE:
            raise _bad(f"messages[{i}]: this model is a text-only model; it takes no image.")
        elif rule is Images.OPTIONAL and images:
            if len(images) > 1 or image_ref is not None:
                raise _bad(f"messages[{i}]: this model takes one image per conversation.")
            image_ref = images[0]
        elif rule is Images.REQUIRED and not seen_user:
            if len(images) != 1:
                # Say only what is wrong: none breaks the no-text-only rule, several the one-image rule.
                why = "takes no text-only input" if not images else "takes one image per conversation"
                raise _bad(
                    f"messages[{i}]: the first user message must carry exactly one image "
                    f"(found {len(images)}); this model {why}."
                )
            image_ref = images[0]
        elif images:
            raise _bad(
                f"messages[{i}]: only the first user message may carry an image; "
                "this model takes one image per conversation, later turns are text."
            )
        seen_user = seen_user or role == "user"
        if role != "tool":
            answering = calls
        turns.append(
            DraftTurn(
                role=role,
                text="".join(after),
                has_image=bool(images),
                text_before_image="".join(before),
                tool_calls=calls,
                tool_call_id=call_id,
            )
        )
    if not seen_user:
        raise _bad("The input messages do not contain elements with the role of user.")
    if turns[-1].role not in ("user", "tool"):
        raise _bad("The last message must be a user message (or the results of the tool calls before it).")
    return Draft(turns=tuple(turns), image_ref=image_ref)
