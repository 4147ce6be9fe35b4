"""Structured output's own costs, engine-free, on the built-in model's tokenizer (or --model-dir's).

- compile: a new JSON Schema's grammar (a miss of the grammar cache) against a cached one (a hit), each with the
  request's own matcher made from it: what a new schema adds to its request's first token;
- mask fill: one step's bitmask for --rows constrained rows (llguidance's batched fill), the rows at the states a
  random decode reaches (inside strings, where most of the vocabulary is allowed, and between fields);
- mask apply: the bitmask put on a [rows, vocab] float32 logits tensor, all rows constrained and half of them,
  on the CPU and, where there is one, the GPU.

    .venv/bin/python bench/structured.py [--rows 16] [--steps 64] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from llamascope.engines.builtin_model import ensure_test_model
from llamascope.settings import Settings
from llamascope.structured.backend import Matcher
from llamascope.structured.compiler import GrammarCache
from llamascope.structured.guidance import GuidanceBackend
from llamascope.structured.masking import FilledMasks, StepMasks
from llamascope.structured.spec import GrammarSpec


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


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--model-dir", type=Path, default=None)
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

    grammar = cache.get_blocking(cached_spec)
    rng = np.random.default_rng(0)
    matchers: list[Matcher] = [grammar.matcher() for _ in range(args.rows)]
    bitmask = backend.allocate_bitmask(args.rows)
    fills = []
    for _ in range(args.steps):
        began = time.perf_counter()
        backend.fill_bitmask(matchers, bitmask)
        fills.append((time.perf_counter() - began) * 1000)
        for i, bits in enumerate(bitmask):  # a random allowed token each, as a random model would pick
            allowed = np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little")[: backend.vocab_size])
            token = int(rng.choice(allowed))
            if token in backend.stop_ids or not matchers[i].advance(token) or matchers[i].finished:
                matchers[i] = grammar.matcher()

    rows: list[tuple[str, str]] = [
        ("tokenizer load (once per model)", f"{tokenizer_s * 1000:.0f} ms"),
        ("new schema: compile + matcher", f"{new:.2f} ms"),
        ("cached schema: lookup + matcher", f"{cached:.3f} ms"),
        ("new minus cached (first-token cost)", f"{new - cached:.2f} ms"),
        (f"mask fill, {args.rows} rows, median step", f"{statistics.median(fills):.2f} ms"),
        (f"mask fill, {args.rows} rows, p90 step", f"{np.percentile(fills, 90):.2f} ms"),
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

    width = max(len(name) for name, _ in rows)
    print(f"structured output, llguidance, vocabulary {backend.vocab_size}, {Path(model_dir).name}")
    print(f"{'what':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")


if __name__ == "__main__":
    main()
