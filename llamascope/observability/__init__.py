"""Operating llamascope: Prometheus metrics, OpenTelemetry traces, structured logs.

- ``metrics``: every metric, defined in one place, and the collector that
  reads the service's state when Prometheus scrapes;
- ``tracing``: the OpenTelemetry SDK and OTLP exporter, when an endpoint is set;
- ``logs``: text or JSON lines, each naming the request it is about;
- ``request``: the hooks the rest of llamascope calls as a request goes
  through it (arrival, image intake, tokens, engine stages, upstream calls, end).

See docs/observability.md for what each metric means and how to scrape it.
"""

from __future__ import annotations

from llamascope.observability import logs, request, tracing
from llamascope.settings import Settings


def configure(settings: Settings) -> None:
    """Logs, traces and per-key metrics as the settings say; call once, before serving."""
    logs.configure(settings.log_level, settings.log_format)
    tracing.configure(settings.otlp_traces_endpoint)
    request.configure(settings.metrics_keys)
