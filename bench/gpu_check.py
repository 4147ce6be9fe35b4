"""The GPU device check: the in-process engine on a GPU, in one command, printing a table.

    bash bench/gpu_check.sh            # on a GPU machine (installs the wheels in .whl/ if there are any)
    python bench/gpu_check.py --device cpu --shape tiny --tokens 8 --levels 1,2   # its CPU parts
    python bench/gpu_check.py --device cpu --shape tiny --tokens 4 --levels 2 --images 2 --samples 1  # the test's

1. Correctness on the device, with the built-in model loaded through ``from_pretrained`` onto it (the path
   ``serve --model NAME=PATH --device cuda`` takes) in float32: greedy answers batched are token for token
   the answers alone; a cancelled request leaves the batch within a step; the model thread makes no tensor
   without naming its device (``devices.discipline``); the memory plan of the device.
2. Speed, on a random-weight model of the exact Llama-3.2-11B-Vision-Instruct shape (``--shape 11b``, its
   config's sizes, not its weights) in bf16, built on the device: decode tokens/s at batch 1 against the
   memory-bandwidth limit (bytes of weights one decode step reads over the copy bandwidth measured in the
   same run), tokens/s at each ``--levels`` concurrency (one shared cached image), time to first token with
   a new image (vision encoding and prefill) and with a cached one (the median of ``--samples``), 16
   requests about 16 new images (``--images``) sent at once with their images encoded together
   (VISION_BATCH_TILES 16) against one at a time, and peak GPU memory.
Targets on one H200: batch-1 decode >= 60% of the bandwidth limit; 64 concurrent >= 20x batch 1; a new
image's time to first token < 150 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from llamascope.engines import devices
from llamascope.engines.base import EngineInfo, SamplingParams, Turn
from llamascope.engines.builtin_model import ELEVEN_B, build_processor, build_tokenizer, ensure_test_model
from llamascope.engines.mllama import MllamaEngine
from llamascope.engines.requests import BatchLimits
from llamascope.engines.templates import LLAMASCOPE_TEMPLATE
from llamascope.images import PreparedImage


def photo(seed: int) -> PreparedImage:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (840, 1120, 3), dtype=np.uint8)
    return PreparedImage(Image.fromarray(pixels), f"noise-{seed}", "PNG", 1120, 840)


def sync(device: str) -> None:
    import torch

    if device != "cpu":
        torch.cuda.synchronize()


async def answer(engine: MllamaEngine, turns: list[Turn], sampling: SamplingParams) -> tuple[list[int], float, float]:
    """(text deltas' token counts, time to first token, time from first to last token)."""
    started = time.perf_counter()
    prompt = await engine.prepare(turns)
    first = last = 0.0
    counts: list[int] = []
    async for chunk in engine.generate(prompt, sampling):
        now = time.perf_counter()
        first = first or now
        last = now
        counts.append(chunk.output_tokens)
    return counts, first - started, last - first


# -- 1. correctness ----------------------------------------------------------------------------------------


def correctness(device: str, cache_dir: Path) -> list[tuple[str, str, bool]]:
    engine = MllamaEngine.load(ensure_test_model(cache_dir), test_model=True, dtype="float32", device=device)
    where = {str(p.device) for p in engine.model.parameters()}
    rows = [("weights on", ", ".join(sorted(where)), all(d.startswith(device.split(":")[0]) for d in where))]
    image = PreparedImage(Image.new("RGB", (600, 400), (200, 30, 30)), "red", "PNG", 600, 400)
    requests = [
        ([Turn("user", (image, "Describe."))], SamplingParams(max_new_tokens=30, temperature=0)),
        ([Turn("user", "Count to ten please")], SamplingParams(max_new_tokens=25, temperature=0)),
        ([Turn("user", (photo(1), "Other"))], SamplingParams(max_new_tokens=20, temperature=0)),
        ([Turn("user", "x y z " * 30)], SamplingParams(max_new_tokens=15, temperature=0.7, top_k=20, seed=3)),
        ([Turn("user", (image, "Go"))], SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.8, seed=5)),
    ]
    check = devices.discipline()
    engine.scheduler.device_check = check

    async def run() -> tuple[list[Any], list[Any], bool]:
        alone = [await answer(engine, t, s) for t, s in requests]
        together = await asyncio.gather(*(answer(engine, t, s) for t, s in requests))
        # Cancellation: a long answer dropped after its first tokens leaves the model within a step or two.
        prompt = await engine.prepare([Turn("user", (image, "A long story."))])
        stream = engine.generate(prompt, SamplingParams(max_new_tokens=2000, min_new_tokens=2000, temperature=0))
        await anext(stream)
        await stream.aclose()
        deadline = time.monotonic() + 5
        while engine.active and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return alone, together, engine.active == 0

    alone, together, cancelled = asyncio.run(run())
    # Greedy rows; the sampled ones are shown too. Equal up to the order of float32 sums (README): a tie
    # within that distance may part them, so this is a check to read, not a guarantee of bits.
    greedy = [i for i, (_, sampling) in enumerate(requests) if sampling.temperature == 0]
    same = sum(alone[i][0] == together[i][0] for i in greedy)
    sampled = sum(alone[i][0] == together[i][0] for i in range(len(requests)) if i not in greedy)
    rows.append(
        (
            "batched == alone (float32)",
            f"greedy {same} of {len(greedy)}, sampled {sampled} of {len(requests) - len(greedy)}",
            same == len(greedy),
        )
    )
    rows.append(("cancelled request left the batch", "yes" if cancelled else "no", cancelled))
    violations = sorted(set(check.violations))
    rows.append(("tensors made without a device", "; ".join(violations) or "none", not violations))
    return rows


# -- 2. speed ----------------------------------------------------------------------------------------------


def build(shape: str, device: str, cache_dir: Path) -> MllamaEngine:
    import torch
    from transformers import GenerationConfig, MllamaConfig, MllamaForConditionalGeneration

    if shape == "tiny":
        return MllamaEngine.load(ensure_test_model(cache_dir), test_model=True, dtype="bfloat16", device=device)
    config = MllamaConfig(**ELEVEN_B)
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device if device != "cuda" else "cuda:0"):
            model = MllamaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, param in model.named_parameters():  # open the gates, as the built-in model does
            if name.endswith("gate"):
                param.fill_(1.0)
    model.generation_config = GenerationConfig(bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
    model.eval()
    processor = build_processor(build_tokenizer())
    batch, tokens, cache, prefix = devices.settle(
        model, devices.Bounds(), context_length=8192, prefill_chunk=512, report=print
    )
    limits = BatchLimits(max_batch=max(batch, 64), max_batch_tokens=max(tokens, 64 * 1024), max_queued=1024)
    info = EngineInfo(kind="transformers", source="random 11B shape", context_length=8192, test_model=True)
    return MllamaEngine(model, processor, info, LLAMASCOPE_TEMPLATE, limits, cache, prefix_cache_bytes=prefix)


def bandwidth(device: str) -> float:
    """Bytes a second a large device-to-device copy moves (read plus written)."""
    import torch

    size = (1 << 30) if device != "cpu" else (64 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    started = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync(device)
    return 2 * size * 10 / (time.perf_counter() - started)


def speed(
    engine: MllamaEngine, device: str, tokens: int, levels: list[int], images: int = 16, samples: int = 5
) -> list[tuple[str, str, bool | None]]:
    import torch

    text = engine.model.model.language_model
    read = sum(p.numel() * p.element_size() for n, p in text.named_parameters() if "embed_tokens" not in n)
    read += sum(p.numel() * p.element_size() for p in engine.model.lm_head.parameters())
    moved = bandwidth(device)
    limit = moved / read
    shared = photo(0)
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()

    async def run() -> dict[str, Any]:
        greedy = SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0)
        await answer(engine, [Turn("user", (shared, "warm up"))], greedy)  # caches the shared image's states
        _, _, decode = await answer(engine, [Turn("user", (shared, "Tell a story."))], greedy)
        out: dict[str, Any] = {"batch1": (tokens - 1) / decode}
        for n in levels:
            started = time.perf_counter()
            results = await asyncio.gather(
                *(answer(engine, [Turn("user", (shared, f"Story {i}."))], greedy) for i in range(n))
            )
            out[n] = sum(r[0][-1] for r in results) / (time.perf_counter() - started)
        one = SamplingParams(max_new_tokens=1, temperature=0)
        await answer(engine, [Turn("user", (photo(99), "warm"))], one)
        new = [
            (await answer(engine, [Turn("user", (photo(100 + i), "What is this?"))], one))[1] for i in range(samples)
        ]
        cached = [(await answer(engine, [Turn("user", (photo(100 + i), "And this?"))], one))[1] for i in range(samples)]
        out["new"], out["cached"] = statistics.median(new), statistics.median(cached)

        async def at_once(batch_tiles: int, seed: int) -> float:
            """Seconds for ``images`` requests about as many new images, prepared first and then sent at once."""
            engine.scheduler.encoder.batch_tiles = batch_tiles
            prompts = [await engine.prepare([Turn("user", (photo(seed + i), "What is this?"))]) for i in range(images)]

            async def drain(prompt: Any) -> None:
                async for _ in engine.generate(prompt, one):
                    pass

            started = time.perf_counter()
            await asyncio.gather(*(drain(p) for p in prompts))
            return time.perf_counter() - started

        out["images"] = (await at_once(1, 1000), await at_once(16, 2000))
        return out

    r = asyncio.run(run())
    peak = torch.cuda.max_memory_allocated() if device != "cpu" else 0
    rows: list[tuple[str, str, bool | None]] = [
        ("weights read per decode step", f"{read / 1e9:.2f} GB", None),
        ("copy bandwidth (read + written)", f"{moved / 1e12:.2f} TB/s", None),
        ("bandwidth limit, batch 1", f"{limit:.1f} tok/s", None),
        (
            "decode tok/s, batch 1",
            f"{r['batch1']:.1f} ({r['batch1'] / limit:.0%} of the limit; target 60%)",
            r["batch1"] >= 0.6 * limit,
        ),
    ]
    for n in levels:
        ratio = r[n] / r["batch1"]
        rows.append((f"tok/s, {n} concurrent", f"{r[n]:.1f} ({ratio:.1f}x batch 1)", ratio >= 20 if n == 64 else None))
    rows.append(("TTFT, new image", f"{r['new'] * 1000:.1f} ms (target < 150 ms)", r["new"] < 0.150))
    rows.append(("TTFT, cached image", f"{r['cached'] * 1000:.1f} ms", None))
    alone, together = r["images"]
    rows.append(
        (
            f"{images} new images at once, encoded together",
            f"{alone / together:.2f}x one at a time ({together * 1000:.0f} ms vs {alone * 1000:.0f} ms)",
            None,
        )
    )
    rows.append(("peak GPU memory", f"{peak / (1 << 30):.1f} GiB" if peak else "n/a on the CPU", None))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to try the script's parts")
    parser.add_argument("--shape", choices=["11b", "tiny"], default="11b", help="the speed part's model")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per answer in the decode loads")
    parser.add_argument("--levels", default="16,64", help="concurrent requests to measure")
    parser.add_argument("--images", type=int, default=16, help="new images sent at once in the encoding check")
    parser.add_argument("--samples", type=int, default=5, help="time-to-first-token samples per row (the median)")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="where the built-in model is built")
    args = parser.parse_args()
    if min(args.images, args.samples) < 1:
        parser.error("--images and --samples must be at least 1")
    import torch

    try:
        device = devices.resolve_device(args.device)
    except devices.DeviceError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device != "cpu" else "CPU"
    print(f"torch {torch.__version__}, device {device} ({name})", flush=True)
    rows: list[tuple[str, str, bool | None]] = []
    started = time.perf_counter()
    rows += correctness(device, args.cache_dir)
    print(f"correctness done in {time.perf_counter() - started:.0f} s", flush=True)
    engine = build(args.shape, device, args.cache_dir)
    print(f"{args.shape} model built in {time.perf_counter() - started:.0f} s", flush=True)
    levels = [int(n) for n in args.levels.split(",")]
    rows += speed(engine, device, args.tokens, levels, images=args.images, samples=args.samples)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'check':<{width}}  {'result':<50} ok")
    for what, result, ok in rows:
        print(f"{what:<{width}}  {result:<50} {'-' if ok is None else ('yes' if ok else 'NO')}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0 if all(ok is not False for _, _, ok in rows[:4]) else 1


if __name__ == "__main__":
    sys.exit(main())
