"""Where a conversation's images may be, and how many, per endpoint and model (``rules.Images``)."""

from __future__ import annotations

import pytest

from llamascope import errors
from llamascope.conversation.rules import ImageRef, Images, parse_messages

IMAGE = {"image": "https://example.com/dog.png"}
OTHER = {"image": "https://example.com/cat.png"}
MULTIMODAL = Images(4, required=True)  # the multimodal endpoint, a vision model's default
TEXT = Images(4)  # the text-generation endpoint and compatible mode
NONE = Images(0)  # a text-only model


def user(*items: object) -> dict[str, object]:
    return {"role": "user", "content": list(items)}


TEXT_ONLY = [{"role": "system", "content": "Be brief."}, user({"text": "hi"})]
LATER_IMAGE = [user({"text": "hi"}), {"role": "assistant", "content": "hello"}, user(IMAGE, {"text": "and this?"})]


def refusal(messages: list[dict[str, object]], rule: Images) -> str:
    with pytest.raises(errors.ServiceError) as caught:
        parse_messages(messages, rule)
    assert (caught.value.status, caught.value.code) == (400, "InvalidParameter")
    return caught.value.message


def test_the_multimodal_endpoint_wants_an_image_first() -> None:
    assert "must carry an image (found 0)" in refusal(TEXT_ONLY, MULTIMODAL)
    assert "must carry an image (found 0)" in refusal(LATER_IMAGE, MULTIMODAL)
    assert parse_messages([user(IMAGE, {"text": "what?"})]).image_refs == [IMAGE["image"]]
    assert parse_messages(TEXT_ONLY, Images(4, required=False)).image_refs == []  # relaxed by the model's setting


def test_images_in_any_user_turn_in_order() -> None:
    draft = parse_messages(TEXT_ONLY, TEXT)
    assert draft.image_refs == [] and [t.text for t in draft.turns] == ["Be brief.", "hi"]
    assert [turn.content for turn in draft.with_images([])] == ["Be brief.", "hi"]
    later = parse_messages(LATER_IMAGE, TEXT)
    assert later.image_refs == [IMAGE["image"]]
    two = [user(IMAGE, {"text": "a"}), {"role": "assistant", "content": "b"}, user({"text": "c"}, OTHER, {"text": "d"})]
    draft = parse_messages(two, MULTIMODAL)
    assert draft.image_refs == [IMAGE["image"], OTHER["image"]]
    assert draft.turns[2].parts == ("c", ImageRef(OTHER["image"]), "d")
    turns = draft.with_images(["A", "B"])  # type: ignore[list-item]
    assert turns[0].content == ("A", "a") and turns[2].content == ("c", "B", "d")
    both = parse_messages([user(IMAGE, OTHER, {"text": "compare"}, {"text": " them"})], MULTIMODAL)
    assert both.turns[0].parts == (ImageRef(IMAGE["image"]), ImageRef(OTHER["image"]), "compare them")


def test_the_limit_is_named() -> None:
    message = refusal([user(IMAGE, OTHER, IMAGE, {"text": "compare"})], Images(2, required=True))
    assert "messages[0]: this model takes at most 2 images per conversation (found 3" in message
    assert "max_images" in message
    one = [user(IMAGE, {"text": "a"}), {"role": "assistant", "content": "b"}, user(OTHER)]
    assert "at most 1 image per conversation" in refusal(one, Images(1))
    assert "image lists are not supported" in refusal([user({"image": [IMAGE["image"], OTHER["image"]]})], TEXT)
    assert "takes no video" in refusal([user({"video": ["a.jpg", "b.jpg"]})], TEXT)


def test_a_text_only_model_takes_no_image() -> None:
    assert parse_messages(TEXT_ONLY, NONE).image_refs == []
    assert "messages[2]: this model is a text-only model" in refusal(LATER_IMAGE, NONE)
    # LangChain's {"type": "text"} parts are text like DashScope's own items.
    draft = parse_messages([user({"type": "text", "text": "hi"})], NONE)
    assert draft.turns[0].text == "hi"


def test_images_stay_in_user_messages() -> None:
    assert "system message takes text only" in refusal([{"role": "system", "content": [IMAGE]}, user(IMAGE)], TEXT)
    bad = [user(IMAGE), {"role": "assistant", "content": [IMAGE]}, user({"text": "?"})]
    assert "assistant messages take text only" in refusal(bad, TEXT)
