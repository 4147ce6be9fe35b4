"""What the rest of llamascope tells observability: typed records of facts, no behaviour.

Observability is a sink, as vLLM's ``v1/metrics`` is: the layers above push
these records into it (the HTTP layer an ``Outcome`` when a request ends, the
in-process engine its ``EngineTimings``), and what a scrape reads of their
state is handed to ``metrics.StateCollector`` as plain callables by whoever
builds the server. Observability itself imports nothing of theirs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Generation:
    """What a request's generation made (the usage the API reported) and how it ended."""

    model: str
    input_tokens: int
    output_tokens: int
    image_tokens: int
    finish_reason: str | None  # "stop" or "length"; None: it did not finish
    started: bool  # the engine sent something: a generation that started and did not finish was aborted
    max_tokens: int
    temperature: float
    top_p: float


@dataclass(frozen=True, slots=True)
class Outcome:
    """A finished HTTP request, as the HTTP layer saw it end."""

    status: int
    seconds: float  # from its arrival to its last byte
    error_code: str | None = None  # the DashScope code it was answered with, before or during a stream
    key_name: str | None = None  # the name of the API key that made it, once authenticated
    generation: Generation | None = None  # None: the request generated nothing (a refusal, an admin call)


@dataclass(frozen=True, slots=True)
class EngineTimings:
    """The in-process engine's stages of one request (``time.monotonic()``)."""

    queued: float
    started: float | None  # None: it never ran (cancelled or refused while it waited)
    first_token: float | None
    ended: float
    vision: tuple[float, float] | None = None  # the vision encoder's start and end, when it ran for it


@dataclass(frozen=True, slots=True)
class UpstreamHealth:
    """One upstream engine an engine calls, as its health check and its calls last saw it."""

    url: str
    healthy: bool  # in rotation
    outstanding: int  # requests it is answering now


@dataclass(frozen=True, slots=True)
class CacheStats:
    hits: int
    misses: int
    bytes: int


@dataclass(frozen=True, slots=True)
class Allowance:
    """One limited grant of a key named for per-key metrics: what is left of it now."""

    key_name: str
    model: str
    remaining_tokens: int
    allowance_tokens: int
    expires_at: float | None = None  # Unix time


@dataclass(frozen=True, slots=True)
class BatchStats:
    """Batch lines in the accounts database, read when Prometheus scrapes (replicas sharing one database all
    read the same figures). ``batches``: how many batches are in each status that has not ended."""

    waiting: int  # lines of running batches not yet run (or whose replica died while running them)
    running: int  # lines a live replica is running now
    completed: int  # lines in the output files, ever
    failed: int  # lines in the error files, ever: refused, or never run (cancelled, expired)
    input_tokens: int
    output_tokens: int
    batches: Mapping[str, int]


class EngineState(Protocol):
    """What a scrape reads of an engine (``llamascope.engines.base.Engine`` offers it)."""

    def stats(self) -> Mapping[str, int]: ...

    def health(self) -> Sequence[UpstreamHealth]: ...
