"""The engine interface: what every way of running a model offers.

An engine takes a conversation that has already passed llamascope's rules
(``Turn`` objects, the image decoded), turns it into a ``PreparedPrompt``
(tokenised, counted, checked against the context), and generates from it.
``generate`` is an async iterator of ``Chunk``: text deltas with the running
token count, the last one carrying the finish reason. Closing the iterator
(``aclose()``, or cancelling the task that iterates it) cancels the generation:
the engine stops within one decode step and frees what it held.

The in-process transformers engines (Llama 3.2 Vision, and the text-only
Llama models, sharing one batching scheduler) and the upstream-proxy engine
implement it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, Protocol

from llamascope.images import PreparedImage
from llamascope.observability.facts import UpstreamHealth
from llamascope.structured.spec import OutputSpec
from llamascope.structured.tools import ToolCall

# A turn's content, in order: its text and its images (several may be in one turn, text between them).
Part = str | PreparedImage

# Set while a request runs on the capacity interactive requests leave free (a batch line, see batch/runner.py):
# an engine with a queue admits it only when no interactive request waits, and never counts it in the queue
# interactive requests are refused from. A context variable, as the request passes the HTTP layer in process
# on its way here and the engine is the only one that acts on it.
background: ContextVar[bool] = ContextVar("llamascope_background", default=False)


@dataclass(frozen=True)
class Turn:
    """One message of a conversation that passed the rules, its images decoded.

    ``content`` is its text, or its text and images in the order the client sent them (Mllama's text tokens
    attend to the images before them, so the order is kept). A tool turn's text is the tool's result.
    """

    role: Literal["system", "user", "assistant", "tool"]
    content: str | tuple[Part, ...]
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn that called tools (its text may be empty)
    tool_call_id: str | None = None  # a tool turn: the call it answers

    @property
    def parts(self) -> tuple[Part, ...]:
        """The content as parts, in order (a string content: one text part)."""
        return (self.content,) if isinstance(self.content, str) else self.content

    @property
    def text(self) -> str:
        """All of its text, joined, without the images."""
        return "".join(p for p in self.parts if isinstance(p, str))

    @property
    def images(self) -> tuple[PreparedImage, ...]:
        return tuple(p for p in self.parts if isinstance(p, PreparedImage))


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 512
    min_new_tokens: int = 0
    temperature: float = 0.8  # 0 means greedy
    top_p: float = 1.0
    top_k: int | None = None  # None: top-k off, only top-p applies
    seed: int | None = None
    repetition_penalty: float = 1.0
    # OpenAI's: subtracted from the logit of each token the answer has made so far, once (presence) and once
    # for each time it was made (frequency); the prompt's tokens do not count.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Log-probabilities of the tokens made: None, off; N >= 0, each token's own and its N likeliest rivals.
    logprobs: int | None = None
    # The request's stop strings. The conversation cuts the text at the first of them whatever the engine does;
    # an engine that can end its answer at one itself (an upstream) is told them, so that it stops at once
    # and counts its tokens to there.
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class FinishReason(str, Enum):
    STOP = "stop"  # end-of-turn token or a stop string
    LENGTH = "length"  # max_new_tokens or the context limit
    TOOL_CALLS = "tool_calls"  # the answer is tool calls (Chunk.tool_calls), not text
    CANCELLED = "cancelled"  # the caller went away; never sent to a client


@dataclass(frozen=True)
class TokenLogprob:
    """A token made, its log-probability under the model (before the sampling settings), and its rivals'."""

    text: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass
class Chunk:
    text: str  # new text since the previous chunk (may be "")
    output_tokens: int  # tokens generated so far, in total
    finish_reason: FinishReason | None = None
    input_tokens: int | None = None  # the prompt's true count, when the engine learns it only now
    logprobs: list[TokenLogprob] | None = None  # the tokens of this chunk, when the request asked for them
    cached_tokens: int | None = None  # prompt tokens whose keys and values were reused, not computed (first chunk)
    tool_calls: list[ToolCall] | None = None  # the last chunk of an answer that calls tools (or was cut calling)
    # The engine holds its next chunk already (the rest of a burst): the caller may write this one together with
    # it. False whenever the next must be waited for, so that a token made alone goes out alone, at once.
    next_ready: bool = False


@dataclass
class PreparedPrompt:
    """A conversation made ready for one engine. ``payload`` is the engine's own."""

    input_tokens: int
    image_tokens: int
    max_new_tokens: int  # the most this prompt may generate before the context is full
    payload: Any = field(default=None, repr=False)
    output: OutputSpec | None = None  # the answer's required shape, as given to ``prepare``
    # Whether the engine began on it: its prompt prefilled or its images encoded. An engine that cannot tell (an
    # upstream one, which has the prompt once it is sent) leaves it True; the in-process one says, once the request
    # ends. A request that ended before, its client gone while it waited in the queue, is not charged its prompt.
    ran: bool = True

    def new_tokens(self, sampling: SamplingParams) -> int:
        """The most a request may generate: what it asked for, within the context."""
        return min(sampling.max_new_tokens, self.max_new_tokens)


@dataclass(frozen=True)
class EngineInfo:
    kind: str  # "transformers", "upstream", ...
    source: str  # where the weights come from, for listings and logs
    context_length: int
    test_model: bool = False
    takes_images: bool = True  # False: a text-only model (the text-generation API only)
    # Images a conversation may carry unless the model's ``max_images`` setting says otherwise: for Llama 3.2
    # Vision in process, as many as the vision tower encodes in one call (``mllama.default_max_images``); through
    # an upstream engine 1, vLLM's own default (``--limit-mm-per-prompt``).
    max_images: int = 1


class ModelLoadError(Exception):
    """A model that cannot be served (its directory, its weights, its tokenizer); the message says why."""


class Engine(Protocol):
    info: EngineInfo

    async def prepare(self, turns: list[Turn], output: OutputSpec | None = None) -> PreparedPrompt:
        """Tokenise and check the conversation; raise ServiceError if it cannot be served.

        ``output``: the answer's required shape (JSON, a JSON Schema, tools offered or forced); the prompt
        tells the model of the tools it offers, and ``generate`` holds the answer to it.
        """
        ...

    def generate(self, prompt: PreparedPrompt, sampling: SamplingParams) -> AsyncIterator[Chunk]:
        """Generate; close the iterator to cancel."""
        ...

    def tokens(self, prompt: PreparedPrompt) -> tuple[list[int], list[str]]:
        """The prompt's token ids, exactly as ``generate`` runs them, and each one's text (for Tokenization)."""
        ...

    def image_size(self, width: int, height: int) -> tuple[int, int]:
        """The size this model resizes a width x height image to; image intake decodes no larger."""
        ...

    def stats(self) -> dict[str, int]:
        """Its load right now, for /health: requests running and waiting, and the like."""
        ...

    def health(self) -> Sequence[UpstreamHealth]:
        """The upstream engines it calls, each in rotation or not, for /metrics (in process: none)."""
        ...

    def start(self) -> None:
        """Begin its background work, once the server's event loop runs (an upstream's health checks)."""
        ...

    async def close(self) -> None: ...
