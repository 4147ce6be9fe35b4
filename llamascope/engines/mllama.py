"""The in-process engine for Llama 3.2 Vision, through transformers' Mllama classes.

The request path (prepare in worker threads, generate on the scheduler's model thread) is
``in_process.InProcessEngine``'s; what is Mllama's own is here: its processor, the ``<|image|>`` turn in
the chat (several images in any user turn, in order), and the images' model inputs (the cross-attention
mask and, for each image the vision cache has no states of, the pixel tensors made by ``MllamaPixels``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from transformers import AutoProcessor, BatchFeature, MllamaForConditionalGeneration
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from llamascope.engines import attention
from llamascope.engines.base import EngineInfo, ModelLoadError, Turn
from llamascope.engines.in_process import InProcessEngine, chat_role, chat_text
from llamascope.engines.mllama_pixels import MllamaPixels
from llamascope.engines.requests import BatchLimits
from llamascope.engines.templates import LLAMASCOPE_TEMPLATE
from llamascope.engines.vision import DEFAULT_BATCH_TILES
from llamascope.images import PreparedImage
from llamascope.observability.request import image_preprocessed


def default_max_images(max_tiles: int) -> int:
    """Images per conversation by default: as many as one vision-tower call takes at its default size (16 tiles,
    ``vision.DEFAULT_BATCH_TILES``), 4 for Llama 3.2's four tiles an image. Their cross-attention keys and
    values are what ``devices.plan_memory`` sets aside for one prefill's images (210 MB an image for the 11B in
    bf16). Neither the processor nor the model has a limit of its own (``max_num_images`` there is the most
    images of any prompt in the batch); Meta recommends one image a prompt for the best answers."""
    return max(1, DEFAULT_BATCH_TILES // max_tiles)


class MllamaEngine(InProcessEngine):
    """Implements ``llamascope.engines.base.Engine`` for Llama 3.2 Vision in this process."""

    MODEL_TYPE = "mllama"
    TAKES_IMAGES = True

    def __init__(
        self,
        model: Any,
        processor: Any,
        info: EngineInfo,
        template: str,
        limits: BatchLimits | None = None,
        vision_cache_bytes: int = 1 << 30,
        faults: bool = False,
        prefix_cache_bytes: int | None = None,  # None: derived from free memory (prefix_cache.default_bytes)
    ) -> None:
        if model.config.text_config._attn_implementation == "sdpa":  # SDPA, reading a shared image's states once
            attention.register()
            model.set_attn_implementation({"text_config": attention.ATTENTION})
        self.processor = processor
        self.pixels = MllamaPixels(processor.image_processor)
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        vision = model.config.vision_config
        per_tile = (vision.image_size // vision.patch_size) ** 2 + 1
        # Every image becomes max_num_tiles tiles of per_tile vision states (6,404 for Llama 3.2).
        self.image_tokens_per_image = vision.max_num_tiles * per_tile
        super().__init__(
            model, processor.tokenizer, info, template, limits, vision_cache_bytes, faults, prefix_cache_bytes
        )

    @staticmethod
    def _processor(path: Path) -> Any:
        try:
            return AutoProcessor.from_pretrained(path, backend="pil")
        except Exception as exc:  # transformers raises many types here
            raise ModelLoadError(
                f"{path}: the processor (tokenizer and image processor) cannot be loaded: {exc}"
            ) from exc

    @staticmethod
    def _model_class() -> Any:
        return MllamaForConditionalGeneration

    @staticmethod
    def _template(processor: Any, path: Path) -> str:
        return LLAMASCOPE_TEMPLATE

    @staticmethod
    def _max_images(model: Any) -> int:
        return default_max_images(int(model.config.vision_config.max_num_tiles))

    def _image_stats(self) -> dict[str, int]:
        cache = self.vision_cache
        return {
            "vision_cache_images": len(cache),
            "vision_cache_hits": cache.hits,
            "vision_cache_misses": cache.misses,
        }

    # -- prepare ---------------------------------------------------------

    def image_size(self, width: int, height: int) -> tuple[int, int]:
        """What Mllama's preprocessing resizes to: the best tile canvas, then fit inside it."""
        return self.pixels.fit_size(width, height)

    def _chat(self, turns: list[Turn]) -> tuple[list[dict[str, Any]], list[PreparedImage]]:
        messages: list[dict[str, Any]] = []
        images: list[PreparedImage] = []
        for turn in turns:
            if turn.role == "system" or turn.role == "tool" or turn.tool_calls:  # text only
                messages.append({"role": chat_role(turn), "content": chat_text(turn)})
                continue
            content: list[dict[str, str]] = [
                {"type": "text", "text": part} if isinstance(part, str) else {"type": "image"} for part in turn.parts
            ]
            images += turn.images
            messages.append({"role": turn.role, "content": content})
        return messages, images

    def _image_inputs(self, ids: list[int], images: list[PreparedImage]) -> tuple[dict[str, Any], dict[str, Any]]:
        """What ``MllamaProcessor(images=[images], text=[prompt])`` adds to the token ids, the images done by
        MllamaPixels: the cross-attention mask [1, tokens, images, max tiles] (each token marks the real tiles of
        the images it attends to, transformers' own rule), and the pixel tensors of each image not in the vision
        cache, by digest.

        An image whose vision states are cached gets no pixels: the scheduler needs only its tile count
        (and makes the pixels itself should the entry be evicted before the request runs).
        """
        tiles: list[int] = []
        pixels: dict[str, Any] = {}
        for image in images:
            cached = self.vision_cache.peek(image.digest)
            if cached is not None:
                tiles.append(cached[1])
                continue
            if image.digest not in pixels:
                started = time.monotonic()
                made = self.pixels(image.image)
                image_preprocessed(image.format, started)
                pixels[image.digest] = made
            tiles.append(pixels[image.digest]["num_tiles"][0][0])
        mask = convert_sparse_cross_attention_mask_to_dense(
            [get_cross_attention_token_mask(ids, self.image_token_id)],
            num_tiles=[tiles],
            max_num_tiles=self.pixels.max_tiles,
            length=len(ids),
        )
        tensors = {}
        for digest, made in pixels.items():
            made.pop("num_tiles")
            tensors[digest] = BatchFeature(data=made, tensor_type="pt")
        return {"cross_attention_mask": mask}, tensors

    def _pixel_tensors(self, image: Any) -> Any:
        """pixel_values, aspect_ratio_ids and aspect_ratio_mask of an image, as the model takes them."""
        pixels = self.pixels(image)
        pixels.pop("num_tiles")
        return BatchFeature(data=pixels, tensor_type="pt")
