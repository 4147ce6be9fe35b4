"""The one-pass preprocessing gives what the stock Mllama image processor gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoProcessor

from llamascope.engines.mllama_pixels import MllamaPixels


@pytest.fixture(scope="module")
def stock(test_model_dir: Path):
    return AutoProcessor.from_pretrained(test_model_dir, backend="pil").image_processor


@pytest.mark.parametrize(
    "size", [(1120, 840), (840, 1120), (4000, 3000), (2240, 560), (560, 2240), (300, 200), (20, 900), (1600, 1600)]
)
def test_same_as_stock(stock, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    ours = MllamaPixels(stock)(image)
    theirs = stock(images=[[image]], return_tensors="np")
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape
    assert np.allclose(ours["pixel_values"], theirs["pixel_values"], atol=1e-5)
    assert (ours["aspect_ratio_ids"] == theirs["aspect_ratio_ids"]).all()
    assert (ours["aspect_ratio_mask"] == theirs["aspect_ratio_mask"]).all()
    assert ours["num_tiles"] == theirs["num_tiles"]
