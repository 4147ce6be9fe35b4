"""The conversation service: one request, from raw messages to generated text.

Every surface (DashScope's multimodal and text generation, OpenAI-compatible)
calls ``open()``, naming its ``Endpoint`` (which decides where images may be),
which does every check that can fail before the first byte is sent (model,
grant, messages, parameters, rate limits, image, context, allowance), and gets a ``Reply``.
``tokens()`` (Tokenization) makes the same prompt and counts it.
Iterating ``Reply.events()`` generates; closing it cancels the engine. The
Reply keeps the running usage; ``Reply.settle()`` charges it to the caller's
allowance, once, whichever way generation ended: finished, failed, or the
caller gone. The HTTP layer settles every reply when its request ends
(``api.middleware.RequestContext``), after the answer's last byte.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from llamascope import errors
from llamascope.accounts.admission import Accounts, Admission, Principal
from llamascope.conversation.parameters import Options, parse_parameters
from llamascope.conversation.rules import Draft, Images, parse_messages
from llamascope.engines.base import Engine, FinishReason, PreparedPrompt, TokenLogprob
from llamascope.images.intake import ImageIntake
from llamascope.images.source import ANONYMOUS, SourceContext
from llamascope.observability.facts import Generation
from llamascope.observability.request import TokenWatch
from llamascope.structured.conformance import breach
from llamascope.structured.spec import OutputSpec, read_request
from llamascope.structured.tools import ToolCall

log = logging.getLogger(__name__)


class Endpoint(Enum):
    """The API a request came through: it decides whether a conversation must carry an image."""

    MULTIMODAL = "multimodal-generation"  # the seed's contract: the first user message carries an image
    TEXT = "text-generation"  # text-only conversations, or images for a vision model
    CHAT = "chat-completions"  # OpenAI-compatible: as TEXT (chat UIs and health checks start with plain text)


@dataclass(frozen=True)
class ImagePolicy:
    """A served model's own image settings (the composition root makes them from its config)."""

    max_images: int | None = None  # images per conversation at most; None: the engine's ``EngineInfo.max_images``
    # The multimodal endpoint's first user message must carry an image; False takes text-only conversations there.
    require_image: bool = True


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    image_tokens: int = 0
    cached_tokens: int = 0  # of the input tokens, those whose keys and values came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass
class Event:
    delta: str  # text new in this event
    text: str  # all text so far
    usage: Usage
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens new in this event, when asked
    tool_calls: list[ToolCall] = field(default_factory=list)  # the last event of an answer that calls tools


class StopText:
    """Cuts generated text at the first stop string, holding back what may be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        if not self.stops:
            return delta, False
        buffer = self._held + delta
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return buffer[: min(hits)], True
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buffer)), keep, -1):
                if buffer.endswith(stop[:k]):
                    keep = k
                    break
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


@dataclass
class Reply:
    model: str
    engine: Engine = field(repr=False)
    prompt: PreparedPrompt = field(repr=False)
    options: Options
    usage: Usage
    admission: Admission | None = field(default=None, repr=False)
    text: str = ""
    finish_reason: FinishReason | None = None
    status: str = "cancelled"  # what the ledger records unless generation ends otherwise
    started: bool = False  # the engine has sent something: the prompt was run
    logprobs: list[TokenLogprob] = field(default_factory=list)  # every token's, when the request asked
    tool_calls: list[ToolCall] = field(default_factory=list)  # the answer's calls (finish_reason "tool_calls")
    # The engine holds what follows the last event already (``Chunk.next_ready``): a stream may write that event
    # with the next one, in one write. False when the next must be waited for.
    next_ready: bool = False

    async def settle(self) -> None:
        """Charge the caller's allowance what was used, and record how the request ended; only the first
        call charges. Called once the answer is sent, keeping the store off the answer's path: until then
        the reservation holds the tokens, so no other request can spend them."""
        if self.admission is not None:
            usage = self.usage
            await self.admission.settle(usage.input_tokens, usage.output_tokens, usage.image_tokens, self.status)

    def generation(self) -> Generation:
        """What it made and how it ended, for the metrics, the trace and the access log."""
        usage, sampling = self.usage, self.options.sampling
        return Generation(
            model=self.model,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            image_tokens=usage.image_tokens,
            finish_reason=self.finish_reason.value if self.finish_reason is not None else None,
            started=self.started,
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
        )

    async def events(self) -> AsyncGenerator[Event, None]:
        """Generate; each event has new text. The last one has the finish reason. What ends it (finished,
        failed, cancelled) is kept in ``status`` and ``usage`` for ``settle()``."""
        try:
            async for event in self._generate():
                if event.finish_reason is not None:
                    self.status = "ok"
                yield event
        except BaseException as error:
            refused = isinstance(error, errors.ServiceError)
            if isinstance(error, errors.ServiceError):
                self.status = error.code
            # Nothing run for it, no charge: refused before the model ran (queue full, waited too long), or its
            # caller gone (a hang-up, a cancelled task) while it waited in the queue.
            if not self.started and (refused or not self.prompt.ran):
                self.usage.input_tokens = self.usage.image_tokens = 0
            raise

    async def _generate(self) -> AsyncIterator[Event]:
        stop = StopText(self.options.sampling.stop)
        chunks = self.engine.generate(self.prompt, self.options.sampling)
        finish: FinishReason | None = None
        engine_finish: FinishReason | None = None  # the engine's own end (not one of the request's stop words)
        delta = ""
        tokens = TokenWatch(self.model)  # time to first token, between tokens
        sent = 0  # logprobs already in an event
        try:
            async for chunk in chunks:
                self.started = True
                self.next_ready = chunk.next_ready
                tokens(chunk.output_tokens)
                self.usage.output_tokens = chunk.output_tokens
                if chunk.input_tokens is not None:
                    self.usage.input_tokens = chunk.input_tokens
                if chunk.cached_tokens is not None:
                    self.usage.cached_tokens = chunk.cached_tokens
                if chunk.logprobs:
                    self.logprobs += chunk.logprobs
                delta, stopped = stop.feed(chunk.text)
                if stopped:
                    finish = FinishReason.STOP
                    self.text += delta
                    break
                if chunk.finish_reason is not None:
                    finish = engine_finish = chunk.finish_reason
                    self.tool_calls = list(chunk.tool_calls or ())
                    delta += stop.flush()
                    self.text += delta
                    break
                if delta:
                    self.text += delta
                    await self._checkpointed()
                    yield Event(delta, self.text, self.usage, logprobs=self.logprobs[sent:])
                    sent = len(self.logprobs)
        except errors.ServiceError:
            raise
        except Exception:
            log.exception("engine failed for model %s", self.model)
            raise errors.internal_error() from None
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
        if finish is None or finish == FinishReason.CANCELLED:
            # Only reached when the engine itself gave up; a caller that left never gets here.
            raise errors.internal_error()
        output = self.prompt.output
        checked = engine_finish in _WHOLE or (engine_finish == FinishReason.LENGTH and self.tool_calls)
        if output is not None and len(self.tool_calls) > output.most_calls:
            # An unconstrained answer (tool_choice "auto", an upstream's) keeps its first calls, as many as the
            # request allows (parallel_tool_calls), as the in-process engine's answers do (structured.tools).
            del self.tool_calls[output.most_calls :]
        if output is not None and checked and self.engine.info.kind == "upstream":
            # An upstream engine may ignore the shape asked of it (the in-process one cannot): never passed on as kept.
            # Cut by length, its calls are checked (each one given is one to run), not its text (a JSON unfinished).
            problem = breach(output, self.text, self.tool_calls)
            if problem:
                log.warning("the engine of model %s broke the shape asked of its answer: %s", self.model, problem)
                raise errors.ServiceError(
                    500,
                    "InternalError.Algo",
                    f"The model engine's answer is not what the request asked for: {problem}.",
                )
        self.finish_reason = finish
        await self._checkpointed()
        yield Event(delta, self.text, self.usage, finish, self.logprobs[sent:], self.tool_calls)

    async def _checkpointed(self) -> None:
        """Before tokens reach the client: those not on disk yet stay within the checkpoint window, so a
        crash cannot take the charge for more than that (accounts/checkpoints.py). Usually no wait at all."""
        usage, admission = self.usage, self.admission
        if admission is not None and admission.record(usage.input_tokens, usage.output_tokens, usage.image_tokens):
            await admission.saved()

    async def complete(self) -> str:
        async for _ in self.events():
            pass
        return self.text


class ConversationService:
    def __init__(
        self,
        engines: Mapping[str, Engine],
        intake: ImageIntake,
        accounts: Accounts,
        image_policies: Mapping[str, ImagePolicy] | None = None,  # by model name; a model not named: the defaults
    ) -> None:
        self.engines = engines
        self.intake = intake
        self.accounts = accounts
        self.image_policies = image_policies or {}

    def engine(self, model: Any) -> Engine:
        if not isinstance(model, str) or model not in self.engines:
            raise errors.model_not_found()
        return self.engines[model]

    async def open(
        self,
        principal: Principal,
        request_id: str,
        model: Any,
        messages: Any,
        parameters: Any,
        context: SourceContext = ANONYMOUS,
        endpoint: Endpoint = Endpoint.MULTIMODAL,
    ) -> Reply:
        """Check everything that can be checked before generating; raise ServiceError, or return the Reply."""
        engine = self.engine(model)
        grant = await self.accounts.check(principal, model)  # before any image is fetched
        draft = parse_messages(messages, self._images(model, engine, endpoint))
        options = parse_parameters(parameters, engine.info.context_length)
        if options.sampling.logprobs is not None and engine.info.kind == "upstream":
            raise errors.invalid_parameter(
                "Parameter logprobs: not available for a model served by an upstream engine."
            )
        output = await checked_output_spec(parameters, draft, endpoint)
        if options.sampling.stop and output is not None and output.grammar() is not None:
            # The answer is held to JSON (a schema, a forced call): a stop string would cut it, and an answer that
            # ends with "stop" is whole JSON that validates. The stop strings apply to free text, as tool calls'.
            options = replace(options, sampling=replace(options.sampling, stop=()))
        counted = await self.accounts.enter(principal)  # the key's rate limits, before any image is fetched
        try:
            prompt = await self._prompt(engine, draft, context, output)
            most = prompt.input_tokens + prompt.new_tokens(options.sampling)
        except BaseException:  # refused (an image, the length), failed, or the caller gone: counted out
            await self.accounts.leave(principal, counted)
            raise
        admission = await self.accounts.admit(principal, model, grant, most, request_id, prompt.input_tokens, counted)
        held = admission.reservation.tokens
        if grant.allowance_tokens is not None and held < most:
            # The allowance has less left than the request could make: it may make only what is left (at
            # least one token), so it overruns the allowance by at most its prompt. Usage says what it made.
            allowed = max(1, held - prompt.input_tokens)
            sampling = options.sampling
            capped = replace(sampling, max_new_tokens=allowed, min_new_tokens=min(sampling.min_new_tokens, allowed))
            options = replace(options, sampling=capped)
        usage = Usage(input_tokens=prompt.input_tokens, image_tokens=prompt.image_tokens)
        return Reply(model=model, engine=engine, prompt=prompt, options=options, usage=usage, admission=admission)

    async def tokens(
        self, principal: Principal, model: Any, messages: Any, context: SourceContext = ANONYMOUS
    ) -> tuple[list[int], list[str]]:
        """The token ids (and their text) of the prompt a text-generation request with these messages runs."""
        engine, prompt = await self._counted(principal, model, messages, context, Endpoint.TEXT)
        return engine.tokens(prompt)

    async def count(
        self,
        principal: Principal,
        model: Any,
        messages: Any,
        context: SourceContext = ANONYMOUS,
        parameters: Any = None,
    ) -> int:
        """The prompt's input tokens as ``open`` would count them, without generating (``POST /tokenize``);
        ``parameters``' tools (and response_format) are in the prompt as ``open`` puts them there."""
        prompt = (await self._counted(principal, model, messages, context, Endpoint.CHAT, parameters))[1]
        return prompt.input_tokens

    async def _counted(
        self,
        principal: Principal,
        model: Any,
        messages: Any,
        context: SourceContext,
        endpoint: Endpoint,
        parameters: Any = None,
    ) -> tuple[Engine, PreparedPrompt]:
        """The prompt ``open`` would make, checked as it checks it, but for sampling and the allowance."""
        engine = self.engine(model)
        await self.accounts.check(principal, model)
        draft = parse_messages(messages, self._images(model, engine, endpoint))
        output = await checked_output_spec(parameters, draft, endpoint)
        # Its images cost what a call's do: within the key's concurrency (not its requests per minute: an
        # llamascope in front counts each prompt before its call), and not for a key over its limits.
        counted = await self.accounts.enter(principal, per_minute=False)
        try:
            return engine, await self._prompt(engine, draft, context, output)
        finally:
            await self.accounts.leave(principal, counted)

    def image_rules(self, model: str, endpoint: Endpoint) -> Images:
        """How many images a conversation with ``model`` may carry through ``endpoint``, and whether its first user
        message must carry one: the model's settings over its engine's defaults (0 images: a text-only model)."""
        return self._image_rules(model, self.engine(model), endpoint)

    def _image_rules(self, model: str, engine: Engine, endpoint: Endpoint) -> Images:
        if not engine.info.takes_images:
            return Images(0)
        policy = self.image_policies.get(model, ImagePolicy())
        most = policy.max_images if policy.max_images is not None else engine.info.max_images
        return Images(most, required=endpoint is Endpoint.MULTIMODAL and policy.require_image)

    def _images(self, model: str, engine: Engine, endpoint: Endpoint) -> Images:
        if not engine.info.takes_images and endpoint is Endpoint.MULTIMODAL:
            raise errors.invalid_parameter(
                f"Model {model} is a text-only model: call it through the text-generation API "
                "(POST /api/v1/services/aigc/text-generation/generation, dashscope.Generation)."
            )
        return self._image_rules(model, engine, endpoint)

    async def _prompt(
        self, engine: Engine, draft: Draft, context: SourceContext, output: OutputSpec | None = None
    ) -> PreparedPrompt:
        """The conversation's images fetched and decoded (together, each distinct reference once), then prepared."""
        refs = draft.image_refs
        distinct = list(dict.fromkeys(refs))
        fit_key = engine.info.source
        # A conversation's next turn sends its data: URIs again: those still cached are taken here, without a task
        # each and a loop turn (four 1120x840 photos' took about 1 ms a turn together, 2 cores).
        images: dict[str, Any] = {r: found for r in distinct if (found := self.intake.known(r, fit_key)) is not None}
        todo = [r for r in distinct if r not in images]
        loads = [self.intake.load(r, context, fit=engine.image_size, fit_key=fit_key) for r in todo]
        loaded: list[Any] = []
        if len(distinct) == 1 and loads:  # one image (the usual case): awaited here, without a task and a loop turn
            loaded = [await loads[0]]
        elif loads:
            loaded = await asyncio.gather(*loads, return_exceptions=True)
            places = draft.image_places()
            for ref, result in zip(todo, loaded, strict=True):  # the first refusal in the conversation's order
                if isinstance(result, errors.ServiceError):  # which of the images it is (one alone needs no saying)
                    raise replace(result, message=f"{result.message} (the image at {places[ref]})") from None
                if isinstance(result, BaseException):
                    raise result
        images.update(zip(todo, loaded, strict=True))
        return await engine.prepare(draft.with_images([images[r] for r in refs]), output)  # type: ignore[misc]


_WHOLE = (FinishReason.STOP, FinishReason.TOOL_CALLS)  # answers that end as the model meant them to
# read_request's (the legacy functions and function_call to be refused)
_OUTPUT_FIELDS = ("response_format", "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call")


# Threads of their own for the checks: on the loop's default executor (asyncio.to_thread's), a few requests with
# large schemas seen for the first time took every worker for seconds, and what else runs there waited, an upstream
# engine's token count of every request among it. Four: the checks are CPU-bound (more would not be faster), but a
# schema checked before (a cached verdict) need not wait behind a few slow ones.
_SCHEMA_CHECKS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="schema-check")


def _asks_shape(parameters: Any) -> bool:
    """Whether the request sets any of the fields that ask for an answer's shape."""
    return isinstance(parameters, dict) and any(parameters.get(name) is not None for name in _OUTPUT_FIELDS)


async def checked_output_spec(parameters: Any, draft: Draft, endpoint: Endpoint) -> OutputSpec | None:
    """``output_spec``, off the event loop when the request asks for a shape: checking a schema seen for the
    first time (the meta-schema check, then llguidance's compile) takes time that grows with the schema, 0.4 s
    for an anyOf of 3,000 objects (3 s, in which no other request was answered, while the meta-schema check was
    jsonschema's pure Python). In the
    request's context (its request id in the log), as ``asyncio.to_thread`` runs one."""
    if not _asks_shape(parameters):
        return None  # nothing asked (most requests): no thread for them
    check = functools.partial(contextvars.copy_context().run, output_spec, parameters, draft, endpoint)
    return await asyncio.get_running_loop().run_in_executor(_SCHEMA_CHECKS, check)


def output_spec(parameters: Any, draft: Draft, endpoint: Endpoint) -> OutputSpec | None:
    """What the request asks of its answer's shape (``response_format``, ``tools``, ``tool_choice``,
    ``parallel_tool_calls``), checked; None when it asks nothing (free text, no tools).

    The fields are ``parameters``' on the native surfaces and the body's in compatible mode (which hands
    them over in ``parameters`` under the same names): refusals name them as the caller wrote them.
    """
    if not _asks_shape(parameters):
        # Nothing asked (most requests): read_request would make and compare the defaults' spec, 10 us for None.
        return None
    fields = parameters
    spec = read_request(
        **{name: fields.get(name) for name in _OUTPUT_FIELDS},
        message_texts=draft.texts(),
        prefix="" if endpoint is Endpoint.CHAT else "parameters.",
    )
    return None if spec == OutputSpec() else spec
