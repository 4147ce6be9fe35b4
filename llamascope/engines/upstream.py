"""Serving a model through OpenAI-compatible engines (SGLang, TGI, vLLM, Ollama, llama.cpp server).

llamascope keeps its own surfaces, keys, allowances and image intake in front:
every image is fetched and checked here and sent upstream as a ``data:`` URI,
never as the user's URL, so an upstream cannot be made to reach anything.

Several upstream URLs per model are balanced by least outstanding requests.
Each is health-checked (``GET /models``) in the background and taken out of
rotation while failing; a request that fails before its first token is tried
on another. Closing the generation closes the upstream stream at once.

The prompt is counted before the request goes out, so that its allowance is
held with the true count and every streamed event reports the same input
tokens: with the model's tokenizer from a local directory when one is
configured (``upstream_tokenizer``), else by the engine itself through its
``POST /tokenize`` (vLLM's, beside ``/v1``; llamascope serves it beside each
of its prefixes), found on first use beside the configured base, else at the
server's root, and remembered per upstream. Only an engine without
one gets an estimate (the prompt's UTF-8 bytes / 4 plus one token per image),
corrected by its reported usage at the end. Output tokens are the engine's
count, one per streamed piece until it reports.

Structured output is the engine's to do: ``response_format``, ``tools``,
``tool_choice`` and ``parallel_tool_calls`` go on in OpenAI's shapes, tool
results and earlier calls in OpenAI's message form, and the engine's streamed
``tool_calls`` deltas (joined by their ``index``) come back as the last
chunk's calls with finish reason ``tool_calls``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import io
import json
import logging
import math
import re
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from llamascope import errors
from llamascope.caching import SizedLRU
from llamascope.engines.base import (
    Chunk,
    EngineInfo,
    FinishReason,
    PreparedPrompt,
    SamplingParams,
    Turn,
)
from llamascope.engines.upstream_http import Client, Response, TransportError, Unreachable
from llamascope.observability.facts import UpstreamHealth
from llamascope.observability.metrics import upstream_label
from llamascope.observability.request import outgoing_headers, upstream_call, upstream_failed, upstream_failover
from llamascope.structured.spec import OutputSpec
from llamascope.structured.tools import ToolCall, call_id

log = logging.getLogger(__name__)

HEALTH_EVERY_SECONDS = 5.0
# Sent images fit in what Llama 3.2 Vision can use: 4 tiles of 560x560, at most 2240 pixels a side.
MAX_SENT_PIXELS = 4 * 560 * 560
MAX_SENT_SIDE = 2240
# Counting a prompt is quick; an engine that takes longer is counted by estimate instead.
TOKENIZE_TIMEOUT = 10.0  # seconds
# How long an engine may send nothing, before its answer's first byte or between two: then the request is
# given up on it (the next upstream, else 408). Long answers that keep coming are never cut.
ANSWER_SILENCE = 300.0  # seconds, unless the model's upstream_timeout says otherwise
HEALTH_TIMEOUT = 3.0
FORWARDED_STOPS = 4  # stop strings told the engine, at most
MAX_ANSWER_BYTES = 16 << 20  # a whole (not streamed) answer, at most
MAX_COUNT_BYTES = 1 << 20  # a /tokenize answer, with its token ids: about 7 bytes a token
MAX_EVENT_BYTES = 4 << 20  # one line of a streamed answer, at most (a delta is small; a whole call's arguments fit)
# An engine's error page: what is read of it, at most (its words, for the log and the client), and how long its
# words are waited for after a 5xx head (the request goes on to another engine). A larger, or endless, one is
# left there and its connection closed: a broken engine or a proxy's page is not read into memory whole.
ERROR_BYTES = 8 << 10
ERROR_WORDS_SECONDS = 1.0


class CountsPrompts(Protocol):
    """The model's tokenizer and chat template (``engines.prompt_counter.PromptCounter``)."""

    def count(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int: ...


@dataclass
class Upstream:
    url: str  # the OpenAI-compatible base, usually ending in /v1
    # The base as logs, /health, metrics and the banner show it: without the user and password it may hold (sent
    # as Basic authentication, never shown).
    shown: str = field(init=False)
    outstanding: int = 0
    healthy: bool = True
    failures: int = 0
    # The name it serves the model by, where it lists one other than the model's (vLLM's path, without
    # --served-model-name) and upstream_model was not set; None: the model's name.
    model: str | None = None
    listing_read: bool = False  # its GET /models was read (a listing without the model's name said once)
    context: int | None = None  # its max_model_len, as its /tokenize last said
    # Where it may count prompts (POST /tokenize), in the order tried: narrowed to the one that answered,
    # emptied once none did (its prompts are then estimated).
    tokenize_urls: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.shown = upstream_label(self.url)
        self.tokenize_urls = tokenize_urls(self.url)


def tokenize_urls(base: str) -> list[str]:
    """Where an engine with this base may serve ``POST /tokenize``: beside the base, as vLLM does beside
    ``/v1`` (``/compatible-mode/v1`` gives ``/compatible-mode/tokenize``), then at the server's root."""
    parts = urlsplit(base)
    root = urlunsplit((parts.scheme, parts.netloc, "/tokenize", "", ""))
    return list(dict.fromkeys([base.removesuffix("/v1") + "/tokenize", root]))


@dataclass
class UpstreamEngine:
    """Implements ``llamascope.engines.base.Engine`` by calling OpenAI-compatible engines."""

    upstreams: list[Upstream]
    model: str
    info: EngineInfo
    api_key: str | None = None
    # The model's tokenizer, from a local directory: the prompt's exact count without asking the engine.
    tokenizer: CountsPrompts | None = None
    silence: float = ANSWER_SILENCE  # seconds an engine may send nothing before its answer is given up
    named: bool = True  # ``model`` was set for the engines (upstream_model): never replaced by what they list
    _client: Client | None = field(default=None, repr=False)
    # Re-encoded images by content hash, the last 64: a conversation re-sends its image every turn.
    _uris: SizedLRU[str, str] = field(default_factory=lambda: SizedLRU(64, lambda _: 1), repr=False)
    _health: asyncio.Task[None] | None = field(default=None, repr=False)

    @classmethod
    def create(
        cls,
        urls: list[str],
        model: str,
        api_key: str | None,
        context_length: int,
        counter: CountsPrompts | None = None,
        silence: float = ANSWER_SILENCE,
        named: bool = True,
    ) -> UpstreamEngine:
        """``counter``: the model's tokenizer (``engines.prompt_counter``), else the engine counts. ``named``:
        ``model`` is the engines' name for it (upstream_model), not the served name, which an engine that lists
        one model only under another name (vLLM's path) is called by that one instead."""
        info = EngineInfo(kind="upstream", source=",".join(map(upstream_label, urls)), context_length=context_length)
        return cls([Upstream(u.rstrip("/")) for u in urls], model, info, api_key, counter, silence, named)

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})
            # Made by the first request that needs it: in a context of its own, not that request's (its id in logs)
            self._health = asyncio.get_running_loop().create_task(self._check_health(), context=contextvars.Context())
        return self._client

    # -- the Engine protocol ------------------------------------------------

    def start(self) -> None:
        """Health checks from now on, not from the first request: /health and the upstream_healthy gauge say
        that an engine is down before anyone is sent to it."""
        _ = self.client

    def health(self) -> list[UpstreamHealth]:
        return [UpstreamHealth(u.shown, u.healthy, u.outstanding) for u in self.upstreams]

    def stats(self) -> dict[str, int]:
        return {
            "running": sum(u.outstanding for u in self.upstreams),
            "healthy_upstreams": sum(u.healthy for u in self.upstreams),
        }

    def tokens(self, prompt: PreparedPrompt) -> tuple[list[int], list[str]]:
        raise errors.ServiceError(
            400, "InvalidParameter", "This model's tokens are counted by its upstream engine; it has no tokenizer here."
        )

    def image_size(self, width: int, height: int) -> tuple[int, int]:
        scale = min(1.0, math.sqrt(MAX_SENT_PIXELS / (width * height)), MAX_SENT_SIDE / max(width, height))
        return max(1, int(width * scale)), max(1, int(height * scale))

    async def prepare(self, turns: list[Turn], output: OutputSpec | None = None) -> PreparedPrompt:
        messages: list[dict[str, Any]] = []
        text_bytes = 0
        images = 0
        for turn in turns:
            text_bytes += len(turn.text.encode())
            if turn.role == "tool":
                messages.append({"role": "tool", "content": turn.text, "tool_call_id": turn.tool_call_id or ""})
                continue
            if turn.tool_calls:
                calls = [call.to_openai() for call in turn.tool_calls]
                text_bytes += sum(len(c.arguments.encode()) + len(c.name) for c in turn.tool_calls)
                messages.append({"role": turn.role, "content": turn.text or None, "tool_calls": calls})
                continue
            if not turn.images:
                messages.append({"role": turn.role, "content": turn.text})
                continue
            images += len(turn.images)
            content: list[dict[str, Any]] = []
            for part in turn.parts:  # texts and images in the client's order
                if isinstance(part, str):
                    content.append({"type": "text", "text": part})
                else:
                    content.append({"type": "image_url", "image_url": {"url": await self._data_uri(part)}})
            messages.append({"role": turn.role, "content": content})
        tools = [t.to_openai() for t in output.tools] if output is not None and output.tools else None
        count = await self._count(messages, tools, output)
        if count is None:
            tools_bytes = len(json.dumps(tools).encode()) if tools else 0
            # An estimate: the engine's usage corrects it.
            count = (text_bytes + tools_bytes) // 4 + images + 8 * len(turns)
        # The least context an engine said it has (vLLM's /tokenize: max_model_len), where less than context_length:
        # a request is given what fits in it, as in process, not refused by the engine for asking more.
        context = min([self.info.context_length, *(u.context for u in self.upstreams if u.context)])
        max_input = context - 1
        if count > max_input:
            raise errors.input_too_long(max_input)
        return PreparedPrompt(
            input_tokens=count,
            image_tokens=0,
            max_new_tokens=max(1, context - count),
            payload=messages,
            output=output,
        )

    async def _count(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, output: OutputSpec | None
    ) -> int | None:
        """The prompt's tokens as the engine counts them, or None where neither way is open.

        The engine is sent the structured-output fields its completion will get (``output_fields``), not the
        tools alone: an llamascope upstream puts in the prompt only the tools ``tool_choice`` offers (none for
        "none", the named one for a function); vLLM reads ``tools`` and ignores the rest."""
        if self.tokenizer is not None:
            return await asyncio.to_thread(self.tokenizer.count, messages, tools)
        if not any(u.tokenize_urls for u in self.upstreams):
            return None  # none counts prompts (remembered): estimated, with nothing to ask
        body: dict[str, Any] = {"model": self.model, "messages": messages, "add_generation_prompt": True}
        if output is not None:
            body.update(output_fields(output))
        for upstream in sorted(self.upstreams, key=lambda u: (not u.healthy, u.outstanding, u.failures)):
            try:
                count = await self._ask_count(upstream, body)
            except TransportError as exc:  # it cannot be reached: out of rotation, as a completion would take it
                self._mark_failed(upstream, type(exc).__name__)
                continue
            except TimeoutError:  # slow: estimated instead
                continue
            if count is not None:
                return count
        return None

    async def _ask_count(self, upstream: Upstream, body: dict[str, Any]) -> int | None:
        """The prompt's count from this upstream, trying where its tokenizer may be until one answers."""
        if upstream.model is not None:
            body = {**body, "model": upstream.model}
        for url in list(upstream.tokenize_urls):
            async with self.client.request(
                "POST",
                url,
                TOKENIZE_TIMEOUT,
                json.dumps(body).encode(),
                outgoing_headers(),  # the request's id and trace context
            ) as response:
                limit = MAX_COUNT_BYTES if response.status == 200 else ERROR_BYTES
                text = (await response.read(limit)).decode(errors="replace")
                whole = response.at_end
            if response.status == 200 and not whole:
                # Its tokens listed past what is read (vLLM lists them however many: a very long prompt, any
                # key's): estimated this once, its /tokenize not forgotten for every later prompt.
                return None
            if response.status == 400:  # the engine refuses the prompt (too long, ...): say why now
                raise _client_error(400, text)
            if response.status not in (200, 404, 405, 501):
                return None  # it is there but failed this once: estimated this time
            count, context = _count_in(text) if response.status == 200 else (None, None)
            if context is not None:
                upstream.context = context  # its latest word: an engine restarted may have another
            if count is not None:
                upstream.tokenize_urls = [url]  # remembered: only this one from now on
                return count
            with contextlib.suppress(ValueError):  # another request may have found it missing first
                upstream.tokenize_urls.remove(url)
            if not upstream.tokenize_urls:
                log.warning("upstream %s has no /tokenize: its prompts are estimated", upstream.shown)
        return None

    async def _data_uri(self, image: Any) -> str:
        uri = self._uris.get(image.digest)
        if uri is None:
            uri = await asyncio.to_thread(_data_uri, image)
            self._uris.put(image.digest, uri)
        return uri

    async def generate(self, prompt: PreparedPrompt, sampling: SamplingParams) -> AsyncIterator[Chunk]:
        body = self._body(prompt, sampling)
        tried: set[str] = set()
        kinds: set[str] = set()  # how the upstreams tried failed: "timeout", "unreachable", "engine", "busy"
        while True:
            upstream = self._pick(tried)
            tried.add(upstream.url)
            upstream.outstanding += 1
            started = False
            try:
                with upstream_call(upstream.url) as headers:  # request id and trace context; timed
                    # Closed here when the caller stops at the last chunk: a generator dropped unclosed is closed
                    # by the loop's finalizer hook, through a thread-safe wake-up of the loop and a task of its own.
                    async with contextlib.aclosing(self._stream(upstream, body, headers)) as chunks:
                        async for chunk in chunks:
                            started = True
                            yield chunk
                return
            except _UpstreamFailed as failure:
                if failure.kind == "busy":  # at capacity, not failing: it stays in rotation, after the others
                    upstream_failed(upstream.url)
                    upstream.failures += 1
                else:
                    self._mark_failed(upstream, str(failure))
                kinds.add(failure.kind)
                if started:  # the answer had begun (and is charged what it made): it failed, no "try again later"
                    raise _refusal({"engine"}) from None
                if len(tried) >= len(self.upstreams):
                    raise _refusal(kinds) from None
                upstream_failover(upstream.url)
                log.warning("upstream %s failed before its first token; trying another", upstream.shown)
            finally:
                upstream.outstanding -= 1

    async def close(self) -> None:
        if self._health is not None:
            self._health.cancel()
        if self._client is not None:
            await self._client.close()

    # -- internals -------------------------------------------------------------

    def _body(self, prompt: PreparedPrompt, sampling: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": prompt.payload,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": prompt.new_tokens(sampling),
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
        if sampling.top_k is not None:
            body["top_k"] = sampling.top_k
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.repetition_penalty != 1.0:
            body["repetition_penalty"] = sampling.repetition_penalty
        if sampling.presence_penalty:
            body["presence_penalty"] = sampling.presence_penalty
        if sampling.frequency_penalty:
            body["frequency_penalty"] = sampling.frequency_penalty
        if sampling.min_new_tokens:
            body["min_tokens"] = sampling.min_new_tokens
        if sampling.stop and prompt.output is None:
            # Told, the engine stops at once and reports its count (cut here, it ran on until the hang-up was seen
            # and counted no usage). OpenAI's API and TGI take 4: the text is cut here at every one anyway. Not with
            # tools or a response_format: an engine may cut its calls' JSON at them.
            body["stop"] = list(sampling.stop[:FORWARDED_STOPS])
        if prompt.output is not None:
            body.update(output_fields(prompt.output))
        return body

    def _pick(self, tried: set[str]) -> Upstream:
        candidates = [u for u in self.upstreams if u.url not in tried]
        healthy = [u for u in candidates if u.healthy] or candidates  # all failing: try anyway
        if not healthy:
            raise errors.ServiceError(503, "ServiceUnavailable", "No model engine is available; please try later.")
        return min(healthy, key=lambda u: (u.outstanding, u.failures))

    def _mark_failed(self, upstream: Upstream, why: str) -> None:
        upstream_failed(upstream.url)
        upstream.failures += 1
        if upstream.healthy:
            log.warning("upstream %s out of rotation: %s", upstream.shown, why)
        upstream.healthy = False

    async def _stream(
        self, upstream: Upstream, body: dict[str, Any], headers: dict[str, str]
    ) -> AsyncGenerator[Chunk, None]:
        answer = _Answer()
        try:
            url = upstream.url + "/chat/completions"
            sent = json.dumps(body if upstream.model is None else {**body, "model": upstream.model}).encode()
            request = self.client.request("POST", url, self.silence, sent, headers, silence=True)
            async with request as response:
                if response.status >= 500:
                    raise _UpstreamFailed(f"HTTP {response.status}{await _words(response)}")
                if response.status == 429:  # at capacity (TGI, a rate-limiting proxy): another may not be
                    await _error_body(response)  # its start: a short one read to its end keeps the connection
                    raise _UpstreamFailed("HTTP 429", "busy")
                if response.status != 200:
                    text = (await _error_body(response)).decode(errors="replace")
                    if response.status != 400:  # not the request's fault (a key or model name it refuses)
                        upstream_failed(upstream.url)  # counted and logged, for the operator to see
                        log.warning(
                            "upstream %s refused the call: HTTP %d %s", upstream.shown, response.status, text[:300]
                        )
                    raise _client_error(response.status, text)
                # Read as events whatever its type says (a page of something between holds none: it fails below),
                # but a JSON answer (an engine that does not stream) is its own one event.
                reads: AsyncIterator[bytes] = response
                if response.content_type == "application/json":
                    whole = await response.read(MAX_ANSWER_BYTES)
                    reads = _as_event(whole, raw=not whole[:64].lstrip().startswith(b"{"))
                pending = b""
                # Read to the end (so the connection goes back to the pool). The deltas of one network read
                # become one chunk: when the upstream is faster than the client, fewer, larger events.
                async for data in reads:
                    *lines, pending = (pending + data).split(b"\n")
                    if len(pending) > MAX_EVENT_BYTES:
                        raise _UpstreamFailed(f"it sent a line of over {MAX_EVENT_BYTES >> 20} MB")
                    text = answer.read(lines)
                    if text:  # the upstream's answer all here already (its end read): what follows comes at once
                        yield Chunk(text, answer.reported or answer.pieces, next_ready=response.at_end)
                if pending.strip() and (text := answer.read([pending])):  # a last event without its line's end
                    yield Chunk(text, answer.reported or answer.pieces)
        except (TimeoutError, TransportError) as exc:
            # Broken or silent after the answer's end (only its usage or [DONE] lost or late): it is whole.
            if not answer.ended:
                if isinstance(exc, TimeoutError):
                    raise _UpstreamFailed(f"nothing from it for {self.silence:g} s", "timeout") from None
                raise _UpstreamFailed(str(exc), "unreachable" if isinstance(exc, Unreachable) else "engine") from None
        if not answer.ended:  # stopped short of its end (a crash, a proxy's cut), or no answer in it at all
            raise _UpstreamFailed(f"its answer ({response.content_type}) ended before its finish reason, or had none")
        upstream.failures = 0
        yield answer.last()

    async def _check_health(self) -> None:
        while True:
            for upstream in self.upstreams:
                try:
                    await self._check(upstream)
                except Exception:  # an engine's answer no check foresaw must not end the checks for good
                    log.exception("the health check of upstream %s failed", upstream.shown)
            await asyncio.sleep(HEALTH_EVERY_SECONDS)

    async def _check(self, upstream: Upstream) -> None:
        ok = False
        with contextlib.suppress(TransportError, TimeoutError):
            async with self.client.request("GET", upstream.url + "/models", HEALTH_TIMEOUT) as r:
                listing = await r.read()  # to its end: the connection is kept
                ok = r.status == 200
        if ok and not self.named:  # every time: an engine restarted may serve the model by another name
            self._name_from(upstream, listing)
        if ok != upstream.healthy:
            log.warning("upstream %s is %s", upstream.shown, "back" if ok else "failing its health check")
        if ok:
            upstream.failures = 0  # back, or idle since its last failure: in rotation as the others
        upstream.healthy = ok

    def _name_from(self, upstream: Upstream, listing: bytes) -> None:
        """Where the engine's GET /models does not list the model's name, and lists one model only, by a path or
        a hub id (a "/" in it), the engine is called by that one: vLLM and SGLang serve a model by the path they
        were given unless told ``--served-model-name``, and refuse any other name (404), which ``--model
        NAME=openai+URL`` cannot set. Any other listing (another name without a "/": another model, most
        likely, as a proxy or Ollama would list it; several) is said in the log, and the model's name is used."""
        try:
            names = [m["id"] for m in json.loads(listing)["data"]]
        except (ValueError, KeyError, TypeError, RecursionError):
            names = []  # not OpenAI's listing: called by the model's name
        learned = None
        if self.model not in names and len(names) == 1 and isinstance(names[0], str) and "/" in names[0]:
            learned = names[0]
        if learned != upstream.model:
            if learned is not None:
                log.warning(
                    "upstream %s serves only %r: called by that name (upstream_model sets one)", upstream.shown, learned
                )
            upstream.model = learned
        if learned is None and names and self.model not in names and not upstream.listing_read:
            log.warning(
                "upstream %s does not list %r (it lists %s): set upstream_model", upstream.shown, self.model, names[:8]
            )
        upstream.listing_read = True


_FINISH = {"length": FinishReason.LENGTH, "tool_calls": FinishReason.TOOL_CALLS}
# vLLM and SGLang end a request they aborted (preempted for good, shutting down) with "abort"; "error" is an
# engine's error as a reason: either answer stopped short, never passed on as a whole one ended by "stop".
_BROKEN_OFF = frozenset({"abort", "error"})


def output_fields(output: OutputSpec) -> dict[str, Any]:
    """A request's structured-output fields in OpenAI's shapes, for the engine's /chat/completions."""
    fields: dict[str, Any] = {}
    fmt = output.response_format
    if fmt.type == "json_object":
        fields["response_format"] = {"type": "json_object"}
    elif fmt.type == "json_schema":
        schema: dict[str, Any] = {"name": fmt.name, "schema": dict(fmt.schema or {})}
        if fmt.strict:
            schema["strict"] = True
        fields["response_format"] = {"type": "json_schema", "json_schema": schema}
    if output.tools:
        fields["tools"] = [t.to_openai() for t in output.tools]
        choice = output.tool_choice
        fields["tool_choice"] = (
            {"type": "function", "function": {"name": choice.name}} if choice.mode == "function" else choice.mode
        )
        if not output.parallel_tool_calls:  # OpenAI's default is true; an engine that knows no such field is spared
            fields["parallel_tool_calls"] = False
    return fields


class _Answer:
    """An engine's answer as it arrives, read from OpenAI's chat events: its text, counts, calls and end."""

    def __init__(self) -> None:
        self.pieces = 0  # streamed pieces: the output count until the engine reports its own
        self.reported: int | None = None
        self.input_tokens: int | None = None
        self.cached: int | None = None  # prompt tokens from the engine's prefix cache, where it says
        self.finish: FinishReason | None = None
        self.done = False  # [DONE] came
        self.chosen = False  # an event had a choice (an answer, if an empty one)
        self.calls = _CallDeltas()
        self.text = _Utf16Text()

    @property
    def ended(self) -> bool:
        """Whether the engine said its answer is complete: a finish reason, or [DONE] after a choice."""
        return self.finish is not None or (self.done and self.chosen)

    def read(self, lines: list[bytes]) -> str:
        """Take the lines of one network read; the text they add. ``_UpstreamFailed`` for what is not OpenAI's
        chat events (not JSON, nor UTF-8, nested past the parser's depth, of other shapes)."""
        try:
            return self._read(lines)
        except (ValueError, AttributeError, TypeError, RecursionError) as exc:
            raise _UpstreamFailed(f"its answer is not OpenAI's chat events: {type(exc).__name__}") from None

    def _read(self, lines: list[bytes]) -> str:
        text = ""
        payloads = []
        for line in lines:
            if line.startswith(b"data:"):
                if (payload := line[5:]).strip() == b"[DONE]":
                    self.done = True
                else:
                    payloads.append(payload)
        # The events of one read parsed as one JSON array: one parse, not one per event.
        for event in json.loads(b"[" + b",".join(payloads) + b"]") if payloads else ():
            choices = event.get("choices")
            # An error the engine sends in its stream, its status sent already (200): vLLM's and SGLang's
            # {"error": {"message", "type", "code"}} (once {"error": {"object": "error", ...}}), TGI's
            # {"error": "..."}, or OpenAI's error object itself ({"object": "error", ...}). The engine failed,
            # whatever code it gives (vLLM says 400 for a RuntimeError, CUDA's included): as a 5xx would.
            if not choices and (event.get("error") is not None or event.get("object") == "error"):
                words = " ".join((_error_message(event) or json.dumps(event)).split())
                raise _UpstreamFailed(f"it sent an error in its answer: {words[:300]}")
            usage = event.get("usage")
            if usage:
                self.input_tokens = _count(usage.get("prompt_tokens"), self.input_tokens)
                self.reported = _count(usage.get("completion_tokens"), self.reported)
                if isinstance(details := usage.get("prompt_tokens_details"), dict):
                    self.cached = _count(details.get("cached_tokens"), self.cached)
            for choice in choices or ():
                self.chosen = True
                delta = choice.get("delta") or choice.get("message") or {}
                piece = delta.get("content") or ""
                self.pieces += bool(piece)
                text += piece
                if delta.get("tool_calls"):
                    self.pieces += self.calls.add(delta["tool_calls"])
                if reason := choice.get("finish_reason"):
                    if reason in _BROKEN_OFF:  # not the answer's end: the engine gave up on it
                        raise _UpstreamFailed(f"it ended its answer with finish_reason {reason!r}")
                    self.finish = _FINISH.get(reason, FinishReason.STOP)
        return self.text.add(text)

    def last(self) -> Chunk:
        """The answer's last chunk: its end, counts and calls."""
        finish = self.finish or FinishReason.STOP
        made = self.calls.calls(cut=finish == FinishReason.LENGTH)  # cut short: its whole calls, not the one cut
        if made and finish != FinishReason.LENGTH:  # the answer is calls, whatever reason the engine gave ("stop")
            finish = FinishReason.TOOL_CALLS
        output_tokens = self.reported if self.reported is not None else self.pieces
        # Of the prompt it counted: without that count, its cached count cannot be checked, so it is not taken.
        cached = None if self.input_tokens is None or self.cached is None else min(self.cached, self.input_tokens)
        return Chunk(
            self.text.add("", final=True),
            output_tokens,
            finish,
            self.input_tokens,
            cached_tokens=cached,
            tool_calls=made or None,
        )


class _Utf16Text:
    """An engine's text deltas as valid text. JSON strings are UTF-16: an engine that cuts its text between the
    halves of a surrogate pair (an emoji) sends each half escaped in its own delta, and Python keeps them as two
    lone surrogates, which no UTF-8 answer can carry (a 500 mid-answer, once). A pair is joined across deltas;
    a half that stays alone becomes U+FFFD, as a UTF-8 decoder makes a broken sequence."""

    def __init__(self) -> None:
        self._high = ""  # a pair's first half, waiting for the next delta

    def add(self, piece: str, final: bool = False) -> str:
        if not self._high and (piece.isascii() or not _SURROGATE.search(piece)):
            return piece  # nearly always
        text, self._high = self._high + piece, ""
        if not final and text and "\ud800" <= text[-1] <= "\udbff":
            text, self._high = text[:-1], text[-1]
        return _joined(text)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _joined(text: str) -> str:
    """``text`` with its surrogate pairs joined, each lone half U+FFFD: text UTF-8 can carry."""
    if text.isascii() or not _SURROGATE.search(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


class _CallDeltas:
    """An engine's streamed tool calls: pieces joined by their ``index`` (OpenAI's stream), or whole calls."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def add(self, deltas: list[dict[str, Any]]) -> int:
        """Take one event's ``tool_calls``; how many pieces it held."""
        for delta in deltas:
            index = delta["index"] if isinstance(delta.get("index"), int) else len(self._calls)  # whole: a new one
            call = self._calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            call["id"] = delta.get("id") or call["id"]
            function = delta.get("function") or {}
            call["name"] += function.get("name") or ""
            arguments = function.get("arguments")
            if isinstance(arguments, dict):  # an engine that sends the object, not its text
                arguments = json.dumps(arguments, ensure_ascii=False)
            call["arguments"] += arguments or ""
        return len(deltas)

    def calls(self, cut: bool = False) -> list[ToolCall]:
        """The calls; ``cut`` (the answer ran out of tokens): without the last if its arguments, as the engine
        sent them, are not a whole JSON object (it was cut in the middle of it)."""
        made = [c for _, c in sorted(self._calls.items()) if c["name"]]
        if cut and made and not _json_object(made[-1]["arguments"]):
            made.pop()
        # Joined here, whole: an emoji's halves may come in two deltas, as in the text (_Utf16Text).
        return [ToolCall(_joined(c["name"]), _joined(c["arguments"]) or "{}", c["id"] or call_id()) for c in made]


def _count_in(text: str) -> tuple[int | None, int | None]:
    """The count in a vLLM ``/tokenize`` answer, and its ``max_model_len`` where it says one; None for any
    other answer (not an engine's tokenizer)."""
    try:
        answer = json.loads(text)
    except ValueError:
        return None, None
    if not isinstance(answer, dict):
        return None, None
    count, context = answer.get("count"), answer.get("max_model_len")
    return (
        count if isinstance(count, int) and not isinstance(count, bool) else None,
        context if isinstance(context, int) and not isinstance(context, bool) and context > 1 else None,
    )


class _UpstreamFailed(Exception):
    """The upstream failed in a way another upstream might not: as an ``engine`` (an error, a broken answer), by
    ``timeout`` (silent too long), ``unreachable`` (no connection), or ``busy`` (429: at capacity)."""

    def __init__(self, why: str, kind: str = "engine") -> None:
        super().__init__(why)
        self.kind = kind


def _refusal(kinds: set[str]) -> errors.ServiceError:
    """What the client is told when the upstreams tried all failed: the wire spec's timeout (408) when they were
    silent, 503 (worth a retry) when none could be reached, 429 Throttling when one at least was busy and none
    failed, else the engine's failure (500)."""
    if "busy" in kinds and "engine" not in kinds:
        return errors.throttled(1, "every model engine is busy")
    if kinds == {"timeout"}:
        return errors.ServiceError(408, "RequestTimeOut", "Request timed out, please try again later.")
    if kinds == {"unreachable"}:
        return errors.ServiceError(
            503,
            "ServiceUnavailable",
            "No model engine could be reached; please try again later.",
            {"x-should-retry": "true", "Retry-After": "1"},
        )
    return errors.ServiceError(500, "InternalError.Algo", "The model engine failed; please try again later.")


async def _as_event(body: bytes, raw: bool = False) -> AsyncIterator[bytes]:
    """A whole JSON answer (``chat.completion``) as the one event of a stream that ends with it; ``raw``: a body
    that is events already, whatever its type said."""
    yield body if raw else b"data: " + body.replace(b"\n", b" ") + b"\n\ndata: [DONE]\n"


async def _error_body(response: Response) -> bytes:
    """The start of an engine's error body, waited for a short while (b"" past it): one whose head came and whose
    body does not held the request, a 429 too (for another engine), for all of upstream_timeout."""
    try:
        async with asyncio.timeout(ERROR_WORDS_SECONDS):
            return await response.read(ERROR_BYTES)
    except TimeoutError:
        return b""


async def _words(response: Response) -> str:
    """A failed engine's words, to say why it failed: the start of its error body, waited for a short while."""
    try:
        body = await _error_body(response)
    except TransportError:
        return ""
    message = " ".join(_message_in(body.decode(errors="replace")).split())
    return f": {message[:300]}" if message else ""


def _message_in(text: str) -> str:
    """The words of an engine's error: OpenAI's ``error.message``, vLLM's ``message`` (``"object": "error"``), TGI's
    ``error`` string; else the text as it came."""
    try:
        detail = json.loads(text)
    except (ValueError, RecursionError):
        return text
    return _error_message(detail) or text


def _error_message(detail: Any) -> str:
    """The message of an engine's error object, as :func:`_message_in` finds it; "" where it has none."""
    if not isinstance(detail, dict):
        return ""
    error = detail.get("error")
    for message in (error.get("message") if isinstance(error, dict) else error, detail.get("message")):
        if isinstance(message, str) and message:
            return message
    return ""


def _client_error(status: int, text: str) -> errors.ServiceError:
    message = _message_in(text).strip() or f"HTTP {status}"  # an empty body (a redirect, a bare 401): its status
    code = "InvalidParameter" if status == 400 else "InternalError.Algo"
    return errors.ServiceError(
        400 if status == 400 else 500, code, f"The model engine refused the request: {message[:300]}"
    )


def _data_uri(image: Any) -> str:
    """The checked, decoded image as a JPEG data: URI (what every OpenAI-compatible engine takes)."""
    buffer = io.BytesIO()
    image.image.save(buffer, format="JPEG", quality=92)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _count(value: Any, default: int | None) -> int | None:
    """A token count the upstream reported, as an int (20.0 is 20), or ``default`` for what is not a whole
    number of 0 or more: it is charged, and written as the client's usage."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return default
    return int(value) if value == int(value) else default
