"""A streamed answer through an upstream engine, as its client reads it: the exact bytes when the upstream
sends its whole answer at once (llamascope writes frames that come together in one write, the bytes
unchanged), and a first token that leaves at once when the upstream has nothing more yet."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import API_KEY, Server, start_server

pytestmark = pytest.mark.server
PIECES = ["The ", "picture ", "shows ", "a ", "small ", "red ", "square", "."]
# An engine that cuts its text between the halves of a surrogate pair (JSON strings are UTF-16): each half is
# escaped alone in its delta (json.dumps writes "\ud83d"), and a half of a pair is left alone before "!".
HALVES = ["A ", "\ud83d", "\udc09", " or ", "\ud83d", "!"]
# An error sent in the stream after its 200 and a first piece: vLLM's (serving_chat.py: the exception as an event,
# then [DONE]), and OpenAI's error object itself, which had no choice in it and passed for the answer's end.
STREAM_ERRORS = {
    "fails": {"error": {"message": "EngineCore died", "type": "InternalServerError", "param": None, "code": 500}},
    "fails-object": {"object": "error", "message": "EngineCore died", "type": "InternalServerError", "code": 500},
}
WAIT_SECONDS = 5  # how long the slow upstream holds the rest of its answer unless the client has its first token


def _event(delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
    choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body = {"id": "up", "object": "chat.completion.chunk", "created": 0, "model": "up", "choices": choices}
    if usage:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n".encode()


def _answer(counts: type = int, pieces: list[str] = PIECES, cached: int | None = None) -> list[bytes]:
    events = [_event({"role": "assistant", "content": p}) for p in pieces[:-1]]
    events.append(_event({"content": pieces[-1]}, "stop"))
    usage: dict = {"prompt_tokens": counts(20), "completion_tokens": counts(8), "total_tokens": counts(28)}
    if cached is not None:  # vLLM (--enable-prompt-tokens-details) and SGLang report their prefix cache's reuse
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    events.append(_event({}, usage=usage))
    return [*events, b"data: [DONE]\n\n"]


class Upstream:
    """An OpenAI-compatible engine in a thread of the test: model "burst" sends its whole answer in one write;
    "slow" sends its first event, then waits until ``released`` (or ``WAIT_SECONDS``) for the rest; "floats"
    is "burst" with its usage counts written as 20.0, "cached" with 16 of its prompt's tokens from its cache;
    "halves" sends ``HALVES`` an event a write; "stops" ends its answer before the first of the request's stop
    strings, as vLLM does, an event a write. ``bodies`` holds the requests it was sent."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.bodies: list[dict] = []
        self.waited_out = False  # the slow answer's rest went out because nobody released it
        self.base = ""
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        self._stop: asyncio.Event | None = None

    def __enter__(self) -> Upstream:
        self._thread.start()
        assert self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    async def _serve(self) -> None:
        from aiohttp import web

        async def completions(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            self.bodies.append(body)
            model = body["model"]
            if model == "stops":
                return await _stopping(request, body.get("stop") or [])
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            events = _answer(
                float if model == "floats" else int,
                HALVES if model == "halves" else PIECES,
                16 if model == "cached" else None,
            )
            if model == "halves":
                for event in events[:-1]:
                    await response.write(event)
                    await asyncio.sleep(0.01)  # each its own read, most likely
                events = events[-1:]
            if model.startswith("fails"):  # its first piece, then (once released) an error, as vLLM sends one
                await response.write(events[0])
                await asyncio.get_running_loop().run_in_executor(None, self.released.wait, WAIT_SECONDS)
                await response.write(b"data: " + json.dumps(STREAM_ERRORS[model]).encode() + b"\n\ndata: [DONE]\n\n")
                await response.write_eof()
                return response
            if model == "slow":
                await response.write(events[0])
                released = await asyncio.get_running_loop().run_in_executor(None, self.released.wait, WAIT_SECONDS)
                self.waited_out = not released
                events = events[1:]
            await response.write(b"".join(events))
            await response.write_eof()
            return response

        async def models(request: web.Request) -> web.Response:
            names = ("burst", "slow", "floats", "halves", "stops", "cached", *STREAM_ERRORS)
            return web.json_response({"object": "list", "data": [{"id": name} for name in names]})

        app = web.Application()
        app.router.add_post("/v1/chat/completions", completions)
        app.router.add_get("/v1/models", models)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.base = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()


async def _stopping(request: object, stops: list[str]) -> object:
    """The answer of an engine told ``stops``: its pieces up to the first stop string, without it, then its
    usage; an event a write, as a token at a time."""
    from aiohttp import web

    text, made = "", []
    for piece in PIECES:
        cut = min((i for i in ((text + piece).find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            made.append((text + piece)[len(text) : cut])
            break
        text += piece
        made.append(piece)
    finish = "stop"
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)  # type: ignore[arg-type]
    for i, piece in enumerate(made):
        await response.write(_event({"content": piece}, finish if i == len(made) - 1 else None))
        await asyncio.sleep(0.01)
    usage = {"prompt_tokens": 20, "completion_tokens": len(made), "total_tokens": 20 + len(made)}
    await response.write(_event({}, usage=usage) + b"data: [DONE]\n\n")
    return response


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with Upstream() as engine:
        yield engine


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Server]:
    models = [
        arg
        for name in ("burst", "slow", "floats", "halves", "stops", "cached", *STREAM_ERRORS)
        for arg in ("--model", f"{name}=openai+{upstream.base}")
    ]
    srv = start_server(tmp_path_factory.mktemp("front"), models)
    yield srv
    srv.stop()


def _request(model: str) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "What is in the picture?"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _streamed(front: Server, model: str) -> httpx.Response:
    """The model's streamed compatible-mode answer, read whole."""
    r = httpx.post(
        front.base + "/compatible-mode/v1/chat/completions",
        json=_request(model),
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    assert r.status_code == 200
    return r


def test_a_whole_answer_at_once_comes_back_byte_for_byte(front: Server) -> None:
    r = _streamed(front, "burst")
    head = f'data: {{"id":"chatcmpl-{r.headers["x-request-id"]}","object":"chat.completion.chunk","created":'
    created = re.match(re.escape(head) + r"(\d+),", r.text)
    assert created is not None, r.text[:300]
    start = f'{head}{created[1]},"model":"burst","choices":'
    end = ',"system_fingerprint":null}\n\n'
    text = "".join(PIECES)
    # What llamascope sent before frames were written together: one chunk for the upstream's one read, the finish
    # with empty content, the usage (the upstream's), then [DONE].
    assert r.text == (
        f'{start}[{{"index":0,"delta":{{"role":"assistant","content":"{text}"}},"finish_reason":null,'
        f'"logprobs":null}}],"usage":null{end}'
        f'{start}[{{"index":0,"delta":{{"content":""}},"finish_reason":"stop","logprobs":null}}],"usage":null{end}'
        f'{start}[],"usage":{{"prompt_tokens":20,"completion_tokens":8,"total_tokens":28,'
        f'"prompt_tokens_details":{{"cached_tokens":0}}}}{end}'
        "data: [DONE]\n\n"
    )


@pytest.mark.parametrize(
    "path",
    [
        "/compatible-mode/v1/chat/completions",
        "/api/v1/services/aigc/text-generation/generation",
    ],
)
def test_a_first_token_alone_is_not_held_back(front: Server, upstream: Upstream, path: str) -> None:
    upstream.released.clear()
    upstream.waited_out = False
    headers = {"Authorization": f"Bearer {API_KEY}", "X-DashScope-SSE": "enable"}
    body = _request("slow")
    if path.startswith("/api/"):
        body = {"model": "slow", "input": {"messages": body["messages"]}, "parameters": {"incremental_output": True}}
    seen = []
    with httpx.stream("POST", front.base + path, json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:") and PIECES[0].strip() in line:
                upstream.released.set()  # the first token is here while the upstream still holds the rest
            seen.append(line)
    assert not upstream.waited_out, "the first token came only with the rest of the answer"
    assert upstream.released.is_set()
    assert any("square." in line for line in seen)


@pytest.mark.parametrize("model", STREAM_ERRORS)
@pytest.mark.parametrize("native", [False, True])
def test_an_error_the_engine_sends_after_its_first_piece_is_an_error_event(
    front: Server, upstream: Upstream, model: str, native: bool
) -> None:
    """The client has the first piece, then an error event in its API's shape (DashScope's ``event:error`` with the
    500's code and request id; OpenAI's error object): never a stream that ends as if the answer were whole."""
    upstream.released.clear()
    headers = {"Authorization": f"Bearer {API_KEY}", "X-DashScope-SSE": "enable"}
    path, body = "/compatible-mode/v1/chat/completions", _request(model)
    if native:
        path = "/api/v1/services/aigc/text-generation/generation"
        body = {"model": model, "input": {"messages": body["messages"]}, "parameters": {"incremental_output": True}}
    lines = []
    with httpx.stream("POST", front.base + path, json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:") and PIECES[0].strip() in line:
                upstream.released.set()  # the error only once the client has the first piece
            lines.append(line)
    assert upstream.released.is_set(), lines
    data = [json.loads(line[5:]) for line in lines if line.startswith("data:") and line != "data: [DONE]"]
    assert not any(line.startswith("data:") and ('"stop"' in line or "[DONE]" in line) for line in lines), lines
    if native:
        assert lines[lines.index("event:error") :][:3] == ["event:error", ":HTTP_STATUS/500", "status:500"], lines
        assert (data[-1]["code"], data[-1]["request_id"]) == ("InternalError.Algo", r.headers["x-request-id"])
    else:
        assert data[-1]["error"]["code"] == "InternalError.Algo", lines


def test_usage_counts_written_as_floats_come_back_as_whole_numbers(front: Server) -> None:
    """An upstream may write its counts as 20.0: the client gets 20 (what it is charged), as pydantic made it."""
    r = _streamed(front, "floats")
    assert '"usage":{"prompt_tokens":20,"completion_tokens":8,"total_tokens":28,' in r.text, r.text[-400:]


@pytest.mark.parametrize("stream", [False, True])
def test_the_engines_cached_prompt_tokens_are_reported(front: Server, stream: bool) -> None:
    """What the engine's prefix cache reused, as it reports it: not 0, as if nothing had been."""
    import openai

    client = openai.OpenAI(api_key=API_KEY, base_url=front.base + "/compatible-mode/v1", max_retries=0)
    asked = {"model": "cached", "messages": [{"role": "user", "content": "What is in the picture?"}]}
    if stream:
        chunks = list(client.chat.completions.create(**asked, stream=True, stream_options={"include_usage": True}))
        usage = chunks[-1].usage
    else:
        usage = client.chat.completions.create(**asked).usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens) == (20, 16)


@pytest.mark.parametrize("stream", [False, True])
def test_a_surrogate_pair_cut_between_deltas_comes_back_whole(front: Server, stream: bool) -> None:
    """Its halves joined, a half alone as U+FFFD: never a 500 or a stream cut short for text UTF-8 cannot carry."""
    import openai

    client = openai.OpenAI(base_url=front.base + "/compatible-mode/v1", api_key=API_KEY, max_retries=0)
    messages = _request("halves")["messages"]
    if stream:
        chunks = client.chat.completions.create(model="halves", messages=messages, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        text = client.chat.completions.create(model="halves", messages=messages).choices[0].message.content or ""
    assert text == "A \U0001f409 or \ufffd!"
    native = httpx.post(
        front.base + "/api/v1/services/aigc/text-generation/generation",
        json={"model": "halves", "input": {"messages": messages}, "parameters": {"incremental_output": True}},
        headers={"Authorization": f"Bearer {API_KEY}", **({"X-DashScope-SSE": "enable"} if stream else {})},
        timeout=30,
    )
    assert native.status_code == 200
    if stream:
        events = [json.loads(line[5:]) for line in native.text.splitlines() if line.startswith("data:")]
    else:
        events = [native.json()]
    assert "".join(e["output"]["text"] for e in events) == text


def test_stop_strings_are_told_the_engine_which_stops_and_counts(front: Server, upstream: Upstream) -> None:
    """The engine stops at once and reports its count: the usage is its, exactly (cut here alone, it ran on
    until the hang-up was seen, and its count of the prompt and of what it made never came)."""
    import openai

    client = openai.OpenAI(base_url=front.base + "/compatible-mode/v1", api_key=API_KEY, max_retries=0)
    stops = ["nothing", "red", "sq", "x", "y"]
    r = client.chat.completions.create(model="stops", messages=_request("stops")["messages"], stop=stops)
    assert upstream.bodies[-1]["stop"] == stops[:4]  # OpenAI's API and TGI take 4
    assert r.choices[0].message.content == "The picture shows a small "
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (20, 6)
