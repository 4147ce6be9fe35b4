"""The conversation rules of the Llama models, as the hosted service states them.

- ``system``, if present, is the first message and carries text only;
- images follow the ``Images`` rule the request is under: any ``user`` message
  may carry images, several of them, between its texts (their order is kept),
  up to the model's limit per conversation; on the multimodal endpoint the first
  ``user`` message carries at least one (no text-only input) unless the model's
  setting relaxes it; a text-only model takes no image. Never an image list,
  video or audio;
- ``assistant`` messages are earlier replies, text only; one that called tools
  carries ``tool_calls`` (OpenAI's shape) and may have no content;
- ``tool`` messages are the results of those calls, text only, each after an
  assistant message that called tools (``tool_call_id`` names its call);
- ``content`` is a string or a list of ``{"text": ...}`` / ``{"image": ...}``
  items; sibling hints such as ``min_pixels`` are accepted and ignored;
- the conversation ends with a user message, or with tool results (the model
  answers them).

``parse_messages`` checks all of this on the raw JSON and returns a ``Draft``
whose images are still references; every violation is a 400 InvalidParameter
that names the message and the problem.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from llamascope import errors
from llamascope.engines.base import Part, Turn
from llamascope.images import PreparedImage
from llamascope.structured.tools import ToolCall

ROLES = ("system", "user", "assistant", "tool")
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a surrogate: json joins an escaped pair into its character, so one left is alone, and
    no text can be encoded with it (the prompt, a log line, an error message echoing it). ``isascii`` is a flag of
    the string: most texts cost nothing."""
    return not text.isascii() and _SURROGATE.search(text) is not None


# Keys that may ride beside "image" or "text" in a content item; DashScope clients send them.
_HINTS = {"min_pixels", "max_pixels", "total_pixels", "cache_control", "type"}
# An OpenAI-style image part with no URL, said in the form the caller wrote: it reaches the rules as
# {"type": "image_url", "image": url} (api/openai and api/text keep the type), a key the caller never wrote.
_NO_IMAGE_URL = '"image_url" must be {"url": ...} with an http(s) URL or a data: URI.'


@dataclass(frozen=True)
class Images:
    """Where a conversation may (or must) carry images, and how many."""

    most: int  # images per conversation at most; 0: a text-only model, which takes none
    required: bool = False  # the first user message must carry one (the multimodal endpoint's contract)


@dataclass(frozen=True)
class ImageRef:
    """An image of a message, not fetched yet: its URL, ``data:`` URI or ``oss://`` key."""

    reference: str
    at: str = field(default="", compare=False)  # where the request has it: "messages[2] (user) content[0]"


@dataclass(frozen=True)
class DraftTurn:
    role: str
    parts: tuple[str | ImageRef, ...]  # its texts and images in order, adjacent texts joined
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn's call

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))


@dataclass(frozen=True)
class Draft:
    turns: tuple[DraftTurn, ...]

    @property
    def image_refs(self) -> list[str]:
        """Every image's reference, in the conversation's order (empty: a text-only conversation)."""
        return [p.reference for t in self.turns for p in t.parts if isinstance(p, ImageRef)]

    def image_places(self) -> dict[str, str]:
        """Where each image's reference first is in the request ("messages[2] (user) content[0]")."""
        places: dict[str, str] = {}
        for turn in self.turns:
            for part in turn.parts:
                if isinstance(part, ImageRef):
                    places.setdefault(part.reference, part.at)
        return places

    def texts(self) -> Iterator[str]:
        """Every text of the conversation, calls included (``response_format`` json_object looks for "json")."""
        for turn in self.turns:
            yield turn.text
            for call in turn.tool_calls:
                yield call.arguments

    def with_images(self, images: Sequence[PreparedImage]) -> list[Turn]:
        """The turns, each image reference replaced by its image (``images`` in ``image_refs``' order)."""
        given = iter(images)
        turns = []
        for t in self.turns:
            parts: tuple[Part, ...] = tuple(next(given) if isinstance(p, ImageRef) else p for p in t.parts)
            content: str | tuple[Part, ...] = parts[0] if len(parts) == 1 and isinstance(parts[0], str) else parts
            turns.append(Turn(t.role, content, t.tool_calls, t.tool_call_id))  # type: ignore[arg-type]
        return turns


def _bad(message: str) -> errors.ServiceError:
    return errors.invalid_parameter(message)


def _content_parts(index: int, role: str, content: Any) -> tuple[str | ImageRef, ...]:
    """One message's texts and images, in order, adjacent texts joined."""
    where = f"messages[{index}] ({role})"
    if isinstance(content, str):
        return (content,)
    if not isinstance(content, list):
        raise _bad(f'{where}: content must be a string or a list of {{"text": ...}} / {{"image": ...}} items.')
    parts: list[str | ImageRef] = []
    for j, item in enumerate(content):
        at = f"{where} content[{j}]"
        if not isinstance(item, dict):
            raise _bad(f'{at}: The item of `content` should be a message of a certain modal, like {{"text": "..."}}.')
        for modal in ("video", "audio"):
            if modal in item:
                raise _bad(f"{at}: this model takes no {modal}; it understands images and text.")
        kinds = [k for k in ("text", "image") if k in item]
        unknown = set(item) - {"text", "image"} - _HINTS
        if len(kinds) != 1 or unknown:
            raise _bad(
                f"{at}: The item of `content` should be a message of a certain modal: exactly one of "
                f'"text" or "image"{"; unknown key " + repr(sorted(unknown)[0]) if unknown else ""}.'
            )
        value = item[kinds[0]]
        if kinds[0] == "image":
            openai_style = item.get("type") == "image_url"  # a compatible-mode part, translated: named as written
            if isinstance(value, list):
                own = '{"type": "image_url", "image_url": {"url": ...}} part' if openai_style else '{"image": ...} item'
                raise _bad(f"{at}: image lists are not supported; send each image as its own {own}.")
            if not isinstance(value, str) or not value.strip():
                raise _bad(f"{at}: {_NO_IMAGE_URL}" if openai_style else f'{at}: "image" must be a URL string.')
            parts.append(ImageRef(value.strip(), at))
        else:
            if not isinstance(value, str):
                raise _bad(f'{at}: "text" must be a string.')
            if parts and isinstance(parts[-1], str):
                parts[-1] += value
            else:
                parts.append(value)
    return tuple(parts) if parts else ("",)


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
            except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
                raise _bad(f"{at}.function.arguments: not valid JSON.") from None
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise _bad(f"{at}.function.arguments: must be a JSON object (as a string).")
        text = json.dumps(arguments, ensure_ascii=False)
        if lone_surrogate(text):  # from an escape in the arguments' own JSON
            raise _bad(f"{at}.function.arguments: a string holds a lone surrogate (\\ud800 to \\udfff).")
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


def parse_messages(messages: Any, rule: Images = Images(1, required=True)) -> Draft:
    if messages is None or messages == []:
        raise errors.ServiceError(400, "BadRequest.EmptyInput", "Required input parameter missing from request.")
    if not isinstance(messages, list):
        raise _bad("input.messages must be a list of messages.")
    turns: list[DraftTurn] = []
    count = 0  # images so far
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
        parts = _content_parts(i, role, content)
        images = sum(isinstance(p, ImageRef) for p in parts)
        call_id = None
        if role == "system":
            if i != 0:
                raise _bad(f"messages[{i}]: the system message must be the first message.")
            if images:
                raise _bad("messages[0]: the system message takes text only; put images in user messages.")
        elif role == "assistant":
            if images:
                raise _bad(f"messages[{i}]: assistant messages take text only.")
        elif role == "tool":
            if images:
                raise _bad(f"messages[{i}]: tool messages take text only.")
            call_id = _tool_call_id(i, message, answering)
        elif images and rule.most == 0:
            raise _bad(f"messages[{i}]: this model is a text-only model; it takes no image.")
        elif rule.required and not seen_user and not images:
            raise _bad(
                f"messages[{i}]: the first user message must carry an image (found 0); "
                "this model takes no text-only input on this endpoint."
            )
        count += images
        if count > rule.most:
            raise _bad(
                f"messages[{i}]: this model takes at most {rule.most} image{'s' if rule.most != 1 else ''} "
                f"per conversation (found {count} so far); its limit is the model's max_images setting."
            )
        seen_user = seen_user or role == "user"
        if role != "tool":
            answering = calls
        turns.append(DraftTurn(role=role, parts=parts, tool_calls=calls, tool_call_id=call_id))
    if not seen_user:
        raise _bad("The input messages do not contain elements with the role of user.")
    if turns[-1].role not in ("user", "tool"):
        raise _bad("The last message must be a user message (or the results of the tool calls before it).")
    return Draft(turns=tuple(turns))
