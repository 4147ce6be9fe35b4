"""Mllama image preprocessing in one pass.

The stock ``MllamaImageProcessorPil`` makes several whole-array passes per
image (pad as uint8, rescale to float, normalise, split into tiles, copy into
a zeroed pack): about 22 ms for a 1120x840 image on this machine's CPU, as much
as decoding the JPEG. This does the same arithmetic in one pass, through a
per-channel lookup table from uint8 to the normalised float32 value, written
straight into the tile array: about 5 ms (bench/images.py). Canvas choice,
aspect-ratio ids and masks come from transformers' own functions, and
``tests/engines/test_mllama_pixels.py`` checks the output against the stock
processor's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image
from transformers.models.mllama.image_processing_pil_mllama import (
    build_aspect_ratio_mask_np,
    convert_aspect_ratios_to_ids_np,
    get_image_size_fit_to_canvas,
    get_optimal_tiled_canvas,
)


class MllamaPixels:
    def __init__(self, image_processor: Any) -> None:
        size = image_processor.size
        self.tile = int(size["height"] if isinstance(size, dict) else size.height)
        self.max_tiles = int(image_processor.max_image_tiles)
        self.resample = image_processor.resample
        values = np.arange(256, dtype=np.float32)
        if image_processor.do_rescale:
            values = values * np.float32(image_processor.rescale_factor)
        mean = np.asarray(image_processor.image_mean, dtype=np.float32)[:, None]
        std = np.asarray(image_processor.image_std, dtype=np.float32)[:, None]
        # lut[c, v]: what a byte v of channel c becomes; padding is byte 0, as the stock pads before rescaling.
        self.lut = ((values[None, :] - mean) / std).astype(np.float32) if image_processor.do_normalize else values

    def fit_size(self, width: int, height: int) -> tuple[int, int]:
        """The size the image is resized to: the best tile canvas, then fit inside it (the stock rules)."""
        canvas_h, canvas_w = get_optimal_tiled_canvas(height, width, self.max_tiles, self.tile)
        new_h, new_w = get_image_size_fit_to_canvas(height, width, canvas_h, canvas_w, self.tile)
        return int(new_w), int(new_h)

    def __call__(self, image: Image.Image) -> dict[str, Any]:
        """pixel_values (1, 1, max_tiles, 3, tile, tile), aspect_ratio_ids, aspect_ratio_mask, num_tiles."""
        width, height = image.size
        canvas_h, canvas_w = get_optimal_tiled_canvas(height, width, self.max_tiles, self.tile)
        new_w, new_h = self.fit_size(width, height)
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), resample=self.resample)
        rgb = np.asarray(image.convert("RGB"))
        rows, cols, tile = canvas_h // self.tile, canvas_w // self.tile, self.tile
        pixels = np.zeros((1, 1, self.max_tiles, 3, tile, tile), dtype=np.float32)
        for i in range(rows):
            for j in range(cols):
                block = rgb[i * tile : (i + 1) * tile, j * tile : (j + 1) * tile]
                out = pixels[0, 0, i * cols + j]
                bh, bw = block.shape[:2]
                for c in range(3):
                    if bh < tile or bw < tile:
                        out[c].fill(self.lut[c, 0])
                    out[c, :bh, :bw] = self.lut[c][block[..., c]]
        ratios = [[(rows, cols)]]
        return {
            "pixel_values": pixels,
            "aspect_ratio_ids": convert_aspect_ratios_to_ids_np(ratios, self.max_tiles),
            "aspect_ratio_mask": build_aspect_ratio_mask_np(ratios, self.max_tiles),
            "num_tiles": [[rows * cols]],
        }
