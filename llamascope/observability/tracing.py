"""OpenTelemetry traces, when an OTLP endpoint is configured (``LLAMASCOPE_OTLP_TRACES_ENDPOINT``).

One server span per request, with children for the image fetch, decode and
preprocessing, the queue, the vision encoder, prefill and decode, and a client
span for each call to an upstream engine. An incoming W3C ``traceparent`` is
the parent of the request's span, and the upstream call passes its own on, so
a request can be followed from the client through llamascope into SGLang or
vLLM (or another llamascope).

With no endpoint, nothing here is loaded and no span is made; an incoming
``traceparent`` is still passed on to upstream engines unchanged, so a trace
that goes through llamascope is not cut.

Spans are made from explicit parents, never from OpenTelemetry's "current
span": a request's work runs in several tasks and threads (the engine's model
thread among them), and its stages are recorded there as times and made into
spans when they are known.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import SpanKind, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llamascope import __version__

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

_tracer: Tracer | None = None
_provider: Any = None


def traces_url(endpoint: str) -> str:
    """An OTLP/HTTP endpoint as the traces URL: ``http://collector:4318`` becomes ``.../v1/traces``."""
    base = endpoint.rstrip("/")
    return base if base.endswith("/v1/traces") else base + "/v1/traces"


def configure(endpoint: str | None, exporter: SpanExporter | None = None) -> None:
    """Send spans to an OTLP/HTTP endpoint (batched), or to ``exporter`` (each at once); neither: traces off."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = _tracer = None
    if endpoint is None and exporter is None:
        return
    # The SDK and the OTLP exporter (about 0.2 s) load only when traces are sent.
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    # Resource.create() puts the attributes it is given over those of OTEL_SERVICE_NAME and
    # OTEL_RESOURCE_ATTRIBUTES: these are defaults, so the variables' own attributes go over them again.
    defaults = Resource.create({"service.name": "llamascope", "service.version": __version__})
    provider = TracerProvider(resource=defaults.merge(OTELResourceDetector().detect()))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # as above

        assert endpoint is not None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint))))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    _provider = provider
    _tracer = provider.get_tracer("llamascope", __version__)


def shutdown() -> None:
    """Send the spans still waiting in the batch."""
    if _provider is not None:
        _provider.shutdown()


def enabled() -> bool:
    return _tracer is not None


def wall_ns(monotonic: float) -> int:
    """A ``time.monotonic()`` reading as Unix nanoseconds, for span times."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


def server_span(name: str, traceparent: str | None, tracestate: str | None, attributes: Mapping[str, Any]) -> Span:
    """A request's span: the child of the caller's ``traceparent`` if it sent one, else a new trace."""
    assert _tracer is not None
    parent = None
    if traceparent:
        carrier = {"traceparent": traceparent, **({"tracestate": tracestate} if tracestate else {})}
        parent = TraceContextTextMapPropagator().extract(carrier)
    return _tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=dict(attributes))


def child_span(
    parent: Span,
    name: str,
    start_ns: int | None = None,
    attributes: Mapping[str, Any] | None = None,
    client: bool = False,
) -> Span:
    """A span under ``parent``; started now unless ``start_ns`` says when (end it with ``end(end_time=...)``)."""
    assert _tracer is not None
    return _tracer.start_span(
        name,
        context=set_span_in_context(parent),
        kind=SpanKind.CLIENT if client else SpanKind.INTERNAL,
        attributes=dict(attributes or {}),
        start_time=start_ns,
    )


def recorded_span(
    parent: Span, name: str, start_ns: int, end_ns: int, attributes: Mapping[str, Any] | None = None
) -> None:
    """A finished stage, from the times recorded when it ran."""
    child_span(parent, name, start_ns, attributes).end(end_time=max(start_ns, end_ns))


def traceparent_of(span: Span) -> str:
    """The W3C ``traceparent`` header naming ``span`` as the parent."""
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id in a ``traceparent`` header, if it is well formed."""
    if traceparent is None:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or parts[1] == "0" * 32:
        return None
    try:
        int(parts[1], 16)
    except ValueError:
        return None
    return parts[1].lower()
