"""Operating llamascope: Prometheus metrics, OpenTelemetry traces, structured logs.

Observability is a sink: the rest of llamascope pushes facts into it
(``facts``: a finished request's ``Outcome``, the engine's ``EngineTimings``)
through the hooks of ``request``, and the state a scrape reads is handed to
``metrics.StateCollector`` as callables; it imports nothing of llamascope's
but ``errors``.

- ``facts``: the typed records the rest of llamascope fills in;
- ``metrics``: every metric, defined in one place, and the collector that
  reads the server's state when Prometheus scrapes;
- ``tracing``: the OpenTelemetry SDK and OTLP exporter, when an endpoint is set;
- ``logs``: text or JSON lines, each naming the request it is about;
- ``request``: the hooks the rest of llamascope calls as a request goes
  through it (arrival, image intake, tokens, engine stages, upstream calls, end).

See docs/observability.md for what each metric means and how to scrape it.
"""

from __future__ import annotations

from collections.abc import Iterable

from llamascope.observability import logs, request, tracing
from llamascope.observability.logs import LogFormat


def configure(
    log_level: str = "info",
    log_format: LogFormat = "text",
    otlp_traces_endpoint: str | None = None,
    metrics_keys: Iterable[str] = (),
) -> None:
    """Logs, traces and per-key metrics (the key names whose tokens are counted); call once, before serving."""
    logs.configure(log_level, log_format)
    tracing.configure(otlp_traces_endpoint)
    request.configure(frozenset(metrics_keys))
