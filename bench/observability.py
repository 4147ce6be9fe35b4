"""What the metrics cost a request: the observability hooks one streamed request passes, in this process.

One request's hooks, in the order a request meets them (arrival, image
intake, the upstream call, its tokens, the engine's stages, the end), timed
as CPU time over many rounds, so that other programs on the machine hardly
move the figure; and one scrape of /metrics. bench/gateway.py measures the
whole request through HTTP, where these microseconds are lost in the noise
of a shared machine.

    .venv/bin/python bench/observability.py [--rounds 20000] [--tokens 8]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

from llamascope.observability import request as hooks
from llamascope.observability.facts import EngineTimings, Generation, Outcome
from llamascope.observability.metrics import METRICS, exposition

MODEL = "llama3.2-11b-vision"


def one_request(tokens: int) -> None:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "route": SimpleNamespace(path="/v1/chat/completions"),
        "headers": [(b"host", b"llm"), (b"authorization", b"Bearer sk-x"), (b"content-type", b"application/json")],
    }
    observation = hooks.begin(scope, "0f6b1c7e-5d1a-4e43-9a8b-5d5f0c1e2a3b")
    image = hooks.ImageWatch()
    image.fetched("data")
    image.decoded(time.monotonic())
    image.accepted("PNG")
    watch = hooks.TokenWatch(MODEL)
    with hooks.upstream_call("http://gpu1:30000/v1"):
        for n in range(1, tokens + 1):
            watch(n)
    hooks.engine_timings(EngineTimings(0.0, 0.5, 0.6, 1.0, (0.5, 0.55)))
    generation = Generation(MODEL, 20, tokens, 6404, "stop", True, 16, 0.8, 1.0)
    hooks.end(observation, scope, Outcome(200, 0.01, key_name="from settings", generation=generation))
    hooks.finished(observation)


def cpu_microseconds(call: object, rounds: int) -> float:
    for _ in range(min(rounds, 1000)):  # warm-up: the label series exist
        call()  # type: ignore[operator]
    started = time.process_time()
    for _ in range(rounds):
        call()  # type: ignore[operator]
    return (time.process_time() - started) / rounds * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20000)
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args()
    per_request = cpu_microseconds(lambda: one_request(args.tokens), args.rounds)
    per_token = cpu_microseconds(lambda: one_request(args.tokens * 2), args.rounds) - per_request
    scrape = cpu_microseconds(lambda: exposition(METRICS.registry), max(args.rounds // 100, 10))
    print(f"observability hooks, CPU time ({args.rounds} rounds; traces off)")
    print(f"{'a request (hooks, ' + str(args.tokens) + ' tokens)':<36} {per_request:>8.1f} us")
    print(f"{'each further token':<36} {per_token / args.tokens:>8.2f} us")
    print(f"{'one scrape of the event metrics':<36} {scrape:>8.0f} us")


if __name__ == "__main__":
    main()
