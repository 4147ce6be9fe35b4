"""A client of the DashScope native multimodal-generation API: httpx for HTTP, httpx-sse for the stream.

It speaks to any server of that API (a llamascope, the hosted service) and
knows nothing of llamascope's internals. Every failure, whether the server
gave it (HTTP status, DashScope ``code`` and ``message``, ``request_id``) or
the connection did, is one exception type, ``APIError``, so that callers
show it and never a traceback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import httpx
from httpx_sse import EventSource, SSEError, connect_sse

from llamascope import __version__

DEFAULT_BASE_URL = "http://127.0.0.1:8000/api/v1"
GENERATION_PATH = "services/aigc/multimodal-generation/generation"
# The hosted service's default model name for these models; llamascope serves it out of the box.
DEFAULT_MODEL = "llama3.2-90b-vision-instruct"


class APIError(Exception):
    """A refused or failed call: the API's status, code and message, or what went wrong on the way.

    ``status`` is None when no HTTP answer came (unreachable server, broken stream, timeout).
    """

    def __init__(self, code: str, message: str, status: int | None = None, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.request_id = request_id

    def describe(self) -> str:
        """One line for a person: ``InvalidApiKey (HTTP 401): Invalid API-key provided.``"""
        status = f" (HTTP {self.status})" if self.status is not None else ""
        request = f" [request_id {self.request_id}]" if self.request_id else ""
        return f"{self.code}{status}: {self.message}{request}"


def error_of(response: httpx.Response, body: str) -> APIError:
    """The API's own error body, or (from something else on the way, such as a proxy) what can be said of it."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("code"):
        return APIError(str(data["code"]), str(data.get("message", "")), response.status_code, data.get("request_id"))
    if isinstance(data, dict) and isinstance(data.get("error"), dict):  # an OpenAI-shaped error
        error = data["error"]
        return APIError(
            str(error.get("code") or error.get("type") or "Unknown"),
            str(error.get("message", "")),
            response.status_code,
            data.get("request_id"),
        )
    text = " ".join(body.split())[:300] or response.reason_phrase
    return APIError("Unknown", text, response.status_code, response.headers.get("x-request-id"))


@dataclass
class Answer:
    """One reply: its text, why it ended, its usage, and when its parts arrived (``time.monotonic``)."""

    text: str = ""
    finish_reason: str | None = None  # None: it did not end (stopped by the caller, or an error)
    usage: dict[str, int] = field(default_factory=dict)
    request_id: str | None = None
    body: dict[str, Any] | None = None  # the last response body (for a stream: the last event's data)
    started: float = 0.0
    first_token_at: float | None = None
    last_event_at: float | None = None
    finished_at: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def tokens_per_second(self) -> float | None:
        """Output tokens after the first, over the time after the first: the decoding rate (of the part that
        arrived, for an answer stopped half way)."""
        tokens = self.usage.get("output_tokens", 0)
        if self.first_token_at is None or self.last_event_at is None or tokens < 2:
            return None
        elapsed = self.last_event_at - self.first_token_at
        return (tokens - 1) / elapsed if elapsed > 0 else None

    def final_body(self) -> dict[str, Any]:
        """The response body as a non-streamed call returns it: the whole text, the final usage."""
        body = dict(self.body or {})
        body["output"] = {
            "choices": [
                {
                    "finish_reason": self.finish_reason or "null",
                    "message": {"role": "assistant", "content": [{"text": self.text}]},
                }
            ]
        }
        body["usage"] = self.usage
        if self.request_id:
            body["request_id"] = self.request_id
        return body

    def absorb(self, data: Any, incremental: bool) -> str:
        """Take one response body (a stream event or the whole answer); return the text it added."""
        try:
            text, reason = _text_and_finish(data)
        except (AttributeError, KeyError, IndexError, TypeError):
            raise APIError("Unknown", f"not a DashScope response body: {json.dumps(data)[:200]}") from None
        self.body = data
        self.request_id = data.get("request_id", self.request_id)
        if isinstance(data.get("usage"), dict):
            self.usage = {k: v for k, v in data["usage"].items() if isinstance(v, int)}
        if incremental:
            delta = text
            self.text += delta
        elif text.startswith(self.text):
            delta = text[len(self.text) :]
            self.text = text
        else:  # a cumulative stream that rewrote what it had sent (not expected): show it from here on
            delta, self.text = text, text
        self.last_event_at = time.monotonic()
        if delta and self.first_token_at is None:
            self.first_token_at = self.last_event_at
        if reason and reason != "null":
            self.finish_reason = reason
            self.finished_at = self.last_event_at
        return delta


def _text_and_finish(data: Any) -> tuple[str, str | None]:
    """``output.choices[0]``'s text (content as a list of items or a string) and finish reason."""
    choice = (data.get("output") or {}).get("choices", [{}])[0]
    content = (choice.get("message") or {}).get("content")
    text = content if isinstance(content, str) else "".join(item.get("text") or "" for item in content or [])
    return text, choice.get("finish_reason")


class AnswerStream:
    """A streamed reply, as a context manager: iterate it for the text as it grows.

    Leaving the ``with`` block closes the connection, which is how a stream is
    cancelled: the server sees the client go and stops generating. ``answer``
    holds what arrived so far.
    """

    def __init__(self, client: Client, body: dict[str, Any]) -> None:
        self._client = client
        self._body = body
        self._incremental = (body.get("parameters") or {}).get("incremental_output") is True
        self._stack = ExitStack()
        self._source: EventSource | None = None
        self.answer = Answer()

    def __enter__(self) -> AnswerStream:
        self.answer.started = time.monotonic()
        try:
            self._open()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _open(self) -> None:
        with self._client.translated_errors():
            source = self._stack.enter_context(
                connect_sse(
                    self._client.http,
                    "POST",
                    GENERATION_PATH,
                    json=self._body,
                    headers={"X-DashScope-SSE": "enable", "X-Accel-Buffering": "no"},
                )
            )
            response = source.response
            if response.status_code == 200 and "text/event-stream" in response.headers.get("content-type", ""):
                self._source = source
                return
            body = response.read().decode(errors="replace")
        if response.status_code != 200:
            raise error_of(response, body)
        try:  # a whole JSON answer where a stream was asked for: take it as the answer
            data = json.loads(body)
        except ValueError:
            raise error_of(response, body) from None
        self.answer.absorb(data, incremental=False)
        a = self.answer  # a whole answer: its time to first token is its time to the end; no rate
        a.first_token_at = a.last_event_at = a.finished_at = time.monotonic()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stack.close()

    def __iter__(self) -> Iterator[str]:
        """The text each event adds."""
        if self._source is None:  # the answer came whole
            if self.answer.text:
                yield self.answer.text
            return
        with self._client.translated_errors():
            for event in self._source.iter_sse():
                if not event.data:
                    continue
                try:
                    data = json.loads(event.data)
                except ValueError:
                    raise APIError(
                        "Unknown", f"the stream sent something that is not JSON: {event.data[:200]}"
                    ) from None
                if not isinstance(data, dict):
                    raise APIError("Unknown", f"not a DashScope event: {event.data[:200]}")
                if event.event == "error" or (data.get("code") and "output" not in data):
                    status = data.get("status_code") if isinstance(data.get("status_code"), int) else None
                    raise APIError(
                        str(data.get("code", "Unknown")), str(data.get("message", "")), status, data.get("request_id")
                    )
                delta = self.answer.absorb(data, self._incremental)
                if delta:
                    yield delta
        if self.answer.finished_at is None:
            self.answer.finished_at = time.monotonic()
            if self.answer.finish_reason is None:
                raise APIError(
                    "IncompleteStream", "the stream ended before the answer did", request_id=self.answer.request_id
                )


class HttpApi:
    """One HTTP API at ``base_url`` with one API key: the connection the command's clients share."""

    AGENT = "llamascope"

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str = "", timeout: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.base_url + "/",
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": f"{self.AGENT}/{__version__}"},
            # The SDK's 300 s for reads: a CPU-bound model can take minutes to its first token.
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client(HttpApi):
    """The DashScope native API at ``base_url`` (ending in ``/api/v1``), with one API key."""

    AGENT = "llamascope-chat"

    def translated_errors(self) -> TranslatedErrors:
        return TranslatedErrors(self.base_url)

    @staticmethod
    def body(model: str, messages: list[dict[str, Any]], parameters: dict[str, Any] | None) -> dict[str, Any]:
        return {"model": model, "input": {"messages": messages}, "parameters": dict(parameters or {})}

    def stream(
        self, model: str, messages: list[dict[str, Any]], parameters: dict[str, Any] | None = None
    ) -> AnswerStream:
        """A streamed generation; use it as ``with client.stream(...) as s: for text in s: ...``."""
        return AnswerStream(self, self.body(model, messages, parameters))

    def generate(self, model: str, messages: list[dict[str, Any]], parameters: dict[str, Any] | None = None) -> Answer:
        """A generation answered in one JSON body."""
        answer = Answer(started=time.monotonic())
        with self.translated_errors():
            response = self.http.post(GENERATION_PATH, json=self.body(model, messages, parameters))
        if response.status_code != 200:
            raise error_of(response, response.text)
        try:
            data = response.json()
        except ValueError:
            raise error_of(response, response.text) from None
        answer.absorb(data, incremental=False)
        answer.first_token_at = answer.last_event_at = answer.finished_at = time.monotonic()  # no rate: one piece
        return answer

    def models(self) -> list[dict[str, Any]]:
        """``GET /models``: llamascope's listing of what it serves (the hosted service has none)."""
        with self.translated_errors():
            response = self.http.get("models")
        if response.status_code != 200:
            raise error_of(response, response.text)
        try:
            data = response.json().get("data")
        except (ValueError, AttributeError):
            raise error_of(response, response.text) from None
        return [m for m in data if isinstance(m, dict) and "model" in m] if isinstance(data, list) else []


class TranslatedErrors:
    """Turns what httpx raises into ``APIError``, so that every failure reads the same."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if isinstance(value, httpx.ConnectError):
            raise APIError("ConnectionError", f"cannot reach {self.base_url}: {_reason(value)}") from None
        if isinstance(value, httpx.TimeoutException):
            raise APIError("Timeout", f"no answer from {self.base_url} in time: {_reason(value)}") from None
        if isinstance(value, httpx.HTTPError):
            raise APIError("ConnectionError", f"the connection to {self.base_url} failed: {_reason(value)}") from None
        if isinstance(value, SSEError):
            raise APIError("Unknown", f"not a DashScope event stream: {value}") from None


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    # httpx repeats the OS error verbatim, e.g. "[Errno 111] Connection refused": keep the words.
    return text.split("] ", 1)[-1] if text.startswith("[Errno") else text
