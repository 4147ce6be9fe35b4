"""Real clients, unchanged, against a real server: dashscope's Generation (1.x sync and async, 2.x Client)
and Tokenization, LangChain's ChatTongyi with its own choice of client, and the openai package for a
text-only Llama served with ``--model NAME=PATH`` (conftest's ``text_server``)."""

from __future__ import annotations

import base64
import itertools
from collections.abc import Iterator
from http import HTTPStatus

import httpx
import openai
import pytest

from tests.conftest import TEXT_MODEL, Server, png_bytes, run_sdk

VISION = "llama3.2-11b-vision"  # no "vl" in the name: ChatTongyi picks dashscope.Generation for it
HI = [{"role": "user", "content": "hi"}]
DATA_URI = "data:image/png;base64," + base64.b64encode(png_bytes((200, 60, 10), (400, 300))).decode()


@pytest.fixture
def sdk(text_server: Server) -> Iterator[object]:
    """The official SDK pointed at the server as the README says (the module attribute read at call time)."""
    import dashscope

    old = dashscope.base_http_api_url, dashscope.api_key
    dashscope.base_http_api_url, dashscope.api_key = text_server.api, text_server.key
    yield dashscope
    dashscope.base_http_api_url, dashscope.api_key = old


@pytest.mark.parametrize("model", [VISION, TEXT_MODEL])
def test_generation_call_both_result_formats(sdk, model: str) -> None:
    from dashscope import Generation

    text = Generation.call(model=model, prompt="hi", max_tokens=6, temperature=0)
    assert text.status_code == HTTPStatus.OK, text
    assert isinstance(text.output.text, str) and text.output.text and text.output.finish_reason == "length"
    assert text.output.choices is None and text.usage.output_tokens == 6
    assert text.usage["total_tokens"] == text.usage.input_tokens + 6

    message = Generation.call(model=model, messages=HI, max_tokens=6, temperature=0, result_format="message")
    assert message.status_code == HTTPStatus.OK, message
    choice = message.output.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text.output.text
    assert choice.finish_reason == "length" and message.usage.input_tokens == text.usage.input_tokens


def test_a_local_file_is_not_uploaded_by_generation_and_the_refusal_says_so(sdk, tmp_path) -> None:
    """Generation and Tokenization upload no local file (MultiModalConversation does): a path they sent, of a
    file that exists, was refused as "not found: the dashscope SDK uploads a local file it finds ... check that
    the file exists". The refusal says what to send instead."""
    from dashscope import Generation, Tokenization

    path = tmp_path / "cat.png"
    path.write_bytes(png_bytes())
    for image in (str(path), path.as_uri()):
        messages = [{"role": "user", "content": [{"image": image}, {"text": "What is it?"}]}]
        for r in (
            Generation.call(model=VISION, messages=messages, max_tokens=2, result_format="message"),
            Tokenization.call(model=VISION, messages=messages),
        ):
            assert (r.status_code, r.code) == (400, "InvalidParameter"), r
            assert f"{image!r} is a local path" in r.message and "data: URI" in r.message, r.message
            assert "not found" not in r.message and "MultiModalConversation" in r.message, r.message


def test_an_openai_style_image_part_without_a_url_is_named_as_written(sdk) -> None:
    """ChatTongyi sends OpenAI's image_url parts as written: one with no URL was refused as '"image" must be a
    URL string', naming a key the caller never wrote."""
    from dashscope import Generation

    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}, {"type": "text"}]}]
    r = Generation.call(model=VISION, messages=messages, max_tokens=2, result_format="message")
    assert (r.status_code, r.code) == (400, "InvalidParameter"), r
    assert 'content[0]: "image_url" must be {"url": ...}' in r.message, r.message
    messages[0]["content"][0]["image_url"]["url"] = ["a.png", "b.png"]  # a list: one part an image, as written
    r = Generation.call(model=VISION, messages=messages, max_tokens=2, result_format="message")
    assert r.status_code == 400 and '{"type": "image_url", "image_url": {"url": ...}} part' in r.message, r.message


@pytest.mark.parametrize("result_format", ["text", "message"])
def test_generation_streams(sdk, result_format: str) -> None:
    from dashscope import Generation

    kwargs = {"model": TEXT_MODEL, "messages": HI, "max_tokens": 8, "temperature": 0, "result_format": result_format}

    def text_of(rsp) -> str:
        assert rsp.status_code == HTTPStatus.OK, rsp
        return rsp.output.text if result_format == "text" else rsp.output.choices[0].message.content

    whole = text_of(Generation.call(**kwargs))
    cumulative = [text_of(r) for r in Generation.call(stream=True, **kwargs)]
    for before, after in itertools.pairwise(cumulative):
        assert after.startswith(before)
    assert cumulative[-1] == whole
    assert "".join(text_of(r) for r in Generation.call(stream=True, incremental_output=True, **kwargs)) == whole
    # incremental_output=False: the SDK asks for increments on the wire and joins them itself.
    assert [text_of(r) for r in Generation.call(stream=True, incremental_output=False, **kwargs)][-1] == whole


def test_aio_generation(sdk) -> None:
    from dashscope import AioGeneration

    async def run() -> tuple[object, list[object]]:
        single = await AioGeneration.call(model=VISION, prompt="hi", max_tokens=4, temperature=0)
        stream = await AioGeneration.call(
            model=VISION, prompt="hi", max_tokens=4, temperature=0, stream=True, result_format="message"
        )
        return single, [event async for event in stream]

    single, events = run_sdk(run())
    assert single.status_code == HTTPStatus.OK and single.usage.output_tokens == 4, single
    assert all(e.status_code == HTTPStatus.OK for e in events) and len(events) >= 2
    assert events[-1].output.choices[0].finish_reason == "length"
    assert events[-1].output.choices[0].message.content == single.output.text


def test_v2_client_chat(text_server: Server) -> None:
    import dashscope

    client = dashscope.Client(api_key=text_server.key, base_url=text_server.api, max_retries=0)
    for model in (TEXT_MODEL, VISION):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
        completion = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
        assert completion.output_text and completion.usage.output_tokens == 6
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=6, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == completion.output_text
        count = client.tokenization.count(model=model, messages=messages)
        assert count.input_tokens == len(count.token_ids) == completion.usage.input_tokens


def test_tokenization_counts_equal_generation_usage(sdk) -> None:
    from dashscope import Generation, Tokenization

    conversation = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "北京有哪些好玩地方？"},
        {"role": "assistant", "content": "故宫、颐和园、天坛等都是可以去游玩的景点哦。"},
        {"role": "user", "content": "帮我安排一些行程"},
    ]
    for model in (TEXT_MODEL, VISION):
        for form in ({"messages": conversation}, {"prompt": "hi"}):
            counted = Tokenization.call(model=model, **form)
            assert counted.status_code == HTTPStatus.OK, counted
            ids = counted.output["token_ids"]
            assert counted.usage["input_tokens"] == len(ids) == len(counted.output["tokens"])
            generated = Generation.call(model=model, max_tokens=1, **form)
            assert generated.usage.input_tokens == counted.usage["input_tokens"]


@pytest.fixture
def chat_tongyi(sdk) -> tuple[object, object]:
    """ChatTongyi as constructed by default, and with ``streaming=True``.

    With langchain-core 1.x, ChatTongyi's own validator marks ``streaming`` as set (to False), so its default
    ``.stream()`` answers with one ``invoke``; ``streaming=True`` streams through the SDK (incremental_output).
    """
    from langchain_community.chat_models.tongyi import ChatTongyi

    options = {"model": VISION, "dashscope_api_key": sdk.api_key, "model_kwargs": {"max_tokens": 8}, "max_retries": 1}
    llm, streaming = ChatTongyi(**options), ChatTongyi(streaming=True, **options)
    assert llm.client is sdk.Generation  # its default choice for a name without "vl"
    return llm, streaming


def test_chat_tongyi_text_only(chat_tongyi) -> None:
    from langchain_core.messages import HumanMessage, SystemMessage

    llm, streaming = chat_tongyi
    messages = [SystemMessage(content="Be brief."), HumanMessage(content="hi")]
    answer = llm.invoke(messages, top_p=1.0, temperature=0)
    assert isinstance(answer.content, str) and answer.content
    assert answer.response_metadata["finish_reason"] == "length"
    assert answer.response_metadata["token_usage"]["output_tokens"] == 8
    assert "".join(c.content for c in llm.stream(messages, top_p=1.0, temperature=0)) == answer.content
    chunks = list(streaming.stream(messages, top_p=1.0, temperature=0))
    assert len(chunks) >= 2 and "".join(c.content for c in chunks) == answer.content
    assert streaming.invoke(messages, top_p=1.0, temperature=0).content == answer.content


def test_chat_tongyi_with_an_image(chat_tongyi, image_host) -> None:
    from langchain_core.messages import HumanMessage

    llm, streaming = chat_tongyi
    b64 = DATA_URI.partition(",")[2]
    for image in (
        {"image": DATA_URI},  # DashScope's own items, as ChatTongyi's documentation writes them
        {"image": image_host.url("/dog_and_girl.jpeg")},
        {"type": "image", "base64": b64, "mime_type": "image/png"},  # LangChain's standard blocks
        {"type": "image_url", "image_url": {"url": image_host.url("/red.png")}},
    ):
        question = [HumanMessage(content=[image, {"type": "text", "text": "What is in the picture?"}])]
        answer = llm.invoke(question, temperature=0)
        assert isinstance(answer.content, str) and answer.content
        assert answer.response_metadata["token_usage"]["image_tokens"] == 6404  # the image reached the model
        if "image" in image:
            chunks = list(streaming.stream(question, temperature=0))
            assert len(chunks) >= 2 and "".join(c.content for c in chunks) == answer.content


def test_text_only_llama_answers_through_both_surfaces(sdk, text_server: Server) -> None:
    from dashscope import Generation

    native = Generation.call(model=TEXT_MODEL, messages=HI, max_tokens=10, temperature=0, result_format="message")
    client = openai.OpenAI(api_key=text_server.key, base_url=text_server.base + "/compatible-mode/v1", max_retries=0)
    assert TEXT_MODEL in [m.id for m in client.models.list()]
    compat = client.chat.completions.create(model=TEXT_MODEL, messages=HI, max_tokens=10, temperature=0)
    assert compat.choices[0].message.content == native.output.choices[0].message.content
    assert compat.usage.prompt_tokens == native.usage.input_tokens
    counted = httpx.post(
        text_server.base + "/tokenize",
        json={"model": TEXT_MODEL, "messages": HI},
        headers={"Authorization": f"Bearer {text_server.key}"},
    )
    assert counted.json()["count"] == native.usage.input_tokens, counted.text  # vLLM's /tokenize, as upstreams ask
    stream = client.chat.completions.create(model=TEXT_MODEL, messages=HI, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == compat.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="text-only model"):
        image = [{"type": "image_url", "image_url": {"url": DATA_URI}}, {"type": "text", "text": "?"}]
        client.chat.completions.create(model=TEXT_MODEL, messages=[{"role": "user", "content": image}])
