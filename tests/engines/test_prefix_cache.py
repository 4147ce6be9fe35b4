"""Prefix reuse: later turns take the keys and values of the history from the pool and answer as without it.

Real Mllama classes on the built-in model (float32), greedy decoding: an engine with a pool and one
without (``prefix_cache_bytes=0``) must give the same answers token for token, at batch sizes 1 and 4,
with and without an image, and with a pool so small it evicts all the time. The pool itself is driven
with real tensors for what the engine cannot show from outside (a held block is never evicted).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from llamascope.engines.base import SamplingParams, Turn
from llamascope.engines.mllama import MllamaEngine
from llamascope.engines.prefix_cache import PrefixCache
from llamascope.images import PreparedImage
from tests.conftest import SEED_MODEL, Server, png_bytes

GREEDY = SamplingParams(max_new_tokens=20, min_new_tokens=20, temperature=0)
STOCK = {"max_new_tokens": 20, "min_new_tokens": 20, "do_sample": False}
QUESTIONS = ["What is in the picture?", "Tell me more about it.", "And the colours?"]


def image(color: tuple[int, int, int], size: tuple[int, int] = (600, 400)) -> PreparedImage:
    return PreparedImage(Image.new("RGB", size, color), f"prefix{color}{size}", "PNG", *size)


@pytest.fixture(scope="module")
def plain(test_model_dir: Path) -> MllamaEngine:
    return MllamaEngine.load(test_model_dir, test_model=True, prefix_cache_bytes=0)


@pytest.fixture(scope="module")
def reusing(test_model_dir: Path) -> MllamaEngine:
    return MllamaEngine.load(test_model_dir, test_model=True, prefix_cache_bytes=64 << 20)


def block_bytes(engine: MllamaEngine) -> int:
    """One block's bytes on this model: every self-attention layer's keys and values for its tokens."""
    text = engine.model.config.text_config
    layers = text.num_hidden_layers - len(text.cross_attention_layers)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return layers * 2 * text.num_key_value_heads * engine.prefix_cache.block_tokens * head_dim * 4


@pytest.fixture(scope="module")
def tiny(test_model_dir: Path, plain: MllamaEngine) -> MllamaEngine:
    """A pool of six blocks: a conversation's history overflows it, so it evicts in every test."""
    return MllamaEngine.load(test_model_dir, test_model=True, prefix_cache_bytes=6 * block_bytes(plain))


async def answer(engine: MllamaEngine, turns: list[Turn], sampling: SamplingParams = GREEDY) -> tuple[str, int]:
    prompt = await engine.prepare(turns)
    chunks = [c async for c in engine.generate(prompt, sampling)]
    return "".join(c.text for c in chunks), chunks[-1].output_tokens


async def conversation(engine: MllamaEngine, opening: str, picture: PreparedImage | None) -> list[tuple[str, int]]:
    """Three turns, each sending the whole history; the answers, and the pool's bound checked after each."""
    turns: list[Turn] = []
    answers = []
    for n, question in enumerate(QUESTIONS):
        turns.append(Turn("user", (picture, f"{opening} {question}") if n == 0 else f"{opening} {question}"))
        text, tokens = await answer(engine, turns)
        assert engine.prefix_cache.bytes <= engine.prefix_cache.max_bytes
        answers.append((text, tokens))
        turns.append(Turn("assistant", text))
    return answers


def conversations(engine: MllamaEngine, count: int, picture: PreparedImage | None) -> list[list[tuple[str, int]]]:
    async def scenario() -> list[list[tuple[str, int]]]:
        return list(await asyncio.gather(*(conversation(engine, f"Person {i}.", picture) for i in range(count))))

    return asyncio.run(scenario())


@pytest.mark.slow
@pytest.mark.parametrize("picture", [None, image((200, 30, 30))], ids=["text", "image"])
@pytest.mark.parametrize("count", [1, 4], ids=["alone", "batched"])
@pytest.mark.parametrize("pool", ["reusing", "tiny"], ids=["large pool", "evicting pool"])
def test_answers_with_reuse_equal_answers_without(
    request: pytest.FixtureRequest, plain: MllamaEngine, pool: str, count: int, picture: PreparedImage | None
) -> None:
    engine: MllamaEngine = request.getfixturevalue(pool)
    if pool == "tiny":  # another image's blocks fill the pool: the conversation's must evict them
        asyncio.run(answer(engine, [Turn("user", (image((1, 1, 1)), "Fill the pool. " * 8))]))
    before = engine.prefix_cache.stats()
    expected = conversations(plain, count, picture)
    got = conversations(engine, count, picture)
    assert got == expected
    after = engine.prefix_cache.stats()
    assert after["prefix_cache_held_blocks"] == 0  # every request gave its blocks back
    assert plain.prefix_cache.stats()["prefix_cache_tokens_reused"] == 0
    if pool == "reusing":  # every later turn found its history
        assert after["prefix_cache_hits"] - before["prefix_cache_hits"] >= count * (len(QUESTIONS) - 1)
    else:  # four conversations at once churn six blocks too fast to find much; one alone reuses across eviction
        assert after["prefix_cache_evicted"] > before["prefix_cache_evicted"]
        assert after["prefix_cache_bytes"] <= after["prefix_cache_max_bytes"]
    if pool == "reusing" or count == 1:
        assert after["prefix_cache_tokens_reused"] > before["prefix_cache_tokens_reused"]


@pytest.mark.slow
def test_another_image_or_none_reuses_nothing(reusing: MllamaEngine, plain: MllamaEngine) -> None:
    """The same words about another image, or about none, have other keys and values: nothing of the first
    request is taken (a text-only request may take only what every text-only prompt starts with)."""
    words = "Which animal is this, and what is it doing here?"
    first = [Turn("user", (image((10, 200, 10)), words))]
    asyncio.run(answer(reusing, first))
    again = reusing.prefix_cache.stats()["prefix_cache_tokens_reused"]
    asyncio.run(answer(reusing, first))  # the same image: its whole prompt but the last block is taken
    assert reusing.prefix_cache.stats()["prefix_cache_tokens_reused"] > again

    def ids(turns: list[Turn]) -> list[int]:
        return asyncio.run(reusing.prepare(turns)).payload.inputs["input_ids"][0].tolist()

    text_only, other = ids([Turn("user", words)]), ids([Turn("user", "Something else entirely")])
    common = next(i for i, (a, b) in enumerate(zip(text_only, other, strict=False)) if a != b)
    for picture, most in [(image((10, 10, 200)), 0), (None, common)]:
        turns = [Turn("user", (picture, words) if picture else words)]
        before = reusing.prefix_cache.stats()["prefix_cache_tokens_reused"]
        assert asyncio.run(answer(reusing, turns)) == asyncio.run(answer(plain, turns))
        assert reusing.prefix_cache.stats()["prefix_cache_tokens_reused"] - before <= most


@pytest.mark.slow
def test_pool_stays_within_its_bytes_under_concurrent_load(tiny: MllamaEngine, plain: MllamaEngine) -> None:
    """Six conversations at once on a six-block pool: after every request the pool holds at most its bound
    (``conversation`` checks it after each turn), and the answers are those without reuse."""
    pictures = [image((40 * i, 90, 200 - 20 * i)) if i % 2 else None for i in range(6)]

    async def load(engine: MllamaEngine) -> list[list[tuple[str, int]]]:
        return list(await asyncio.gather(*(conversation(engine, f"Load {i}.", p) for i, p in enumerate(pictures))))

    assert asyncio.run(load(tiny)) == asyncio.run(load(plain))
    assert tiny.prefix_cache.bytes <= tiny.prefix_cache.max_bytes
    assert tiny.prefix_cache.stats()["prefix_cache_held_blocks"] == 0


def kv(layers: int, tokens: int, fill: float) -> list[tuple[Any, Any]]:
    import torch

    return [(torch.full((2, tokens, 8), fill), torch.full((2, tokens, 8), -fill)) for _ in range(layers)]


def test_held_blocks_are_never_evicted_and_the_prefix_is_exact() -> None:
    per_block = 3 * 2 * 2 * 4 * 8 * 4  # layers, keys and values, heads, tokens, dim, float32
    pool = PrefixCache(5 * per_block, block_tokens=4)
    ids = list(range(100, 113))  # three full blocks and one token
    pool.store(ids, "a", kv(3, 13, 1.0))
    assert pool.bytes == 3 * per_block
    lease = pool.take([*ids, 7], "a")
    assert lease.tokens == 12 and len(lease.layers) == 3
    assert lease.layers[0][0].shape == (1, 2, 12, 8) and float(lease.layers[0][1][0, 0, 11, 0]) == -1.0
    assert pool.take(ids[:12], "a").tokens == 8  # the last token is left to prefill
    assert pool.take(ids, "b").tokens == 0 and pool.take(ids, None).tokens == 0  # another image: nothing
    # Others' blocks come and go; the held ones stay, and a block that cannot fit is not kept.
    for n in range(6):
        pool.store([n] * 8, None, kv(3, 8, 2.0))
        assert pool.bytes <= pool.max_bytes
    assert pool.take(ids, "a").tokens == 12
    pool.give_back(lease)
    pool.give_back(pool.take(ids, "a"))  # (the two takes above without give_back still hold them)
    assert pool.stats()["prefix_cache_evicted"] >= 4


def test_the_next_turn_takes_the_prompt_and_the_answer_as_far_as_they_match(reusing: MllamaEngine) -> None:
    """Turn 2 takes exactly the full blocks that turn 1's prompt and answer share with it: the answer's tokens as
    the model made them, up to the first one the tokenizer makes otherwise from the answer's text (the built-in
    model's random words often are not what the tokenizer makes; a trained model's are)."""
    import torch

    turns = [Turn("user", "Person 9. Tell me everything about the weather today.")]
    first = asyncio.run(reusing.prepare(turns)).payload.inputs["input_ids"]
    with torch.inference_mode():  # the answer's token ids, as stock generate makes them (ours are the same)
        stock = reusing.model.generate(input_ids=first, attention_mask=torch.ones_like(first), **STOCK)
    made = stock[0, first.shape[1] :].tolist()
    text, _ = asyncio.run(answer(reusing, turns))
    assert text == reusing.tokenizer.decode(made, skip_special_tokens=True)
    turns += [Turn("assistant", text), Turn("user", "And tomorrow?")]
    second = asyncio.run(reusing.prepare(turns)).payload.inputs["input_ids"][0].tolist()
    kept = first[0].tolist() + made[:-1]  # the last token made has no keys and values
    common = next((i for i, (a, b) in enumerate(zip(kept, second, strict=False)) if a != b), len(kept))
    block = reusing.prefix_cache.block_tokens
    before = reusing.prefix_cache.stats()["prefix_cache_tokens_reused"]
    asyncio.run(answer(reusing, turns))
    reused = reusing.prefix_cache.stats()["prefix_cache_tokens_reused"] - before
    assert reused == min(common, len(second) - 1) // block * block
    assert reused >= first.shape[1] // block * block


def noise(seed: int, size: tuple[int, int]) -> PreparedImage:
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return PreparedImage(Image.fromarray(pixels), f"noise{seed}{size}", "PNG", *size)


SHORT = SamplingParams(max_new_tokens=8, min_new_tokens=8, temperature=0)


def stock_answer(engine: MllamaEngine, turns: list[Turn]) -> str:
    """transformers' own MllamaProcessor and generate on the prompt the engine renders, greedy."""
    import torch

    ids = asyncio.run(engine.prepare(turns)).payload.inputs["input_ids"]
    images = [image for turn in turns for image in turn.images]
    inputs = engine.processor(
        images=[[i.image for i in images]],
        text=[engine.tokenizer.decode(ids[0])],
        add_special_tokens=False,
        return_tensors="pt",
    )
    assert (inputs["input_ids"] == ids).all()
    with torch.inference_mode():
        out = engine.model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    return str(engine.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


@pytest.mark.slow
def test_a_second_image_later_leaves_the_first_turn_as_it_was(reusing: MllamaEngine, plain: MllamaEngine) -> None:
    """Turn 1 about image A, turn 2 adds image B: turn 2 answers as stock generate does on both images (greedy,
    float32), takes none of turn 1's blocks (its every token sees B too), and turn 1 replayed afterwards answers
    token for token as before. Two images side by side in one message answer as stock generate too."""
    a, b = noise(1, (320, 240)), noise(2, (1120, 400))  # one tile, two tiles
    turn1 = [Turn("user", (a, "What is this?"))]
    first = asyncio.run(answer(reusing, turn1, SHORT))
    turn2 = [*turn1, Turn("assistant", first[0]), Turn("user", ("And", b, "this?"))]
    before = reusing.prefix_cache.stats()["prefix_cache_tokens_reused"]
    second = asyncio.run(answer(reusing, turn2, SHORT))
    assert reusing.prefix_cache.stats()["prefix_cache_tokens_reused"] == before
    assert second[0] == stock_answer(reusing, turn2)
    assert asyncio.run(answer(reusing, turn1, SHORT)) == first
    side_by_side = [Turn("user", (b, a, "Compare them."))]

    async def batched() -> list[tuple[str, int]]:  # beside a one-image request: its rows padded to more tiles
        requests = (side_by_side, turn1, turn2)
        return list(await asyncio.gather(*(answer(plain, turns, SHORT) for turns in requests)))

    together = asyncio.run(batched())
    assert together[0][0] == stock_answer(plain, side_by_side)
    assert together[1:] == [first, second]


@pytest.mark.slow
def test_the_next_turn_about_several_images_answers_as_stock_generate(reusing: MllamaEngine) -> None:
    """Turn 2 of a conversation about three images (one, two and four tiles), no new image: its history is taken
    past the images, so the rest of its prompt runs without a cross-attention mask, on the tiles it attends to
    alone, and answers as stock generate does (greedy, float32)."""
    pictures = (noise(3, (320, 240)), noise(4, (1120, 400)), noise(5, (1120, 840)))
    turn1 = [Turn("user", (*pictures, "Compare them."))]
    first = asyncio.run(answer(reusing, turn1, SHORT))
    turn2 = [*turn1, Turn("assistant", first[0]), Turn("user", "Which is brighter?")]
    masks: list[bool] = []  # each prefill forward: whether it had a cross-attention mask

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if kwargs["input_ids"].shape[1] > 1:
            masks.append(kwargs.get("cross_attention_mask") is not None)

    handle = reusing.model.register_forward_pre_hook(hook, with_kwargs=True)
    before = reusing.prefix_cache.stats()["prefix_cache_tokens_reused"]
    try:
        second = asyncio.run(answer(reusing, turn2, SHORT))
    finally:
        handle.remove()
    assert reusing.prefix_cache.stats()["prefix_cache_tokens_reused"] > before
    assert masks == [False]
    assert second[0] == stock_answer(reusing, turn2)


def test_the_same_words_about_other_images_share_no_block(reusing: MllamaEngine) -> None:
    """Blocks are keyed by every image of the prompt, in order: another second image, the same two the other way
    round, or the first alone take nothing of a two-image prompt's blocks; the same two again take its prefix."""
    words = "Compare the two pictures, please, in every detail you can see."
    a, b, c = image((1, 2, 3)), image((200, 2, 3)), image((1, 200, 3))

    def reused(*pictures: PreparedImage) -> int:
        before = reusing.prefix_cache.stats()["prefix_cache_tokens_reused"]
        asyncio.run(answer(reusing, [Turn("user", (*pictures, words))], SamplingParams(max_new_tokens=1)))
        return int(reusing.prefix_cache.stats()["prefix_cache_tokens_reused"] - before)

    assert reused(a, b) == 0
    assert [reused(a, c), reused(b, a), reused(a)] == [0, 0, 0]
    assert reused(a, b) > 0


def test_turn_n_reuses_turn_n_minus_1_through_the_server(server: Server) -> None:
    """A conversation through the real server: each turn's prompt takes the previous turn's prompt from the pool
    (and its answer as far as it matches, as the test above shows), as /health counts."""

    def health() -> dict[str, int]:
        stats: dict[str, int] = httpx.get(server.base + "/health", timeout=5).json()["models"][SEED_MODEL]
        return stats

    url = "data:image/png;base64," + __import__("base64").b64encode(png_bytes((1, 2, 3), (300, 200))).decode()
    messages: list[dict[str, Any]] = []
    previous = 0  # the previous turn's prompt tokens
    for n in range(4):
        content: list[dict[str, str]] = [{"text": f"Question {n}: what else do you see?"}]
        if n == 0:
            content.insert(0, {"image": url})
        messages.append({"role": "user", "content": content})
        before = health()
        response = httpx.post(
            server.api + "/services/aigc/multimodal-generation/generation",
            headers={"Authorization": f"Bearer {server.key}"},
            json={
                "model": SEED_MODEL,
                "input": {"messages": messages},
                "parameters": {"max_tokens": 40, "temperature": 0, "result_format": "message"},
            },
            timeout=60,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        after = health()
        reused = after["prefix_cache_tokens_reused"] - before["prefix_cache_tokens_reused"]
        if n:
            assert after["prefix_cache_hits"] == before["prefix_cache_hits"] + 1
            assert reused >= previous // 16 * 16, (reused, previous)  # all but the last, partial block
        assert after["prefix_cache_bytes"] <= after["prefix_cache_max_bytes"]
        usage = body["usage"]
        previous = usage["input_tokens"]
        text = body["output"]["choices"][0]["message"]["content"][0]["text"]
        messages.append({"role": "assistant", "content": [{"text": text}]})
