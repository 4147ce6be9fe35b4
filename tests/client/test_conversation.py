"""The client's conversation: the messages it sends, what /retry, /undo, /save and /load do to it."""

from __future__ import annotations

import json

import pytest

from llamascope.client.conversation import Conversation, parse_parameter


def conversation() -> Conversation:
    c = Conversation(model="m", system="Be brief.", image="https://example.com/dog.jpeg", parameters={"top_k": 5})
    c.ask("What is it?")
    c.answered("A dog.")
    c.ask("What colour?")
    c.answered("Brown.")
    return c


def test_the_image_rides_in_the_first_user_message_only() -> None:
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


def test_retry_and_undo() -> None:
    c = conversation()
    assert c.last_question() == "What colour?"  # the answer and its question leave; the caller asks again
    assert c.turns == [("user", "What is it?"), ("assistant", "A dog.")]
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
    assert loaded.turns == [("user", "hi"), ("assistant", "hello")] and loaded.image is None
    with pytest.raises(ValueError, match="role"):
        Conversation.load('[{"role": "robot", "content": "x"}]')
    with pytest.raises(ValueError, match=r"input\.messages"):
        Conversation.load('{"nothing": 1}')
    with pytest.raises(ValueError, match="second image"):
        Conversation.load(
            '[{"role": "user", "content": [{"image": "a"}, {"text": "x"}]},'
            ' {"role": "user", "content": [{"image": "b"}, {"text": "y"}]}]'
        )


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
