"""The OpenAI-compatible surface with the official openai package, against a real server."""

from __future__ import annotations

import base64
import json
import uuid

import httpx
import openai
import pytest

from tests.conftest import SEED_MODEL, Server, png_bytes

NATIVE = "/api/v1/services/aigc/multimodal-generation/generation"
IMAGE_PART = {"type": "image_url", "image_url": {"url": "https://example.com/never-fetched.png"}}


@pytest.fixture(params=["/compatible-mode/v1", "/v1"])
def client(request: pytest.FixtureRequest, server: Server) -> openai.OpenAI:
    return openai.OpenAI(api_key=server.key, base_url=server.base + request.param, max_retries=0)


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def messages(url: str, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [_image(url), {"type": "text", "text": text}]}]


def test_completion(client: openai.OpenAI, image_host) -> None:
    r = client.chat.completions.create(model=SEED_MODEL, messages=messages(image_host.url("/red.png")), max_tokens=6)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_two_images_in_one_message_and_text_only(server: Server, image_host) -> None:
    """Compatible mode takes several image_url parts in a message, and a vision model's text-only chat."""
    client = openai.OpenAI(api_key=server.key, base_url=server.base + "/compatible-mode/v1", max_retries=0)
    two = [
        {"type": "image_url", "image_url": {"url": image_host.url("/red.png")}},
        {"type": "image_url", "image_url": {"url": image_host.url("/blue.png")}},
        {"type": "text", "text": "Which is redder?"},
    ]
    r = client.chat.completions.create(model=SEED_MODEL, messages=[{"role": "user", "content": two}], max_tokens=3)
    assert r.choices[0].message.content and r.usage.completion_tokens == 3
    one = client.chat.completions.create(model=SEED_MODEL, messages=messages(image_host.url("/red.png")), max_tokens=1)
    assert r.usage.prompt_tokens > one.usage.prompt_tokens  # the second image's <|image|> token
    text = client.chat.completions.create(model=SEED_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert text.choices[0].message.content and text.usage.completion_tokens == 2


def test_stream_with_usage(client: openai.OpenAI, image_host) -> None:
    kwargs = {"model": SEED_MODEL, "messages": messages(image_host.url("/red.png")), "max_tokens": 8, "temperature": 0}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in content]
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_same_greedy_text_as_the_native_surface(server: Server, client: openai.OpenAI, image_host) -> None:
    url = image_host.url("/blue.png")
    ours = client.chat.completions.create(
        model=SEED_MODEL, messages=messages(url, "Describe."), max_tokens=16, temperature=0, seed=3
    )
    native = httpx.post(
        server.base + NATIVE,
        json={
            "model": SEED_MODEL,
            "input": {"messages": [{"role": "user", "content": [{"image": url}, {"text": "Describe."}]}]},
            "parameters": {"max_tokens": 16, "temperature": 0, "seed": 3},
        },
        headers={"Authorization": f"Bearer {server.key}"},
    ).json()
    assert ours.choices[0].message.content == native["output"]["choices"][0]["message"]["content"][0]["text"]
    assert ours.usage.prompt_tokens == native["usage"]["input_tokens"]


def test_string_content_system_and_data_uri(client: openai.OpenAI) -> None:
    uri = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    r = client.chat.completions.create(
        model=SEED_MODEL,
        messages=[{"role": "system", "content": "Be brief."}, *messages(uri)],
        max_tokens=2,
        extra_body={"top_k": 20, "repetition_penalty": 1.05},
    )
    assert r.usage.completion_tokens == 2


def test_errors_in_the_openai_shape(server: Server, client: openai.OpenAI, image_host) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=SEED_MODEL, messages=[{"role": "user", "content": [IMAGE_PART] * 5}])
    assert bad.value.body["code"] == "invalid_parameter_error" and "at most 4 images" in bad.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model=SEED_MODEL, messages=messages(image_host.url("/red.png")), top_p=7)
    with pytest.raises(openai.BadRequestError, match="Model not exist"):
        client.chat.completions.create(model="gpt-4o", messages=messages(image_host.url("/red.png")))
    wrong = openai.OpenAI(api_key="sk-wrong", base_url=str(client.base_url), max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        wrong.chat.completions.create(model=SEED_MODEL, messages=messages(image_host.url("/red.png")))
    assert auth.value.body["code"] == "invalid_api_key"
    raw = httpx.post(
        str(client.base_url) + "chat/completions", content=b"{", headers={"Authorization": f"Bearer {server.key}"}
    )
    body = raw.json()
    assert raw.status_code == 400 and set(body) == {"error", "request_id"}
    assert set(body["error"]) == {"code", "type", "param", "message"}
    assert body["request_id"] == raw.headers["x-request-id"]
    for empty in ([], None):  # DashScope's "Required input parameter missing" names messages here
        with pytest.raises(openai.BadRequestError) as missing:
            client.chat.completions.create(model=SEED_MODEL, messages=empty)  # type: ignore[arg-type]
        assert missing.value.body["param"] == "messages", missing.value.body
    with pytest.raises(openai.BadRequestError) as last:  # "The last message must be a user message ..."
        client.chat.completions.create(
            model=SEED_MODEL, messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        )
    assert last.value.body["param"] == "messages", last.value.body


def test_json_nested_too_deeply_is_the_callers_400(server: Server, client: openai.OpenAI) -> None:
    """JSON nested past the parser's depth, as a body or as a tool call's arguments in the history, is refused
    naming the fault, on both surfaces, never a 500."""
    headers = {"Authorization": f"Bearer {server.key}", "Content-Type": "application/json"}
    deep = b"[" * 5000 + b"]" * 5000
    for url in (str(client.base_url) + "chat/completions", server.base + NATIVE):
        raw = httpx.post(url, content=deep, headers=headers)
        assert raw.status_code == 400 and "nested too deeply" in raw.text, raw.text
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "tool_calls": [call_of("f", "[" * 5000 + "]" * 5000)]},
        {"role": "tool", "tool_call_id": "call_1", "content": "done"},
    ]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=SEED_MODEL, messages=history, max_tokens=2)  # type: ignore[arg-type]
    assert "tool_calls[0].function.arguments" in bad.value.body["message"], bad.value.body


def test_a_lone_surrogate_is_the_callers_400(server: Server, client: openai.OpenAI) -> None:
    """A string cut inside an emoji (a JavaScript client's slice) reaches JSON as a lone surrogate escape, which no
    text can be encoded with: refused on every surface, in the body or in a call's arguments; a whole pair is
    its character."""
    headers = {"Authorization": f"Bearer {server.key}", "Content-Type": "application/json"}
    chat = str(client.base_url) + "chat/completions"
    body = '{"model": "%s", "max_tokens": 1, "messages": [{"role": "user", "content": "%s"}]}'
    whole = httpx.post(chat, content=body % (SEED_MODEL, "smile \\ud83d\\ude00"), headers=headers, timeout=60)
    assert whole.status_code == 200, whole.text
    native = '{"model": "%s", "input": {"messages": [{"role": "user", "content": "%s"}]}}'
    text = server.base + "/api/v1/services/aigc/text-generation/generation"
    for url, form in ((chat, body), (text, native)):
        cut = httpx.post(url, content=form % (SEED_MODEL, "smile \\ud83d"), headers=headers, timeout=60)
        assert cut.status_code == 400 and "lone surrogate" in cut.text, cut.text
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "tool_calls": [call_of("f", '{"text": "\\ud83d"}')]},
        {"role": "tool", "tool_call_id": "call_1", "content": "done"},
    ]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=SEED_MODEL, messages=history, max_tokens=2)  # type: ignore[arg-type]
    assert "function.arguments: a string holds a lone surrogate" in bad.value.body["message"], bad.value.body


def test_a_body_only_pythons_json_reads_is_answered_as_before(server: Server, client: openai.OpenAI) -> None:
    """orjson reads bodies first (api.incoming.parse_body); what it refuses or reads otherwise, Python's json
    reads as it always did: a UTF-8 BOM is still read, an integer past 64 bits still echoed as sent, and a body
    128 levels deep still answered, one of 129 refused."""
    headers = {"Authorization": f"Bearer {server.key}", "Content-Type": "application/json"}
    chat = str(client.base_url) + "chat/completions"
    body = '{"model": "%s", "max_tokens": %s, "messages": [{"role": "user", "content": "Hi"}]%s}'
    bom = httpx.post(chat, content=b"\xef\xbb\xbf" + (body % (SEED_MODEL, 1, "")).encode(), headers=headers, timeout=60)
    assert bom.status_code == 200, bom.text
    wide = httpx.post(chat, content=body % (SEED_MODEL, "[18446744073709551617]", ""), headers=headers, timeout=60)
    assert wide.status_code == 400 and "[18446744073709551617]" in wide.json()["error"]["message"], wide.text
    for levels, status in ((128, 200), (129, 400)):  # the body is one level, the value the rest
        deep = ', "metadata": ' + '{"a": ' * (levels - 2) + "[]" + "}" * (levels - 2)
        answer = httpx.post(chat, content=body % (SEED_MODEL, 1, deep), headers=headers, timeout=60)
        assert answer.status_code == status, answer.text
        assert ("nested too deeply" in answer.text) == (status == 400), answer.text


def call_of(name: str, arguments: str) -> dict:
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}


def test_tokenize_counts_the_tools_as_a_completion_does(server: Server) -> None:
    """vLLM's /tokenize (what a front llamascope asks, with the request's tools): the tools are in the prompt, so
    they are in the count, which is the completion's prompt_tokens."""
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    body = {"model": SEED_MODEL, "messages": [{"role": "user", "content": "What time is it?"}], "tools": [tool]}
    headers = {"Authorization": f"Bearer {server.key}"}
    counted = httpx.post(server.base + "/compatible-mode/tokenize", json=body, headers=headers)
    chat = server.base + "/compatible-mode/v1/chat/completions"
    done = httpx.post(chat, json={**body, "max_tokens": 1}, headers=headers, timeout=60)
    bare = httpx.post(server.base + "/compatible-mode/tokenize", json={**body, "tools": None}, headers=headers)
    assert counted.json()["count"] == done.json()["usage"]["prompt_tokens"] > bare.json()["count"], counted.text


def test_models(client: openai.OpenAI) -> None:
    assert {m.id for m in client.models.list()} == {"llama3.2-11b-vision", "llama3.2-90b-vision-instruct"}


def test_raw_stream_framing(server: Server, image_host) -> None:
    r = httpx.post(
        server.base + "/compatible-mode/v1/chat/completions",
        json={"model": SEED_MODEL, "messages": messages(image_host.url("/red.png")), "max_tokens": 3, "stream": True},
        headers={"Authorization": f"Bearer {server.key}"},
    )
    blocks = r.text.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"
    for block in blocks[:-2]:
        assert block.startswith("data: {")
        chunk = json.loads(block[6:])
        assert chunk["object"] == "chat.completion.chunk" and chunk["usage"] is None


def test_what_newer_clients_send(client: openai.OpenAI, image_host) -> None:
    """Issue 13: `role: "developer"` was refused and `models.retrieve(id)` got 404."""
    chat = [{"role": "developer", "content": "Answer briefly."}, *messages(image_host.url("/red.png"))]
    r = client.chat.completions.create(model=SEED_MODEL, messages=chat, max_tokens=2)
    assert r.choices[0].message.content and r.usage.completion_tokens == 2
    model = client.models.retrieve(SEED_MODEL)
    assert (model.id, model.object) == (SEED_MODEL, "model")
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("field", "value"),
    [("logit_bias", {"1": 5}), ("functions", [{"name": "f", "parameters": {"type": "object"}}])],
)
def test_what_cannot_be_honoured_is_refused_naming_it(client: openai.OpenAI, image_host, field: str, value) -> None:
    """Issue 13: what was not honoured was silently ignored, answered as if honoured (tools and response_format
    are honoured since issue 24: tests/api/test_structured.py)."""
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model=SEED_MODEL, messages=messages(image_host.url("/red.png")), max_tokens=2, **{field: value}
        )
    assert bad.value.body["param"] == field and f"Parameter {field}:" in bad.value.body["message"]
    # What changes nothing is accepted; so are the penalties, served.
    r = client.chat.completions.create(
        model=SEED_MODEL, messages=messages(image_host.url("/red.png")), max_tokens=1, response_format={"type": "text"}
    )
    assert r.usage.completion_tokens == 1
    r = client.chat.completions.create(
        model=SEED_MODEL,
        messages=messages(image_host.url("/red.png")),
        max_tokens=3,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
    )
    assert r.usage.completion_tokens == 3


def test_errors_speak_this_modes_language(client: openai.OpenAI, image_host) -> None:
    """Issue 13: errors said `input.messages` and left `param` empty."""
    two = messages(image_host.url("/broken.png"))
    for kwargs, param, said in [
        ({"messages": "hello"}, "messages", "messages must be a list"),
        ({"messages": [{"role": "user", "content": [IMAGE_PART] * 5}]}, "messages", "messages"),
        ({"messages": messages(image_host.url("/red.png")), "top_p": 5}, "top_p", "top_p"),
        ({"messages": messages(image_host.url("/red.png")), "presence_penalty": 3}, "presence_penalty", "[-2.0, 2.0]"),
        ({"messages": messages(image_host.url("/red.png")), "model": "nope"}, "model", "Model not exist"),
        ({"messages": messages("data:image/png;base64," + "A" * (14 << 20))}, "messages", "per data-uri item"),
        (  # one image of several: which one
            {"messages": [{"role": "user", "content": [_image(image_host.url("/red.png")), *two[0]["content"]]}]},
            "messages",
            "(the image at messages[0] (user) content[1])",
        ),
        # An empty image_url said '"image" must be a URL string' (a key this mode has not), and a local path
        # that the file "was not found" and that "the dashscope SDK uploads a local file it finds": the openai
        # SDK uploads nothing.
        ({"messages": messages("")}, "messages", 'content[0]: "image_url" must be {"url": ...}'),
        ({"messages": messages("/home/me/cat.png")}, "messages", "'/home/me/cat.png' is a local path"),
    ]:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(**{"model": SEED_MODEL, "max_tokens": 1, **kwargs})
        body = bad.value.body
        assert body["param"] == param and said in body["message"] and "input.messages" not in body["message"], body


def test_logprobs_come_from_the_sampler(client: openai.OpenAI, image_host) -> None:
    """Issue 13: logprobs were silently ignored. Greedy, each token is its step's likeliest; streamed the same."""
    kwargs = {
        "model": SEED_MODEL,
        "messages": messages(image_host.url("/red.png")),
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    r = client.chat.completions.create(**kwargs)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        rivals = [t.logprob for t in item.top_logprobs]
        assert len(rivals) == 3 and rivals == sorted(rivals, reverse=True) and rivals[0] <= 0
        assert item.logprob == pytest.approx(rivals[0], abs=1e-5)  # greedy: the likeliest (or tied with it)
        assert item.bytes == list(item.token.encode())
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = [i for c in chunks if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content]
    assert [(i.token, round(i.logprob, 4)) for i in streamed] == [(i.token, round(i.logprob, 4)) for i in content]
    plain = client.chat.completions.create(model=SEED_MODEL, messages=kwargs["messages"], max_tokens=1)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(**{**kwargs, "logprobs": False})
    assert bad.value.body["param"] == "top_logprobs"


def test_cached_tokens_say_how_much_of_the_prompt_was_reused(client: openai.OpenAI, image_host) -> None:
    """usage.prompt_tokens_details.cached_tokens: the prompt tokens whose keys and values came from the prefix
    cache (as DashScope's context cache reports them), 0 on a first turn."""
    turn1 = messages(image_host.url("/red.png"), f"{uuid.uuid4().hex}: a first question about this red square?")
    first = client.chat.completions.create(model=SEED_MODEL, messages=turn1, max_tokens=12, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    turn2 = [*turn1, {"role": "assistant", "content": first.choices[0].message.content}]
    turn2.append({"role": "user", "content": "And its colour?"})
    chunks = list(
        client.chat.completions.create(
            model=SEED_MODEL,
            messages=turn2,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    cached = usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens - 16 < cached < usage.prompt_tokens
    assert cached % 16 == 0  # whole blocks
    # A turn that adds an image reuses nothing (the prompt's opening tokens see every image), as Images says.
    turn2[-1] = {"role": "user", "content": [_image(image_host.url("/blue.png")), {"type": "text", "text": "This?"}]}
    added = client.chat.completions.create(model=SEED_MODEL, messages=turn2, max_tokens=2)
    assert added.usage.prompt_tokens_details.cached_tokens == 0
