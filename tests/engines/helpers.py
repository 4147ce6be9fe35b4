"""What the engine tests share: images made at test time, a request run to its end, a batch of mixed
requests, and the most an engine ran at once. Test modules import these from here, never from each other."""

from __future__ import annotations

import asyncio
from typing import Any

from PIL import Image

from llamascope.engines.base import Chunk, SamplingParams, Turn
from llamascope.engines.mllama import MllamaEngine
from llamascope.images import PreparedImage


def image(color: tuple[int, int, int], size: tuple[int, int] = (600, 400)) -> PreparedImage:
    """A plain image of one colour, its digest named by colour and size."""
    return PreparedImage(Image.new("RGB", size, color), f"{color}{size}", "PNG", *size)


def prepared(color: tuple[int, int, int]) -> PreparedImage:
    """A 600x400 image of one colour, its digest named by colour only."""
    return PreparedImage(
        Image.new("RGB", (600, 400), color), digest=str(color), format="PNG", source_width=600, source_height=400
    )


RED = prepared((200, 30, 30))


async def run(engine: MllamaEngine, turns: list[Turn], sampling: SamplingParams) -> tuple[str, list[Chunk]]:
    """The answer's text and its chunks, the prompt prepared and generated to its end."""
    prompt = await engine.prepare(turns)
    chunks = [c async for c in engine.generate(prompt, sampling)]
    return "".join(c.text for c in chunks), chunks


# Requests of every kind together: with and without an image, greedy and sampled, each bounded.
REQUESTS = [
    ([Turn("user", (image((200, 30, 30)), "Describe."))], SamplingParams(max_new_tokens=40, temperature=0)),
    (
        [Turn("user", (image((20, 30, 230), (1200, 300)), "What is in this picture? Tell me a lot."))],
        SamplingParams(max_new_tokens=25, temperature=0),
    ),
    ([Turn("user", "Hello there")], SamplingParams(max_new_tokens=60, temperature=0.9, top_p=0.9, seed=7)),
    (
        [Turn("system", "Be brief."), Turn("user", "Count to ten please, slowly and carefully")],
        SamplingParams(max_new_tokens=33, temperature=0, repetition_penalty=1.3),
    ),
    ([Turn("user", (image((0, 255, 0), (300, 900)), "Other"))], SamplingParams(max_new_tokens=50, temperature=0)),
    ([Turn("user", "x y z " * 30)], SamplingParams(max_new_tokens=20, temperature=0.7, top_k=20, seed=3)),
    ([Turn("user", (image((9, 9, 9)), "Short"))], SamplingParams(max_new_tokens=5, temperature=1.0, seed=11)),
]


async def most_active(engine: MllamaEngine, *requests: Any) -> tuple[list[Any], int]:
    """The requests' results, and the most the engine ran at once while they ran (sampled every 2 ms)."""
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, engine.active)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    try:
        return list(await asyncio.gather(*requests)), peak
    finally:
        watcher.cancel()
