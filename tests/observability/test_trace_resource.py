"""The service name traces carry: llamascope's by default, the operator's when OTEL_* variables name one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llamascope.observability import tracing


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    tracing.configure(None)


def resource_of_a_span(spans: InMemorySpanExporter) -> dict:
    tracing.configure(None, exporter=spans)
    tracing.server_span("GET /", None, None, {}).end()
    (span,) = spans.get_finished_spans()
    return dict(span.resource.attributes)


def test_spans_name_llamascope_unless_told_otherwise(spans, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    attributes = resource_of_a_span(spans)
    assert attributes["service.name"] == "llamascope" and attributes["service.version"]


def test_otel_service_name_names_the_service(spans, monkeypatch: pytest.MonkeyPatch) -> None:
    # docs/observability.md: "OTEL_SERVICE_NAME (default here: llamascope)"; replicas or regions told apart.
    monkeypatch.setenv("OTEL_SERVICE_NAME", "llamascope-eu")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod")
    attributes = resource_of_a_span(spans)
    assert attributes["service.name"] == "llamascope-eu"
    assert attributes["deployment.environment"] == "prod"


def test_otel_resource_attributes_may_name_the_service(spans, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=vision-gw,service.version=7")
    attributes = resource_of_a_span(spans)
    assert attributes["service.name"] == "vision-gw" and attributes["service.version"] == "7"
