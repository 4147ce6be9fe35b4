"""Decode speed with the self-attention caches appended to in place (kv_cache.GrowingLayer) against
transformers' DynamicLayer, which copies every layer's whole cache every token.

One engine in this process (the built-in model's "medium" shape unless --model names a directory: 10 layers
of width 512, where a step's cost is reading weights and caches, as with real models). --requests requests
at once, each a --context-token history (the same long text, so the prefix cache prefills it once; a short
question of its own after it) and exactly --tokens new tokens, greedy. Rounds alternate the two kinds of
cache (one untimed round of each first); the median round of each is shown, as decode tokens per second
from the moment every request has its first token to the end, and the per-step time.

    .venv/bin/python bench/kv_growth.py [--model PATH] [--requests 16] [--context 1500] [--tokens 128]
                                        [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from engine import SHAPES


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--context", type=int, default=1500, help="history tokens before each question (about)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from llamascope.cli import configure_torch
    from llamascope.engines.base import SamplingParams, Turn
    from llamascope.engines.builtin_model import ensure_test_model
    from llamascope.engines.mllama import MllamaEngine
    from llamascope.engines.requests import BatchLimits
    from llamascope.settings import Settings

    configure_torch(None)
    model_dir = args.model or ensure_test_model(Settings.load().cache_dir, **SHAPES["medium"])
    engine = MllamaEngine.load(model_dir, limits=BatchLimits(max_batch=args.requests))
    history = "hello " * args.context  # one token a word
    greedy = SamplingParams(max_new_tokens=args.tokens, min_new_tokens=args.tokens, temperature=0)

    async def one(i: int, firsts: list[float]) -> int:
        prompt = await engine.prepare([Turn("user", f"{history}\nQuestion {i}: what comes next?")])
        made = 0
        async for chunk in engine.generate(prompt, greedy):
            if not made:
                firsts.append(time.perf_counter())
            made = chunk.output_tokens
        return made

    async def round_(growing: bool) -> tuple[float, float, int]:
        engine.scheduler.growing_kv = growing
        firsts: list[float] = []
        steps = engine.scheduler.steps
        made = await asyncio.gather(*(one(i, firsts) for i in range(args.requests)))
        ended = time.perf_counter()
        decode = ended - max(firsts)
        # Every request's tokens after its first (they all start within one scheduling turn: the history
        # comes from the prefix cache), over the time from the last first token to the end.
        tokens = sum(m - 1 for m in made)
        return tokens / decode, decode / max(args.tokens - 1, 1) * 1000, engine.scheduler.steps - steps

    async def run() -> dict[bool, list[tuple[float, float, int]]]:
        await one(-1, [])  # the history into the prefix cache
        results: dict[bool, list[tuple[float, float, int]]] = {False: [], True: []}
        for growing in (False, True):
            await round_(growing)
        for _ in range(args.rounds):
            for growing in (False, True):
                results[growing].append(await round_(growing))
        await engine.close()
        return results

    results = asyncio.run(run())
    print(
        f"model: {model_dir}; {args.requests} requests at once, {args.context}-token history each, "
        f"{args.tokens} new tokens; median of {args.rounds} rounds"
    )
    print(f"{'self-attention cache':<34} {'decode tok/s':>12} {'ms a step':>10} {'x DynamicLayer':>15}")
    base = statistics.median(r[0] for r in results[False])
    for growing, label in ((False, "DynamicLayer (torch.cat a token)"), (True, "GrowingLayer (in place)")):
        rate = statistics.median(r[0] for r in results[growing])
        step = statistics.median(r[1] for r in results[growing])
        print(f"{label:<34} {rate:>12.1f} {step:>10.2f} {rate / base:>14.2f}x")


if __name__ == "__main__":
    main()
