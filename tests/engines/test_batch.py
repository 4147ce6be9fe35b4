"""The running batch's layout, watched while the scheduler runs it: rows about one image share one copy of its
states; a row about another image makes copies until it leaves."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llamascope.engines.attention import is_shared
from llamascope.engines.base import SamplingParams, Turn
from llamascope.engines.mllama import MllamaEngine
from tests.engines.helpers import image, run


@pytest.fixture(scope="module")
def engine(test_model_dir: Path) -> MllamaEngine:
    return MllamaEngine.load(test_model_dir, test_model=True)


@pytest.mark.slow
def test_requests_about_one_image_share_its_states(engine: MllamaEngine) -> None:
    """Rows with the same image keep one copy of its cross-attention states, not one each; a row with
    another image makes the batch hold copies until it leaves; every answer is the request's alone."""
    same, other = image((200, 120, 0), (640, 480)), image((0, 120, 200), (1200, 300))
    requests = [
        ([Turn("user", (same, "What is it?"))], SamplingParams(max_new_tokens=90, min_new_tokens=90, temperature=0)),
        ([Turn("user", (same, "Its colours?"))], SamplingParams(max_new_tokens=80, min_new_tokens=80, temperature=0)),
        ([Turn("user", (other, "And this?"))], SamplingParams(max_new_tokens=10, min_new_tokens=10, temperature=0)),
    ]
    batch = engine.scheduler.batches[True]
    layer = min(engine.scheduler.cross_layers)
    seen: list[tuple[int, bool]] = []  # (rows holding the image states, whether they are one shared copy)

    async def watch() -> None:
        while True:
            cache = batch.cache
            if cache is not None:
                keys = cache.layers[layer].keys
                if not seen or seen[-1] != (keys.shape[0], is_shared(keys)):
                    seen.append((keys.shape[0], is_shared(keys)))
            await asyncio.sleep(0.0005)

    async def scenario() -> tuple[list[str], list[str]]:
        alone = [(await run(engine, turns, sampling))[0] for turns, sampling in requests]
        watcher = asyncio.create_task(watch())
        streams = [engine.generate(await engine.prepare(t), s) for t, s in requests]
        firsts = await asyncio.gather(anext(streams[0]), anext(streams[1]))  # both running before the third

        async def rest(i: int, first: str) -> str:
            return first + "".join([c.text async for c in streams[i]])

        await asyncio.sleep(0.05)
        third = asyncio.create_task(rest(2, ""))
        together = await asyncio.gather(rest(0, firsts[0].text), rest(1, firsts[1].text), third)
        watcher.cancel()
        return alone, list(together)

    alone, together = asyncio.run(scenario())
    assert together == alone
    shared_two = seen.index((2, True))
    mixed = seen.index((3, False), shared_two)
    assert (2, True) in seen[mixed:]  # the other image left: one copy again
