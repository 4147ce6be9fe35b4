"""The request hooks as a sink: the facts pushed in (an ``Outcome``, ``EngineTimings``) become the metrics."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from llamascope.observability import request as hooks
from llamascope.observability.facts import EngineTimings, Generation, Outcome
from llamascope.observability.metrics import METRICS, observe_many

ROUTE = "/v1/chat/completions"


@pytest.fixture
def named_keys() -> Iterator[None]:
    hooks.configure({"alice"})
    yield
    hooks.configure()


def sample(name: str, **labels: str) -> float:
    return METRICS.registry.get_sample_value("llamascope:" + name, labels) or 0.0


def finish(outcome: Outcome, timings: EngineTimings | None = None) -> None:
    scope = {"type": "http", "method": "POST", "path": ROUTE, "route": SimpleNamespace(path=ROUTE), "headers": []}
    observation = hooks.begin(scope, "request-1")
    if timings is not None:
        hooks.engine_timings(timings)
    hooks.end(observation, scope, outcome)
    hooks.finished(observation)
    assert hooks.current() is None


def generation(model: str, finish_reason: str | None = "stop", started: bool = True) -> Generation:
    return Generation(model, 20, 7, 6404, finish_reason, started, 16, 0.8, 1.0)


def test_an_outcome_counts_the_usage_reported_and_the_named_keys_tokens(named_keys: None) -> None:
    model = "test-outcome-usage"
    finish(Outcome(200, 0.01, key_name="alice", generation=generation(model)))
    finish(Outcome(200, 0.01, key_name="bob", generation=generation(model, "length")))
    assert sample("prompt_tokens_total", model_name=model) == 40
    assert sample("generation_tokens_total", model_name=model) == 14
    assert sample("image_tokens_total", model_name=model) == 12808
    assert sample("request_success_total", model_name=model, finished_reason="stop") == 1
    assert sample("request_success_total", model_name=model, finished_reason="length") == 1
    assert sample("key_tokens_total", key_name="alice", model_name=model, kind="output") == 7
    assert sample("key_tokens_total", key_name="bob", model_name=model, kind="output") == 0  # not named
    assert sample("e2e_request_latency_seconds_count", model_name=model) == 2


def test_a_started_generation_that_did_not_finish_is_an_abort_unless_it_failed() -> None:
    model = "test-outcome-abort"
    finish(Outcome(200, 0.01, generation=generation(model, finish_reason=None)))
    finish(Outcome(200, 0.01, "InternalError.Algo", generation=generation(model, finish_reason=None)))
    finish(Outcome(503, 0.01, generation=generation(model, finish_reason=None, started=False)))
    assert sample("request_success_total", model_name=model, finished_reason="abort") == 1
    assert sample("request_errors_total", code="InternalError.Algo") >= 1
    assert sample("e2e_request_latency_seconds_count", model_name=model) == 0


def test_engine_timings_become_the_stage_histograms() -> None:
    model = "test-outcome-stages"
    ran = EngineTimings(queued=1.0, started=1.5, first_token=2.0, ended=4.0, vision=(1.5, 1.75))
    finish(Outcome(200, 3.0, generation=generation(model)), ran)
    never_ran = EngineTimings(queued=1.0, started=None, first_token=None, ended=9.0)
    finish(Outcome(200, 8.0, generation=generation(model, finish_reason=None)), never_ran)
    assert sample("request_queue_time_seconds_count", model_name=model) == 1
    assert sample("request_queue_time_seconds_sum", model_name=model) == 0.5
    assert sample("request_prefill_time_seconds_sum", model_name=model) == 0.5
    assert sample("request_decode_time_seconds_sum", model_name=model) == 2.0
    assert sample("vision_encoder_seconds_sum", model_name=model) == 0.25


def test_an_outcome_counts_the_http_request_by_route_template() -> None:
    before = sample("http_requests_total", route=ROUTE, method="POST", status="418")
    finish(Outcome(418, 0.002))
    assert sample("http_requests_total", route=ROUTE, method="POST", status="418") == before + 1


@pytest.mark.parametrize("amount", [0.0, 0.0007, 0.03, 1e9])
def test_tokens_arriving_together_are_counted_as_that_many_observations(amount: float) -> None:
    """observe_many (one bucket search for a read's tokens) leaves a histogram as that many observe() calls."""
    from prometheus_client import CollectorRegistry, Histogram

    registry = CollectorRegistry()
    histogram = Histogram("gaps", "", ["way"], registry=registry, buckets=(0.001, 0.01, 0.1))
    for _ in range(7):
        histogram.labels("one by one").observe(amount)
    observe_many(histogram.labels("together"), amount, 7)
    observe_many(histogram.labels("together"), amount, 0)

    def samples(way: str) -> list[tuple[str, str, float]]:
        return sorted(
            (s.name, s.labels.get("le", ""), s.value)
            for metric in registry.collect()
            for s in metric.samples
            if s.labels.get("way") == way
        )

    assert samples("together") == samples("one by one")
