"""PyTorch thread count against speed of the in-process engine, on the built-in model.

Each setting runs in a fresh process (PyTorch's thread pools are fixed once
used). Prints vision+prefill time and decode time per token, as ratios
against llamascope's default (one thread per usable core, inter-op 1),
measured in the same run.

    .venv/bin/python bench/threads.py [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import asyncio, json, sys, time
import torch
threads, interop, tokens, repeats = (int(x) for x in sys.argv[1:5])
if threads:
    torch.set_num_threads(threads)
if interop:
    torch.set_num_interop_threads(interop)
from pathlib import Path
from PIL import Image
from llamascope.engines.mllama import MllamaEngine
from llamascope.engines.base import SamplingParams, Turn
from llamascope.engines.builtin_model import ensure_test_model
from llamascope.images import PreparedImage
from llamascope.settings import Settings

engine = MllamaEngine.load(ensure_test_model(Settings.load().cache_dir), test_model=True)
image = PreparedImage(Image.new("RGB", (800, 600), (90, 140, 200)), "x", "PNG", 800, 600)

async def once():
    prompt = await engine.prepare([Turn("user", "Describe the picture.", image)])
    start = time.perf_counter()
    first = None
    async for chunk in engine.generate(prompt, SamplingParams(max_new_tokens=tokens, temperature=0)):
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - start, (end - first) / (tokens - 1)

asyncio.run(once())  # warm-up
runs = [asyncio.run(once()) for _ in range(repeats)]
print(json.dumps({"threads": torch.get_num_threads(), "ttft": [r[0] for r in runs], "tpot": [r[1] for r in runs]}))
"""


def run(threads: int, interop: int, tokens: int, repeats: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(threads), str(interop), str(tokens), str(repeats)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    settings = [
        ("llamascope default", cores, 1),
        ("PyTorch default", 0, 0),
        ("1 thread", 1, 1),
        (f"{cores * 2} threads (oversubscribed)", cores * 2, 1),
        (f"{cores * 4} threads (oversubscribed)", cores * 4, 1),
    ]
    started = time.time()
    results = [(name, run(t, i, args.tokens, args.repeats)) for name, t, i in settings]
    base_ttft = statistics.median(results[0][1]["ttft"])
    base_tpot = statistics.median(results[0][1]["tpot"])
    print(f"usable cores: {cores}; {args.tokens} tokens, median of {args.repeats} runs; ratio = time / default's")
    print(f"{'setting':<32} {'threads':>7} {'vision+prefill':>15} {'ratio':>6} {'ms/token':>9} {'ratio':>6}")
    for name, r in results:
        ttft, tpot = statistics.median(r["ttft"]), statistics.median(r["tpot"])
        print(
            f"{name:<32} {r['threads']:>7} {ttft * 1000:>12.0f} ms {ttft / base_ttft:>6.2f} "
            f"{tpot * 1000:>9.2f} {tpot / base_tpot:>6.2f}"
        )
    print(f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
