"""The in-process engine's scheduler, driven directly: batching, vision reuse, bounds.

Real Mllama classes on the built-in model; the scheduler's own thread runs them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from llamascope import errors
from llamascope.engines.base import FinishReason, PreparedPrompt, SamplingParams, Turn, background
from llamascope.engines.mllama import MllamaEngine
from llamascope.engines.requests import BatchLimits
from llamascope.images import PreparedImage
from tests.engines.helpers import REQUESTS, image, most_active, run


@pytest.fixture(scope="module")
def engine(test_model_dir: Path) -> MllamaEngine:
    return MllamaEngine.load(test_model_dir, test_model=True)


@pytest.mark.slow
def test_batched_output_is_token_identical_to_alone(engine: MllamaEngine) -> None:
    async def scenario() -> tuple[list[tuple[str, int]], list[tuple[str, int]], int]:
        alone = []
        for turns, sampling in REQUESTS:
            text, chunks = await run(engine, turns, sampling)
            alone.append((text, chunks[-1].output_tokens))
        steps = engine.scheduler.steps
        results = await asyncio.gather(*(run(engine, t, s) for t, s in REQUESTS))
        together = [(text, chunks[-1].output_tokens) for text, chunks in results]
        return alone, together, engine.scheduler.steps - steps

    alone, together, steps = asyncio.run(scenario())
    assert together == alone
    # They ran together: far fewer decode steps than tokens made.
    assert steps < sum(n for _, n in together) / 2


@pytest.fixture(scope="module")
def chunked(test_model_dir: Path) -> MllamaEngine:
    """Prompts prefilled five tokens at a time: the image token and the text around it in different chunks."""
    return MllamaEngine.load(test_model_dir, test_model=True, limits=BatchLimits(prefill_chunk=5))


@pytest.mark.slow
@pytest.mark.parametrize("size", [(320, 240), (1120, 840)], ids=["one tile", "four tiles"])
@pytest.mark.parametrize("prefill", ["whole", "chunked"])
def test_answers_equal_transformers_generate(
    request: pytest.FixtureRequest, prefill: str, size: tuple[int, int]
) -> None:
    """The scheduler's own prefill and decode loop answer as stock generate does, token for token.

    Stock Mllama pads every image to four tiles and masks the padding; the scheduler decodes over the
    image's own tiles only, padding a batch to its most tiles.
    """
    import numpy as np
    import torch

    engine: MllamaEngine = request.getfixturevalue("engine" if prefill == "whole" else "chunked")

    pixels = Image.fromarray(np.random.default_rng(size[0]).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    turns = [Turn("user", (PreparedImage(pixels, f"noise{size}", "PNG", *size), "What is this?"))]
    greedy = SamplingParams(max_new_tokens=24, min_new_tokens=24, temperature=0)
    ours = asyncio.run(engine.prepare(turns)).payload.inputs
    prompt = engine.tokenizer.decode(ours["input_ids"][0])
    inputs = engine.processor(images=[[pixels]], text=[prompt], add_special_tokens=False, return_tensors="pt")
    tiles = int(inputs["aspect_ratio_mask"].sum())
    assert tiles == (1 if size == (320, 240) else 4)
    with torch.inference_mode():
        stock = engine.model.generate(**inputs, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    expected = engine.tokenizer.decode(stock[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    # Alone and in a batch with a request whose image has a different number of tiles.
    other = [Turn("user", (image((9, 99, 9), (1200, 300) if tiles == 1 else (300, 200)), "And this?"))]

    async def scenario() -> tuple[str, str]:
        alone, _ = await run(engine, turns, greedy)
        (batched, _), _ = await asyncio.gather(run(engine, turns, greedy), run(engine, other, greedy))
        return alone, batched

    assert asyncio.run(scenario()) == (expected, expected)
    assert engine.vision_cache.peek(turns[0].images[0].digest)[1] == tiles


def test_running_streams_go_on_while_a_long_prompt_is_prefilled(test_model_dir: Path) -> None:
    engine = MllamaEngine.load(test_model_dir, test_model=True, limits=BatchLimits(prefill_chunk=256))
    long_turns = [Turn("user", "describe every detail " * 800)]  # about 7,000 tokens: 28 chunks

    async def scenario() -> tuple[int, int]:
        long_prompt = await engine.prepare(long_turns)
        prompt = await engine.prepare([Turn("user", "Tell me everything.")])
        stamps: list[float] = []

        async def running() -> None:
            async for _ in engine.generate(
                prompt, SamplingParams(max_new_tokens=400, min_new_tokens=400, temperature=0)
            ):
                stamps.append(time.monotonic())

        task = asyncio.create_task(running())
        while len(stamps) < 5:
            await asyncio.sleep(0.001)
        submitted = time.monotonic()
        chunks = engine.generate(long_prompt, SamplingParams(max_new_tokens=1, temperature=0))
        await anext(chunks)
        first = time.monotonic()
        await chunks.aclose()  # type: ignore[attr-defined]
        await task
        return long_prompt.input_tokens, sum(submitted < t < first for t in stamps)

    tokens, during = asyncio.run(scenario())
    assert tokens > 6000
    # One decode step after every chunk of 256 prompt tokens (a whole-prompt prefill would allow none).
    assert during >= tokens // 256 // 2


def test_requests_join_and_leave_a_running_batch(engine: MllamaEngine) -> None:
    """A short request started while a long one runs finishes first; the long one is unchanged."""
    long_turns = [Turn("user", "Tell me everything.")]
    greedy = SamplingParams(max_new_tokens=200, temperature=0)

    async def scenario() -> tuple[str, str, float, float, float]:
        alone, _ = await run(engine, long_turns, greedy)
        started = time.monotonic()
        long_task = asyncio.create_task(run(engine, long_turns, greedy))
        await asyncio.sleep(0.05)
        await run(engine, [Turn("user", "Hi")], SamplingParams(max_new_tokens=3, temperature=0))
        short_done = time.monotonic() - started
        batched, _ = await long_task
        return alone, batched, short_done, time.monotonic() - started, 0.0

    alone, batched, short_done, long_done, _ = asyncio.run(scenario())
    assert batched == alone
    assert short_done < long_done / 2


def test_vision_states_are_reused_and_change_nothing(test_model_dir: Path) -> None:
    engine = MllamaEngine.load(test_model_dir, test_model=True)
    cat = image((120, 80, 40), (800, 600))
    turns = [Turn("user", (cat, "What is this?"))]
    greedy = SamplingParams(max_new_tokens=30, temperature=0)
    first, _ = asyncio.run(run(engine, turns, greedy))
    assert engine.stats()["vision_cache_misses"] == 1
    again, _ = asyncio.run(run(engine, turns, greedy))
    assert again == first
    stats = engine.stats()
    assert stats["vision_cache_hits"] == 1 and stats["vision_cache_images"] == 1
    # A later turn with the same image: prepared without pixels, the same answer as with them.
    prompt = asyncio.run(engine.prepare(turns))
    assert "pixel_values" not in prompt.payload.inputs
    # Evicted between prepare and run: the scheduler makes the pixels itself.
    entry = engine.vision_cache.get(cat.digest)
    engine.vision_cache.put("other", entry)
    engine.vision_cache.max_size = engine.vision_cache.total // 2 + 1
    engine.vision_cache.put("other2", entry)
    assert engine.vision_cache.peek(cat.digest) is None

    async def late() -> str:
        return "".join([c.text async for c in engine.generate(prompt, greedy)])

    assert asyncio.run(late()) == first


def test_full_queue_is_refused_with_retry_after(test_model_dir: Path) -> None:
    engine = MllamaEngine.load(test_model_dir, test_model=True, limits=BatchLimits(max_batch=1, max_queued=1))
    turns = [Turn("user", "Go on and on.")]
    endless = SamplingParams(max_new_tokens=100_000, temperature=0)

    async def scenario() -> errors.ServiceError:
        prompt = await engine.prepare(turns)
        running = engine.generate(prompt, endless)
        await anext(running)  # in the batch
        queued = engine.generate(prompt, endless)
        queued_task = asyncio.create_task(anext(queued))
        await asyncio.sleep(0.1)
        assert engine.stats() | {} and engine.stats()["waiting"] == 1
        with pytest.raises(errors.ServiceError) as refused:
            await anext(engine.generate(prompt, endless))
        queued_task.cancel()
        await asyncio.gather(queued_task, return_exceptions=True)
        await queued.aclose()
        await running.aclose()
        return refused.value

    error = asyncio.run(scenario())
    assert (error.status, error.code) == (429, "Throttling")
    assert int(error.headers["Retry-After"]) >= 1
    deadline = time.monotonic() + 5
    while engine.active or engine.stats()["waiting"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_interactive_requests_go_before_background_ones_and_are_never_refused_for_them(test_model_dir: Path) -> None:
    """Batch lines (background) wait apart: a full batch and three lines waiting leave the one-place queue to
    interactive requests, and the interactive one waiting is admitted before any line though it came last."""
    engine = MllamaEngine.load(test_model_dir, test_model=True, limits=BatchLimits(max_batch=1, max_queued=1))
    turns = [Turn("user", "Go on and on.")]
    started: list[str] = []

    async def queued(until: Callable[[dict[str, Any]], bool]) -> None:
        """Wait (no fixed sleep: a loaded machine is slower) until the engine's queue is as ``until`` says."""
        deadline = time.monotonic() + 30
        while not until(engine.stats()):
            assert time.monotonic() < deadline, engine.stats()
            await asyncio.sleep(0.01)

    async def first_token(name: str, prompt: PreparedPrompt, is_background: bool) -> None:
        background.set(is_background)  # this task's own context, as a batch line's request has
        async for _ in engine.generate(prompt, SamplingParams(max_new_tokens=3, temperature=0)):
            started.append(name)
            break

    async def scenario() -> errors.ServiceError:
        prompt = await engine.prepare(turns)
        running = engine.generate(prompt, SamplingParams(max_new_tokens=100_000, temperature=0))
        await anext(running)  # the batch is full
        lines = [asyncio.create_task(first_token(f"line{i}", prompt, True)) for i in range(3)]
        await queued(lambda stats: stats["waiting_background"] == 3)  # the lines wait before the interactive comes
        interactive = asyncio.create_task(first_token("interactive", prompt, False))
        await queued(lambda stats: stats["waiting"] == 1)
        assert engine.stats()["waiting"] == 1 and engine.stats()["waiting_background"] == 3
        with pytest.raises(errors.ServiceError) as refused:  # the queue's one place is the interactive one's
            await anext(engine.generate(prompt, SamplingParams(max_new_tokens=1)))
        await running.aclose()
        await asyncio.gather(interactive, *lines)
        return refused.value

    assert asyncio.run(scenario()).code == "Throttling"
    assert started == ["interactive", "line0", "line1", "line2"]


def test_background_requests_leave_the_batch_a_place_for_an_interactive_one(test_model_dir: Path) -> None:
    """With two places and one taken, a batch line waits: the interactive request that comes runs at once."""
    engine = MllamaEngine.load(test_model_dir, test_model=True, limits=BatchLimits(max_batch=2))
    endless = SamplingParams(max_new_tokens=100_000, temperature=0)

    async def scenario() -> tuple[int, int]:
        prompt = await engine.prepare([Turn("user", "Go on and on.")])
        running = engine.generate(prompt, endless)
        await anext(running)
        background.set(True)
        lines = engine.generate(prompt, endless)
        line = asyncio.create_task(anext(lines))
        background.set(False)
        await asyncio.sleep(0.3)
        waiting = engine.stats()["waiting_background"]
        interactive = engine.generate(prompt, endless)
        await asyncio.wait_for(anext(interactive), 30)  # in the place kept free
        await interactive.aclose()
        await running.aclose()
        await asyncio.wait_for(line, 30)  # the line runs once the batch has room again
        await lines.aclose()
        return waiting, engine.stats()["waiting_background"]

    assert asyncio.run(scenario()) == (1, 0)


def test_the_queue_holds_what_fits_in_its_memory(test_model_dir: Path) -> None:
    """Waiting requests are counted at what they hold: many small ones wait where one image's pixels do not fit."""
    engine = MllamaEngine.load(
        test_model_dir, test_model=True, limits=BatchLimits(max_batch=1, max_queued_bytes=8 * 1024 * 1024)
    )

    async def scenario() -> tuple[int, int, errors.ServiceError]:
        text = await engine.prepare([Turn("user", "Go on and on.")])
        big = await engine.prepare([Turn("user", (image((1, 2, 3), (1120, 840)), "And this?"))])  # four tiles of pixels
        running = engine.generate(text, SamplingParams(max_new_tokens=100_000, temperature=0))
        await anext(running)
        waiting = [engine.generate(text, SamplingParams(max_new_tokens=1, temperature=0)) for _ in range(12)]
        tasks = [asyncio.create_task(anext(w)) for w in waiting]  # each about 0.5 MB: 12 fit in 8 MB
        await asyncio.sleep(0.2)
        queued, held = engine.stats()["waiting"], engine.scheduler.waiting_bytes
        with pytest.raises(errors.ServiceError) as refused:
            await anext(engine.generate(big, SamplingParams(max_new_tokens=1)))  # 15 MB of pixel tensors
        await running.aclose()
        await asyncio.gather(*tasks)
        for w in waiting:
            await w.aclose()
        return queued, held, refused.value

    queued, held, error = asyncio.run(scenario())
    assert queued == 12 and 12 * 512 * 1024 <= held < 8 * 1024 * 1024
    assert (error.status, error.code) == (429, "Throttling")
    assert engine.scheduler.waiting_bytes == 0


def test_waiting_too_long_is_a_timeout(test_model_dir: Path) -> None:
    engine = MllamaEngine.load(
        test_model_dir, test_model=True, limits=BatchLimits(max_batch=1, max_queued=4, max_queue_wait=0.3)
    )
    turns = [Turn("user", "Go on and on.")]

    async def scenario() -> tuple[errors.ServiceError, float]:
        prompt = await engine.prepare(turns)
        running = engine.generate(prompt, SamplingParams(max_new_tokens=100_000, temperature=0))
        await anext(running)
        started = time.monotonic()
        with pytest.raises(errors.ServiceError) as late:
            await anext(engine.generate(prompt, SamplingParams(max_new_tokens=5)))
        waited = time.monotonic() - started
        await running.aclose()
        return late.value, waited

    error, waited = asyncio.run(scenario())
    assert (error.status, error.code) == (408, "RequestTimeOut")
    assert 0.3 <= waited < 3


def test_token_budget_keeps_requests_waiting(test_model_dir: Path) -> None:
    """Requests whose prompts and answers would not fit together wait; they are served, one after another."""
    engine = MllamaEngine.load(test_model_dir, test_model=True, limits=BatchLimits(max_batch_tokens=300))
    turns = [Turn("user", "Count.")]
    sampling = SamplingParams(max_new_tokens=200, temperature=0)

    async def scenario() -> int:
        results, peak = await most_active(engine, *(run(engine, turns, sampling) for _ in range(3)))
        assert all(chunks[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH) for _, chunks in results)
        return peak

    assert asyncio.run(scenario()) == 1


def test_a_batch_lines_image_is_encoded_off_the_model_thread_with_the_same_answer(test_model_dir: Path) -> None:
    """On the CPU, while interactive traffic is about, a batch line's image goes through the vision tower on the
    line-images thread before the line is admitted (an interactive request need not wait for it); with batch
    lines alone, in its prefill on the model thread. Either way the answer is the one it gets alone."""
    turns = [Turn("user", (image((30, 160, 90), (640, 480)), "What is this?"))]
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    alone, _ = asyncio.run(run(MllamaEngine.load(test_model_dir, test_model=True), turns, greedy))
    engine = MllamaEngine.load(test_model_dir, test_model=True)
    encoded_on: list[str] = []
    tower_call = engine.scheduler.encoder._encode

    def watched(images: Any) -> Any:
        encoded_on.append(threading.current_thread().name)
        return tower_call(images)

    engine.scheduler.encoder._encode = watched  # type: ignore[method-assign]

    async def line(about: bool) -> str:
        if about:  # an interactive request about another image, decoding while the line comes
            talk = [Turn("user", (image((200, 10, 10), (640, 480)), "Describe it."))]
            prompt = await engine.prepare(talk)
            stream = engine.generate(prompt, SamplingParams(max_new_tokens=400, min_new_tokens=400))
            await anext(stream)
        background.set(True)
        answer = (await run(engine, turns, greedy))[0]
        if about:
            await stream.aclose()
        return answer

    assert asyncio.run(line(about=False)) == alone
    assert encoded_on == ["llamascope-generate"]
    engine.scheduler.encoder.cache.clear()
    encoded_on.clear()
    assert asyncio.run(line(about=True)) == alone
    assert encoded_on == ["llamascope-generate", "llamascope-line-images"]
