"""The text-only Llama engine on the shared batching scheduler, with real LlamaForCausalLM weights.

The built-in text model is built like Llama-3.1-8B-Instruct (its classes, special ids and chat format);
its answers are random, which is all these checks need: the same tokens as transformers' own generate,
batched or alone, and a request that leaves frees its place.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, LlamaForCausalLM

from llamascope.engines.base import ModelLoadError, SamplingParams, Turn
from llamascope.engines.builtin_model import is_test_model
from llamascope.engines.llama_text import LlamaTextEngine
from llamascope.engines.requests import BatchLimits
from tests.engines.helpers import run


@pytest.fixture(scope="module")
def engine(text_model_dir: Path) -> LlamaTextEngine:
    return LlamaTextEngine.load(text_model_dir, test_model=True, limits=BatchLimits(prefill_chunk=16))


def test_built_like_llama_3_1(text_model_dir: Path) -> None:
    config = json.loads((text_model_dir / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert config["vocab_size"] == 128256 and config["eos_token_id"] == [128001, 128008, 128009]
    tok = AutoTokenizer.from_pretrained(text_model_dir)
    assert len(tok) == 128256 and tok.convert_tokens_to_ids("<|eot_id|>") == 128009
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
        date_string="26 Jul 2024",
    )
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert is_test_model(text_model_dir)


REQUESTS = [
    ([Turn("user", "Hello there")], SamplingParams(max_new_tokens=30, min_new_tokens=30, temperature=0)),
    (
        [Turn("system", "Be brief."), Turn("user", "Count to ten please, slowly and carefully " * 3)],
        SamplingParams(max_new_tokens=12, min_new_tokens=12, temperature=0),
    ),
    ([Turn("user", "x y z " * 20)], SamplingParams(max_new_tokens=20, temperature=0.7, top_k=20, seed=3)),
]


def test_answers_equal_transformers_generate_alone_and_batched(engine: LlamaTextEngine) -> None:
    """Prompts prefilled 16 tokens at a time, then decoded in one batch, left-padded: stock generate's tokens."""
    import torch

    turns = REQUESTS[1][0]
    ids = asyncio.run(engine.prepare(turns)).payload.inputs["input_ids"]
    assert ids.shape[1] > 16  # more than one prefill chunk
    with torch.inference_mode():
        stock = engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    expected = engine.tokenizer.decode(stock[0, ids.shape[1] :], skip_special_tokens=True)

    async def scenario() -> tuple[list[str], list[str], int]:
        alone = [(await run(engine, t, s))[0] for t, s in REQUESTS]
        steps = engine.scheduler.steps
        together = [text for text, _ in await asyncio.gather(*(run(engine, t, s) for t, s in REQUESTS))]
        return alone, together, engine.scheduler.steps - steps

    alone, together, steps = asyncio.run(scenario())
    assert alone[1] == expected
    assert together == alone
    assert steps < 30 + 12 + 20  # they decoded together


def test_a_cancelled_request_leaves_the_batch(engine: LlamaTextEngine) -> None:
    async def scenario() -> tuple[int, str]:
        prompt = await engine.prepare([Turn("user", "Go on for ever")])
        stream = engine.generate(prompt, SamplingParams(max_new_tokens=2000, min_new_tokens=2000, temperature=0))
        async for chunk in stream:
            if chunk.output_tokens >= 3:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        for _ in range(200):
            if engine.scheduler.active == 0:
                break
            await asyncio.sleep(0.01)
        return engine.scheduler.active, (await run(engine, *REQUESTS[0]))[0]

    active, after = asyncio.run(scenario())
    assert active == 0 and after


def test_token_ids_are_the_prompt_the_model_runs(engine: LlamaTextEngine) -> None:
    prompt = asyncio.run(engine.prepare([Turn("user", "Hi")]))
    ids, tokens = engine.tokens(prompt)
    assert len(ids) == prompt.input_tokens == len(tokens)
    assert ids[0] == 128000 and "".join(tokens) == engine.tokenizer.decode(ids)
    assert "".join(tokens).endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert engine.info.takes_images is False and "vision_cache_images" not in engine.stats()


def test_load_errors_say_what_is_wrong(tmp_path: Path, text_model_dir: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mllama"}))
    with pytest.raises(ModelLoadError, match="has model_type 'mllama'"):
        LlamaTextEngine.load(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (bare / name).write_bytes((text_model_dir / name).read_bytes())
    with pytest.raises(ModelLoadError, match="has no chat template"):
        LlamaTextEngine.load(bare)
    assert isinstance(LlamaTextEngine.load(text_model_dir).model, LlamaForCausalLM)


def test_vision_model_text_only_answers_as_transformers_generate(test_model_dir: Path) -> None:
    """A text-only conversation on Llama 3.2 Vision runs its text model without an image (the cross-attention
    layers skipped), as stock generate does without pixel values; batched with an image request, the same."""
    import torch
    from PIL import Image

    from llamascope.engines.mllama import MllamaEngine
    from llamascope.images import PreparedImage

    vision = MllamaEngine.load(test_model_dir, test_model=True)
    turns = [Turn("system", "Be brief."), Turn("user", "Tell me about the sea")]
    greedy = SamplingParams(max_new_tokens=16, min_new_tokens=16, temperature=0)
    ids = asyncio.run(vision.prepare(turns)).payload.inputs["input_ids"]
    with torch.inference_mode():
        stock = vision.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    expected = vision.tokenizer.decode(stock[0, ids.shape[1] :], skip_special_tokens=True)
    picture = PreparedImage(Image.new("RGB", (300, 200), (9, 99, 9)), "green", "PNG", 300, 200)

    async def scenario() -> tuple[str, str]:
        alone, _ = await run(vision, turns, greedy)
        (batched, _), _ = await asyncio.gather(
            run(vision, turns, greedy), run(vision, [Turn("user", (picture, "And this?"))], greedy)
        )
        return alone, batched

    assert asyncio.run(scenario()) == (expected, expected)
