"""The paths to fit real weights in less memory: bf16, and 4-bit NF4 or 8-bit through bitsandbytes.

The built-in model stands in for the real weights: same classes, same loading code.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from PIL import Image

from llamascope.engines.base import SamplingParams, Turn
from llamascope.engines.mllama import MllamaEngine
from llamascope.images import PreparedImage

IMAGE = PreparedImage(Image.new("RGB", (600, 400), (10, 120, 200)), "blue", "PNG", 600, 400)


async def answer(engine: MllamaEngine, tokens: int = 12) -> tuple[str, int]:
    prompt = await engine.prepare([Turn("user", (IMAGE, "What is this?"))])
    sampling = SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0)
    chunks = [c async for c in engine.generate(prompt, sampling)]
    return "".join(c.text for c in chunks), chunks[-1].output_tokens


def footprint(engine: MllamaEngine) -> int:
    return int(engine.model.get_memory_footprint())


@pytest.mark.slow
def test_bf16_and_nf4_load_and_generate(test_model_dir: Path) -> None:
    import torch

    full = MllamaEngine.load(test_model_dir)
    half = MllamaEngine.load(test_model_dir, dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16
    assert footprint(half) < 0.55 * footprint(full)
    text, made = asyncio.run(answer(half))
    assert made == 12 and text

    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    nf4 = MllamaEngine.load(test_model_dir, quantization="nf4")
    layer = nf4.model.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(layer, Linear4bit)
    assert footprint(nf4) < footprint(half)
    text, made = asyncio.run(answer(nf4))
    assert made == 12 and text

    async def together() -> list[tuple[str, int]]:
        return list(await asyncio.gather(*(answer(nf4) for _ in range(3))))

    # The scheduler batches quantized models too, and greedy answers do not change.
    assert asyncio.run(together()) == [(text, made)] * 3


@pytest.mark.slow
def test_int8_loads_and_generates(test_model_dir: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear8bitLt

    full = MllamaEngine.load(test_model_dir)
    int8 = MllamaEngine.load(test_model_dir, quantization="int8")
    assert isinstance(int8.model.model.language_model.layers[0].self_attn.q_proj, Linear8bitLt)
    assert footprint(int8) < footprint(full)
    text, made = asyncio.run(answer(int8))
    assert made == 12 and text
