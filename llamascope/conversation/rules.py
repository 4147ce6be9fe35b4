"""The conversation rules of the Llama models, as the hosted service states them.

- ``system``, if present, is the first message and carries text only;
- images follow the ``Images`` rule the request is under: on the multimodal
  endpoint the first ``user`` message carries exactly one image (no text-only
  input) and later user messages are text; on the text-generation endpoint a
  vision model takes a text-only conversation or one image in a user message;
  a text-only model takes no image. Never an image list, video or audio;
- ``assistant`` messages are earlier replies, text only;
- ``content`` is a string or a list of ``{"text": ...}`` / ``{"image": ...}``
  items; sibling hints such as ``min_pixels`` are accepted and ignored;
- the conversation ends with a user message.

``parse_messages`` checks all of this on the raw JSON and returns a ``Draft``
whose image is still a reference; every violation is a 400 InvalidParameter
that names the message and the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from llamascope import errors
from llamascope.engines.base import Turn
from llamascope.images import PreparedImage

ROLES = ("system", "user", "assistant")
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


@dataclass(frozen=True)
class Draft:
    turns: tuple[DraftTurn, ...]
    image_ref: str | None  # None: a text-only conversation

    def with_image(self, image: PreparedImage | None) -> list[Turn]:
        return [
            Turn(
                role=t.role,  # type: ignore[arg-type]
                text=t.text,
                image=image if t.has_image else None,
                text_before_image=t.text_before_image,
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


def parse_messages(messages: Any, rule: Images = Images.REQUIRED) -> Draft:
    if messages is None or messages == []:
        raise errors.ServiceError(400, "BadRequest.EmptyInput", "Required input parameter missing from request.")
    if not isinstance(messages, list):
        raise _bad("input.messages must be a list of messages.")
    turns: list[DraftTurn] = []
    image_ref: str | None = None
    seen_user = False
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f'messages[{i}] must be an object with "role" and "content".')
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}]: role {role!r} is not supported; use system, user or assistant.")
        if "content" not in message or message["content"] is None:
            raise _bad(f"messages[{i}] ({role}) has no content.")
        before, after, images = _content_parts(i, role, message["content"])
        if role == "system":
            if i != 0:
                raise _bad(f"messages[{i}]: the system message must be the first message.")
            if images:
                raise _bad("messages[0]: the system message takes text only; put the image in the first user message.")
        elif role == "assistant":
            if images:
                raise _bad(f"messages[{i}]: assistant messages take text only.")
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
        turns.append(
            DraftTurn(role=role, text="".join(after), has_image=bool(images), text_before_image="".join(before))
        )
    if not seen_user:
        raise _bad("The input messages do not contain elements with the role of user.")
    if turns[-1].role != "user":
        raise _bad("The last message must be a user message.")
    return Draft(turns=tuple(turns), image_ref=image_ref)
