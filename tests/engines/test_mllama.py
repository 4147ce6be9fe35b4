"""The in-process engine on the built-in model, driven directly (no HTTP)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from PIL import Image

from llamascope import errors
from llamascope.engines.base import FinishReason, SamplingParams, Turn
from llamascope.engines.mllama import MllamaEngine, ModelLoadError, _IncrementalText, check_model_dir
from llamascope.images import PreparedImage


def prepared(color: tuple[int, int, int]) -> PreparedImage:
    return PreparedImage(
        Image.new("RGB", (600, 400), color), digest=str(color), format="PNG", source_width=600, source_height=400
    )


RED = prepared((200, 30, 30))


@pytest.fixture(scope="module")
def engine(test_model_dir: Path) -> MllamaEngine:
    return MllamaEngine.load(test_model_dir, test_model=True)


async def collect(engine: MllamaEngine, turns: list[Turn], sampling: SamplingParams) -> tuple[str, list]:
    prompt = await engine.prepare(turns)
    chunks = [c async for c in engine.generate(prompt, sampling)]
    return "".join(c.text for c in chunks), chunks


def test_prepare_counts_tokens(engine: MllamaEngine) -> None:
    prompt = asyncio.run(engine.prepare([Turn("user", "What is this?", RED)]))
    assert prompt.image_tokens == 6404
    expected = engine.tokenizer(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>What is this?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        add_special_tokens=False,
    ).input_ids
    assert prompt.input_tokens == len(expected)
    assert prompt.max_new_tokens == 8192 - len(expected)


def test_greedy_is_deterministic_and_sees_the_image(engine: MllamaEngine) -> None:
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    a, chunks = asyncio.run(collect(engine, [Turn("user", "Describe.", RED)], greedy))
    b, _ = asyncio.run(collect(engine, [Turn("user", "Describe.", RED)], greedy))
    c, _ = asyncio.run(collect(engine, [Turn("user", "Describe.", prepared((0, 0, 255)))], greedy))
    assert a == b != c
    assert chunks[-1].finish_reason == FinishReason.LENGTH and chunks[-1].output_tokens == 10
    assert [ch.finish_reason for ch in chunks[:-1]] == [None] * (len(chunks) - 1)


def test_seeded_sampling_repeats(engine: MllamaEngine) -> None:
    turns = [Turn("user", "Describe.", RED)]
    run = lambda seed: asyncio.run(collect(engine, turns, SamplingParams(max_new_tokens=10, seed=seed)))[0]  # noqa: E731
    assert run(1) == run(1) != run(2)


def test_context_limit(test_model_dir: Path) -> None:
    small = MllamaEngine.load(test_model_dir, context_length=40, test_model=True)
    turns = [Turn("user", "Describe.", RED)]
    _text, chunks = asyncio.run(collect(small, turns, SamplingParams(max_new_tokens=512, temperature=0)))
    prompt = asyncio.run(small.prepare(turns))
    assert chunks[-1].output_tokens == 40 - prompt.input_tokens
    assert chunks[-1].finish_reason == FinishReason.LENGTH
    with pytest.raises(errors.ServiceError, match=r"Range of input length should be \[1, 39\]"):
        asyncio.run(small.prepare([Turn("user", "dog " * 50, RED)]))
    # A prompt far too long is refused without tokenising it.
    with pytest.raises(errors.ServiceError, match="Range of input length"):
        asyncio.run(small.prepare([Turn("user", "x" * 5_000_000, RED)]))


def test_cancel_frees_the_model_within_a_step(engine: MllamaEngine) -> None:
    async def scenario() -> tuple[int, float]:
        prompt = await engine.prepare([Turn("user", "Describe.", RED)])
        stream = engine.generate(prompt, SamplingParams(max_new_tokens=4000, temperature=0))
        got = 0
        async for chunk in stream:
            got = chunk.output_tokens
            if got >= 3:
                break
        await stream.aclose()
        closed = time.monotonic()
        while engine.active:
            await asyncio.sleep(0.005)
            assert time.monotonic() - closed < 5, "generation kept running after cancel"
        # The next request runs at once: the model thread is free.
        _text, chunks = await collect(engine, [Turn("user", "Next.", RED)], SamplingParams(max_new_tokens=2))
        return chunks[-1].output_tokens, time.monotonic() - closed

    produced, _ = asyncio.run(scenario())
    assert produced == 2
    assert engine.active == 0


def test_incremental_text_never_splits_characters(engine: MllamaEngine) -> None:
    text = "狗🐶 dog, 这是什么?"
    ids = engine.tokenizer(text, add_special_tokens=False).input_ids
    inc = _IncrementalText(engine.tokenizer)
    pieces = [inc.add([i]) for i in ids] + [inc.add([], final=True)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_incremental_text_is_the_whole_decode(engine: MllamaEngine) -> None:
    """Random ids (the built-in model's kind of answer: special tokens, bytes of split characters), fed one
    to three at a time, as a step or a backlog delivers them, join to what decoding them all at once gives."""
    import random

    rng = random.Random(0)
    tokenizer = engine.tokenizer
    for _ in range(100):
        ids = [rng.randrange(len(tokenizer)) for _ in range(60)]
        inc = _IncrementalText(tokenizer)
        pieces, i = [], 0
        while i < len(ids):
            n = rng.choice([1, 1, 2, 3])
            pieces.append(inc.add(ids[i : i + n]))
            i += n
        pieces.append(inc.add([], final=True))
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    inc = _IncrementalText(tokenizer)  # half a character at the end: U+FFFD, as decode gives it
    half = tokenizer("🐶", add_special_tokens=False).input_ids[:-1]
    assert half
    assert inc.add(half) == "" and inc.add([], final=True) == tokenizer.decode(half)


def test_load_errors_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        check_model_dir(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="text-only model"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "vision_config": {}}))
    with pytest.raises(ModelLoadError, match="vision-language model of type 'qwen2_vl'"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mllama"}))
    with pytest.raises(ModelLoadError, match="no weights"):
        check_model_dir(tmp_path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("size", [(4000, 3000), (3000, 4000), (5000, 1000), (1000, 5000), (1500, 1500), (2500, 700)])
def test_decoding_at_the_model_size_changes_nothing_the_model_sees(
    engine: MllamaEngine, size: tuple[int, int], fmt: str
) -> None:
    """Intake shrinks big images to the size the processor would resize them to: same tiles, same canvas."""
    import io

    import numpy as np

    from llamascope.images.decode import DecodeLimits, decode_image

    w, h = size
    gradient = np.zeros((h, w, 3), dtype=np.uint8)
    gradient[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    gradient[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    original = Image.fromarray(gradient)
    buf = io.BytesIO()
    original.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    original = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")  # what the stock path decodes
    shrunk = decode_image(buf.getvalue(), DecodeLimits(), engine.image_size).image
    assert max(shrunk.size) < max(size)
    ip = engine.processor.image_processor
    a, b = ip(images=[[original]], return_tensors="np"), ip(images=[[shrunk]], return_tensors="np")
    assert (a["aspect_ratio_ids"] == b["aspect_ratio_ids"]).all()
    assert (a["aspect_ratio_mask"] == b["aspect_ratio_mask"]).all()
    assert np.abs(a["pixel_values"] - b["pixel_values"]).mean() < 0.02


def test_model_inputs_equal_the_stock_processor(engine: MllamaEngine) -> None:
    import numpy as np

    prompt = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<|image|>What is this?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 1300, 3), dtype=np.uint8))
    ours = engine._model_inputs(prompt, [PreparedImage(image, "noise", "PNG", 1300, 700)])
    theirs = engine.processor(images=[[image]], text=[prompt], add_special_tokens=False, return_tensors="pt")
    assert set(ours) == set(theirs)
    for name in theirs:
        if name == "pixel_values":
            assert np.allclose(ours[name].numpy(), theirs[name].numpy(), atol=1e-5)
        else:
            assert (ours[name] == theirs[name]).all(), name
