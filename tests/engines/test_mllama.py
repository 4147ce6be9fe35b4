"""The in-process engine on the built-in model, driven directly (no HTTP)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from PIL import Image

from llamascope.engines.base import FinishReason, SamplingParams, Turn
from llamascope.engines.mllama import MllamaEngine
from llamascope.images import PreparedImage
from tests.engines.helpers import RED, prepared
from tests.engines.helpers import run as collect


@pytest.fixture(scope="module")
def engine(test_model_dir: Path) -> MllamaEngine:
    return MllamaEngine.load(test_model_dir, test_model=True)


def test_prepare_counts_tokens(engine: MllamaEngine) -> None:
    prompt = asyncio.run(engine.prepare([Turn("user", (RED, "What is this?"))]))
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
    a, chunks = asyncio.run(collect(engine, [Turn("user", (RED, "Describe."))], greedy))
    b, _ = asyncio.run(collect(engine, [Turn("user", (RED, "Describe."))], greedy))
    c, _ = asyncio.run(collect(engine, [Turn("user", (prepared((0, 0, 255)), "Describe."))], greedy))
    assert a == b != c
    assert chunks[-1].finish_reason == FinishReason.LENGTH and chunks[-1].output_tokens == 10
    assert [ch.finish_reason for ch in chunks[:-1]] == [None] * (len(chunks) - 1)


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
    """Two images, one in each user turn: the cross-attention mask (which images each token attends to, which of
    their tiles are real) and the pixel tensors are the stock processor's."""
    import numpy as np
    import torch

    prompt = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<|image|>What is this?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA square.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd<|image|>this?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)) for size in ((700, 1300, 3), (300, 200, 3))]
    prepared = [PreparedImage(image, f"noise{i}", "PNG", *image.size) for i, image in enumerate(images)]
    ours, pixels = engine._model_inputs(prompt, prepared)
    theirs = engine.processor(images=[images], text=[prompt], add_special_tokens=False, return_tensors="pt")
    assert set(ours) | {"pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"} == set(theirs)
    assert list(pixels) == ["noise0", "noise1"]
    for name in theirs:
        if name in ours:
            assert (ours[name] == theirs[name]).all(), name
            continue
        joined = torch.cat([pixels[image.digest][name] for image in prepared], dim=1)
        if name == "pixel_values":
            assert np.allclose(joined.numpy(), theirs[name].numpy(), atol=1e-5)
        else:
            assert (joined == theirs[name]).all(), name
