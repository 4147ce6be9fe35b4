"""The client's conversation: the messages it sends, what /retry, /undo, /save and /load do to it."""

from __future__ import annotations

import json

import pytest

from llamascope.client.conversation import Conversation, Turn, parse_parameter

DOG, CAT, OWL = (f"https://example.com/{name}.jpeg" for name in ("dog", "cat", "owl"))


def conversation() -> Conversation:
    c = Conversation(model="m", system="Be brief.", images=[DOG], parameters={"top_k": 5})
    c.ask("What is it?")
    c.answered("A dog.")
    c.ask("What colour?")
    c.answered("Brown.")
    return c


def test_each_image_rides_in_the_message_it_was_added_to() -> None:
    assert conversation().body() == {
        "model": "m",
        "input": {
            "messages": [
                {"role": "system", "content": [{"text": "Be brief."}]},
                {"role": "user", "content": [{"image": "https://example.com/dog.jpeg"}, {"text": "What is it?"}]},
                {"role": "assistant", "content": [{"text": "A dog."}]},
                {"role": "user", "content": [{"text": "What colour?"}]},
                {"role": "assistant", "content": [{"text": "Brown."}]},
            ]
        },
        "parameters": {"top_k": 5},
    }
    c = conversation()
    c.images += [CAT, OWL]  # two at a later turn, in order
    c.ask("And these?")
    assert c.messages()[-1] == {"role": "user", "content": [{"image": CAT}, {"image": OWL}, {"text": "And these?"}]}
    assert c.images == [] and c.sent_images() == [DOG, CAT, OWL]
    assert Conversation.load(c.save()).body() == c.body()


def test_a_question_that_goes_gives_back_its_images_unless_refused() -> None:
    c = conversation()
    c.images.append(CAT)
    c.ask("And this?")
    assert c.unanswered() == (CAT,) and c.images == [CAT]  # stopped before an answer: they wait again
    c.ask("And this?")
    assert c.unanswered(keep_images=False) == (CAT,) and c.images == []  # refused: they go with it
    c.images.append(OWL)
    c.ask("And this?")
    c.answered("An owl.")
    assert c.last_question() == "And this?" and c.images == [OWL]  # /retry sends them again
    c.ask("And this?")
    c.answered("An owl.")
    assert c.undo() and c.images == [OWL]
    c.clear()  # a new conversation about the same images
    assert c.turns == [] and c.images == [DOG, OWL]


def test_retry_and_undo() -> None:
    c = conversation()
    assert c.last_question() == "What colour?"  # the answer and its question leave; the caller asks again
    assert c.turns == [Turn("user", "What is it?", (DOG,)), Turn("assistant", "A dog.")]
    assert c.undo() and c.turns == []
    assert not c.undo() and c.last_question() is None
    c.ask("Unanswered")
    c.unanswered()
    assert c.turns == []


@pytest.mark.parametrize("shape", ["body", "messages", "list"])
def test_save_and_load_round_trip(shape: str) -> None:
    original = conversation()
    saved = json.loads(original.save())
    text = {
        "body": json.dumps(saved),
        "messages": json.dumps({"model": "m", "messages": saved["input"]["messages"], "parameters": {"top_k": 5}}),
        "list": json.dumps(saved["input"]["messages"]),
    }[shape]
    loaded = Conversation.load(text, model="m")
    if shape == "list":  # no model or parameters in a bare list
        assert loaded.messages() == original.messages()
    else:
        assert loaded.body() == original.body()


def test_load_takes_string_content_and_refuses_what_is_not_a_conversation() -> None:
    loaded = Conversation.load('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]')
    assert loaded.turns == [Turn("user", "hi"), Turn("assistant", "hello")]
    with pytest.raises(ValueError, match="role"):
        Conversation.load('[{"role": "robot", "content": "x"}]')
    with pytest.raises(ValueError, match=r"input\.messages"):
        Conversation.load('{"nothing": 1}')
    with pytest.raises(ValueError, match="only a user message"):
        Conversation.load('[{"role": "assistant", "content": [{"image": "a"}, {"text": "x"}]}]')


def test_parameters_are_parsed_to_the_types_the_api_takes() -> None:
    assert parse_parameter("temperature", "0.2") == 0.2
    assert parse_parameter("max_tokens", "64") == 64 and isinstance(parse_parameter("seed", "7"), int)
    assert parse_parameter("stop", "END") == "END"
    assert parse_parameter("stop", '["\\n\\n", "END"]') == ["\n\n", "END"]
    assert parse_parameter("incremental_output", "true") is True
    assert parse_parameter("vl_high_resolution_images", "true") is True  # not known here: JSON, sent as given
    assert parse_parameter("some_hint", "plain words") == "plain words"
    with pytest.raises(ValueError, match="max_tokens"):
        parse_parameter("max_tokens", "many")
    with pytest.raises(ValueError, match="incremental_output"):
        parse_parameter("incremental_output", "maybe")
