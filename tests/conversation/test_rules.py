"""Where a conversation's image may be, per endpoint and model (``rules.Images``)."""

from __future__ import annotations

import pytest

from llamascope import errors
from llamascope.conversation.rules import Images, parse_messages

IMAGE = {"image": "https://example.com/dog.png"}


def user(*items: object) -> dict[str, object]:
    return {"role": "user", "content": list(items)}


TEXT_ONLY = [{"role": "system", "content": "Be brief."}, user({"text": "hi"})]
LATER_IMAGE = [user({"text": "hi"}), {"role": "assistant", "content": "hello"}, user(IMAGE, {"text": "and this?"})]


def refusal(messages: list[dict[str, object]], rule: Images) -> str:
    with pytest.raises(errors.ServiceError) as caught:
        parse_messages(messages, rule)
    assert (caught.value.status, caught.value.code) == (400, "InvalidParameter")
    return caught.value.message


def test_the_multimodal_rule_is_the_seeds() -> None:
    assert "exactly one image (found 0)" in refusal(TEXT_ONLY, Images.REQUIRED)
    assert "exactly one image (found 0)" in refusal(LATER_IMAGE, Images.REQUIRED)
    assert parse_messages([user(IMAGE, {"text": "what?"})]).image_ref == IMAGE["image"]


def test_a_vision_model_on_text_generation_takes_text_or_one_image() -> None:
    draft = parse_messages(TEXT_ONLY, Images.OPTIONAL)
    assert draft.image_ref is None and [t.text for t in draft.turns] == ["Be brief.", "hi"]
    assert all(turn.image is None for turn in draft.with_image(None))
    later = parse_messages(LATER_IMAGE, Images.OPTIONAL)
    assert later.image_ref == IMAGE["image"] and [t.has_image for t in later.turns] == [False, False, True]
    two = [user(IMAGE, {"text": "a"}), {"role": "assistant", "content": "b"}, user(IMAGE, {"text": "c"})]
    assert "messages[2]: this model takes one image per conversation" in refusal(two, Images.OPTIONAL)
    assert "one image per conversation" in refusal([user(IMAGE, IMAGE)], Images.OPTIONAL)


def test_a_text_only_model_takes_no_image() -> None:
    assert parse_messages(TEXT_ONLY, Images.NONE).image_ref is None
    assert "messages[2]: this model is a text-only model" in refusal(LATER_IMAGE, Images.NONE)
    # LangChain's {"type": "text"} parts are text like DashScope's own items.
    draft = parse_messages([user({"type": "text", "text": "hi"})], Images.NONE)
    assert draft.turns[0].text == "hi"


def test_two_images_in_the_first_message_are_refused_for_what_is_wrong() -> None:
    """Two images break the one-image rule only: the refusal says nothing about text-only input."""
    message = refusal([user(IMAGE, IMAGE, {"text": "compare"})], Images.REQUIRED)
    assert "exactly one image (found 2)" in message and "one image per conversation" in message
    assert "text-only" not in message
    assert "text-only input" in refusal(TEXT_ONLY, Images.REQUIRED)  # with none, that is what is wrong
