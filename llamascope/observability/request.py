"""One request as metrics, a span and log context: the hooks the rest of llamascope calls.

The HTTP layer opens a ``RequestObservation`` when a request arrives
(``begin``) and closes it with the request's ``Outcome`` when the last byte is
sent (``end``); it lives in a context variable, so the hooks deeper down (image intake, the engines, the
conversation service) find it without being handed it, in the request's tasks
and in the worker threads anyio starts for it. Each hook is a few clock reads
and counter increments; spans are made only when traces are on.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import weakref
from collections.abc import Iterator
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Status, StatusCode
from starlette.routing import Match, Mount

from llamascope.observability import tracing
from llamascope.observability.facts import EngineTimings, Generation, Outcome
from llamascope.observability.metrics import METRICS, observe_many, upstream_label

if TYPE_CHECKING:
    from opentelemetry.trace import Span
    from starlette.types import Scope

    from llamascope.errors import ServiceError

log = logging.getLogger(__name__)
_current: ContextVar[RequestObservation | None] = ContextVar("llamascope_request", default=None)
_key_names: frozenset[str] = frozenset()
# Routes whose requests get no span: scrapes and health checks would drown the traces.
UNTRACED = frozenset({"/health", "/metrics"})
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
_CLIENT_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


def configure(key_names: frozenset[str] | set[str] | list[str] = frozenset()) -> None:
    """The key names whose tokens are counted per key (LLAMASCOPE_METRICS_KEYS)."""
    global _key_names
    _key_names = frozenset(key_names)


def current() -> RequestObservation | None:
    """The request being served in this task or thread, if any."""
    return _current.get()


class RequestObservation:
    """What is known of one request while it runs; made into metrics and a span when it ends."""

    __slots__ = (
        "_token",
        "arrived",
        "client_request_id",
        "engine",
        "first_token",
        "image_source",
        "last_token",
        "model",
        "request_id",
        "span",
        "traceparent",
        "tracestate",
    )

    def __init__(self, request_id: str, traceparent: str | None, tracestate: str | None, client_id: str | None) -> None:
        self.request_id = request_id
        self.arrived = time.monotonic()
        self.traceparent = traceparent
        self.tracestate = tracestate
        self.client_request_id = client_id
        self.span: Span | None = None
        self.model: str | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.engine: EngineTimings | None = None  # the in-process engine's stages
        self.image_source: str | None = None
        self._token: Token[RequestObservation | None] | None = None

    @property
    def trace_id(self) -> str | None:
        if self.span is not None:
            return f"{self.span.get_span_context().trace_id:032x}"
        return tracing.trace_id_of(self.traceparent)

    def outgoing_headers(self) -> dict[str, str]:
        """What a call to an upstream engine carries: this request's id and its trace context."""
        headers = {"x-request-id": self.request_id}
        if self.span is not None:
            headers["traceparent"] = tracing.traceparent_of(self.span)
        elif self.traceparent:
            headers["traceparent"] = self.traceparent  # traces off here: the caller's trace goes on through
            if self.tracestate:
                headers["tracestate"] = self.tracestate
        return headers


# -- the HTTP layer ---------------------------------------------------------------


def begin(scope: Scope, request_id: str) -> RequestObservation:
    """A request arrived: its observation, current from now on in this task and those it starts."""
    traceparent = tracestate = client_id = None
    for name, value in scope.get("headers", ()):
        if name == b"traceparent":
            traceparent = value.decode("latin-1")
        elif name == b"tracestate":
            tracestate = value.decode("latin-1")
        elif name == b"x-request-id":
            client_id = _client_request_id(value.decode("latin-1"))
    observation = RequestObservation(request_id, traceparent, tracestate, client_id)
    path = scope.get("path", "")
    if tracing.enabled() and path not in UNTRACED:
        method = scope.get("method", "")
        observation.span = tracing.server_span(
            f"{method} {path}",
            traceparent,
            tracestate,
            {"http.request.method": method, "url.path": path, "llamascope.request_id": request_id},
        )
    observation._token = _current.set(observation)
    return observation


def _client_request_id(value: str) -> str | None:
    """A caller's own request id, if it is a plain token (it goes into logs)."""
    value = value.strip()[:128]
    return value if value and set(value) <= _CLIENT_ID_CHARS else None


def end(observation: RequestObservation, scope: Scope, outcome: Outcome) -> None:
    """The request's last byte is sent (or it failed): count it, and end its span."""
    try:
        _end(observation, scope, outcome)
    except Exception:  # never the request's problem
        log.exception("recording the request's metrics failed")


def _end(observation: RequestObservation, scope: Scope, outcome: Outcome) -> None:
    route = route_of(scope)
    method = scope.get("method", "")
    requests, duration = _http_series(route, method if method in _METHODS else "other", outcome.status)
    requests.inc()
    duration.observe(outcome.seconds)
    code = outcome.error_code
    if code:
        _error_series(code).inc()
    generation = outcome.generation
    if generation is not None:
        _count_generation(observation, generation, outcome.key_name, code)
    span = observation.span
    if span is not None:
        _end_span(observation, span, route, outcome)


def finished(observation: RequestObservation) -> None:
    """After the access log line: this task no longer serves the request."""
    if observation._token is not None:
        with contextlib.suppress(ValueError):  # reset from another context: nothing to undo there
            _current.reset(observation._token)
        observation._token = None


# A series' labels are looked up once (prometheus-client's labels() takes a lock and builds a key): the label
# values are bounded, so are these caches.
@functools.lru_cache(maxsize=4096)
def _http_series(route: str, method: str, status: int) -> tuple[Any, Any]:
    return METRICS.http_requests.labels(route, method, str(status)), METRICS.http_duration.labels(route)


@functools.lru_cache(maxsize=256)
def _error_series(code: str) -> Any:
    return METRICS.request_errors.labels(code)


class _ModelSeries:
    """One model's series of the per-model metrics, looked up once."""

    __slots__ = (
        "decode_time",
        "e2e",
        "finished",
        "generation_tokens",
        "image_tokens",
        "inter_token",
        "model",
        "prefill_time",
        "prompt_tokens",
        "queue_time",
        "ttft",
        "vision_encoder",
    )

    def __init__(self, model: str) -> None:
        self.model = model
        self.prompt_tokens = METRICS.prompt_tokens.labels(model)
        self.generation_tokens = METRICS.generation_tokens.labels(model)
        self.image_tokens = METRICS.image_tokens.labels(model)
        self.ttft = METRICS.ttft.labels(model)
        self.inter_token = METRICS.inter_token.labels(model)
        self.e2e = METRICS.e2e.labels(model)
        self.queue_time = METRICS.queue_time.labels(model)
        self.prefill_time = METRICS.prefill_time.labels(model)
        self.decode_time = METRICS.decode_time.labels(model)
        self.vision_encoder = METRICS.vision_encoder.labels(model)
        self.finished: dict[str, Any] = {}  # request_success by finished_reason, as they come

    def success(self, reason: str) -> Any:
        series = self.finished.get(reason)
        if series is None:
            series = self.finished[reason] = METRICS.request_success.labels(self.model, reason)
        return series


@functools.lru_cache(maxsize=1024)
def _model_series(model: str) -> _ModelSeries:
    return _ModelSeries(model)


@functools.lru_cache(maxsize=1024)
def _key_series(name: str, model: str) -> tuple[Any, Any, Any]:
    tokens = METRICS.key_tokens
    inputs, outputs, images = (tokens.labels(name, model, kind) for kind in ("input", "output", "image"))
    return inputs, outputs, images


def _count_generation(
    observation: RequestObservation, generation: Generation, key_name: str | None, code: str | None
) -> None:
    series = _model_series(generation.model)
    series.prompt_tokens.inc(generation.input_tokens)
    series.generation_tokens.inc(generation.output_tokens)
    if generation.image_tokens:
        series.image_tokens.inc(generation.image_tokens)
    if key_name is not None and key_name in _key_names:
        inputs, outputs, images = _key_series(key_name, generation.model)
        inputs.inc(generation.input_tokens)
        outputs.inc(generation.output_tokens)
        images.inc(generation.image_tokens)
    if generation.finish_reason is not None:
        series.success(generation.finish_reason).inc()
        series.e2e.observe((observation.last_token or time.monotonic()) - observation.arrived)
    elif generation.started and code is None:
        series.success("abort").inc()
    timings = observation.engine
    if timings is not None:
        if timings.started is not None:
            series.queue_time.observe(timings.started - timings.queued)
            if timings.first_token is not None:
                series.prefill_time.observe(timings.first_token - timings.started)
                series.decode_time.observe(timings.ended - timings.first_token)
        if timings.vision is not None:
            series.vision_encoder.observe(timings.vision[1] - timings.vision[0])


def _end_span(observation: RequestObservation, span: Span, route: str, outcome: Outcome) -> None:
    status, code, generation = outcome.status, outcome.error_code, outcome.generation

    method = span.attributes.get("http.request.method", "") if span.attributes else ""  # type: ignore[attr-defined]
    span.update_name(f"{method} {route}")
    span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if code:
        span.set_attribute("error.type", code)
    if status >= 500 or (code and status == 200):
        span.set_status(Status(StatusCode.ERROR, code or str(status)))
    if generation is not None:
        span.set_attributes(
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": "llamascope",
                "gen_ai.request.model": generation.model,
                "gen_ai.response.model": generation.model,
                "gen_ai.request.max_tokens": generation.max_tokens,
                "gen_ai.request.temperature": generation.temperature,
                "gen_ai.request.top_p": generation.top_p,
                "gen_ai.usage.input_tokens": generation.input_tokens,
                "gen_ai.usage.output_tokens": generation.output_tokens,
                "llamascope.usage.image_tokens": generation.image_tokens,
            }
        )
        if generation.finish_reason is not None:
            span.set_attribute("gen_ai.response.finish_reasons", [generation.finish_reason])
        timings = observation.engine
        if timings is not None:
            wall = tracing.wall_ns
            if timings.started is not None:
                tracing.recorded_span(span, "queue", wall(timings.queued), wall(timings.started))
                if timings.vision is not None:
                    tracing.recorded_span(span, "vision_encoder", wall(timings.vision[0]), wall(timings.vision[1]))
                if timings.first_token is not None:
                    tracing.recorded_span(span, "prefill", wall(timings.started), wall(timings.first_token))
                    tracing.recorded_span(span, "decode", wall(timings.first_token), wall(timings.ended))
            else:
                tracing.recorded_span(span, "queue", wall(timings.queued), wall(timings.ended))
        elif observation.first_token is not None:  # an upstream engine: its own trace shows its stages
            tracing.recorded_span(
                span, "first_token", tracing.wall_ns(observation.first_token), tracing.wall_ns(observation.first_token)
            )
    span.end()


# Each application's routes, by endpoint: plain Starlette routes do not put themselves in the scope, and
# FastAPI keeps included routers' routes inside its own (private) structures.
_routes: weakref.WeakKeyDictionary[Any, tuple[list[Any], dict[Any, list[Any]]]] = weakref.WeakKeyDictionary()


def routes_of(app: Any, routes: list[Any]) -> None:
    """The routes of ``app`` (each with a ``path`` template), for ``route_of``."""
    by_endpoint: dict[Any, list[Any]] = {}
    for route in routes:
        # A Mount (the playground's files) puts the app it serves in the scope as the endpoint.
        endpoint = route.app if isinstance(route, Mount) else getattr(route, "endpoint", None)
        by_endpoint.setdefault(endpoint, []).append(route)
    _routes[app] = (routes, by_endpoint)


def route_of(scope: Scope) -> str:
    """The route template that served a request ("/admin/keys/{key_id}/revoke"), never the raw path."""
    route = scope.get("route")
    if route is not None and hasattr(route, "path"):
        return str(route.path)
    app = scope.get("app")
    known = _routes.get(app) if app is not None else None
    if known is None:
        return "other"
    routes, by_endpoint = known
    endpoint = scope.get("endpoint")
    candidates = by_endpoint.get(endpoint) if endpoint is not None else None
    if candidates and len(candidates) == 1:
        return _template(candidates[0])
    for candidate in candidates or routes:  # refused before routing (a bad key): matched here
        if candidate.matches(scope)[0] == Match.FULL:
            return _template(candidate)
    return "other"


def _template(route: Any) -> str:
    # A Mount's own path is its prefix ("/playground"); what it serves is "/playground/{path}".
    return str(route.path_format if isinstance(route, Mount) else route.path)


# -- the conversation service ------------------------------------------------------


class TokenWatch:
    """A reply's tokens as they come: time to first token, and the time between tokens.

    Measured where the reply receives them, as its client will: tokens that arrive together share the
    time since the previous arrival (those arriving with the first token: none), so every token but the
    first is one inter-token observation.
    """

    __slots__ = ("arrived", "count", "inter_token", "last", "observation", "ttft")

    def __init__(self, model: str) -> None:
        self.observation = observation = _current.get()
        if observation is not None:
            observation.model = model
        self.arrived = observation.arrived if observation is not None else time.monotonic()
        series = _model_series(model)
        self.ttft = series.ttft
        self.inter_token = series.inter_token
        self.last: float | None = None
        self.count = 0

    def __call__(self, output_tokens: int) -> None:
        """The engine has made ``output_tokens`` tokens so far."""
        new = output_tokens - self.count
        if new <= 0:
            return
        now = time.monotonic()
        self.count = output_tokens
        if self.last is None:
            self.ttft.observe(now - self.arrived)
            if self.observation is not None:
                self.observation.first_token = now
            gap, new = 0.0, new - 1
        else:
            gap = (now - self.last) / new
        observe_many(self.inter_token, gap, new)
        self.last = now
        if self.observation is not None:
            self.observation.last_token = now


# -- the engines ------------------------------------------------------------------


def engine_timings(timings: EngineTimings) -> None:
    """The in-process engine's stages of the current request."""
    observation = _current.get()
    if observation is not None:
        observation.engine = timings


@contextlib.contextmanager
def upstream_call(url: str) -> Iterator[dict[str, str]]:
    """One call to an upstream engine: the headers it carries (request id, trace context), timed and traced."""
    observation = _current.get()
    label = _upstream_label(url)
    span = None
    if observation is None:
        headers: dict[str, str] = {}
    else:
        if observation.span is not None:
            span = tracing.child_span(
                observation.span, "upstream chat", attributes={"server.address": label}, client=True
            )
        headers = {"x-request-id": observation.request_id}
        if span is not None:
            headers["traceparent"] = tracing.traceparent_of(span)
        elif observation.traceparent:
            headers.update(observation.outgoing_headers())
    started = time.monotonic()
    try:
        yield headers
    except Exception as error:
        if span is not None:
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        raise
    finally:
        _upstream_latency(label).observe(time.monotonic() - started)
        if span is not None:
            span.end()


def upstream_failed(url: str) -> None:
    """A call to an upstream failed (it goes out of rotation)."""
    METRICS.upstream_errors.labels(_upstream_label(url)).inc()


def upstream_failover(url: str) -> None:
    """A request goes on to another upstream after this one failed before its first token."""
    METRICS.upstream_failovers.labels(_upstream_label(url)).inc()


def outgoing_headers() -> dict[str, str]:
    """What any call made for the current request carries: its id and trace context (none outside one)."""
    observation = _current.get()
    return observation.outgoing_headers() if observation is not None else {}


@functools.lru_cache(maxsize=256)
def _upstream_label(url: str) -> str:
    return upstream_label(url)


@functools.lru_cache(maxsize=256)
def _upstream_latency(label: str) -> Any:
    return METRICS.upstream_latency.labels(label)


@functools.lru_cache(maxsize=256)
def _image_series(source: str, image_format: str) -> tuple[Any, Any, Any]:
    """An image source's and format's fetch, decode and preprocess series."""
    return (
        METRICS.image_fetch.labels(source, image_format),
        METRICS.image_decode.labels(source, image_format),
        METRICS.image_preprocess.labels(source, image_format),
    )


def image_preprocessed(image_format: str, started: float) -> None:
    """The engine made the tiles and pixel values of an image in ``image_format`` (PNG, JPEG, ...), from
    ``started`` (``time.monotonic()``) until now."""
    now = time.monotonic()
    observation = _current.get()
    source = (observation.image_source if observation is not None else None) or "unknown"
    _image_series(source, image_format)[2].observe(now - started)
    if observation is not None and observation.span is not None:
        tracing.recorded_span(observation.span, "image.preprocess", tracing.wall_ns(started), tracing.wall_ns(now))


# -- image intake -----------------------------------------------------------------


class ImageWatch:
    """One image through intake: fetch and decode times, or why it was refused."""

    __slots__ = ("decode_seconds", "fetched_at", "observation", "source", "started", "timed_out")

    def __init__(self) -> None:
        self.observation = _current.get()
        self.source = "unknown"
        self.started = time.monotonic()
        self.fetched_at: float | None = None
        self.decode_seconds: float | None = None  # None: it came from the decoded-image cache
        self.timed_out = False

    def fetched(self, source: str) -> None:
        """Its bytes are read; ``source`` is url, data, upload or local."""
        self.fetched_at = time.monotonic()
        self.source = source
        if self.observation is not None:
            self.observation.image_source = source

    def decoded(self, started: float) -> None:
        """It was decoded (not found in the cache), from ``started`` until now."""
        self.decode_seconds = time.monotonic() - started

    def took(self, fetch: ImageWatch, *, decoded: bool) -> None:
        """Its image came from ``fetch``, a fetch and decode made for the requests that waited for it (this one's
        included): its bytes came when they came or when this request asked, and the decode counts for
        ``decoded``, the first request that took it, alone (a decode, not one for each request)."""
        self.source = fetch.source
        if fetch.fetched_at is not None:
            self.fetched(fetch.source)
            self.fetched_at = max(self.started, fetch.fetched_at)
        self.decode_seconds = fetch.decode_seconds if decoded else None
        self.timed_out = fetch.timed_out

    def accepted(self, image_format: str) -> None:
        """It was taken, in ``image_format`` (PNG, JPEG, ...)."""
        fetched = self.fetched_at or self.started
        fetch, decode, _ = _image_series(self.source, image_format)
        fetch.observe(fetched - self.started)
        if self.decode_seconds is not None:
            decode.observe(self.decode_seconds)
        if self.observation is not None and self.observation.span is not None:
            self._spans({"llamascope.image.format": image_format})

    def refused(self, error: ServiceError) -> None:
        if self.fetched_at is None:
            reason = "source"
        elif self.timed_out:
            reason = "timeout"
        elif error.code == "InvalidParameter.DataInspection":
            reason = "format"
        else:
            reason = "size"
        METRICS.image_refusals.labels(reason).inc()
        self._spans({"error.type": error.code, "llamascope.image.refusal": reason})

    def _spans(self, attributes: dict[str, str]) -> None:
        span = self.observation.span if self.observation is not None else None
        if span is None:
            return
        wall = tracing.wall_ns
        attributes = {"llamascope.image.source": self.source, **attributes}
        fetched = self.fetched_at or time.monotonic()
        tracing.recorded_span(span, "image.fetch", wall(self.started), wall(fetched), attributes)
        if self.fetched_at is not None:
            end = fetched + (self.decode_seconds or 0.0) if not self.timed_out else time.monotonic()
            tracing.recorded_span(span, "image.decode", wall(fetched), wall(end), attributes)
