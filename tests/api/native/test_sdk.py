"""The official ``dashscope`` package against a real llamascope process.

The seed API reference's Python examples run here as written, with only the
base URL, the key and the image host changed (the image is served from
loopback because this machine has no internet).
"""

from __future__ import annotations

import itertools
from http import HTTPStatus

import pytest

from tests.conftest import SEED_MODEL, Server, run_sdk, user_turn


def test_seed_single_turn_example(dashscope_sdk, image_host) -> None:
    from dashscope import MultiModalConversation

    messages = [
        {
            "role": "user",
            "content": [{"image": image_host.url("/dog_and_girl.jpeg")}, {"text": "这是什么,请用中文回答?"}],
        }
    ]
    response = MultiModalConversation.call(model="llama3.2-90b-vision-instruct", messages=messages)
    assert response.status_code == HTTPStatus.OK, response
    text = response.output.choices[0].message.content[0]["text"]
    assert isinstance(text, str) and text
    assert response.request_id
    usage = response.usage
    # No max_tokens: the seed's default of 512 applies (the random model almost never ends a turn early).
    assert 0 < usage.output_tokens <= 512
    if response.output.choices[0].finish_reason == "length":
        assert usage.output_tokens == 512
    assert usage["image_tokens"] == 6404  # 4 tiles x (40 x 40 patches + 1)
    assert usage.input_tokens > 10
    assert usage["total_tokens"] == usage.input_tokens + usage.output_tokens


def test_seed_multi_turn_example(dashscope_sdk, image_host) -> None:
    from dashscope import MultiModalConversation

    messages = [
        {
            "role": "user",
            "content": [{"image": image_host.url("/dog_and_girl.jpeg")}, {"text": "这是什么?"}],
        }
    ]
    response = MultiModalConversation.call(model="llama3.2-90b-vision-instruct", messages=messages, max_tokens=20)
    assert response.status_code == HTTPStatus.OK, response
    first_input = response.usage.input_tokens
    messages.append(response["output"]["choices"][0]["message"])
    messages.append({"role": "user", "content": [{"text": "做一首诗描述这个场景"}]})
    response = MultiModalConversation.call(model="llama3.2-90b-vision-instruct", messages=messages, max_tokens=20)
    assert response.status_code == HTTPStatus.OK, response
    assert response.output.choices[0].message.content[0]["text"]
    assert response.usage.input_tokens > first_input + 20  # the history is in the prompt


def test_seed_streaming_example(dashscope_sdk, image_host) -> None:
    from dashscope import MultiModalConversation

    messages = [
        {
            "role": "user",
            "content": [{"image": image_host.url("/dog_and_girl.jpeg")}, {"text": "这是什么?"}],
        }
    ]
    responses = MultiModalConversation.call(
        model="llama3.2-90b-vision-instruct", messages=messages, stream=True, max_tokens=30
    )
    outputs = []
    for response in responses:
        assert response.status_code == HTTPStatus.OK, response
        outputs.append(response["output"])
    texts = [o["choices"][0]["message"]["content"][0]["text"] for o in outputs]
    reasons = [o["choices"][0]["finish_reason"] for o in outputs]
    assert len(outputs) >= 2
    assert reasons[:-1] == ["null"] * (len(reasons) - 1)  # the string "null", as DashScope sends it
    assert reasons[-1] in ("stop", "length")
    for before, after in itertools.pairwise(texts):
        assert after.startswith(before)  # cumulative by default
    assert texts[-1] == texts[-2]  # the last event repeats the whole answer with the finish reason


def test_system_message_with_image(dashscope_sdk, image_host) -> None:
    from dashscope import MultiModalConversation

    messages = [
        {"role": "system", "content": [{"text": "You are a helpful assistant."}]},
        user_turn(image_host.url("/red.png")),
    ]
    with_system = MultiModalConversation.call(model=SEED_MODEL, messages=messages, max_tokens=5, temperature=0)
    without = MultiModalConversation.call(model=SEED_MODEL, messages=messages[1:], max_tokens=5, temperature=0)
    assert with_system.status_code == HTTPStatus.OK, with_system
    assert with_system.usage.input_tokens > without.usage.input_tokens


def test_two_images_in_one_message_and_a_later_turn(dashscope_sdk, image_host) -> None:
    """MultiModalConversation with two images in one message, then a third in a later turn."""
    from dashscope import MultiModalConversation

    red, blue = image_host.url("/red.png"), image_host.url("/blue.png")
    messages = [{"role": "user", "content": [{"image": red}, {"image": blue}, {"text": "Compare them."}]}]
    first = MultiModalConversation.call(model=SEED_MODEL, messages=messages, max_tokens=3)
    assert first.status_code == HTTPStatus.OK, first
    assert first.usage.image_tokens == 2 * 6404  # each image's vision states, as one image counts them
    messages += [
        {"role": "assistant", "content": [{"text": first.output.choices[0].message.content[0]["text"]}]},
        {"role": "user", "content": [{"text": "And this one?"}, {"image": red}]},
    ]
    second = MultiModalConversation.call(model=SEED_MODEL, messages=messages, max_tokens=3)
    assert second.status_code == HTTPStatus.OK, second
    assert second.usage.image_tokens == 3 * 6404


def test_async_client(dashscope_sdk, image_host) -> None:
    from dashscope import AioMultiModalConversation

    async def run() -> tuple[object, list[object]]:
        messages = [user_turn(image_host.url("/red.png"))]
        single = await AioMultiModalConversation.call(model=SEED_MODEL, messages=messages, max_tokens=4)
        stream = await AioMultiModalConversation.call(model=SEED_MODEL, messages=messages, max_tokens=4, stream=True)
        return single, [event async for event in stream]

    single, events = run_sdk(run())
    assert single.status_code == HTTPStatus.OK, single
    assert single.usage.output_tokens == 4
    assert events and all(e.status_code == HTTPStatus.OK for e in events)
    assert events[-1].output.choices[0].finish_reason == "length"


def test_sdk_incremental_false_still_cumulative(dashscope_sdk, image_host) -> None:
    """The 1.x SDK sends true on the wire for incremental_output=False and rebuilds the text itself."""
    from dashscope import MultiModalConversation

    messages = [user_turn(image_host.url("/red.png"))]
    kwargs = {"model": SEED_MODEL, "messages": messages, "max_tokens": 8, "temperature": 0}
    events = list(MultiModalConversation.call(stream=True, incremental_output=False, **kwargs))
    whole = MultiModalConversation.call(**kwargs)
    assert events[-1].output.choices[0].message.content[0]["text"] == whole.output.choices[0].message.content[0]["text"]


def test_logprobs_are_answered_as_the_sdk_merges_them(dashscope_sdk, image_host) -> None:
    """logprobs=True was accepted and answered without them. DashScope answers them in choices[].logprobs; the
    1.x SDK joins a stream's (incremental_output=False, true on the wire) as it joins its text."""
    from dashscope import Generation, MultiModalConversation

    messages = [user_turn(image_host.url("/red.png"))]
    kwargs = {"model": SEED_MODEL, "messages": messages, "max_tokens": 5, "temperature": 0, "logprobs": True}
    whole = MultiModalConversation.call(top_logprobs=2, **kwargs)
    content = whole.output.choices[0].logprobs["content"]
    assert len(content) == 5 and all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in content)
    assert "".join(t["token"] for t in content) == whole.output.choices[0].message.content[0]["text"]
    events = list(MultiModalConversation.call(stream=True, incremental_output=False, **kwargs))
    assert [t["token"] for t in events[-1].output.choices[0].logprobs["content"]] == [t["token"] for t in content]

    text = Generation.call(result_format="message", **kwargs)
    assert len(text.output.choices[0].logprobs["content"]) == 5
    plain = Generation.call(**kwargs)  # the text format has no choices to put them in: answered without
    assert plain.status_code == 200 and plain.output.text and plain.output.choices is None


def test_errors_come_back_as_responses(dashscope_sdk, image_host) -> None:
    from dashscope import MultiModalConversation

    messages = [user_turn(image_host.url("/red.png"))]
    bad_key = MultiModalConversation.call(model=SEED_MODEL, messages=messages, api_key="sk-wrong")
    assert (bad_key.status_code, bad_key.code) == (401, "InvalidApiKey")
    assert bad_key.output is None and bad_key.request_id

    unknown = MultiModalConversation.call(model="qwen-vl-max", messages=messages)
    assert (unknown.status_code, unknown.code, unknown.message) == (400, "InvalidParameter", "Model not exist.")

    text_only = MultiModalConversation.call(model=SEED_MODEL, messages=[{"role": "user", "content": [{"text": "hi"}]}])
    assert (text_only.status_code, text_only.code) == (400, "InvalidParameter")
    assert "must carry an image" in text_only.message  # the multimodal endpoint's contract

    # Rejected before the stream starts: the streaming SDK yields one error object.
    events = list(MultiModalConversation.call(model=SEED_MODEL, messages=messages, stream=True, top_p=3))
    assert len(events) == 1 and (events[0].status_code, events[0].code) == (400, "InvalidParameter")
    assert "top_p" in events[0].message


def test_v2_client(server: Server, image_host) -> None:
    import dashscope

    client = dashscope.Client(api_key=server.key, base_url=server.api, max_retries=0)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "url": image_host.url("/red.png")}, {"type": "text", "text": "What?"}],
        }
    ]
    completion = client.multimodal.chat.create(model=SEED_MODEL, messages=messages, max_tokens=6, temperature=0)
    assert completion.output_text
    stream = client.multimodal.chat.create(
        model=SEED_MODEL, messages=messages, max_tokens=6, temperature=0, stream=True
    )
    deltas = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert deltas == completion.output_text


def test_v2_client_errors(server: Server, image_host) -> None:
    import dashscope
    from dashscope.v2 import errors as v2errors

    client = dashscope.Client(api_key="sk-nope", base_url=server.api, max_retries=0)
    with pytest.raises(v2errors.AuthenticationError):
        client.multimodal.chat.create(model=SEED_MODEL, messages=[user_turn(image_host.url("/red.png"))])


def test_the_readmes_first_examples_run_with_no_network(server: Server, tmp_path) -> None:
    """Issue 13: the README's first example fetched https://example.com/..., which fails on a machine with no
    network. Its first two Python examples (the SDK, the 2.x client) run here as written, in a fresh process,
    given only the address and the key as the README says."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    examples = re.findall(r"```python\n(.*?)```", readme, re.S)[:2]
    env = os.environ | {"DASHSCOPE_HTTP_BASE_URL": server.api, "DASHSCOPE_API_KEY": server.key}
    for example in examples:
        program = example.replace("http://127.0.0.1:8000", server.base)
        out = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip(), out.stdout + out.stderr
        assert "InvalidParameter" not in out.stdout and "Traceback" not in out.stderr


def test_ten_turns_each_prefill_only_what_is_new(dashscope_sdk, server: Server, image_host) -> None:
    """A ten-turn conversation about one image through the SDK, the whole history re-sent every turn as the
    seed's multi-turn example does: every turn answers, and every turn after the first takes the keys and
    values of the history the previous turn ran from the prefix cache, so the tokens it runs through the
    model stay those of the new question and answer, not the growing history (bench/engine.py --only
    multi-turn times it)."""
    import httpx
    from dashscope import MultiModalConversation

    def reused() -> int:
        health = httpx.get(server.base + "/health", timeout=10).json()
        return int(health["models"][SEED_MODEL]["prefix_cache_tokens_reused"])

    messages = [{"role": "user", "content": [{"image": image_host.url("/dog_and_girl.jpeg")}, {"text": "这是什么?"}]}]
    previous_input = 0
    fresh = []  # tokens each turn ran through the model
    for turn in range(10):
        before = reused()
        response = MultiModalConversation.call(model=SEED_MODEL, messages=messages, max_tokens=24, temperature=0)
        assert response.status_code == HTTPStatus.OK, response
        taken = reused() - before
        input_tokens = response.usage.input_tokens
        assert input_tokens > previous_input
        if turn:  # the previous prompt is this one's start: all its whole 16-token blocks were reused
            assert previous_input - 16 < taken < input_tokens, (turn, taken, previous_input, input_tokens)
        fresh.append(input_tokens - taken)
        previous_input = input_tokens
        messages.append(response.output.choices[0].message)
        messages.append({"role": "user", "content": [{"text": f"第{turn + 2}个问题:还有什么?"}]})
    # The history grew to hundreds of tokens; the last turn ran a small part of it through the model.
    assert previous_input > 400 and fresh[-1] * 3 < previous_input, (fresh, previous_input)
