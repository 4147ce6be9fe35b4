"""An upstream engine that breaks its answer, is slow, hangs or is gone: what the gateway makes of it.

The engines are raw asyncio servers on loopback that answer with exact bytes; the gateway's engine is the
real ``UpstreamEngine`` with its own HTTP client.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from llamascope import errors
from llamascope.engines.base import Chunk, FinishReason, SamplingParams, Turn
from llamascope.engines.upstream import UpstreamEngine
from llamascope.observability.metrics import METRICS
from tests.conftest import free_port

Writer = Callable[[asyncio.StreamWriter], Awaitable[None]]


def event(delta: dict, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n"


def head(content_type: str = "text/event-stream", length: int | None = None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Connection: close"
    return f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n".encode()


def answer_with(body: bytes, content_type: str = "text/event-stream") -> Writer:
    async def write(writer: asyncio.StreamWriter) -> None:
        writer.write(head(content_type) + body)

    return write


ENDED = event({"content": "A red "}) + event({"content": "square."}, "stop") + b"data: [DONE]\n\n"
COMPLETION = {
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "A red square."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11},
}


MODELS = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{"data": []}'


async def slowly(writer: asyncio.StreamWriter) -> None:
    """Twenty pieces 0.1 s apart: two seconds in all, never silent for long."""
    writer.write(head())
    for i in range(20):
        await asyncio.sleep(0.1)
        writer.write(event({"content": f"{i} "}))
    writer.write(event({}, "stop") + b"data: [DONE]\n\n")


async def never(writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


async def then_silent(writer: asyncio.StreamWriter) -> None:
    writer.write(head() + event({"content": "A red "}))
    await writer.drain()
    await asyncio.sleep(30)


async def gone_before_its_head(writer: asyncio.StreamWriter) -> None:
    """Takes the request, then its connection ends with no answer (an engine that crashed on it)."""


async def cut_after_its_end(writer: asyncio.StreamWriter) -> None:
    """The whole answer, then the connection ends short of the length it announced (usage and [DONE] lost)."""
    body = event({"content": "A red "}) + event({"content": "square."}, "stop")
    writer.write(head(length=len(body) + 100) + body)


async def engine(write: Writer) -> AsyncIterator[str]:
    """An engine at a loopback base URL whose /chat/completions answers as ``write`` does, whose /models passes
    the health check, and 404 elsewhere."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (int(line[15:]) for line in request.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
        )
        await reader.readexactly(length)
        if b"/chat/completions" in request.split(b"\r\n")[0]:
            await write(writer)
        elif b"/models" in request.split(b"\r\n")[0]:
            writer.write(MODELS)
        else:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"


async def ask(writes: list[Writer | None], silence: float = 300.0) -> list[Chunk]:
    """Through engines that answer as ``writes`` do (None: nothing listens there), tried in that order."""
    bases: list[str] = []
    running = []
    for write in writes:
        if write is None:
            bases.append(f"http://127.0.0.1:{free_port()}/v1")
            continue
        served = engine(write)
        running.append(served)
        bases.append(await anext(served))
    gateway = UpstreamEngine.create(bases, "stub", None, 8192, silence=silence)
    try:
        prompt = await gateway.prepare([Turn("user", "What is it?")])
        return [chunk async for chunk in gateway.generate(prompt, SamplingParams(max_new_tokens=16))]
    finally:
        await gateway.close()
        for served in running:
            await served.aclose()


def text_of(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


@pytest.mark.parametrize(
    "broken",
    [
        (b"<html><body>502 Bad Gateway</body></html>", "text/html"),  # a proxy's page
        (b"<html>not json", "text/event-stream"),  # no events at all
        (event({"content": "A red "}) + b"data: {broken", "text/event-stream"),  # not JSON
        (event({"content": "A red "}), "text/event-stream"),  # ended before its finish reason or [DONE]
        (b'{"hello": "world"}', "application/json"),  # JSON, not an answer
        (b'data: {"foo": 1}\n\ndata: [DONE]\n\n', "text/event-stream"),  # [DONE], and no choice before it
        (
            b'data: {"choices": [{"index": 0, "delta": {"content": "caf\xe9 \xff"}, "finish_reason": "stop"}]}\n\n'
            b"data: [DONE]\n\n",
            "text/event-stream",
        ),
        (b"data: " + b"[" * 100_000 + b"\n\n", "text/event-stream"),  # nested past the parser's depth
        # vLLM and SGLang end a request they aborted (preempted, shutting down) with finish_reason "abort"
        (event({"content": "A red "}) + event({}, "abort") + b"data: [DONE]\n\n", "text/event-stream"),
        (event({"role": "assistant"}) + event({}, "abort") + b"data: [DONE]\n\n", "text/event-stream"),
    ],
    ids=[
        "html page",
        "no events",
        "not JSON",
        "cut short",
        "no answer",
        "no choice",
        "not UTF-8",
        "too deep",
        "aborted",
        "aborted at once",
    ],
)
def test_a_broken_answer_is_an_error_never_an_answer(broken: tuple[bytes, str]) -> None:
    """Issue 29's gateway, tried as a user: a broken answer came back as a short or empty one, finish "stop"."""
    with pytest.raises(errors.ServiceError) as alone:
        asyncio.run(ask([answer_with(*broken)]))
    assert (alone.value.status, alone.value.code) == (500, "InternalError.Algo")
    if b"red" not in broken[0]:  # nothing delivered yet: the next upstream answers instead
        chunks = asyncio.run(ask([answer_with(*broken), answer_with(ENDED)]))
        assert text_of(chunks) == "A red square." and chunks[-1].finish_reason == FinishReason.STOP


def test_an_engine_that_does_not_stream_is_read_whole_and_events_are_read_whatever_their_type() -> None:
    body = json.dumps(COMPLETION).encode()
    chunks = asyncio.run(ask([answer_with(body, "application/json")]))
    assert text_of(chunks) == "A red square."
    assert (chunks[-1].finish_reason, chunks[-1].input_tokens, chunks[-1].output_tokens) == (FinishReason.STOP, 7, 4)
    for mislabelled in ("text/plain", "application/json"):  # a small engine's (or a test stub's) events
        assert text_of(asyncio.run(ask([answer_with(ENDED, mislabelled)]))) == "A red square."


def test_silence_ends_an_answer_and_a_slow_one_is_never_cut() -> None:
    """The engine may be silent at most ``silence`` seconds: a hung one is given up (408, as the wire spec's
    timeout), one that keeps sending runs past it, however long it takes in all. Silent once its answer has
    begun (the client has part of it, and is charged for it): a failure, not "try again later"."""
    chunks = asyncio.run(ask([slowly], silence=1.5))
    assert text_of(chunks) == "".join(f"{i} " for i in range(20)) and chunks[-1].finish_reason == FinishReason.STOP
    with pytest.raises(errors.ServiceError) as hung:
        asyncio.run(ask([never], silence=0.3))
    assert (hung.value.status, hung.value.code) == (408, "RequestTimeOut")
    with pytest.raises(errors.ServiceError) as begun:
        asyncio.run(ask([then_silent], silence=1.0))  # its first piece comes at once: the silence after it
    assert (begun.value.status, begun.value.code) == (500, "InternalError.Algo")


def test_an_answer_whole_before_its_connection_broke_or_its_last_line_ended_is_whole() -> None:
    chunks = asyncio.run(ask([cut_after_its_end]))
    assert text_of(chunks) == "A red square." and chunks[-1].finish_reason == FinishReason.STOP
    no_newline = event({"content": "A red square."}, "stop").rstrip()
    chunks = asyncio.run(ask([answer_with(no_newline)]))
    assert text_of(chunks) == "A red square." and chunks[-1].finish_reason == FinishReason.STOP


def test_calls_cut_by_length_keep_the_whole_ones() -> None:
    whole = {"index": 0, "id": "call_a", "function": {"name": "w", "arguments": '{"city": "Paris"}'}}
    cut = {"index": 1, "id": "call_b", "function": {"name": "w", "arguments": '{"ci'}}
    bare = {"index": 2, "id": "call_c", "function": {"name": "w"}}  # cut right after its name: no arguments yet
    for last_one in (cut, bare):
        body = event({"tool_calls": [whole]}) + event({"tool_calls": [last_one]}) + event({}, "length")
        last = asyncio.run(ask([answer_with(body + b"data: [DONE]\n\n")]))[-1]
        assert last.finish_reason == FinishReason.LENGTH
        assert [(c.id, c.arguments) for c in last.tool_calls or ()] == [("call_a", '{"city": "Paris"}')]


def test_no_engine_reachable_is_503_worth_retrying() -> None:
    with pytest.raises(errors.ServiceError) as gone:
        asyncio.run(ask([None, None]))
    assert (gone.value.status, gone.value.code) == (503, "ServiceUnavailable")
    assert gone.value.headers["x-should-retry"] == "true"
    with pytest.raises(errors.ServiceError) as crashed:  # reached, and it broke on the request: the engine failed
        asyncio.run(ask([None, gone_before_its_head]))
    assert (crashed.value.status, crashed.value.code) == (500, "InternalError.Algo")


def test_an_answer_that_breaks_the_schema_asked_for_is_not_passed_on(tmp_path) -> None:
    """Through the conversation service: the engine answers prose to a json_schema request (an engine without
    guided decoding): an error, not an answer that ends with "stop"; a valid one passes."""
    from llamascope.accounts import admin
    from llamascope.accounts.admission import Accounts
    from llamascope.accounts.store import AccountStore
    from llamascope.conversation.service import ConversationService, Endpoint
    from llamascope.images.decode import DecodeLimits
    from llamascope.images.intake import ImageIntake
    from llamascope.images.source import FetchPolicy
    from tests.conftest import API_KEY

    store = AccountStore(f"sqlite:///{tmp_path / 'accounts.db'}")
    store.migrate()
    admin.seed_keys(store, [API_KEY])
    accounts = Accounts(store)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    asked = {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}
    calls: list = []  # the last answer's calls

    async def answer(events: bytes, parameters: dict = asked) -> str:
        served = engine(answer_with(events + b"data: [DONE]\n\n"))
        gateway = UpstreamEngine.create([await anext(served)], "stub", None, 8192)
        service = ConversationService({"stub": gateway}, ImageIntake(FetchPolicy(), DecodeLimits()), accounts)
        try:
            principal = await accounts.authenticate(f"Bearer {API_KEY}")
            messages = [{"role": "user", "content": "How many? Answer in JSON."}]
            reply = await service.open(principal, "r", "stub", messages, parameters, endpoint=Endpoint.CHAT)
            text = await reply.complete()
            calls[:] = reply.tool_calls
            return text
        finally:
            await gateway.close()
            service.intake.close()
            await served.aclose()

    try:
        assert asyncio.run(answer(event({"content": '{"n": 3}'}, "stop"))) == '{"n": 3}'
        with pytest.raises(errors.ServiceError) as broken:
            asyncio.run(answer(event({"content": "There are three."}, "stop")))
        assert (broken.value.status, broken.value.code) == (500, "InternalError.Algo")
        assert "not what the request asked for: its answer is not JSON" in broken.value.message
        # Cut by length, its calls are still held to the functions offered (the text, unfinished, is not)
        tools = {"tools": [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}]}
        call = {"index": 0, "id": "call_a", "function": {"name": "launch", "arguments": "{}"}}
        with pytest.raises(errors.ServiceError) as unoffered:
            asyncio.run(answer(event({"tool_calls": [call]}) + event({}, "length"), tools))
        assert "it called 'launch', which is not a function it was offered" in unoffered.value.message
        # Two calls under "auto" though parallel_tool_calls is false: the first kept, as the in-process engine
        # keeps its free answers' (it was a 500 saying the engine broke the shape asked)
        two = [{"index": i, "id": f"call_{i}", "function": {"name": "w", "arguments": "{}"}} for i in (0, 1)]
        assert asyncio.run(answer(event({"tool_calls": two}) + event({}, "tool_calls"), tools)) == ""
        assert [c.id for c in calls] == ["call_0", "call_1"]
        single = {**tools, "parallel_tool_calls": False}
        assert asyncio.run(answer(event({"tool_calls": two}) + event({}, "tool_calls"), single)) == ""
        assert [c.id for c in calls] == ["call_0"]
    finally:
        accounts.close()


def test_call_arguments_cut_between_the_halves_of_a_surrogate_pair_come_back_whole() -> None:
    """As the text's: an engine's JSON may split an emoji's UTF-16 halves across two argument deltas; joined as two
    lone surrogates, the arguments could not be written as UTF-8 (a 500). A half left alone becomes U+FFFD."""
    first = {"index": 0, "id": "call_a", "function": {"name": "w", "arguments": '{"a": "\ud83d'}}
    rest = {"index": 0, "function": {"arguments": '\udc09", "b": "\ud83d"}'}}
    body = event({"tool_calls": [first]}) + event({"tool_calls": [rest]}) + event({}, "tool_calls")
    last = asyncio.run(ask([answer_with(body + b"data: [DONE]\n\n")]))[-1]
    assert [c.arguments for c in last.tool_calls or ()] == ['{"a": "\U0001f409", "b": "\ufffd"}']


def refusing(status: str, message: str) -> Writer:
    """An engine that answers the completion with an error status and an OpenAI-shaped error."""
    body = json.dumps({"object": "error", "message": message, "type": "RateLimitError"}).encode()

    async def write(writer: asyncio.StreamWriter) -> None:
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )

    return write


def test_a_busy_engine_passes_the_request_on_and_every_engine_busy_is_429_throttling() -> None:
    """An engine at capacity (429: TGI past its max_concurrent_requests, a rate-limiting proxy) failed nothing:
    the request goes to another engine, and when every one is busy the client is throttled, worth a retry."""
    busy = refusing("429 Too Many Requests", "Model is overloaded")
    assert text_of(asyncio.run(ask([busy, answer_with(ENDED)]))) == "A red square."
    with pytest.raises(errors.ServiceError) as throttled:
        asyncio.run(ask([busy, busy]))
    assert (throttled.value.status, throttled.value.code) == (429, "Throttling")
    assert throttled.value.headers["Retry-After"] == "1"
    with pytest.raises(errors.ServiceError) as partly:  # busy, or not there: still worth a retry later
        asyncio.run(ask([None, busy]))
    assert (partly.value.status, partly.value.code) == (429, "Throttling")


def test_a_busy_engine_stays_in_rotation() -> None:
    async def run() -> list[bool]:
        served = engine(refusing("429 Too Many Requests", "Model is overloaded"))
        gateway = UpstreamEngine.create([await anext(served)], "stub", None, 8192)
        try:
            prompt = await gateway.prepare([Turn("user", "What is it?")])
            with pytest.raises(errors.ServiceError):
                async for _ in gateway.generate(prompt, SamplingParams(max_new_tokens=16)):
                    pass
            return [u.healthy for u in gateway.health()]
        finally:
            await gateway.close()
            await served.aclose()

    assert asyncio.run(run()) == [True]


def test_an_engine_that_refuses_the_gateway_itself_is_named_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """A wrong upstream_api_key (401) or upstream_model (vLLM's 404) fails every request with a 500: the
    operator's log says which engine refused, with what status and words (the access log says only 500)."""
    with pytest.raises(errors.ServiceError) as refused:
        asyncio.run(ask([refusing("401 Unauthorized", "Invalid API key")]))
    assert (refused.value.status, refused.value.code) == (500, "InternalError.Algo")
    assert "Invalid API key" in refused.value.message
    line = next(r.getMessage() for r in caplog.records if "refused" in r.getMessage())
    found = re.search(r"upstream (http://127\.0\.0\.1:\d+/v1) refused .*HTTP 401.*Invalid API key", line)
    assert found, line
    errors_counted = METRICS.registry.get_sample_value("llamascope:upstream_errors_total", {"upstream": found[1]})
    assert errors_counted == 1  # in llamascope:upstream_errors_total, which an operator's alert watches


async def json_answer(writer: asyncio.StreamWriter, status: str, answer: dict) -> None:
    data = json.dumps(answer).encode()
    writer.write(f"HTTP/1.1 {status}\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    await writer.drain()
    writer.close()


async def vllm_by_its_path(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """vLLM started without --served-model-name: it lists the model by its path and refuses any other name (404)."""
    request = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line[15:]) for line in request.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    body = json.loads(await reader.readexactly(length)) if length else {}
    if b"GET /v1/models" in request:
        answer, status = {"object": "list", "data": [{"id": VLLM_PATH, "object": "model"}]}, "200 OK"
    elif body.get("model") != VLLM_PATH:
        answer, status = {"object": "error", "message": f"The model `{body.get('model')}` does not exist."}, "404"
    else:
        writer.write(head() + ENDED)
        await writer.drain()
        writer.close()
        return
    await json_answer(writer, status, answer)


VLLM_PATH = "/models/Llama-3.2-90B-Vision-Instruct"


@pytest.mark.parametrize("named", [False, True])
def test_an_engine_that_serves_one_model_by_another_name_is_called_by_it(named: bool) -> None:
    """`--model llama3.2-90b-vision-instruct=openai+http://gpu1:8000/v1` in front of `vllm serve /models/...`
    (the names differ, and the command line cannot set upstream_model): answers, not a 500 on every request.
    A name set with upstream_model is the operator's: kept, and the engine's refusal says why."""

    async def run() -> str:
        server = await asyncio.start_server(vllm_by_its_path, "127.0.0.1", 0)
        base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        gateway = UpstreamEngine.create([base], "llama3.2-90b-vision-instruct", None, 8192, named=named)
        try:
            gateway.start()  # its health check reads the engine's list of models
            deadline = asyncio.get_running_loop().time() + 10
            while not gateway.upstreams[0].listing_read and not named and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            prompt = await gateway.prepare([Turn("user", "What is it?")])
            return text_of([c async for c in gateway.generate(prompt, SamplingParams(max_new_tokens=16))])
        finally:
            await gateway.close()
            server.close()

    if not named:
        assert asyncio.run(run()) == "A red square."
        return
    with pytest.raises(errors.ServiceError) as refused:
        asyncio.run(run())
    assert refused.value.status == 500 and "`llama3.2-90b-vision-instruct` does not exist" in refused.value.message


async def vllm_of_short_context(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """vLLM started with --max-model-len 40: its /tokenize says so, and it refuses (400) a completion whose prompt
    and max_tokens together pass it, as vLLM does."""
    request = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line[15:]) for line in request.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    body = json.loads(await reader.readexactly(length)) if length else {}
    if b"/tokenize" in request.split(b"\r\n")[0]:
        answer, status = {"count": 30, "max_model_len": 40, "tokens": list(range(30))}, "200 OK"
    elif 30 + body.get("max_tokens", 0) > 40:
        message = f"This model's maximum context length is 40 tokens. However, you requested {30 + body['max_tokens']}"
        answer, status = {"object": "error", "message": message, "type": "BadRequestError", "code": 400}, "400"
    else:
        usage = {"prompt_tokens": 30, "completion_tokens": body["max_tokens"], "total_tokens": 30 + body["max_tokens"]}
        done = event({"content": "A red square"}, "length")[:-2]  # the usage rides on the last event
        writer.write(head() + done[:-1] + b', "usage": ' + json.dumps(usage).encode() + b"}\n\ndata: [DONE]\n\n")
        await writer.drain()
        writer.close()
        return
    await json_answer(writer, status, answer)


def test_an_engine_of_a_shorter_context_than_configured_gets_what_fits_in_it() -> None:
    """context_length left at 8192 before `vllm --max-model-len 40`: a request that does not say max_tokens is
    answered as far as the engine's context allows (finish length), as in process, not refused by the engine."""

    async def run() -> list[Chunk]:
        server = await asyncio.start_server(vllm_of_short_context, "127.0.0.1", 0)
        base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        gateway = UpstreamEngine.create([base], "stub", None, 8192)
        try:
            prompt = await gateway.prepare([Turn("user", "What is it?")])
            return [c async for c in gateway.generate(prompt, SamplingParams(max_new_tokens=512))]
        finally:
            await gateway.close()
            server.close()

    last = asyncio.run(run())[-1]
    assert (last.finish_reason, last.input_tokens, last.output_tokens) == (FinishReason.LENGTH, 30, 10)


def test_the_engines_name_for_the_model_is_read_from_its_listing_at_every_check() -> None:
    """vLLM's path is taken (a "/" in it) and given up once the engine lists the model's own name (restarted with
    --served-model-name); another model's name (Ollama's, a proxy's) is never taken for it; a hostile listing
    changes nothing."""
    gateway = UpstreamEngine.create(["http://127.0.0.1:9/v1"], "llama", None, 8192, named=False)
    upstream = gateway.upstreams[0]

    def listed(*ids: str) -> bytes:
        return json.dumps({"object": "list", "data": [{"id": i, "object": "model"} for i in ids]}).encode()

    steps = [
        (listed("/models/llama"), "/models/llama"),
        (listed("llama"), None),  # restarted with --served-model-name llama
        (listed("meta-llama/Llama-3.2-11B-Vision-Instruct"), "meta-llama/Llama-3.2-11B-Vision-Instruct"),
        (listed("qwen2.5vl:7b"), None),  # another model
        (listed("a/b", "c/d"), None),
        (b'{"data": ' + b"[" * 200_000, None),
    ]
    for listing, name in steps:
        gateway._name_from(upstream, listing)
        assert upstream.model == name, (listing[:60], upstream.model)


def test_an_engines_context_is_its_latest_word_and_a_cached_count_needs_a_prompt_count() -> None:
    from llamascope.engines.upstream import _Answer

    gateway = UpstreamEngine.create(["http://127.0.0.1:9/v1", "http://127.0.0.1:10/v1"], "stub", None, 8192)
    turns = [Turn("user", "What is it?")]
    gateway.upstreams[0].context = 40
    assert asyncio.run(gateway.prepare(turns)).max_new_tokens < 40
    gateway.upstreams[0].context = 4096  # restarted with a longer --max-model-len
    assert asyncio.run(gateway.prepare(turns)).max_new_tokens > 4000
    answer = _Answer()
    usage = {"completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 999}}
    answer.read([b"data: " + json.dumps({"choices": [], "usage": usage}).encode()])
    answer.read([b"data: " + json.dumps({"choices": [{"delta": {"content": "x"}, "finish_reason": "stop"}]}).encode()])
    assert answer.last().cached_tokens is None  # no prompt count to hold it to


def test_a_good_health_check_puts_an_engine_back_in_rotation_as_the_others() -> None:
    """Failures (429s included) weighed against an engine until it answered a request: idle, it got none."""

    async def run() -> tuple[bool, int]:
        server = await asyncio.start_server(vllm_by_its_path, "127.0.0.1", 0)
        gateway = UpstreamEngine.create([f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"], "m", None, 8192)
        upstream = gateway.upstreams[0]
        upstream.failures, upstream.healthy = 3, False
        try:
            await gateway._check(upstream)
            return upstream.healthy, upstream.failures
        finally:
            await gateway.close()
            server.close()

    assert asyncio.run(run()) == (True, 0)


# What vLLM sends when its stream generator fails after its 200 (serving_chat.py's ``except Exception``: the error
# as an event, then [DONE]): {"error": ErrorInfo} now, {"error": ErrorResponse} (with "object": "error") before;
# TGI's {"error": "...", "error_type": ...}; OpenAI's error object itself, as some engines and proxies write it.
STREAM_ERRORS = {
    "vllm": {"error": {"message": "CUDA out of memory", "type": "InternalServerError", "param": None, "code": 500}},
    "vllm 0.6": {"error": {"object": "error", "message": "CUDA out of memory", "type": "BadRequestError", "code": 400}},
    "tgi": {"error": "CUDA out of memory", "error_type": "generation"},
    "error object": {"object": "error", "message": "CUDA out of memory", "type": "InternalServerError", "code": 500},
}


@pytest.mark.parametrize("shape", STREAM_ERRORS)
def test_an_error_the_engine_sends_in_its_stream_is_its_failure(shape: str, caplog: pytest.LogCaptureFixture) -> None:
    """Before its first piece: the engine failed, as with a 5xx (out of rotation, counted, its words in the log), and
    the next engine answers; alone, a 500 (after a piece: tests/api/test_upstream_stream.py)."""
    error = b"data: " + json.dumps(STREAM_ERRORS[shape]).encode() + b"\n\ndata: [DONE]\n\n"
    with pytest.raises(errors.ServiceError) as alone:
        asyncio.run(ask([answer_with(event({"role": "assistant"}) + error)]))
    assert (alone.value.status, alone.value.code) == (500, "InternalError.Algo")
    line = next(r.getMessage() for r in caplog.records if "out of rotation" in r.getMessage())
    assert "CUDA out of memory" in line, line
    found = re.search(r"upstream (http://127\.0\.0\.1:\d+/v1) out of rotation", line)
    assert found and METRICS.registry.get_sample_value("llamascope:upstream_errors_total", {"upstream": found[1]}) == 1
    assert text_of(asyncio.run(ask([answer_with(error), answer_with(ENDED)]))) == "A red square."


def test_an_event_that_says_no_error_is_no_error() -> None:
    """``"error": null`` beside the usage (as a proxy may write every event) is an answer's event, not a failure."""
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}, "error": null}\n\n'
    chunks = asyncio.run(ask([answer_with(ENDED.replace(b"data: [DONE]", usage + b"data: [DONE]"))]))
    assert text_of(chunks) == "A red square." and chunks[-1].output_tokens == 2


def endless(status: str, start: bytes, sent: list[int]) -> Writer:
    """An engine that answers ``status`` with an error body that begins with ``start`` and goes on (64 MiB, as far
    as a reader that reads it all could tell), counting in ``sent`` what it could send before the hang-up."""

    async def write(writer: asyncio.StreamWriter) -> None:
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        sent.append(0)
        piece = start + b" " * (65536 - len(start))
        try:
            while sent[-1] < 64 << 20:
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                sent[-1] += len(piece)
                piece = b" " * 65536
            writer.write(b"0\r\n\r\n")
        except ConnectionError:
            pass

    return write


@pytest.mark.parametrize("status", ["401 Unauthorized", "429 Too Many Requests", "500 Internal Server Error"])
def test_an_engines_error_body_is_read_only_for_its_first_words(status: str, caplog: pytest.LogCaptureFixture) -> None:
    """A broken or hostile engine whose error body is huge, or never ends: its first words are read (for the log
    and the client), the rest is left and its connection closed, not read into memory, nor for ever."""
    sent: list[int] = []
    start = b'{"object": "error", "message": "Invalid API key"'  # cut: no JSON to parse, its words all the same
    with pytest.raises(errors.ServiceError) as refused:
        asyncio.run(ask([endless(status, start, sent)]))
    assert sent and sent[0] < 64 << 20  # it saw the hang-up
    if status.startswith("429"):
        assert refused.value.code == "Throttling"
        return
    assert (refused.value.status, refused.value.code) == (500, "InternalError.Algo")
    said = [
        r.getMessage() for r in caplog.records if "refused" in r.getMessage() or "out of rotation" in r.getMessage()
    ]
    assert any("Invalid API key" in line and len(line) < 1000 for line in said), said


def test_a_redirect_is_not_followed_and_says_its_status() -> None:
    """The engines are URLs the operator configured: one that redirects (a proxy's login page, a moved engine)
    fails the request, saying its status (its empty body said nothing: "refused the request: "), and the place
    it names is never asked."""
    asked: list[bytes] = []

    async def elsewhere(writer: asyncio.StreamWriter) -> None:
        asked.append(b"chat")
        writer.write(head() + ENDED)

    async def run() -> None:
        served = engine(elsewhere)
        target = await anext(served)

        async def redirect(writer: asyncio.StreamWriter) -> None:
            writer.write(
                f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {target}/chat/completions\r\n"
                "Content-Length: 0\r\n\r\n".encode()
            )

        try:
            with pytest.raises(errors.ServiceError) as refused:
                await ask([redirect])
            assert (refused.value.status, refused.value.code) == (500, "InternalError.Algo")
            assert refused.value.message.endswith("refused the request: HTTP 307"), refused.value.message
        finally:
            await served.aclose()

    asyncio.run(run())
    assert asked == []


def stalled_error(status: str) -> Writer:
    """An engine (or a proxy before it) that sends an error's head, then not the body it announced."""

    async def write(writer: asyncio.StreamWriter) -> None:
        writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode())
        await writer.drain()
        await asyncio.sleep(120)

    return write


@pytest.mark.parametrize("status", ["429 Too Many Requests", "401 Unauthorized"])
def test_an_error_body_that_never_comes_does_not_hold_the_request(status: str) -> None:
    """As with a 5xx, its words are waited for a short while: a 429 goes on to the next engine, and a 401 is
    refused saying its status, not after upstream_timeout (300 s) of waiting for a body that does not come."""

    async def run() -> list[Chunk]:
        return await asyncio.wait_for(ask([stalled_error(status), answer_with(ENDED)]), 60)  # not hung: 1 s

    if status.startswith("429"):
        assert text_of(asyncio.run(run())) == "A red square."
        return
    with pytest.raises(errors.ServiceError) as refused:
        asyncio.run(run())
    assert refused.value.message.endswith("refused the request: HTTP 401"), refused.value.message
