"""Every Prometheus metric llamascope exposes, defined in one place.

Names follow vLLM's (``vllm/v1/metrics/loggers.py``) where the meaning is the
same, with the ``llamascope:`` prefix, so dashboards made for vLLM carry over.
Each label set is bounded: model names and upstream URLs come from the
configuration, image sources, formats and refusal reasons from fixed lists,
error codes from llamascope's own, routes are the route templates (never the
raw path), and per-key series exist only for keys the operator names.

Two kinds of figures:

- events (tokens, latencies, images, errors) are counted where the fact is
  decided, by the hooks of ``llamascope.observability.request``;
- state (requests running and waiting, caches, upstream health, allowances
  left) is read when Prometheus scrapes, by ``StateCollector``, through the
  callables it is given by whoever builds the server: nothing on the request
  path keeps it up to date, and nothing here imports what it reads.

llamascope serves from one process, so one registry holds every count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from llamascope.observability.facts import Allowance, BatchStats, CacheStats, EngineState

log = logging.getLogger(__name__)

# No "_created" series beside every counter and histogram: they double what a scrape carries, and
# Prometheus 2.x does not use them.
disable_created_metrics()

PREFIX = "llamascope:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets chosen for the quantity measured.
# Time to first token: from a few ms (a warm cache on a GPU) to the minutes a CPU takes for the 11B;
# unlike vLLM's, 1 s to 2.5 s is not one bucket (1.25, 1.5, 2.0 are there).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 1.25, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
# Between two tokens: from 1 ms (fast decode; vLLM's start at 10 ms) to a stalled stream.
INTER_TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
# A whole request or one of its phases: a gateway's milliseconds to a long CPU generation.
REQUEST_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0,
    15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# Image work: a cached decode's fraction of a millisecond to a 15 s fetch.
IMAGE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0,
)  # fmt: skip
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

# Where an image came from (``ImageSource.kind``) and why one was refused: fixed lists.
IMAGE_SOURCES = ("url", "data", "upload", "local")
IMAGE_REFUSAL_REASONS = ("source", "format", "size", "timeout")


class Metrics:
    """The event metrics, in their own registry (not prometheus-client's global one)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)

        def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
            return Counter(PREFIX + name, doc, list(labels), registry=registry)

        def histogram(name: str, doc: str, labels: Iterable[str], buckets: Iterable[float]) -> Histogram:
            return Histogram(PREFIX + name, doc, list(labels), registry=registry, buckets=tuple(buckets))

        model = ("model_name",)
        # What the API reported as usage (the tokens charged), counted when the request ends.
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens the API reported as input_tokens.", model)
        self.generation_tokens = counter(
            "generation_tokens", "Generated tokens the API reported as output_tokens.", model
        )
        self.image_tokens = counter(
            "image_tokens", "Vision states the API reported as image_tokens (6,404 an image for Llama 3.2).", model
        )
        self.request_success = counter(
            "request_success",
            "Requests whose generation ended: stop, length, or abort (the client left after it started).",
            (*model, "finished_reason"),
        )
        self.ttft = histogram(
            "time_to_first_token_seconds",
            "From the request's arrival (image fetch and decode included) to its first generated token.",
            model,
            TTFT_BUCKETS,
        )
        self.inter_token = histogram(
            "inter_token_latency_seconds", "Time between two generated tokens of a request.", model, INTER_TOKEN_BUCKETS
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds",
            "From the request's arrival to its end, for requests whose generation ended.",
            model,
            REQUEST_BUCKETS,
        )
        self.queue_time = histogram(
            "request_queue_time_seconds",
            "Time a request waited for a place in the in-process engine's batch.",
            model,
            REQUEST_BUCKETS,
        )
        self.prefill_time = histogram(
            "request_prefill_time_seconds",
            "In-process engine: from a request's first prompt step (vision encoding included) to its first token.",
            model,
            REQUEST_BUCKETS,
        )
        self.decode_time = histogram(
            "request_decode_time_seconds",
            "In-process engine: from a request's first token to its last.",
            model,
            REQUEST_BUCKETS,
        )
        self.vision_encoder = histogram(
            "vision_encoder_seconds",
            "The vision tower and projector on one image (vision-cache misses only).",
            model,
            IMAGE_BUCKETS,
        )
        image = ("source", "format")
        self.image_fetch = histogram(
            "image_fetch_seconds",
            "Reading an image's bytes: URL download, data: URI decoding, upload or local file read.",
            image,
            IMAGE_BUCKETS,
        )
        self.image_decode = histogram(
            "image_decode_seconds",
            "Decoding an image with Pillow, waiting for a decode worker included (decode-cache hits: none).",
            image,
            IMAGE_BUCKETS,
        )
        self.image_preprocess = histogram(
            "image_preprocess_seconds",
            "Turning a decoded image into the model's tiles and pixel values (vision-cache hits: none).",
            image,
            IMAGE_BUCKETS,
        )
        self.image_refusals = counter(
            "image_refusals",
            "Images refused: source (not allowed, not found, too many bytes, download failed), format "
            "(not an accepted format, corrupt), size (pixel limits), timeout (decode budget).",
            ("reason",),
        )
        self.http_requests = counter(
            "http_requests",
            "HTTP requests answered, by route template, method and status.",
            ("route", "method", "status"),
        )
        self.http_duration = histogram(
            "http_request_duration_seconds",
            "From a request's arrival to its last byte, by route template.",
            ("route",),
            HTTP_BUCKETS,
        )
        self.request_errors = counter(
            "request_errors",
            "Requests answered with a DashScope error code (before or during a stream): refusals and failures.",
            ("code",),
        )
        upstream = ("upstream",)
        self.upstream_latency = histogram(
            "upstream_request_seconds", "One call to an upstream engine, to its last byte.", upstream, REQUEST_BUCKETS
        )
        self.upstream_errors = counter(
            "upstream_errors", "Calls to an upstream engine that failed (error status, broken stream).", upstream
        )
        self.upstream_failovers = counter(
            "upstream_failovers", "Requests moved to another upstream after this one failed before a token.", upstream
        )
        self.key_tokens = counter(
            "key_tokens",
            "Tokens used by the keys named in LLAMASCOPE_METRICS_KEYS (kind: input, output, image).",
            ("key_name", *model, "kind"),
        )


METRICS = Metrics()


# -- state, read at scrape time ---------------------------------------------------

# Figures an engine's stats() may report, as the metric each becomes. Engines report what they have; a
# figure appears once an engine reports it. The prefix cache's hits and queries count prompt tokens, as
# vLLM's do, so its dashboards' hit rate (hits / queries) reads the same here.
_ENGINE_GAUGES = {
    "running": ("num_requests_running", "Requests prefilling or decoding."),
    "waiting": ("num_requests_waiting", "Requests waiting for a place in the batch."),
    "vision_cache_images": ("vision_cache_images", "Images whose vision-tower output is cached."),
    "prefix_cache_bytes": ("prefix_cache_bytes", "Bytes held by the prefix cache."),
    "prefix_cache_max_bytes": ("prefix_cache_max_bytes", "The prefix cache's bound in bytes (PREFIX_CACHE_BYTES)."),
    "prefix_cache_blocks": ("prefix_cache_blocks", "Blocks held by the prefix cache."),
    "prefix_cache_held_blocks": ("prefix_cache_held_blocks", "Prefix-cache blocks that running requests hold."),
}
_ENGINE_COUNTERS = {
    "vision_cache_hits": ("vision_cache_hits", "Images whose vision-tower output came from the cache."),
    "vision_cache_misses": ("vision_cache_misses", "Images that went through the vision tower."),
    "prefix_cache_tokens_reused": ("prefix_cache_hits", "Prompt tokens found in the prefix cache (not prefilled)."),
    "prefix_cache_tokens_queried": ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    "prefix_cache_hits": (
        "prefix_cache_request_hits",
        "Requests that took some of their prompt from the prefix cache.",
    ),
    "prefix_cache_misses": ("prefix_cache_request_misses", "Requests that took none of their prompt from it."),
    "prefix_cache_evicted": ("prefix_cache_evicted_blocks", "Prefix-cache blocks evicted to make room."),
}


class StateCollector:
    """Reads the server's state when Prometheus scrapes, through what it is given: the engines by model name
    (each one's ``stats()`` and ``health()``), the decoded-image cache, the allowances left.

    Names served by one engine (by default both seed names share the built-in model) each show that
    engine's figures, as ``/health`` does.
    """

    def __init__(
        self,
        engines: Callable[[], Mapping[str, EngineState]],
        image_cache: Callable[[], CacheStats] | None = None,
        allowances: Callable[[], Iterable[Allowance]] | None = None,
        batches: Callable[[], BatchStats] | None = None,
    ) -> None:
        self.engines = engines
        self.image_cache = image_cache
        self.allowances = allowances
        self.batches = batches

    def collect(self) -> Iterator[Metric]:
        yield from self._engines()
        if self.image_cache is not None:
            yield from self._image_cache(self.image_cache())
        if self.allowances is not None:
            yield from self._allowances()
        if self.batches is not None:
            yield from self._batches(self.batches)

    def _engines(self) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            k: GaugeMetricFamily(PREFIX + n, d, labels=["model_name"]) for k, (n, d) in _ENGINE_GAUGES.items()
        }
        families.update(
            (k, CounterMetricFamily(PREFIX + n, d, labels=["model_name"])) for k, (n, d) in _ENGINE_COUNTERS.items()
        )
        healthy = GaugeMetricFamily(
            PREFIX + "upstream_healthy", "1 while an upstream engine is in rotation, 0 while it is failing.",
            labels=["model_name", "upstream"],
        )  # fmt: skip
        outstanding = GaugeMetricFamily(
            PREFIX + "upstream_outstanding_requests", "Requests an upstream engine is answering now.",
            labels=["model_name", "upstream"],
        )  # fmt: skip
        reported: set[str] = set()
        for name, engine in self.engines().items():
            try:  # a scrape must not fail for one engine
                stats = engine.stats()
                upstreams = engine.health()
            except Exception:
                log.exception("stats of model %s", name)
                continue
            for key, value in stats.items():
                family = families.get(key)
                if family is not None:
                    family.add_metric([name], float(value))
                    reported.add(key)
            for upstream in upstreams:
                label = upstream_label(upstream.url)
                healthy.add_metric([name, label], 1.0 if upstream.healthy else 0.0)
                outstanding.add_metric([name, label], float(upstream.outstanding))
        for key, family in families.items():
            if key in reported or key in ("running", "waiting"):
                yield family
        yield healthy
        yield outstanding

    @staticmethod
    def _image_cache(cache: CacheStats) -> Iterator[Metric]:
        yield CounterMetricFamily(
            PREFIX + "image_cache_hits", "Images whose decode came from the decoded-image cache.", value=cache.hits
        )
        yield CounterMetricFamily(
            PREFIX + "image_cache_misses", "Images decoded (not in the cache).", value=cache.misses
        )
        yield GaugeMetricFamily(PREFIX + "image_cache_bytes", "Pixel bytes in the decoded-image cache.", cache.bytes)

    def _allowances(self) -> Iterator[Metric]:
        labels = ["key_name", "model_name"]
        remaining = GaugeMetricFamily(
            PREFIX + "key_allowance_remaining_tokens",
            "Tokens left in a named key's allowance (limited grants of keys in LLAMASCOPE_METRICS_KEYS).",
            labels=labels,
        )
        allowance = GaugeMetricFamily(
            PREFIX + "key_allowance_tokens", "A named key's allowance, in tokens.", labels=labels
        )
        expires = GaugeMetricFamily(
            PREFIX + "key_allowance_expires_timestamp_seconds",
            "When a named key's allowance expires (Unix time).",
            labels=labels,
        )
        sums: dict[tuple[str, str], list[float]] = {}  # several grants of one key and model add up
        assert self.allowances is not None
        try:
            grants = list(self.allowances())
        except Exception:
            log.exception("allowances for /metrics")
            grants = []
        for grant in grants:
            row = sums.setdefault((grant.key_name, grant.model), [0.0, 0.0, 0.0])
            row[0] += grant.remaining_tokens
            row[1] += grant.allowance_tokens
            if grant.expires_at is not None:
                row[2] = grant.expires_at if not row[2] else min(row[2], grant.expires_at)
        for labels_of, (remains, total, expiry) in sorted(sums.items()):
            remaining.add_metric(list(labels_of), remains)
            allowance.add_metric(list(labels_of), total)
            if expiry:
                expires.add_metric(list(labels_of), expiry)
        yield remaining
        yield allowance
        yield expires

    @staticmethod
    def _batches(read: Callable[[], BatchStats]) -> Iterator[Metric]:
        try:  # a scrape must not fail while the accounts database is away
            stats = read()
        except Exception as exc:
            log.warning("batch figures for /metrics: %s", exc)
            return
        yield GaugeMetricFamily(
            PREFIX + "batch_lines_waiting", "Lines of running batches not yet run.", value=stats.waiting
        )
        yield GaugeMetricFamily(PREFIX + "batch_lines_running", "Batch lines running now.", value=stats.running)
        yield CounterMetricFamily(
            PREFIX + "batch_lines_completed", "Batch lines answered (for the output file).", value=stats.completed
        )
        yield CounterMetricFamily(
            PREFIX + "batch_lines_failed",
            "Batch lines in an error file: refused, or never run (the batch was cancelled or expired).",
            value=stats.failed,
        )
        yield CounterMetricFamily(
            PREFIX + "batch_prompt_tokens", "Input tokens of the batch lines that ran.", value=stats.input_tokens
        )
        yield CounterMetricFamily(
            PREFIX + "batch_generation_tokens", "Output tokens of the batch lines that ran.", value=stats.output_tokens
        )
        batches = GaugeMetricFamily(
            PREFIX + "batches", "Batches not ended, by status (validating, in_progress, finalizing, cancelling).",
            labels=["status"],
        )  # fmt: skip
        for status, count in stats.batches.items():
            batches.add_metric([status], float(count))
        yield batches


def observe_many(histogram: Any, amount: float, count: int) -> None:
    """``count`` observations of the same ``amount`` on a labelled histogram: what ``count`` calls of its
    ``observe`` do, with one bucket search and two increments (a stream's tokens arriving together share one
    inter-token gap). Reads prometheus-client's histogram fields; tests/observability/test_metrics.py checks
    it against ``observe``."""
    if count <= 0:
        return
    if count == 1:
        histogram.observe(amount)
        return
    histogram._sum.inc(amount * count)
    for i, bound in enumerate(histogram._upper_bounds):
        if amount <= bound:
            histogram._buckets[i].inc(count)
            break


def upstream_label(url: str) -> str:
    """An upstream URL as a label: without user name or password."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def exposition(registry: CollectorRegistry) -> bytes:
    """The text Prometheus scrapes."""
    return generate_latest(registry)


@dataclass(frozen=True)
class MetricsEndpoint:
    """Where and how the metrics are served (LLAMASCOPE_METRICS, _METRICS_KEY, _METRICS_PORT, _METRICS_KEYS)."""

    enabled: bool = True
    key: str | None = None  # Bearer key /metrics asks for; None: none
    port: int | None = None  # serve them on this port (host as the server's) instead of at /metrics
    host: str = "127.0.0.1"
    key_names: frozenset[str] = frozenset()

    @property
    def on_main_port(self) -> bool:
        return self.enabled and self.port is None


class _Forward:
    """The event metrics' registry as one collector of another registry."""

    def collect(self) -> Iterable[Metric]:
        return METRICS.registry.collect()


def registry_for(state: StateCollector) -> CollectorRegistry:
    """One server's metrics: the event metrics, and its state read at scrape time."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Forward())  # type: ignore[arg-type]
    registry.register(state)  # type: ignore[arg-type]
    return registry


def serve_on_port(registry: CollectorRegistry, host: str, port: int) -> Any:
    """prometheus-client's own HTTP server on a port of its own (a thread); ``.shutdown()`` stops it."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
