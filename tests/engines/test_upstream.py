"""A model served through an OpenAI-compatible upstream: a second real llamascope process, over loopback."""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, free_port, generation_body, start_server, user_turn


@contextlib.asynccontextmanager
async def _engine_before(app: Any, base: str = "/v1", context: int = 8192) -> AsyncIterator[Any]:
    """An UpstreamEngine in front of ``app`` (an aiohttp stub engine) on a loopback port; both closed after."""
    from aiohttp import web

    from llamascope.engines.upstream import UpstreamEngine

    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    engine = UpstreamEngine.create([f"http://127.0.0.1:{runner.addresses[0][1]}{base}"], MODEL, None, context)
    try:
        yield engine
    finally:
        await engine.close()
        await runner.cleanup()


pytestmark = pytest.mark.server
PATH = "/api/v1/services/aigc/multimodal-generation/generation"
WITH_PASSWORD = "with-password"
PASSWORD = "s3cret-of-the-proxy"


def with_password(url: str) -> str:
    return url.replace("http://", f"http://gateway:{PASSWORD}@")


UPSTREAM_KEY = "sk-8f1c8e9939b6e046908ec799c08eaf8c9fa97f43"
MODEL = "llama3.2-11b-vision"
DASHSCOPE_BASE = "by-dashscope-base"  # the same upstream, named by the base DashScope documents: .../compatible-mode/v1


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory, test_model_dir: Path) -> Iterator[Server]:
    # This upstream may not fetch loopback URLs: the front must send it the image bytes.
    srv = start_server(
        tmp_path_factory.mktemp("upstream"),
        env={"LLAMASCOPE_API_KEYS": UPSTREAM_KEY, "LLAMASCOPE_IMAGE_FETCH_ALLOW": ""},
    )
    srv.key = UPSTREAM_KEY
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, upstream: Server, test_model_dir: Path) -> Iterator[Server]:
    from llamascope.engines.templates import LLAMASCOPE_TEMPLATE

    tmp = tmp_path_factory.mktemp("front")
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    template = tmp / "template.jinja"  # the upstream's: an llamascope renders with its own
    template.write_text(LLAMASCOPE_TEMPLATE)
    config = tmp / "llamascope.toml"
    config.write_text(
        f'[models."{MODEL}"]\nupstreams = ["{upstream.base}/v1"]\nupstream_api_key = "{UPSTREAM_KEY}"\n'
        f'[models."pair"]\nupstreams = ["{dead}", "{upstream.base}/v1"]\nupstream_model = "{MODEL}"\n'
        f'upstream_api_key = "{UPSTREAM_KEY}"\n'
        f'[models."local"]\nupstreams = ["{upstream.base}/v1"]\nupstream_model = "{MODEL}"\n'
        f'upstream_api_key = "{UPSTREAM_KEY}"\nupstream_tokenizer = "{test_model_dir}"\nchat_template = "{template}"\n'
        f'[models."{DASHSCOPE_BASE}"]\nupstreams = ["{upstream.base}/compatible-mode/v1"]\nupstream_model = "{MODEL}"\n'
        f'upstream_api_key = "{UPSTREAM_KEY}"\n'
        f'[models."gone"]\nupstreams = ["{dead}"]\n'
        # A user and password in the URL (a proxy's Basic authentication): an upstream_api_key's Bearer goes instead
        f'[models."{WITH_PASSWORD}"]\nupstreams = ["{with_password(upstream.base)}/v1"]\nupstream_model = "{MODEL}"\n'
        f'upstream_api_key = "{UPSTREAM_KEY}"\n'
        f'[models."gone-{WITH_PASSWORD}"]\nupstreams = ["{with_password(dead)}"]\n'
        f'[models."down-at-start"]\nupstreams = ["http://127.0.0.1:{free_port()}/v1"]\n'  # never called
    )
    srv = start_server(tmp, ["--config", str(config)])
    yield srv
    srv.stop()


def post(server: Server, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(
        server.base + PATH, json=body, headers={"Authorization": f"Bearer {server.key}", **headers}, timeout=60
    )


def body_for(model: str, image: str, **parameters: object) -> dict:
    body = generation_body(image, **parameters)
    body["model"] = model
    return body


def test_same_answer_and_usage_as_the_upstream_itself(front: Server, upstream: Server, image_host) -> None:
    import base64

    image = image_host.url("/blue.png")
    via_front = post(front, body_for(MODEL, image, max_tokens=12, temperature=0)).json()
    # The upstream gets the image as the front decoded it; ask it directly with the same bytes.
    direct = post(
        upstream,
        body_for(
            MODEL,
            "data:image/png;base64," + base64.b64encode(httpx.get(image).content).decode(),
            max_tokens=12,
            temperature=0,
        ),
    ).json()
    text = via_front["output"]["choices"][0]["message"]["content"][0]["text"]
    assert text and via_front["output"]["choices"][0]["finish_reason"] == "length"
    assert via_front["usage"]["input_tokens"] == direct["usage"]["input_tokens"]  # the upstream's count
    assert via_front["usage"]["output_tokens"] == 12
    # An engine reports no vision states: 0, as Images says (the engine itself counted 6,404).
    assert (via_front["usage"]["image_tokens"], direct["usage"]["image_tokens"]) == (0, 6404)


def test_the_upstream_never_sees_the_users_url(front: Server, upstream: Server, image_host) -> None:
    refused = post(upstream, body_for(MODEL, image_host.url("/red.png"), max_tokens=2))
    assert refused.status_code == 400 and "private or local" in refused.json()["message"]
    assert post(front, body_for(MODEL, image_host.url("/red.png"), max_tokens=2)).status_code == 200


def test_native_guarantees_hold_through_an_upstream(front: Server, image_host) -> None:
    r = post(
        front, body_for(MODEL, image_host.url("/red.png"), max_tokens=6, temperature=0), **{"X-DashScope-SSE": "enable"}
    )
    events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
    texts = [e["output"]["choices"][0]["message"]["content"][0]["text"] for e in events]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))  # cumulative by default
    assert [e["output"]["choices"][0]["finish_reason"] for e in events][-1] == "length"
    text_only = post(front, {"model": MODEL, "input": {"messages": [{"role": "user", "content": "hi"}]}})
    assert text_only.status_code == 400 and "must carry an image" in text_only.json()["message"]


def test_openai_surface_through_an_upstream(front: Server, image_host) -> None:
    import openai

    client = openai.OpenAI(api_key=front.key, base_url=front.base + "/v1", max_retries=0)
    r = client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_host.url("/red.png")}},
                    {"type": "text", "text": "?"},
                ],
            }
        ],
        max_tokens=4,
    )
    assert r.choices[0].message.content and r.usage.completion_tokens == 4


def test_a_failing_upstream_is_skipped(front: Server, image_host) -> None:
    for _ in range(3):
        assert post(front, body_for("pair", image_host.url("/red.png"), max_tokens=2)).status_code == 200
    # Out of rotation by its health check, which runs from the start, or by the first request it failed
    assert re.search(r"upstream http://\S+ (is failing its health check|out of rotation)", front.log())


def test_no_upstream_reachable_is_a_503_worth_retrying_and_health_says_so(front: Server, image_host) -> None:
    r = post(front, body_for("gone", image_host.url("/red.png"), max_tokens=2))
    assert (r.status_code, r.json()["code"], r.headers["x-should-retry"]) == (503, "ServiceUnavailable", "true")
    health = httpx.get(front.base + "/health", timeout=10).json()
    assert health["status"] == "degraded" and health["models"]["gone"]["healthy_upstreams"] == 0


def test_an_upstream_urls_password_is_never_shown(front: Server, image_host) -> None:
    """The URL's password goes to the engine only: the log (the banner, the engine named as it fails), /health and
    /metrics name the engine without it. The upstream_api_key's Bearer is what the engine gets (it answers)."""
    assert post(front, body_for(WITH_PASSWORD, image_host.url("/red.png"), max_tokens=2)).status_code == 200
    gone = post(front, body_for(f"gone-{WITH_PASSWORD}", image_host.url("/red.png"), max_tokens=2))
    assert gone.status_code == 503
    seen = [
        front.log(),
        httpx.get(front.base + "/health", timeout=10).text,
        httpx.get(front.base + "/metrics", timeout=10).text,
    ]
    assert not [where for where in seen if PASSWORD in where or "gateway:" in where]
    dead = re.escape(with_password("http://127.0.0.1:").replace(f"gateway:{PASSWORD}@", ""))
    assert re.search(rf"gone-{WITH_PASSWORD} +{dead}\d+/v1\n", seen[0])  # the banner's line, without it
    assert re.search(rf"upstream {dead}\d+/v1 (is failing its health check|out of rotation)", seen[0])


def test_an_engine_down_at_start_shows_in_health_before_any_request(front: Server) -> None:
    """A load balancer's probe of /health and the upstream_healthy gauge see an engine that was never up,
    though no request has tried it (the health checks run from the start, not from the first request)."""
    deadline = time.monotonic() + 30
    down = 1
    while time.monotonic() < deadline and down:
        down = httpx.get(front.base + "/health", timeout=10).json()["models"]["down-at-start"]["healthy_upstreams"]
        time.sleep(0.2)
    assert down == 0
    metrics = httpx.get(front.base + "/metrics", timeout=10).text.splitlines()
    gauge = next(x for x in metrics if x.startswith("llamascope:upstream_healthy{") and "down-at-start" in x)
    assert gauge.endswith(" 0.0")


def test_hangup_closes_the_upstream_stream(front: Server, upstream: Server, image_host) -> None:
    body = body_for(MODEL, image_host.url("/red.png"), max_tokens=3000)
    headers = {"Authorization": f"Bearer {front.key}", "X-DashScope-SSE": "enable"}
    with httpx.stream("POST", front.base + PATH, json=body, headers=headers, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data:")
            if seen == 3:
                break
    deadline = time.monotonic() + 15
    line = ""
    while time.monotonic() < deadline and not line:
        lines = [x for x in upstream.log().splitlines() if "/compatible-mode/" in x or "/v1/chat" in x]
        line = next((x for x in reversed(lines) if "client=disconnected" in x), "")
        time.sleep(0.1)
    assert line, upstream.log()[-2000:]
    assert int(re.search(r"output_tokens=(\d+)", line).group(1)) < 3000


def test_upstream_refusals_come_back_as_400(front: Server, image_host) -> None:
    # Short in bytes, long in tokens: the front's estimate admits it, the upstream counts and refuses.
    r = post(front, {"model": MODEL, "input": {"messages": [user_turn(image_host.url("/red.png"), "龘" * 3000)]}})
    assert r.status_code == 400 and "Range of input length" in r.json()["message"]


@pytest.mark.parametrize(
    "model",
    [MODEL, "pair", "local", DASHSCOPE_BASE],
    ids=["the engine's /tokenize", "after a dead upstream", "a local tokenizer", "a /compatible-mode/v1 base"],
)
def test_streamed_input_tokens_are_exact_from_the_first_event(front: Server, image_host, model: str) -> None:
    """Counted before the request goes out, not estimated until the engine reports: every event says the same."""
    for text in ["?", "Describe every colour in this picture, one by one, in as much detail as you can."]:
        body = body_for(model, image_host.url("/red.png"), max_tokens=5, temperature=0)
        body["input"]["messages"] = [
            {"role": "system", "content": "Be brief."},
            user_turn(image_host.url("/red.png"), text),
        ]
        r = post(front, body, **{"X-DashScope-SSE": "enable"})
        events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
        assert len(events) > 1 and events[-1]["output"]["choices"][0]["finish_reason"] == "length"
        # The last event carries the engine's own count (its reported usage).
        assert {e["usage"]["input_tokens"] for e in events} == {events[-1]["usage"]["input_tokens"]}


def test_tokenize_counts_as_a_completion_reports(upstream: Server, image_host) -> None:
    """llamascope serves vLLM's POST /tokenize for chat messages (what a front llamascope asks)."""
    import base64

    uri = "data:image/png;base64," + base64.b64encode(httpx.get(image_host.url("/red.png")).content).decode()
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "Hi"}]}
    ]
    headers = {"Authorization": f"Bearer {upstream.key}"}
    counted = httpx.post(upstream.base + "/tokenize", json={"model": MODEL, "messages": messages}, headers=headers)
    assert counted.status_code == 200, counted.text
    done = httpx.post(
        upstream.base + "/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "max_tokens": 1},
        headers=headers,
        timeout=60,
    )
    assert counted.json() == {"count": done.json()["usage"]["prompt_tokens"], "max_model_len": 8192}
    refused = httpx.post(upstream.base + "/tokenize", json={"model": MODEL, "messages": []}, headers=headers)
    assert refused.status_code == 400 and refused.json()["error"]["message"]


def test_an_upstream_named_by_its_dashscope_base_counts_exactly(front: Server, upstream: Server, image_host) -> None:
    """``upstreams = [".../compatible-mode/v1"]``: the front finds the engine's tokenizer beside that base, so a
    streamed answer's input tokens are the engine's exact count in every event, as in the non-streamed answer."""
    body = body_for(DASHSCOPE_BASE, image_host.url("/red.png"), max_tokens=5, temperature=0)
    body["input"]["messages"] = [
        {"role": "system", "content": "Be brief."},
        user_turn(image_host.url("/red.png"), "Describe every colour in this picture, one by one, in detail."),
    ]
    whole = post(front, body).json()["usage"]["input_tokens"]
    r = post(front, body, **{"X-DashScope-SSE": "enable"})
    events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
    assert len(events) > 1
    assert [e["usage"]["input_tokens"] for e in events] == [whole] * len(events)
    asked = [x for x in upstream.log().splitlines() if "tokenize" in x and "POST" in x]
    assert any("/compatible-mode/tokenize" in x for x in asked), upstream.log()[-2000:]


def test_tokenize_is_served_beside_each_compatible_prefix(upstream: Server, image_host) -> None:
    import base64

    uri = "data:image/png;base64," + base64.b64encode(httpx.get(image_host.url("/red.png")).content).decode()
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "Hi"}]}
    ]
    headers = {"Authorization": f"Bearer {upstream.key}"}
    counts = [
        httpx.post(upstream.base + path, json={"model": MODEL, "messages": messages}, headers=headers)
        for path in ("/tokenize", "/compatible-mode/tokenize")
    ]
    assert [c.status_code for c in counts] == [200, 200], counts[1].text
    assert counts[0].json() == counts[1].json()
    refused = httpx.post(upstream.base + "/compatible-mode/tokenize", json={"model": MODEL, "messages": []})
    assert refused.status_code == 401 and "error" in refused.json()  # the compatible mode's error shape


# Where an engine's tokenizer is found, per layout: an OpenAI-compatible engine (not llamascope) that serves
# POST /tokenize at some paths and answers everything else with 404, recording what it was asked.
VLLM_ANSWER = {"count": 42, "max_model_len": 8192}
LLAMA_CPP_ANSWER = {"tokens": []}  # llama.cpp's /tokenize takes "content", not chat messages


@pytest.mark.parametrize(
    ("base", "serves", "asked", "count"),
    [
        ("/compatible-mode/v1", {"/compatible-mode/tokenize": VLLM_ANSWER}, ["/compatible-mode/tokenize"] * 2, 42),
        (
            "/compatible-mode/v1",
            {"/tokenize": VLLM_ANSWER},
            ["/compatible-mode/tokenize", "/tokenize", "/tokenize"],
            42,
        ),
        ("/v1", {"/tokenize": VLLM_ANSWER}, ["/tokenize"] * 2, 42),
        ("/compatible-mode/v1", {}, ["/compatible-mode/tokenize", "/tokenize"], None),
        ("/v1", {"/tokenize": LLAMA_CPP_ANSWER}, ["/tokenize"], None),
    ],
    ids=["beside the base", "at the root", "vLLM's layout", "nowhere", "not vLLM's"],
)
def test_the_engines_tokenizer_is_found_and_remembered(
    base: str, serves: dict[str, dict], asked: list[str], count: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Beside the base first, then at the root; what worked (or that nothing did) is remembered."""
    import asyncio

    from aiohttp import web

    from llamascope.engines.base import Turn

    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.path)
        if request.method == "POST" and request.path in serves:
            return web.json_response(serves[request.path])
        return web.json_response({"error": "not found"}, status=404)

    async def two_prompts() -> list[int]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        async with _engine_before(app, base) as engine:
            return [(await engine.prepare([Turn("user", "Hi")])).input_tokens for _ in range(2)]

    counted = asyncio.run(two_prompts())
    assert [p for p in seen if p.endswith("/tokenize")] == asked
    if count is None:
        assert counted[0] == counted[1] != VLLM_ANSWER["count"]  # estimated
        assert "has no /tokenize: its prompts are estimated" in caplog.text
    else:
        assert counted == [count, count]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Hangzhou"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time now in a zone, for the prompt to hold more than one tool.",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CST"]}}, "required": ["zone"]},
    },
}


@pytest.mark.parametrize(
    "tool_choice",
    ["none", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["none", "a named function"],
)
def test_the_engines_count_sees_the_tool_choice(upstream: Server, tool_choice: object) -> None:
    """A front asks the upstream's /tokenize with the completion's tool_choice: an llamascope upstream puts no
    tool in the prompt for "none" and only the named one for a function, so the front's count is the one the
    completion reports (sent the tools alone, it counted both tools in the prompt)."""
    import asyncio

    from llamascope.engines.base import Turn
    from llamascope.engines.upstream import UpstreamEngine
    from llamascope.structured.spec import read_request

    tools, question = [WEATHER_TOOL, TIME_TOOL], "What is the weather in Paris?"
    spec = read_request(tools=tools, tool_choice=tool_choice)

    async def count() -> int:
        engine = UpstreamEngine.create([upstream.base + "/v1"], MODEL, UPSTREAM_KEY, 8192)
        try:
            return (await engine.prepare([Turn("user", question)], spec)).input_tokens
        finally:
            await engine.close()

    done = httpx.post(
        upstream.base + "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": question}],
            "tools": tools,
            "tool_choice": tool_choice,
            "max_tokens": 1,
        },
        headers={"Authorization": f"Bearer {UPSTREAM_KEY}"},
        timeout=60,
    )
    assert done.status_code == 200, done.text
    assert asyncio.run(count()) == done.json()["usage"]["prompt_tokens"]


def test_a_forced_tool_call_comes_back_through_an_upstream_llamascope(upstream: Server) -> None:
    """llamascope in front of llamascope: the fields go on, the upstream's grammar forces the call, and its
    streamed ``tool_calls`` come back as the last chunk's calls."""
    import asyncio

    from llamascope.engines.base import FinishReason, SamplingParams, Turn
    from llamascope.engines.upstream import UpstreamEngine
    from llamascope.structured.spec import read_request
    from llamascope.structured.tools import ToolCall
    from tests.engines.helpers import image

    spec = read_request(tools=[WEATHER_TOOL], tool_choice="required", parallel_tool_calls=False)
    history = [
        Turn("user", (image((90, 120, 200)), "Weather here, then in Hangzhou?")),  # the model takes an image first
        Turn("assistant", "", tool_calls=(ToolCall("get_weather", '{"city": "Paris"}', "call_0"),)),
        Turn("tool", "Sunny", tool_call_id="call_0"),
    ]

    async def ask() -> list:
        engine = UpstreamEngine.create([upstream.base + "/compatible-mode/v1"], MODEL, UPSTREAM_KEY, 8192)
        try:
            prompt = await engine.prepare(history, spec)
            return [c async for c in engine.generate(prompt, SamplingParams(max_new_tokens=80, temperature=0))]
        finally:
            await engine.close()

    chunks = asyncio.run(ask())
    last = chunks[-1]
    assert last.finish_reason == FinishReason.TOOL_CALLS and not "".join(c.text for c in chunks)
    assert [c.name for c in last.tool_calls] == ["get_weather"]
    assert json.loads(last.tool_calls[0].arguments)["city"] in ("Paris", "Hangzhou")


def test_tool_call_deltas_are_joined_by_index() -> None:
    """An engine that streams its calls in pieces (vLLM's way): the fields it was sent, and the calls joined."""
    import asyncio

    from aiohttp import web

    from llamascope.engines.base import FinishReason, SamplingParams, Turn
    from llamascope.structured.spec import read_request

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    spec = read_request(
        response_format={"type": "json_schema", "json_schema": {"name": "count", "schema": schema, "strict": True}},
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
    )
    bodies: list[dict] = []
    deltas = [
        {"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather"}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
        {"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "get_weather", "arguments": "{"}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": '"city": "Hangzhou"}'}}]},
    ]

    async def completions(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for delta in deltas:
            await response.write(f"data: {json.dumps({'choices': [{'index': 0, 'delta': delta}]})}\n\n".encode())
        done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
        await response.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())
        return response

    async def counted(request: web.Request) -> web.Response:
        return web.json_response({"count": 9})

    async def ask() -> list:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", completions)
        app.router.add_post("/tokenize", counted)
        async with _engine_before(app) as engine:
            prompt = await engine.prepare([Turn("user", "json please")], spec)
            return [c async for c in engine.generate(prompt, SamplingParams(max_new_tokens=30))]

    chunks = asyncio.run(ask())
    sent = bodies[0]
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "count", "schema": schema, "strict": True},
    }
    assert sent["tools"] == [WEATHER_TOOL] and sent["parallel_tool_calls"] is False
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    last = chunks[-1]
    assert last.finish_reason == FinishReason.TOOL_CALLS
    assert [(c.id, c.name, json.loads(c.arguments)) for c in last.tool_calls] == [
        ("call_a", "get_weather", {"city": "Paris"}),
        ("call_b", "get_weather", {"city": "Hangzhou"}),
    ]


def test_a_tokenize_answer_too_long_to_read_leaves_the_engines_tokenizer_known() -> None:
    """vLLM's /tokenize lists a prompt's tokens, however many (no context check there): a prompt of some 150,000
    tokens, any key's, is more than the 1 MiB read of that answer. Its count could not be read, and the engine's
    /tokenize was forgotten for good ("has no /tokenize"): every later prompt, every key's, estimated."""
    import asyncio

    from aiohttp import web

    from llamascope.engines.base import Turn
    from llamascope.engines.upstream import MAX_COUNT_BYTES

    async def tokenize(request: web.Request) -> web.Response:
        if b"long" in await request.read():  # its tokens listed: more than is read of the answer
            return web.json_response({"count": 200_000, "tokens": [128000] * (MAX_COUNT_BYTES // 7 + 1)})
        return web.json_response(VLLM_ANSWER)

    async def counts() -> list[int]:
        app = web.Application()
        app.router.add_post("/tokenize", tokenize)
        async with _engine_before(app, context=1_000_000) as engine:
            return [(await engine.prepare([Turn("user", text)])).input_tokens for text in ("Hi", "long", "Hi")]

    counted = asyncio.run(counts())
    assert counted[0] == counted[2] == VLLM_ANSWER["count"], counted  # counted by the engine, before and after
