"""The in-process engine: Llama 3.2 Vision through transformers' Mllama classes.

Prompt preparation (template, image tiling, tokenising) runs in worker threads;
generation runs on one dedicated thread, one request at a time, and streams
token ids back to the event loop. Cancellation is a flag checked by a stopping
criterion after every decode step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from llamascope import errors
from llamascope.engines.base import Chunk, EngineInfo, FinishReason, PreparedPrompt, SamplingParams, Turn
from llamascope.engines.mllama_pixels import MllamaPixels
from llamascope.engines.templates import LLAMASCOPE_TEMPLATE

log = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "auto": "auto"}


@dataclass
class _Job:
    """One generation handed to the model thread."""

    inputs: Any
    sampling: SamplingParams
    max_new: int
    cancel: threading.Event
    put: Callable[[list[int] | None], None]  # token ids to the event loop; None ends the stream


class ModelLoadError(Exception):
    """A model directory that cannot be served; the message says why."""


def check_model_dir(path: Path) -> dict[str, Any]:
    """Fail early, with a message that says what is wrong, before transformers tries."""
    if not path.exists():
        raise ModelLoadError(f"{path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a directory (give the folder of a Hugging Face model)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model directory: it has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config_file} cannot be read as JSON: {exc}") from None
    model_type = config.get("model_type")
    if model_type != "mllama":
        if "vision_config" in config:
            raise ModelLoadError(
                f"{path} is a vision-language model of type {model_type!r}; the in-process engine runs "
                "Llama 3.2 Vision (model_type 'mllama')"
            )
        raise ModelLoadError(
            f"{path} is a text-only model (model_type {model_type!r}); llamascope serves vision-language "
            "models such as Llama-3.2-11B-Vision-Instruct (model_type 'mllama')"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelLoadError(f"{path} has a config.json but no weights (*.safetensors)")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise ModelLoadError(f"{path} has no tokenizer (tokenizer.json)")
    return config


class _IncrementalText:
    """Token ids in, text deltas out, never splitting a UTF-8 character.

    Decodes only a short window (the last emitted token onward), as vLLM's
    incremental detokenizer does, so a long answer costs linear time.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, ids: list[int], final: bool = False) -> str:
        self._ids.extend(ids)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""


class MllamaEngine:
    """Implements ``llamascope.engines.base.Engine`` in this process."""

    def __init__(self, model: Any, processor: Any, info: EngineInfo, template: str) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.info = info
        self.template = template
        self.pixels = MllamaPixels(processor.image_processor)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        vision = model.config.vision_config
        per_tile = (vision.image_size // vision.patch_size) ** 2 + 1
        # Every image becomes max_num_tiles tiles of per_tile vision states (6,404 for Llama 3.2).
        self.image_tokens_per_image = vision.max_num_tiles * per_tile
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos)
        self.pad_id = gen.pad_token_id if gen.pad_token_id is not None else self.tokenizer.pad_token_id
        # No token covers more bytes than this, so a prompt of N bytes has at least N/this tokens.
        self._max_token_bytes = max(len(t.encode()) for t in self.tokenizer.get_vocab())
        self._generator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamascope-generate")
        self.active = 0  # generations running on the model thread right now (0 or 1 here)
        self._preparers = anyio.CapacityLimiter(2)

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        dtype: str = "auto",
        context_length: int = 8192,
        chat_template: str | None = None,
        test_model: bool = False,
    ) -> MllamaEngine:
        import torch
        from transformers import AutoProcessor, MllamaForConditionalGeneration

        check_model_dir(path)
        try:
            processor = AutoProcessor.from_pretrained(path, backend="pil")
        except Exception as exc:  # transformers raises many types here
            raise ModelLoadError(
                f"{path}: the processor (tokenizer and image processor) cannot be loaded: {exc}"
            ) from exc
        torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
        try:
            model = MllamaForConditionalGeneration.from_pretrained(path, dtype=torch_dtype)
        except Exception as exc:
            raise ModelLoadError(f"{path}: the weights cannot be loaded: {exc}") from exc
        model.eval()
        template = Path(chat_template).read_text() if chat_template else LLAMASCOPE_TEMPLATE
        info = EngineInfo(kind="transformers", source=str(path), context_length=context_length, test_model=test_model)
        return cls(model, processor, info, template)

    # -- prepare ---------------------------------------------------------

    def image_size(self, width: int, height: int) -> tuple[int, int]:
        """What Mllama's preprocessing resizes to: the best tile canvas, then fit inside it."""
        return self.pixels.fit_size(width, height)

    async def prepare(self, turns: list[Turn]) -> PreparedPrompt:
        return await anyio.to_thread.run_sync(self._prepare, turns, limiter=self._preparers)

    def _prepare(self, turns: list[Turn]) -> PreparedPrompt:
        messages: list[dict[str, Any]] = []
        images = []
        for turn in turns:
            if turn.role == "system":
                messages.append({"role": "system", "content": turn.text})
                continue
            content: list[dict[str, str]] = []
            if turn.image is not None:
                if turn.text_before_image:
                    content.append({"type": "text", "text": turn.text_before_image})
                content.append({"type": "image"})
                images.append(turn.image.image)
            content.append({"type": "text", "text": turn.text})
            messages.append({"role": turn.role, "content": content})
        prompt = self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=True
        )
        max_input = self.info.context_length - 1
        if len(prompt.encode()) // self._max_token_bytes > max_input:
            raise errors.input_too_long(max_input)  # certain without tokenising megabytes of text
        inputs = self._model_inputs(prompt, images)
        input_tokens = int(inputs["input_ids"].shape[1])
        if input_tokens > max_input:
            raise errors.input_too_long(max_input)
        return PreparedPrompt(
            input_tokens=input_tokens,
            image_tokens=len(images) * self.image_tokens_per_image,
            max_new_tokens=self.info.context_length - input_tokens,
            payload=inputs,
        )

    def _model_inputs(self, prompt: str, images: list[Any]) -> Any:
        """What ``MllamaProcessor(images=[images], text=[prompt])`` returns, with the images done by MllamaPixels."""
        from transformers import BatchFeature
        from transformers.models.mllama.processing_mllama import (
            convert_sparse_cross_attention_mask_to_dense,
            get_cross_attention_token_mask,
        )

        text = self.tokenizer([prompt], add_special_tokens=False)
        data: dict[str, Any] = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}
        if images:
            if len(images) != 1:
                raise ValueError("Llama 3.2 Vision conversations carry one image")
            pixels = self.pixels(images[0])
            ids = text["input_ids"][0]
            data["cross_attention_mask"] = convert_sparse_cross_attention_mask_to_dense(
                [get_cross_attention_token_mask(ids, self.image_token_id)],
                num_tiles=pixels.pop("num_tiles"),
                max_num_tiles=self.pixels.max_tiles,
                length=len(ids),
            )
            data.update(pixels)
        return BatchFeature(data=data, tensor_type="pt")

    # -- generate --------------------------------------------------------

    async def generate(self, prompt: PreparedPrompt, sampling: SamplingParams) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[int] | None] = asyncio.Queue()
        cancel = threading.Event()

        def put(item: list[int] | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        max_new = min(sampling.max_new_tokens, prompt.max_new_tokens)
        job = loop.run_in_executor(
            self._generator, self._generate, _Job(prompt.payload, sampling, max_new, cancel, put)
        )
        text = _IncrementalText(self.tokenizer)
        produced = 0
        try:
            while (ids := await queue.get()) is not None:
                produced += len(ids)
                delta = text.add(ids)
                if delta:
                    yield Chunk(delta, produced)
            finish = await job
            yield Chunk(text.add([], final=True), produced, finish)
        finally:
            cancel.set()

    def _generate(self, job: _Job) -> FinishReason:
        """Runs on the model thread; always ends the stream with ``put(None)``."""
        try:
            if job.cancel.is_set():  # cancelled while queued
                return FinishReason.CANCELLED
            self.active += 1  # only the model thread writes it
            try:
                last = self._run_generate(job)
            finally:
                self.active -= 1
            if job.cancel.is_set():
                return FinishReason.CANCELLED
            return FinishReason.STOP if last in self.eos_ids else FinishReason.LENGTH
        finally:
            job.put(None)

    def _run_generate(self, job: _Job) -> int | None:
        """``model.generate`` with a streamer and a cancel check; returns the last token id."""
        sampling, max_new, cancel, put = job.sampling, job.max_new, job.cancel, job.put
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        class Stream(BaseStreamer):
            prompt_seen = False
            last: int | None = None

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate() first hands over the prompt
                    self.prompt_seen = True
                    return
                ids = value.reshape(-1).tolist()
                self.last = ids[-1]
                put(ids)

            def end(self) -> None:
                pass

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool)

        config = GenerationConfig(
            max_new_tokens=max_new,
            min_new_tokens=min(sampling.min_new_tokens, max_new) or None,
            do_sample=not sampling.greedy,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
            repetition_penalty=sampling.repetition_penalty if sampling.repetition_penalty != 1.0 else None,
        )
        if not sampling.greedy:
            config.temperature = sampling.temperature
            config.top_p = sampling.top_p
            # transformers would apply top_k=50 when given nothing; 0 turns top-k off.
            config.top_k = sampling.top_k or 0
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        stream = Stream()
        with torch.inference_mode():
            self.model.generate(
                **job.inputs,
                generation_config=config,
                streamer=stream,
                stopping_criteria=StoppingCriteriaList([Cancelled()]),
            )
        return stream.last

    async def close(self) -> None:
        self._generator.shutdown(wait=False, cancel_futures=True)
