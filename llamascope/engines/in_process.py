"""What every model run in this process shares: the scheduler's thread, prompt preparation, token streaming.

Prompt preparation (template, tokenising, and for a vision model the image's tiles) runs in worker
threads; generation runs on the scheduler's one model thread (``scheduler.Scheduler``), which decodes
concurrent requests together and streams token ids back to the event loop. Cancellation is a flag the
scheduler checks before every step.

``InProcessEngine`` is the request path; each model family is a subclass that says how to load it and how a
conversation becomes its model inputs: ``mllama.MllamaEngine`` (Llama 3.2 Vision) and
``llama_text.LlamaTextEngine`` (the text-only Llama 3 models).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
from transformers import BatchFeature

from llamascope import errors
from llamascope.engines import devices
from llamascope.engines.base import (
    Chunk,
    EngineInfo,
    FinishReason,
    ModelLoadError,
    PreparedPrompt,
    SamplingParams,
    TokenLogprob,
    Turn,
    background,
)
from llamascope.engines.loading import load_weights
from llamascope.engines.model_dir import check_model_dir
from llamascope.engines.prefix_cache import PrefixCache, default_bytes
from llamascope.engines.requests import BatchLimits, Message, Sequence
from llamascope.engines.scheduler import Scheduler
from llamascope.engines.streaming import IncrementalText, Outbox
from llamascope.engines.templates import renders_every_text, turn_specials
from llamascope.engines.vision import VisionCache, batch_tiles
from llamascope.images import PreparedImage
from llamascope.observability.facts import EngineTimings, UpstreamHealth
from llamascope.observability.request import engine_timings
from llamascope.structured.compiler import GrammarCache
from llamascope.structured.guidance import GuidanceBackend
from llamascope.structured.masking import StepMasks
from llamascope.structured.spec import OutputSpec
from llamascope.structured.tools import TOOL_RESULT_ROLE, CallStream, call_text, tools_prompt

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
    """What ``prepare`` makes for ``generate``: the model inputs, the images in the prompt's order (their digests
    key the vision cache) and the pixel tensors of those the vision cache had no states of, by digest."""

    inputs: Any
    images: tuple[PreparedImage, ...] = ()
    pixels: dict[str, Any] = field(default_factory=dict)
    fault: tuple[str, int] | None = None  # tests only: see ``FAULT``


class InProcessEngine(ABC):
    """Implements ``llamascope.engines.base.Engine`` in this process, for one model family (a subclass)."""

    # What a model family says about itself:
    MODEL_TYPE: ClassVar[str]  # config.json's model_type
    TAKES_IMAGES: ClassVar[bool]
    image_tokens_per_image = 0  # what an image counts in a prompt's usage

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        info: EngineInfo,
        template: str,
        limits: BatchLimits | None = None,
        vision_cache_bytes: int = 0,
        faults: bool = False,
        prefix_cache_bytes: int | None = None,  # None: derived from free memory (prefix_cache.default_bytes)
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
        specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len)
        self._specials = re.compile("|".join(re.escape(t) for t in reversed(specials))) if specials else None
        self._turn_specials = turn_specials(tokenizer, template, self._specials)
        # A template that leaves some turn's text out (a configured one may drop history): no text in the bound.
        self._text_counts = renders_every_text(tokenizer, template)
        self._preparers = anyio.CapacityLimiter(2)
        self._outboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Outbox] = weakref.WeakKeyDictionary()
        self._outboxes_lock = threading.Lock()  # the model thread flushes while a loop may add its own
        self.vision_cache = VisionCache(vision_cache_bytes)
        if prefix_cache_bytes is None:
            prefix_cache_bytes = default_bytes(model.device)
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.faults = faults
        # Structured output's grammar library for this model, made with its first constrained request.
        self._grammars: GrammarCache | None = None
        self._grammars_lock = threading.Lock()
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
                bounds = replace(bounds, prefix_cache_bytes=prefix_cache_bytes)
            batch, batch_tokens, cache_bytes, prefix_cache_bytes = devices.settle(
                model,
                bounds,
                context_length=context_length,
                prefill_chunk=limits.prefill_chunk,
                report=log.info,
                vision_batch_tiles=batch_tiles(limits.vision_batch_tiles, model.device.type),
                max_images=cls._max_images(model),
            )
        except devices.DeviceError as exc:
            raise ModelLoadError(f"{path}: {exc}") from exc
        limits = replace(limits, max_batch=batch, max_batch_tokens=batch_tokens)
        template = Path(chat_template).read_text() if chat_template else cls._template(processor, path)
        info = EngineInfo(
            kind="transformers",
            source=str(path),
            context_length=context_length,
            test_model=test_model,
            takes_images=cls.TAKES_IMAGES,
            max_images=cls._max_images(model),
        )
        return cls(model, processor, info, template, limits, cache_bytes, faults, prefix_cache_bytes)

    @staticmethod
    @abstractmethod
    def _processor(path: Path) -> Any:
        """What the family's ``__init__`` takes as its second argument, loaded from the directory."""

    @staticmethod
    @abstractmethod
    def _model_class() -> Any:
        """transformers' model class for the family."""

    @staticmethod
    @abstractmethod
    def _template(processor: Any, path: Path) -> str:
        """The chat template when none is configured."""

    @staticmethod
    def _max_images(model: Any) -> int:
        """Images per conversation by default (``EngineInfo.max_images``); a text-only family takes none."""
        return 0

    def health(self) -> tuple[UpstreamHealth, ...]:
        return ()  # in process: no upstream engines

    def start(self) -> None:
        return  # nothing to begin: its model thread runs from its construction

    def stats(self) -> dict[str, int]:
        return {
            "running": self.scheduler.active,
            "waiting": len(self.scheduler.waiting),
            "waiting_background": len(self.scheduler.background),
            **self._image_stats(),
            **self.prefix_cache.stats(),
        }

    def _image_stats(self) -> dict[str, int]:
        """The family's own image counters for ``stats``; a text model has none."""
        return {}

    def _flush(self) -> None:
        """The model thread's tokens so far, on their way to every event loop that waits for some."""
        with self._outboxes_lock:
            outboxes = list(self._outboxes.values())
        for outbox in outboxes:
            outbox.flush()

    # -- prepare ---------------------------------------------------------

    @abstractmethod
    def image_size(self, width: int, height: int) -> tuple[int, int]:
        """The size this model resizes a width x height image to."""

    async def prepare(self, turns: list[Turn], output: OutputSpec | None = None) -> PreparedPrompt:
        prompt = await anyio.to_thread.run_sync(self._prepare, turns, output, limiter=self._preparers)
        prompt.output = output
        return prompt

    def _prepare(self, turns: list[Turn], output: OutputSpec | None = None) -> PreparedPrompt:
        max_input = self.info.context_length - 1
        if self._fewest_tokens(turns) > max_input:
            raise errors.input_too_long(max_input)  # certain before rendering thousands of turns
        messages, images = self._chat(turns)
        tools = [t.to_openai() for t in output.offered_tools()] if output is not None else []
        if self._specials is not None:  # the caller's strings are text: "<|image|>" in one is no image
            messages, tools = _as_text(messages, self._specials), _as_text(tools, self._specials)
        extra: dict[str, Any] = {}
        if tools and "tools" in self.template:  # Meta's templates (and llamascope's) place them themselves
            extra["tools"] = tools
        elif tools:  # a template that knows no tools: Meta's instruction heads the first user message
            _head_first_user_message(messages, tools_prompt(output.offered_tools() if output else ()))
        prompt = self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=True, **extra
        )
        if len(prompt.encode()) // self._max_token_bytes > max_input:
            raise errors.input_too_long(max_input)  # certain without tokenising megabytes of text
        inputs, pixels = self._model_inputs(prompt, images)
        fault = FAULT.search(prompt) if self.faults else None
        input_tokens = int(inputs["input_ids"].shape[1])
        if input_tokens > max_input:
            raise errors.input_too_long(max_input)
        return PreparedPrompt(
            input_tokens=input_tokens,
            image_tokens=len(images) * self.image_tokens_per_image,
            max_new_tokens=self.info.context_length - input_tokens,
            payload=_Payload(inputs, tuple(images), pixels, fault and (fault[1], int(fault[2]))),
        )

    def _fewest_tokens(self, turns: list[Turn]) -> int:
        """A lower bound on the prompt's tokens, without rendering it: each turn but the first (maybe the system
        message, in a block every prompt has) adds the template's specials, and its text bytes/longest token."""
        text = sum(len(part.strip().encode()) for turn in turns for part in turn.parts if isinstance(part, str))
        return (len(turns) - 1) * self._turn_specials + (text // self._max_token_bytes if self._text_counts else 0)

    @abstractmethod
    def _chat(self, turns: list[Turn]) -> tuple[list[dict[str, Any]], list[PreparedImage]]:
        """The conversation as the chat template takes it, and its images in order (``chat_role`` and
        ``chat_text`` say how a tool call and a tool's result read)."""

    def _model_inputs(self, prompt: str, images: list[PreparedImage]) -> tuple[Any, dict[str, Any]]:
        """The prompt's input_ids and attention_mask as the model takes them (BatchFeature) with its images'
        cross-attention mask, and the images' pixel tensors by digest (``_image_inputs``)."""
        text = self.tokenizer([prompt], add_special_tokens=False)
        data: dict[str, Any] = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}
        pixels: dict[str, Any] = {}
        if images:
            mask, pixels = self._image_inputs(text["input_ids"][0], images)
            data.update(mask)
        return BatchFeature(data=data, tensor_type="pt"), pixels

    def _image_inputs(self, ids: list[int], images: list[PreparedImage]) -> tuple[dict[str, Any], dict[str, Any]]:
        """What the model takes about the prompt's images besides its token ids, and the pixel tensors of the
        images not in the vision cache, by digest; only a vision model has any."""
        raise TypeError(f"{type(self).__name__} takes no image")

    def _pixel_tensors(self, image: Any) -> Any:
        """An image's pixel tensors, for the scheduler on a vision-cache miss; only a vision model has any."""
        raise TypeError(f"{type(self).__name__} takes no image")

    def tokens(self, prompt: PreparedPrompt) -> tuple[list[int], list[str]]:
        ids: list[int] = prompt.payload.inputs["input_ids"][0].tolist()
        return ids, [self.tokenizer.decode([i]) for i in ids]

    # -- generate --------------------------------------------------------

    async def generate(self, prompt: PreparedPrompt, sampling: SamplingParams) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        with self._outboxes_lock:
            outbox = self._outboxes.get(loop)
            if outbox is None:
                outbox = self._outboxes[loop] = Outbox(loop)
        queue: asyncio.Queue[Message] = asyncio.Queue()

        def send(message: Message) -> None:
            try:
                outbox.put(queue, message)
            except RuntimeError:  # the caller's event loop is gone: so is the caller
                seq.cancel.set()

        payload: _Payload = prompt.payload
        output = prompt.output
        grammar_spec = output.grammar() if output is not None else None
        matcher = None
        if grammar_spec is not None:  # compiled once per schema; a schema that cannot be refuses before any chunk
            grammars = self._grammars  # (a GrammarCache has a length: an empty one is falsy)
            if grammars is None:
                grammars = await anyio.to_thread.run_sync(self._grammar_cache)
            matcher = (await grammars.get(grammar_spec)).matcher()
        # An answer that may call tools: text that may be a call is held back until it is known.
        calls = (
            CallStream(output.offered_tools(), forced=output.forces_tool_call, most=output.most_calls)
            if output is not None and output.calls_tools
            else None
        )
        seq = Sequence(
            inputs=payload.inputs,
            images=payload.images,
            pixels=payload.pixels,
            sampling=sampling,
            max_new=prompt.new_tokens(sampling),
            send=send,
            fault=payload.fault,
            matcher=matcher,
            grammar_field=grammar_spec.field if grammar_spec is not None else "",
            background=background.get(),
        )
        self.scheduler.submit(seq)  # raises 429 Throttling when the queue is full
        text = IncrementalText(self.tokenizer)
        produced = 0
        first_token: float | None = None
        # With stop strings, a token a chunk: the conversation cuts at the first stop string and is charged the
        # tokens to the one that completed it, which a chunk of several made after it would overstate.
        one_by_one = bool(sampling.stop)
        try:
            while True:
                message = await queue.get()
                ids: list[int] = []
                while isinstance(message, list):  # take every token already there: one chunk when behind
                    ids += message
                    if one_by_one or queue.empty():
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
                    if calls is not None:
                        delta = calls.push(delta)
                    if delta or logprobs or cached:
                        # What follows already in hand (the end, a failure; with stop strings a next token): at once.
                        ready = not isinstance(message, list) or not queue.empty()
                        yield Chunk(delta, produced, logprobs=logprobs, cached_tokens=cached, next_ready=ready)
                if isinstance(message, errors.ServiceError):
                    raise message
                if isinstance(message, FinishReason):
                    last = text.add([], final=True)
                    if calls is not None and message is not FinishReason.CANCELLED:
                        last = calls.push(last)
                        cut = message is FinishReason.LENGTH
                        held, answer = calls.finish(cut)
                        if answer.is_calls:  # cut short: its whole calls, "length" (never the raw format as text)
                            reason = message if cut else FinishReason.TOOL_CALLS
                            yield Chunk("", produced, reason, tool_calls=list(answer.calls) or None)
                            return
                        last += held  # not a call after all: its text
                    yield Chunk(last, produced, message)
                    return
        finally:
            seq.cancel.set()
            prompt.ran = seq.began
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

    def _grammar_cache(self) -> GrammarCache:
        """This model's grammar library and cache, made on first use (its tokenizer takes about half a second to
        index, which a model never asked for structured output does not spend); off the event loop."""
        with self._grammars_lock:
            if self._grammars is None:
                backend = GuidanceBackend.from_tokenizer(
                    self.tokenizer,
                    vocab_size=int(self.model.config.get_text_config().vocab_size),  # the output layer's width
                    stop_ids=sorted(self.eos_ids),  # the generation config's: 128001, 128008, 128009 for Llama 3
                )
                self.scheduler.masks = StepMasks(backend, self.model.device)
                self._grammars = GrammarCache(backend)
            return self._grammars

    async def close(self) -> None:
        """Stop the model thread once its current step ends; requests still on it end as cancelled."""
        self.scheduler.stop()
        await anyio.to_thread.run_sync(self.scheduler.join, 30)
        if self._grammars is not None:
            self._grammars.close()


def chat_role(turn: Turn) -> str:
    """The turn's role in the chat template: a tool's result is Meta's "ipython" turn."""
    return TOOL_RESULT_ROLE if turn.role == "tool" else turn.role


def chat_text(turn: Turn) -> str:
    """The turn's text in the chat template: an assistant's tool calls as the model writes them (Llama 3.1's
    JSON, "; " between parallel calls), after any text it had."""
    if not turn.tool_calls:
        return turn.text
    written = call_text(call.to_openai() for call in turn.tool_calls)
    return f"{turn.text}{written}" if turn.text.strip() else written


def _as_text(value: Any, specials: re.Pattern[str]) -> Any:
    """``value`` (a chat template's messages or tools) with each special token in its strings broken by a word
    joiner (U+2060), so the tokenizer reads it as text: a caller cannot add an image token (the image count then
    no longer matched: a 500) or end a turn and start another role's."""
    if isinstance(value, str):
        return specials.sub(lambda m: m[0][0] + "\u2060" + m[0][1:], value)
    if isinstance(value, list):
        return [_as_text(v, specials) for v in value]
    if isinstance(value, dict):
        return {k: _as_text(v, specials) for k, v in value.items()}
    return value


def _head_first_user_message(messages: list[dict[str, Any]], head: str) -> None:
    """Put ``head`` before the first user message's content, in place (the content a string or a list)."""
    for message in messages:
        if message["role"] == "user":
            content = message["content"]
            if isinstance(content, str):
                message["content"] = head + content
            else:
                message["content"] = [{"type": "text", "text": head}, *content]
            return
