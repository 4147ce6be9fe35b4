"""Structured output's own costs, engine-free, on the built-in model's tokenizer (or --model-dir's).

- compile: a new JSON Schema's grammar (a miss of the grammar cache) against a cached one (a hit), each with the
  request's own matcher made from it: what a new schema adds to its request's first token;
- mask fill: one step's bitmask for --rows constrained rows (llguidance's batched fill), the rows at the states a
  random decode reaches (inside strings, where most of the vocabulary is allowed, and between fields); with the
  CPU's index plan (``StepMasks.fill``: what a CPU engine's model thread makes before each step, its rows
  filled one after another);
- mask apply: the bitmask put on a [rows, vocab] float32 logits tensor, all rows constrained and half of them,
  on the CPU and, where there is one, the GPU.

Then the issue's targets, through the in-process engine (``prepare`` and ``generate``, no HTTP; text prompts,
sampled at temperature 1 with seeds, every row made to run --tokens tokens). Three loads of --rows streams run
--rounds times, interleaved so that the loads compared are always run back to back: mixed, unconstrained,
constrained in even rounds, the reverse in odd ones. Each target is a ratio taken within a round (a pair of runs
seconds apart, under the same load from whatever else the machine runs), and the median of those ratios is
shown with their spread (lowest..highest):

- 16 concurrent streams under a JSON Schema (a free-text field, which random weights seldom close) against the
  same 16 unconstrained: tokens/s of the whole run, prefill included (the tokens over the time until the last
  stream ended), and their ratio (target: at least 0.85);
- a mixed batch, 8 constrained and 8 not: the unconstrained rows' decode speed against the same rows' (the same
  prompts and seeds) in the batch of 16 unconstrained (target: at most 5% lower). A row's decode speed is its
  tokens after the first over the time from its first token to its last: what the other rows' grammars cost
  each step of its decoding. The time before its first token (the prompts' preparation and prefill, the same
  work in both loads, and what varies most from run to run on a shared machine) is left out; the unconstrained
  rows' first token is shown beside it;
- a new schema's first token against a cached one's, each request alone (target: at most 50 ms later).

The load average (``os.getloadavg``) before and after the engine's runs is printed with the figures.

    .venv/bin/python bench/structured.py [--rows 16] [--steps 64] [--model-dir DIR] [--tokens 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from harness import median_ms

from llamascope.engines.base import SamplingParams, Turn
from llamascope.engines.builtin_model import ensure_test_model
from llamascope.engines.mllama import MllamaEngine
from llamascope.settings import Settings
from llamascope.structured.backend import Matcher
from llamascope.structured.compiler import GrammarCache
from llamascope.structured.guidance import GuidanceBackend
from llamascope.structured.masking import FilledMasks, StepMasks
from llamascope.structured.spec import GrammarSpec, OutputSpec, read_request

# A schema whose answer random weights seldom end: the rows run their full length, as unconstrained ones do.
FREE_TEXT = {"type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"]}


def receipt(variant: int) -> dict[str, object]:
    """A receipt schema; each variant is a new schema to the cache."""
    return {
        "type": "object",
        "description": f"receipt {variant}",
        "properties": {
            "merchant": {"type": "string", "maxLength": 40},
            "date": {"type": "string", "format": "date"},
            "currency": {"enum": ["CNY", "USD", "EUR"]},
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 20,
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 30},
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                        "price": {"type": "number", "minimum": 0},
                    },
                    "required": ["name", "quantity", "price"],
                    "additionalProperties": False,
                },
            },
            "total": {"type": "number", "minimum": 0},
        },
        "required": ["merchant", "currency", "items", "total"],
        "additionalProperties": False,
    }


def as_output(schema: dict[str, object]) -> OutputSpec:
    return read_request(
        response_format={"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}},
        message_texts=["json"],
    )


@dataclass
class Stream:
    """One stream of a run: its tokens, and when (seconds from the run's start) its first and last chunk came."""

    made: int
    first_made: int  # tokens in its first chunk (more than one when the loop was behind)
    first: float
    last: float


async def streams(engine: MllamaEngine, outputs: list[OutputSpec | None], tokens: int) -> list[Stream]:
    """All at once, each with its own prompt and seed (row i's are the same in every load)."""
    began = time.perf_counter()

    async def one(i: int, output: OutputSpec | None) -> Stream:
        prompt = await engine.prepare([Turn("user", f"Write about item {i} in JSON.")], output)
        sampling = SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=1.0, seed=i)
        made, first_made, first = 0, 0, 0.0
        async for chunk in engine.generate(prompt, sampling):
            if not first_made and chunk.output_tokens:
                first_made, first = chunk.output_tokens, time.perf_counter() - began
            made = chunk.output_tokens
        return Stream(made, first_made, first, time.perf_counter() - began)

    return await asyncio.gather(*(one(i, o) for i, o in enumerate(outputs)))


def rate(results: list[Stream]) -> float:
    """Tokens per second of these streams together: their tokens over the time until the last one ended."""
    return sum(s.made for s in results) / max(s.last for s in results)


def decode_rate(results: list[Stream], rows: list[int]) -> float:
    """These rows' tokens per second while they decode, summed: each row's tokens after its first chunk over the
    time from its first chunk to its last."""
    return sum((results[i].made - results[i].first_made) / max(results[i].last - results[i].first, 1e-9) for i in rows)


def spread(ratios: list[float], scale: float = 1.0, unit: str = "", digits: int = 2) -> str:
    """The median of per-round ratios, and their lowest and highest."""
    values = sorted(r * scale for r in ratios)
    low, high = values[0], values[-1]
    return f"{statistics.median(values):.{digits}f}{unit} ({low:.{digits}f}..{high:.{digits}f}, n={len(values)})"


async def first_token_ms(engine: MllamaEngine, output: OutputSpec) -> float:
    prompt = await engine.prepare([Turn("user", "Answer in JSON.")], output)
    began = time.perf_counter()
    stream = engine.generate(prompt, SamplingParams(max_new_tokens=4, temperature=1.0, seed=0))
    try:
        async for chunk in stream:
            if chunk.output_tokens:
                break
    finally:
        await stream.aclose()
    return (time.perf_counter() - began) * 1000


def engine_loads(model_dir: Path, tokens: int, rounds: int, rows: int) -> list[tuple[str, str]]:
    engine = MllamaEngine.load(model_dir, test_model=True)
    constrained = as_output(FREE_TEXT)
    loads: dict[str, list[OutputSpec | None]] = {
        "mixed": [constrained if i % 2 else None for i in range(rows)],
        "unconstrained": [None] * rows,
        "constrained": [constrained] * rows,
    }
    plain_rows = [i for i, output in enumerate(loads["mixed"]) if output is None]
    tokens_s: dict[str, list[float]] = {"unconstrained": [], "constrained": []}
    constrained_ratio: list[float] = []  # per round: constrained / unconstrained tokens/s
    plain_decode: dict[str, list[float]] = {"unconstrained": [], "mixed": []}  # the plain rows' decode tokens/s
    mixed_ratio: list[float] = []  # per round: the plain rows' decode speed, mixed / unconstrained
    plain_first: dict[str, list[float]] = {"unconstrained": [], "mixed": []}  # their first tokens, seconds
    constrained_made: list[float] = []  # the mixed run's constrained rows' tokens, on average

    async def run() -> tuple[list[float], list[float]]:
        await streams(engine, loads["constrained"], 8)  # warm: the backend, the grammar, the model's first steps
        await streams(engine, loads["mixed"], 8)
        for round_ in range(rounds):
            order = list(loads) if round_ % 2 == 0 else list(reversed(loads))  # unconstrained in the middle
            found = {name: await streams(engine, loads[name], tokens) for name in order}
            for name in ("unconstrained", "constrained"):
                tokens_s[name].append(rate(found[name]))
            constrained_ratio.append(tokens_s["constrained"][-1] / tokens_s["unconstrained"][-1])
            for name in ("unconstrained", "mixed"):
                plain_decode[name].append(decode_rate(found[name], plain_rows))
                plain_first[name] += [found[name][i].first for i in plain_rows]
            mixed_ratio.append(plain_decode["mixed"][-1] / plain_decode["unconstrained"][-1])
            made = [s.made for s, o in zip(found["mixed"], loads["mixed"], strict=True) if o is not None]
            constrained_made.append(statistics.mean(made))
        new, cached = [], []
        await first_token_ms(engine, constrained)
        for variant in range(10):
            cached.append(await first_token_ms(engine, constrained))
            new.append(await first_token_ms(engine, as_output({**FREE_TEXT, "description": f"new {variant}"})))
        return new, cached

    load_before = os.getloadavg()[0]
    new, cached = asyncio.run(run())
    load_after = os.getloadavg()[0]
    asyncio.run(engine.close())
    median = statistics.median
    plain = len(plain_rows)
    return [
        ("load average (1 min) before / after the engine's runs", f"{load_before:.2f} / {load_after:.2f}"),
        (f"engine: {rows} streams unconstrained, tokens/s", f"{median(tokens_s['unconstrained']):.0f}"),
        (f"engine: {rows} streams schema-constrained, tokens/s", f"{median(tokens_s['constrained']):.0f}"),
        ("  constrained / unconstrained, per round (target >= 0.85)", spread(constrained_ratio)),
        (
            f"engine: {plain} rows' decode tokens/s, among {rows} unconstrained streams",
            f"{median(plain_decode['unconstrained']):.0f}",
        ),
        (
            f"engine: the same {plain} rows', beside {rows - plain} constrained ones (mixed)",
            f"{median(plain_decode['mixed']):.0f}",
        ),
        ("  their cost, per round (target <= 5%)", spread([1 - r for r in mixed_ratio], 100, "%", 1)),
        (
            "  their first token, unconstrained / mixed load (median)",
            f"{median(plain_first['unconstrained']) * 1000:.0f} / {median(plain_first['mixed']) * 1000:.0f} ms",
        ),
        (f"  the mixed batch's constrained rows' tokens (of {tokens})", f"{median(constrained_made):.1f}"),
        ("engine: first token, cached schema (median of 10)", f"{median(cached):.1f} ms"),
        ("engine: first token, new schema (median of 10)", f"{median(new):.1f} ms"),
        ("  new minus cached (target <= 50 ms)", f"{median(new) - median(cached):.1f} ms"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=64, help="tokens each engine stream makes")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model_dir = args.model_dir or ensure_test_model(Settings.load().cache_dir)
    began = time.perf_counter()
    backend = GuidanceBackend.from_model_dir(model_dir)
    tokenizer_s = time.perf_counter() - began
    cache = GrammarCache(backend, capacity=1024)

    variants = iter(range(10**9))
    new = median_ms(lambda: cache.get_blocking(GrammarSpec.json_schema(receipt(next(variants)), "bench")).matcher(), 20)
    cached_spec = GrammarSpec.json_schema(receipt(-1), "bench")
    cache.get_blocking(cached_spec)
    cached = median_ms(lambda: cache.get_blocking(cached_spec).matcher(), 200)

    # Reading a request's response_format (read_request, on the event loop of every engine, a gateway's too):
    # a schema not seen before (checked against the meta-schema, compiled once, its values shown finite) and
    # the same schema again (its verdict kept).
    def asked(schema: dict[str, object]) -> None:
        read_request(response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})

    read_new = median_ms(lambda: asked(receipt(next(variants))), 50)
    asked(receipt(-1))
    read_seen = median_ms(lambda: asked(receipt(-1)), 200)

    grammar = cache.get_blocking(cached_spec)
    rng = np.random.default_rng(0)
    matchers: list[Matcher] = [grammar.matcher() for _ in range(args.rows)]
    bitmask = backend.allocate_bitmask(args.rows)
    fills, plans = [], []
    step_masks = StepMasks(backend)
    for _ in range(args.steps):
        began = time.perf_counter()
        backend.fill_bitmask(matchers, bitmask)
        fills.append((time.perf_counter() - began) * 1000)
        began = time.perf_counter()
        step_masks.fill(matchers)  # the same fill, and the index plan the CPU's apply uses
        plans.append((time.perf_counter() - began) * 1000)
        for i, bits in enumerate(bitmask):  # a random allowed token each, as a random model would pick
            allowed = np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little")[: backend.vocab_size])
            token = int(rng.choice(allowed))
            if token in backend.stop_ids or not matchers[i].advance(token) or matchers[i].finished:
                matchers[i] = grammar.matcher()

    rows: list[tuple[str, str]] = [
        ("tokenizer load (once per model)", f"{tokenizer_s * 1000:.0f} ms"),
        ("request's response_format read, new schema", f"{read_new:.2f} ms"),
        ("request's response_format read, schema seen before", f"{read_seen:.3f} ms"),
        ("new schema: compile + matcher", f"{new:.2f} ms"),
        ("cached schema: lookup + matcher", f"{cached:.3f} ms"),
        ("new minus cached (first-token cost)", f"{new - cached:.2f} ms"),
        (f"mask fill, {args.rows} rows, median step", f"{statistics.median(fills):.2f} ms"),
        (f"mask fill, {args.rows} rows, p90 step", f"{np.percentile(fills, 90):.2f} ms"),
        (f"mask fill + CPU index plan, {args.rows} rows, median step", f"{statistics.median(plans):.2f} ms"),
    ]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        masks = StepMasks(backend, device)
        all_rows = masks.fill(matchers)
        half = masks.fill([m if i % 2 else None for i, m in enumerate(matchers)])
        logits = torch.randn(args.rows, backend.vocab_size, device=device)

        def timed(filled: FilledMasks | None, masks: StepMasks = masks, logits: torch.Tensor = logits) -> float:
            def once() -> None:
                masks.apply(logits, filled)
                if logits.is_cuda:
                    torch.cuda.synchronize()

            once()
            return median_ms(once, 30)

        rows.append((f"mask apply, {args.rows}/{args.rows} rows constrained, {device}", f"{timed(all_rows):.2f} ms"))
        rows.append((f"mask apply, {args.rows // 2}/{args.rows} rows constrained, {device}", f"{timed(half):.2f} ms"))
        rows.append((f"mask apply, 0/{args.rows} rows constrained, {device}", f"{timed(None):.3f} ms"))
    cache.close()
    rows += engine_loads(Path(model_dir), args.tokens, args.rounds, args.rows)

    width = max(len(name) for name, _ in rows)
    print(f"structured output, llguidance, vocabulary {backend.vocab_size}, {Path(model_dir).name}")
    print(f"{'what':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")


if __name__ == "__main__":
    main()
