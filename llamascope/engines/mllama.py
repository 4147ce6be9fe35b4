"""The in-process engine: Llama 3.2 Vision through transformers' Mllama classes.

Prompt preparation (template, image tiling, tokenising) runs in worker threads;
generation runs on the scheduler's one model thread (``batching.Scheduler``),
which decodes concurrent requests together and streams token ids back to the
event loop. Cancellation is a flag the scheduler checks before every step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from llamascope import errors
from llamascope.engines import attention, devices
from llamascope.engines.base import (
    Chunk,
    EngineInfo,
    FinishReason,
    ModelLoadError,
    PreparedPrompt,
    SamplingParams,
    TokenLogprob,
    Turn,
)
from llamascope.engines.batching import BatchLimits, Message, Scheduler, Sequence
from llamascope.engines.mllama_pixels import MllamaPixels
from llamascope.engines.prefix_cache import PrefixCache, default_bytes
from llamascope.engines.templates import LLAMASCOPE_TEMPLATE
from llamascope.engines.vision import VisionCache, batch_tiles
from llamascope.images import PreparedImage
from llamascope.observability.facts import EngineTimings, UpstreamHealth
from llamascope.observability.request import engine_timings, image_preprocessed

if TYPE_CHECKING:
    from typing import Self  # Python 3.11; annotations are not evaluated at run time

log = logging.getLogger(__name__)

# Tests only, with fault injection on (``LLAMASCOPE_FAULT_INJECTION``): a conversation whose text holds
# ``[[llamascope-fault:STAGE@N]]`` fails at that stage (prefill, decode: the model's step, sample: the
# next-token choice; oom: the step runs out of device memory) once it has made N tokens, as a bug or a
# bad row would, so tests can check that the failure stays with its request.
FAULT = re.compile(r"\[\[llamascope-fault:(prefill|decode|sample|oom)@(\d+)\]\]")


@dataclass
class _Payload:
    """What ``prepare`` makes for ``generate``: the model inputs and the image (its digest keys the vision cache)."""

    inputs: Any
    image: PreparedImage | None
    fault: tuple[str, int] | None = None  # tests only: see ``FAULT``


def check_model_dir(path: Path, model_types: tuple[str, ...] = ("mllama",)) -> dict[str, Any]:
    """Fail early, with a message that says what is wrong, before transformers tries.

    ``model_types``: the ``model_type`` values the caller can serve (Llama 3.2 Vision is 'mllama')."""
    if not path.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):  # "meta-llama/Llama-3.2-11B-Vision-Instruct"
            raise ModelLoadError(
                f"{path} does not exist here, and Hugging Face hub ids are not fetched: download the model first "
                f"(huggingface-cli download {path} --local-dir /models/{path.name}) and give that directory"
            )
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
    if model_type not in model_types:
        if "vision_config" in config:
            raise ModelLoadError(
                f"{path} is a vision-language model of type {model_type!r}; the in-process engine runs "
                "Llama 3.2 Vision (model_type 'mllama')"
            )
        if "llama" in model_types:
            raise ModelLoadError(
                f"{path} has model_type {model_type!r}; llamascope serves Llama 3.2 Vision (model_type "
                "'mllama') and the Llama 3 text models (model_type 'llama', LlamaForCausalLM)"
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


def _quantization_config(kind: str, compute_dtype: Any, config: dict[str, Any]) -> Any:
    """bitsandbytes weights: 4-bit NF4 (``nf4``) or LLM.int8 (``int8``), computing in ``compute_dtype``.

    Says what to install if bitsandbytes is missing. bitsandbytes quantizes in blocks of 64 inputs: a part
    whose layers take fewer (or a number not a multiple of 64) stays unquantized. For the real Llama 3.2
    Vision models nothing is left out; the tiny built-in model keeps its vision tower (width 32) and
    projector (96) as they are. int8 holds the 90B in about 90 GB, so it fits one 141 GB GPU.
    """
    from importlib.util import find_spec

    missing = [name for name in ("bitsandbytes", "accelerate") if find_spec(name) is None]
    if missing:
        raise ModelLoadError(
            f"quantization {kind!r} needs {' and '.join(missing)}: pip install 'llamascope[quantized]'"
        )
    from transformers import BitsAndBytesConfig

    vision = config.get("vision_config", {})
    keep = ["lm_head"]  # transformers' default: the output layer stays as it is
    if vision.get("hidden_size", 1280) % 64:
        keep.append("model.vision_model")
    if vision.get("vision_output_dim", 7680) % 64:
        keep.append("model.multi_modal_projector")
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        llm_int8_skip_modules=keep,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


def load_weights(
    model_class: Any,
    path: Path,
    dtype: str,
    quantization: str,
    config: dict[str, Any],
    device: str = "cpu",
    gpu_memory_cap: str | None = None,
) -> Any:
    """``model_class.from_pretrained`` in the dtype and quantization asked for, placed on ``device``, ready for
    inference."""
    import torch

    torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
    extra: dict[str, Any] = {}
    if quantization in ("nf4", "int8"):
        compute = torch.bfloat16 if dtype == "auto" else torch_dtype
        extra["quantization_config"] = _quantization_config(quantization, compute, config)
        torch_dtype = compute
    extra.update(devices.placement(device, devices.cuda_devices() if device != "cpu" else 0, gpu_memory_cap))
    try:
        model = model_class.from_pretrained(path, dtype=torch_dtype, **extra)
    except Exception as exc:
        raise ModelLoadError(f"{path}: the weights cannot be loaded: {exc}") from exc
    model.eval()
    return model


class _IncrementalText:
    """Token ids in, text deltas out, never splitting a UTF-8 character.

    tokenizers' own incremental decoder (``DecodeStream``, in Rust), as vLLM's detokenizer uses: it keeps a
    short window, so a long answer costs linear time. Decoding the window twice per token through
    transformers' ``decode`` instead cost ten times as much, a quarter of the event loop's time with 16
    streams running. At the end, bytes that never became a whole character come out as U+FFFD, as
    ``decode`` gives them.
    """

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._pending: list[int] = []  # ids since the last text

    def add(self, ids: list[int], final: bool = False) -> str:
        text = ""
        if ids:
            piece = self._stream.step(self._tokenizer.backend_tokenizer, ids)
            if piece is None:
                self._pending += ids
            else:
                self._pending, text = [], piece
        if final and self._pending:
            text += self._tokenizer.decode(self._pending, skip_special_tokens=True)
            self._pending = []
        return text


class _Outbox:
    """Messages from the model thread to one event loop, handed over a burst at a time.

    ``put`` only files a message; ``flush`` (the scheduler calls it after each prefill turn and each step)
    wakes the loop once for all of them. Waking it on each put cost far more than the write to its
    self-pipe: the loop's thread woke, took the GIL and handled that one token while the model thread,
    holding the next 15 of a step, waited for the GIL, and so on for each (py-spy: 29% of a 16-request
    decode step in ``call_soon_threadsafe``).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[tuple[asyncio.Queue[Message], Message]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, queue: asyncio.Queue[Message], message: Message) -> None:
        """From any thread. RuntimeError when the loop is closed."""
        if self._loop.is_closed():
            raise RuntimeError("the event loop is closed")
        with self._lock:
            self._items.append((queue, message))

    def flush(self) -> None:
        """Wake the loop to deliver what was put, unless a wake-up is already on its way."""
        with self._lock:
            if self._scheduled or not self._items:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop closed: its requests are gone, and their next put() says so
            with self._lock:
                self._items.clear()
                self._scheduled = False

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, deque()
            self._scheduled = False
        for queue, message in items:
            queue.put_nowait(message)


class MllamaEngine:
    """Implements ``llamascope.engines.base.Engine`` in this process."""

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
        self._start(model, processor.tokenizer, info, template, limits, vision_cache_bytes, faults, prefix_cache_bytes)

    def _start(
        self,
        model: Any,
        tokenizer: Any,
        info: EngineInfo,
        template: str,
        limits: BatchLimits | None,
        cache: int,
        faults: bool = False,
        prefix_cache_bytes: int | None = None,
    ) -> None:
        """What every in-process model needs to serve: its tokenizer, end ids and the scheduler's thread."""
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.template = template
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos)
        # No token covers more bytes than this, so a prompt of N bytes has at least N/this tokens.
        self._max_token_bytes = max(len(t.encode()) for t in self.tokenizer.get_vocab())
        self._preparers = anyio.CapacityLimiter(2)
        self._outboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Outbox] = weakref.WeakKeyDictionary()
        self._outboxes_lock = threading.Lock()  # the model thread flushes while a loop may add its own
        self.vision_cache = VisionCache(cache)
        if prefix_cache_bytes is None:
            prefix_cache_bytes = default_bytes(model.device)
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.faults = faults
        self.scheduler = Scheduler(
            model,
            self._pixel_tensors,
            self.eos_ids,
            limits or BatchLimits(),
            self.vision_cache,
            self._flush,
            faults,
            self.prefix_cache,
        )

    @property
    def active(self) -> int:
        """Requests the model is working on right now (prefilling or decoding)."""
        return self.scheduler.active

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        dtype: str = "auto",
        quantization: str = "none",
        context_length: int = 8192,
        chat_template: str | None = None,
        test_model: bool = False,
        limits: BatchLimits | None = None,
        vision_cache_bytes: int | None = None,
        faults: bool = False,
        device: str = "cpu",
        prefix_cache_bytes: int | None = None,
        gpu_memory_cap: str | None = None,
        bounds: devices.Bounds | None = None,
    ) -> Self:
        """Load a model directory onto ``device`` (already resolved: ``devices.resolve_device``).

        ``bounds`` names the batch bounds the operator set (None fields are derived from the memory left
        after loading, ``devices.settle``); without it, ``limits`` and ``vision_cache_bytes`` are taken as given.
        """
        import dataclasses

        config = check_model_dir(path, (cls.MODEL_TYPE,))
        limits = limits or BatchLimits()
        if bounds is None:
            bounds = devices.Bounds(
                limits.max_batch,
                limits.max_batch_tokens,
                devices.CPU_BOUNDS.vision_cache_bytes if vision_cache_bytes is None else vision_cache_bytes,
            )
        dtype = devices.compute_dtype(dtype, device)
        processor = cls._processor(path)
        model = load_weights(cls._model_class(), path, dtype, quantization, config, device, gpu_memory_cap)
        try:
            if prefix_cache_bytes is not None:
                bounds = dataclasses.replace(bounds, prefix_cache_bytes=prefix_cache_bytes)
            batch, batch_tokens, cache_bytes, prefix_cache_bytes = devices.settle(
                model,
                bounds,
                context_length=context_length,
                prefill_chunk=limits.prefill_chunk,
                report=log.info,
                vision_batch_tiles=batch_tiles(limits.vision_batch_tiles, model.device.type),
            )
        except devices.DeviceError as exc:
            raise ModelLoadError(f"{path}: {exc}") from exc
        limits = dataclasses.replace(limits, max_batch=batch, max_batch_tokens=batch_tokens)
        template = Path(chat_template).read_text() if chat_template else cls._template(processor, path)
        info = EngineInfo(
            kind="transformers",
            source=str(path),
            context_length=context_length,
            test_model=test_model,
            takes_images=cls.TAKES_IMAGES,
        )
        return cls(model, processor, info, template, limits, cache_bytes, faults, prefix_cache_bytes)

    # What a subclass for another model family changes (llama_text.LlamaTextEngine):
    MODEL_TYPE = "mllama"  # config.json's model_type
    TAKES_IMAGES = True

    @staticmethod
    def _processor(path: Path) -> Any:
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(path, backend="pil")
        except Exception as exc:  # transformers raises many types here
            raise ModelLoadError(
                f"{path}: the processor (tokenizer and image processor) cannot be loaded: {exc}"
            ) from exc

    @staticmethod
    def _model_class() -> Any:
        from transformers import MllamaForConditionalGeneration

        return MllamaForConditionalGeneration

    @staticmethod
    def _template(processor: Any, path: Path) -> str:
        return LLAMASCOPE_TEMPLATE

    def health(self) -> tuple[UpstreamHealth, ...]:
        return ()  # in process: no upstream engines

    def stats(self) -> dict[str, int]:
        cache = self.vision_cache
        return {
            "running": self.scheduler.active,
            "waiting": len(self.scheduler.waiting),
            "vision_cache_images": len(cache),
            "vision_cache_hits": cache.hits,
            "vision_cache_misses": cache.misses,
            **self.prefix_cache.stats(),
        }

    def _flush(self) -> None:
        """The model thread's tokens so far, on their way to every event loop that waits for some."""
        with self._outboxes_lock:
            outboxes = list(self._outboxes.values())
        for outbox in outboxes:
            outbox.flush()

    # -- prepare ---------------------------------------------------------

    def image_size(self, width: int, height: int) -> tuple[int, int]:
        """What Mllama's preprocessing resizes to: the best tile canvas, then fit inside it."""
        return self.pixels.fit_size(width, height)

    async def prepare(self, turns: list[Turn]) -> PreparedPrompt:
        return await anyio.to_thread.run_sync(self._prepare, turns, limiter=self._preparers)

    def _prepare(self, turns: list[Turn]) -> PreparedPrompt:
        messages, images = self._chat(turns)
        prompt = self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=True
        )
        max_input = self.info.context_length - 1
        if len(prompt.encode()) // self._max_token_bytes > max_input:
            raise errors.input_too_long(max_input)  # certain without tokenising megabytes of text
        inputs = self._model_inputs(prompt, images)
        fault = FAULT.search(prompt) if self.faults else None
        input_tokens = int(inputs["input_ids"].shape[1])
        if input_tokens > max_input:
            raise errors.input_too_long(max_input)
        return PreparedPrompt(
            input_tokens=input_tokens,
            image_tokens=len(images) * self.image_tokens_per_image,
            max_new_tokens=self.info.context_length - input_tokens,
            payload=_Payload(inputs, images[0] if images else None, fault and (fault[1], int(fault[2]))),
        )

    def _chat(self, turns: list[Turn]) -> tuple[list[dict[str, Any]], list[PreparedImage]]:
        """The conversation as the chat template takes it, and its images in order."""
        messages: list[dict[str, Any]] = []
        images: list[PreparedImage] = []
        for turn in turns:
            if turn.role == "system":
                messages.append({"role": "system", "content": turn.text})
                continue
            content: list[dict[str, str]] = []
            if turn.image is not None:
                if turn.text_before_image:
                    content.append({"type": "text", "text": turn.text_before_image})
                content.append({"type": "image"})
                images.append(turn.image)
            content.append({"type": "text", "text": turn.text})
            messages.append({"role": turn.role, "content": content})
        return messages, images

    def _model_inputs(self, prompt: str, images: list[PreparedImage]) -> Any:
        """What ``MllamaProcessor(images=[images], text=[prompt])`` returns, with the images done by MllamaPixels.

        An image whose vision states are cached gets no pixels: the scheduler needs only its tile count
        (and makes the pixels itself should the entry be evicted before the request runs).
        """
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
            cached = self.vision_cache.peek(images[0].digest)
            if cached is None:
                started = time.monotonic()
                pixels = self.pixels(images[0].image)
                image_preprocessed(images[0].format, started)
            else:
                pixels = {"num_tiles": [[cached[1]]]}
            ids = text["input_ids"][0]
            data["cross_attention_mask"] = convert_sparse_cross_attention_mask_to_dense(
                [get_cross_attention_token_mask(ids, self.image_token_id)],
                num_tiles=pixels.pop("num_tiles"),
                max_num_tiles=self.pixels.max_tiles,
                length=len(ids),
            )
            data.update(pixels)
        return BatchFeature(data=data, tensor_type="pt")

    def _pixel_tensors(self, image: Any) -> Any:
        """pixel_values, aspect_ratio_ids and aspect_ratio_mask of an image, as the model takes them."""
        from transformers import BatchFeature

        pixels = self.pixels(image)
        pixels.pop("num_tiles")
        return BatchFeature(data=pixels, tensor_type="pt")

    def tokens(self, prompt: PreparedPrompt) -> tuple[list[int], list[str]]:
        ids: list[int] = prompt.payload.inputs["input_ids"][0].tolist()
        return ids, [self.tokenizer.decode([i]) for i in ids]

    # -- generate --------------------------------------------------------

    async def generate(self, prompt: PreparedPrompt, sampling: SamplingParams) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        with self._outboxes_lock:
            outbox = self._outboxes.get(loop)
            if outbox is None:
                outbox = self._outboxes[loop] = _Outbox(loop)
        queue: asyncio.Queue[Message] = asyncio.Queue()

        def send(message: Message) -> None:
            try:
                outbox.put(queue, message)
            except RuntimeError:  # the caller's event loop is gone: so is the caller
                seq.cancel.set()

        payload: _Payload = prompt.payload
        seq = Sequence(
            inputs=payload.inputs,
            image=payload.image,
            sampling=sampling,
            max_new=prompt.new_tokens(sampling),
            send=send,
            fault=payload.fault,
        )
        self.scheduler.submit(seq)  # raises 429 Throttling when the queue is full
        text = _IncrementalText(self.tokenizer)
        produced = 0
        first_token: float | None = None
        try:
            while True:
                message = await queue.get()
                ids: list[int] = []
                while isinstance(message, list):  # take every token already there: one chunk when behind
                    ids += message
                    if queue.empty():
                        break
                    message = queue.get_nowait()
                if ids:
                    cached = None
                    if not produced:
                        first_token = time.monotonic()
                        cached = seq.reused
                    logprobs = self._logprobs(ids, seq.logprobs[produced:]) if sampling.logprobs is not None else None
                    produced += len(ids)
                    delta = text.add(ids)
                    if delta or logprobs or cached:
                        yield Chunk(delta, produced, logprobs=logprobs, cached_tokens=cached)
                if isinstance(message, errors.ServiceError):
                    raise message
                if isinstance(message, FinishReason):
                    yield Chunk(text.add([], final=True), produced, message)
                    return
        finally:
            seq.cancel.set()
            self.scheduler.wake()
            ended = time.monotonic()
            engine_timings(EngineTimings(seq.queued_at, seq.started_at or None, first_token, ended, seq.encoded))

    def _logprobs(self, ids: list[int], found: list[tuple[float, list[tuple[int, float]]]]) -> list[TokenLogprob]:
        """The scheduler's log-probabilities of these tokens, with each token's (and rival's) own text."""

        def piece(token: int) -> str:
            return str(self.tokenizer.decode([token]))

        return [
            TokenLogprob(piece(token), logprob, tuple((piece(r), p) for r, p in rivals))
            for token, (logprob, rivals) in zip(ids, found, strict=False)
        ]

    async def close(self) -> None:
        """Stop the model thread once its current step ends; requests still on it end as cancelled."""
        self.scheduler.stop()
        await anyio.to_thread.run_sync(self.scheduler.join, 30)
