"""Images through the vision tower together, and each image's cross-attention keys and values projected once.

Real Mllama classes on the built-in model, the scheduler's own thread running them. The model's modules
are watched with PyTorch hooks (never replaced): a pre-hook on the text model can hold the model thread
inside a decode step, so that requests pile up in the queue as they do under load.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from llamascope.engines.base import Chunk, SamplingParams, Turn
from llamascope.engines.mllama import MllamaEngine
from llamascope.engines.requests import BatchLimits
from llamascope.engines.scheduler import cross_states
from llamascope.engines.vision import VisionCache, kv_bytes, sources
from tests.engines.helpers import image

GREEDY = SamplingParams(max_new_tokens=6, min_new_tokens=6, temperature=0)


class Gate:
    """A forward pre-hook that, once armed, holds the model thread in the next forward until released."""

    def __init__(self, module: Any) -> None:
        self.armed = False
        self.inside = threading.Event()
        self.release = threading.Event()
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: Any) -> None:
        if self.armed:
            self.armed = False
            self.inside.set()
            self.release.wait(60)


class Calls:
    """Every call of a module, with the leading size of its first tensor argument (or keyword)."""

    def __init__(self, module: Any) -> None:
        self.sizes: list[int] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: Any, kwargs: Any) -> None:
        first = args[0] if args else next(iter(kwargs.values()))
        self.sizes.append(int(first.shape[0]))


async def text_of(chunks: AsyncIterator[Chunk]) -> tuple[str, int]:
    out = [c async for c in chunks]
    return "".join(c.text for c in out), out[-1].output_tokens


async def piled_up(engine: MllamaEngine, gate: Gate, prompts: list[Any]) -> list[tuple[str, int]]:
    """Hold the model thread in a running request's decode step, queue ``prompts``, then let it go on: the
    next scheduling turn finds them all waiting."""
    running = engine.generate(
        await engine.prepare([Turn("user", "Keep going.")]),
        SamplingParams(max_new_tokens=10_000, min_new_tokens=10_000, temperature=0),
    )
    await anext(running)
    gate.armed = True
    await asyncio.to_thread(gate.inside.wait, 30)
    tasks = [asyncio.create_task(text_of(engine.generate(p, GREEDY))) for p in prompts]
    while len(engine.scheduler.waiting) < len(prompts):
        await asyncio.sleep(0.01)
    gate.release.set()
    try:
        return await asyncio.gather(*tasks)
    finally:
        await running.aclose()  # type: ignore[attr-defined]


@pytest.fixture
def engine(test_model_dir: Path) -> MllamaEngine:
    return MllamaEngine.load(test_model_dir, test_model=True, limits=BatchLimits(max_batch=8, vision_batch_tiles=12))


def test_a_requests_images_go_through_the_tower_together(engine: MllamaEngine) -> None:
    """A request's images (one of them twice) through the tower in one call, each encoded once and cached under
    its own digest for the next turn."""
    pictures = [image((10 + 50 * i, 20, 30), (400 + 100 * i, 300)) for i in range(2)]
    tower = Calls(engine.model.model.vision_model)
    turns = [Turn("user", (*pictures, pictures[0], "Which differ?"))]
    asyncio.run(text_of(engine.generate(asyncio.run(engine.prepare(turns)), GREEDY)))
    tower.handle.remove()
    assert tower.sizes == [2]
    assert all(engine.vision_cache.peek(p.digest) is not None for p in pictures)


@pytest.mark.slow
def test_images_waiting_together_go_through_the_tower_in_one_call(engine: MllamaEngine) -> None:
    pictures = [image((40 * i, 90, 200 - 30 * i), (500 + 150 * i, 400)) for i in range(5)]
    tower = Calls(engine.model.model.vision_model)
    gate = Gate(engine.model.model)

    async def scenario() -> list[tuple[str, int]]:
        prompts = [await engine.prepare([Turn("user", (p, "What is this?"))]) for p in pictures]
        return await piled_up(engine, gate, prompts)

    results = asyncio.run(scenario())
    assert [n for _, n in results] == [6] * 5
    # VISION_BATCH_TILES 12 takes three of Llama 3.2's four-tile images a call: the five in two calls, where
    # each alone took five.
    assert sorted(tower.sizes) == [2, 3]
    assert engine.vision_cache.misses == 0 and len(engine.vision_cache) == 5

    # Each image's keys and values are those it gets through the tower alone, up to the order of sums.
    together = {p.digest: engine.vision_cache.peek(p.digest) for p in pictures}
    engine.vision_cache.clear()
    for picture in pictures:
        asyncio.run(text_of(engine.generate(asyncio.run(engine.prepare([Turn("user", (picture, "?"))])), GREEDY)))
        (kv, tiles), (kv_together, tiles_together) = engine.vision_cache.peek(picture.digest), together[picture.digest]
        assert tiles == tiles_together
        for (keys, values), (keys_t, values_t) in zip(kv, kv_together, strict=True):
            torch.testing.assert_close(keys_t, keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(values_t, values, rtol=1e-4, atol=1e-5)
    assert tower.sizes[2:] == [1] * 5


@pytest.mark.slow
def test_a_failed_batch_of_images_costs_only_the_batching(engine: MllamaEngine) -> None:
    """The tower failing on several images at once (out of memory, say): each request encodes its own."""
    pictures = [image((10, 20 * i, 30), (700, 300 + 100 * i)) for i in range(3)]

    together: list[int] = []

    def refuse_several(module: Any, args: Any, kwargs: Any) -> None:
        if kwargs["pixel_values"].shape[0] > 1:
            together.append(kwargs["pixel_values"].shape[0])
            raise torch.OutOfMemoryError("several images at once do not fit")

    handle = engine.model.model.vision_model.register_forward_pre_hook(refuse_several, with_kwargs=True)
    gate = Gate(engine.model.model)

    async def scenario() -> list[tuple[str, int]]:
        prompts = [await engine.prepare([Turn("user", (p, "And this?"))]) for p in pictures]
        return await piled_up(engine, gate, prompts)

    try:
        results = asyncio.run(scenario())
    finally:
        handle.remove()
    assert [n for _, n in results] == [6] * 3
    assert engine.scheduler.encoder.calls == 3 and len(engine.vision_cache) == 3
    # Tried together once, not again every scheduling turn; after running out of memory, calls take half.
    assert together == [3] and engine.scheduler.encoder.batch_tiles == 6


@pytest.mark.slow
def test_a_queue_longer_than_the_cache_holds_encodes_each_image_once(test_model_dir: Path) -> None:
    """Six requests about six images wait while the batch's token bound lets one in at a time, and the vision
    cache holds two images: each image goes through the tower once (entries made for requests that are
    still waiting are not evicted by the next turn's)."""
    engine = MllamaEngine.load(
        test_model_dir, test_model=True, limits=BatchLimits(max_batch=8, max_batch_tokens=100, vision_batch_tiles=16)
    )
    engine.vision_cache.max_size = 2 * engine.scheduler.encoder.entry_bytes()
    tower = Calls(engine.model.model.vision_model)
    pictures = [image((30 * i, 100, 200 - 20 * i), (500 + 120 * i, 400)) for i in range(6)]

    async def scenario() -> list[tuple[str, int]]:
        prompts = [await engine.prepare([Turn("user", (p, "What is this?"))]) for p in pictures]
        running = engine.generate(
            await engine.prepare([Turn("user", "Keep going.")]),
            SamplingParams(max_new_tokens=60, min_new_tokens=60, temperature=0),
        )
        await anext(running)
        tasks = [asyncio.create_task(text_of(engine.generate(p, GREEDY))) for p in prompts]
        async for _ in running:
            pass
        return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    assert [n for _, n in results] == [6] * 6
    assert sum(tower.sizes) == 6 and max(tower.sizes) == 2, tower.sizes


def test_an_images_keys_and_values_are_projected_once_and_shared(engine: MllamaEngine) -> None:
    """Turns and concurrent requests about one image: one projection, and the batch reads the cache's copy."""
    layer = min(engine.scheduler.cross_layers)
    projections = Calls(engine.model.model.language_model.layers[layer].cross_attn.k_proj)
    photo = image((90, 140, 60), (800, 600))
    gate = Gate(engine.model.model)

    async def scenario() -> tuple[list[tuple[str, int]], bool]:
        first = await text_of(engine.generate(await engine.prepare([Turn("user", (photo, "What is this?"))]), GREEDY))
        second = await text_of(
            engine.generate(
                await engine.prepare(
                    [Turn("user", (photo, "What is this?")), Turn("assistant", first[0]), Turn("user", "Colours?")]
                ),
                GREEDY,
            )
        )
        # Four at once about it, held in a decode step to look at what the batch reads.
        prompts = [await engine.prepare([Turn("user", (photo, f"Question {i}?"))]) for i in range(4)]
        forty = SamplingParams(max_new_tokens=40, min_new_tokens=40)  # none ends before all four have joined
        tasks = [asyncio.create_task(text_of(engine.generate(p, forty))) for p in prompts]
        batch = engine.scheduler.batches[True]
        deadline = time.monotonic() + 60
        while len(batch.rows) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        gate.armed = True
        await asyncio.to_thread(gate.inside.wait, 30)
        (kv, _tiles) = engine.vision_cache.peek(photo.digest)
        cached = kv[0][0].untyped_storage().data_ptr()
        read = batch.cache.layers[layer].keys.untyped_storage().data_ptr()
        gate.release.set()
        return [first, second, *await asyncio.gather(*tasks)], cached == read

    results, same_storage = asyncio.run(scenario())
    assert all(n > 0 for _, n in results)
    assert projections.sizes == [engine.model.config.vision_config.max_num_tiles]  # once, for all six
    assert same_storage


def _entry(fill: float, states: int = 8) -> tuple[Any, int]:
    """A vision-cache entry of two layers' keys and values [1, 2, states, 4], all ``fill``."""
    return tuple((torch.full((1, 2, states, 4), fill), torch.full((1, 2, states, 4), fill)) for _ in range(2)), 4


def test_joined_states_take_only_the_room_the_images_leave() -> None:
    """A joined entry counts in the cache's bound, goes before any image, is kept only where it fits beside them,
    is served only while made from the images' entries cached now, and goes with ``clear``."""
    one = kv_bytes(_entry(0.0)[0])
    cache = VisionCache(4 * one)
    a, b = _entry(1.0), _entry(2.0)
    cache.put("a", a)
    cache.put("b", b)
    key = (("a", 4), ("b", 4), ("", 4))
    joined = cross_states([a[0], b[0]])
    assert cache.keep_joined(key, sources([a[0], b[0]]), joined)
    assert cache.joined_bytes == 2 * one and cache.total + cache.joined_bytes == 4 * one
    assert cache.joined(key, [a[0], b[0]]) is joined and cache.joined_hits == 1
    assert cache.joined((("b", 4), ("a", 4), ("", 4)), [b[0], a[0]]) is None  # another order: another key
    # An image that needs the room: the joined entry goes, both images stay.
    cache.put("c", _entry(3.0))
    assert cache.joined_bytes == 0 and cache.joined(key, [a[0], b[0]]) is None
    assert all(cache.peek(name) is not None for name in "abc")
    # No room beside the images (three of four): not kept, and no image evicted for it.
    assert not cache.keep_joined(key, sources([a[0], b[0]]), joined)
    assert len(cache) == 3 and cache.joined_bytes == 0
    # Made from an image's entry no longer cached (encoded again since): not served, and its room given back.
    cache.pop("c")
    assert cache.keep_joined(key, sources([a[0], b[0]]), joined)
    again = _entry(1.0)
    cache.put("a", again)
    assert cache.joined(key, [again[0], b[0]]) is None and cache.joined_bytes == 0
    kept = cross_states([again[0], b[0]])
    held = weakref.ref(kept[0][0])
    assert cache.keep_joined(key, sources([again[0], b[0]]), kept)
    del kept
    assert held() is not None  # the cache holds it
    cache.clear()
    assert cache.joined_bytes == 0 and cache.total == 0 and cache.joined(key, [again[0], b[0]]) is None
    assert held() is None  # and let it go


def test_a_conversations_next_turn_takes_its_images_joined_states_and_answers_the_same(test_model_dir: Path) -> None:
    """Turn 2 of a conversation about several images attends to the joined states its turn 1 kept; the answers
    are those made joining them again, and conversations about the same images in another order, or about
    another set, are never given another's joined states."""
    colours = [(200, 30, 30), (30, 200, 30), (9, 9, 90)]
    red, green, blue = (image(colour, (600 + 100 * i, 400)) for i, colour in enumerate(colours))
    answers = SamplingParams(max_new_tokens=12, temperature=0)
    sets = [(red, green), (green, red), (red, blue)]

    def turn2(pictures: tuple[Any, ...]) -> list[Turn]:
        return [
            Turn("user", (*pictures, "What do these show?")),
            Turn("assistant", "Some plain colours."),
            Turn("user", "Which one is darker?"),
        ]

    def answer(engine: MllamaEngine, turns: list[Turn]) -> str:
        return asyncio.run(text_of(engine.generate(asyncio.run(engine.prepare(turns)), answers)))[0]

    def conversations(engine: MllamaEngine, join: bool) -> list[str]:
        for pictures in sets:  # every turn 1 first: each keeps its joined states beside the others'
            answer(engine, turn2(pictures)[:1])
        out = []
        for pictures in sets:
            if not join:  # the images encoded again, their states joined again
                engine.vision_cache.clear()
            out.append(answer(engine, turn2(pictures)))
        return out

    engine = MllamaEngine.load(test_model_dir, test_model=True)
    # The keys turn 2's prefill attends to in the first cross-attention layer. Attention over a set of states
    # answers alike in any order, so the answers alone cannot tell another order's joined states: the keys can.
    cross_attn = engine.model.model.language_model.layers[min(engine.scheduler.cross_layers)].cross_attn
    read: list[Any] = []

    def watch(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if kwargs["hidden_states"].shape[1] > 1:  # a prefill's
            read.append(kwargs["past_key_values"].layers[module.layer_idx].keys)

    cross_attn.register_forward_pre_hook(watch, with_kwargs=True)
    joined = conversations(engine, join=True)
    cache = engine.vision_cache
    assert cache.joined_hits == len(sets)
    max_tiles = engine.model.config.vision_config.max_num_tiles
    for pictures, keys in zip(sets, read[-len(sets) :], strict=True):  # each turn 2's own images, in order
        entries = [cache.peek(picture.digest) for picture in pictures]
        own = cross_states([kv for kv, _ in entries], [tiles for _, tiles in entries], max_tiles)
        assert torch.equal(keys, own[0][0])
    assert cache.joined_bytes > 0 and cache.total + cache.joined_bytes <= cache.max_size
    assert joined == conversations(MllamaEngine.load(test_model_dir, test_model=True), join=False)


def test_a_joined_entry_that_cannot_fit_beside_the_images_evicts_no_other() -> None:
    """One that would not fit even with every other joined entry gone is not kept, and the others stay: they
    were dropped for it, for nothing (a conversation's next turn then joined its images again)."""
    one = kv_bytes(_entry(0.0)[0])
    cache = VisionCache(4 * one)
    a, b, c = _entry(1.0), _entry(2.0), _entry(3.0)
    small_a, small_b = _entry(1.0, states=4), _entry(2.0, states=4)  # half an image each: one image's room
    for name, entry in (("a", a), ("b", b), ("c", c)):
        cache.put(name, entry)
    small = (("a", 2), ("b", 2), ("", 4))
    assert cache.keep_joined(small, sources([a[0], b[0]]), cross_states([small_a[0], small_b[0]]))
    assert not cache.keep_joined((("a", 4), ("b", 4), ("", 4)), sources([a[0], b[0]]), cross_states([a[0], b[0]]))
    assert cache.joined(small, [a[0], b[0]]) is not None and cache.joined_bytes == one
