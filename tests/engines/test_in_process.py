"""The request path every in-process model shares (prompt preparation, generation, cancellation), driven
directly (no HTTP) on the built-in Llama 3.2 Vision model."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from llamascope import errors
from llamascope.engines.base import FinishReason, SamplingParams, ToolCall, Turn
from llamascope.engines.mllama import MllamaEngine
from tests.engines.helpers import RED
from tests.engines.helpers import run as collect


@pytest.fixture(scope="module")
def engine(test_model_dir: Path) -> MllamaEngine:
    return MllamaEngine.load(test_model_dir, test_model=True)


def test_seeded_sampling_repeats(engine: MllamaEngine) -> None:
    turns = [Turn("user", (RED, "Describe."))]
    run = lambda seed: asyncio.run(collect(engine, turns, SamplingParams(max_new_tokens=10, seed=seed)))[0]  # noqa: E731
    assert run(1) == run(1) != run(2)


def test_with_stop_strings_each_token_comes_in_its_own_chunk(engine: MllamaEngine) -> None:
    """A loop that falls behind gets the tokens made meanwhile in one chunk, unless the request has stop strings:
    the conversation cuts at the first and charges the tokens to the one that completed it (a chunk of several
    once charged those made after it too, more the further behind the loop was)."""

    async def counts(stop: tuple[str, ...]) -> list[int]:
        prompt = await engine.prepare([Turn("user", (RED, "Describe."))])
        made = []
        async for chunk in engine.generate(prompt, SamplingParams(max_new_tokens=8, temperature=0, stop=stop)):
            made.append(chunk.output_tokens)
            if len(made) == 1:
                time.sleep(2)  # the loop behind: the model makes the rest meanwhile
        return made

    assert len(asyncio.run(counts(()))) < 8
    assert asyncio.run(counts(("never said",)))[:8] == list(range(1, 9))


def test_context_limit(test_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = MllamaEngine.load(test_model_dir, context_length=40, test_model=True)
    turns = [Turn("user", (RED, "Describe."))]
    _text, chunks = asyncio.run(collect(small, turns, SamplingParams(max_new_tokens=512, temperature=0)))
    prompt = asyncio.run(small.prepare(turns))
    assert chunks[-1].output_tokens == 40 - prompt.input_tokens
    assert chunks[-1].finish_reason == FinishReason.LENGTH
    with pytest.raises(errors.ServiceError, match=r"Range of input length should be \[1, 39\]"):
        asyncio.run(small.prepare([Turn("user", (RED, "dog " * 50))]))
    # A prompt far too long is refused without tokenising it.
    with pytest.raises(errors.ServiceError, match="Range of input length"):
        asyncio.run(small.prepare([Turn("user", (RED, "x" * 5_000_000))]))
    # So is one of many short turns, before its chat template is rendered (10,000 turns took 0.6 s of CPU):
    # each turn's header and end are tokens too.
    monkeypatch.setattr(small.tokenizer, "apply_chat_template", lambda *a, **k: pytest.fail("rendered"))
    many = [Turn("user" if i % 2 == 0 else "assistant", (RED, "hi") if i == 0 else "hi") for i in range(10_000)]
    with pytest.raises(errors.ServiceError, match=r"Range of input length should be \[1, 39\]"):
        asyncio.run(small.prepare(many))


def test_the_cheap_bound_on_a_prompt_never_exceeds_its_tokens(engine: MllamaEngine) -> None:
    """The tokens counted before rendering are a lower bound, so a prompt that fits is never refused by it."""
    call = ToolCall("get_weather", '{"city": "Paris"}', "call_1")
    conversations = [
        [Turn("user", (RED, "Describe."))],
        [Turn("system", "  Be brief.  "), Turn("user", "hi"), Turn("assistant", "\n"), Turn("user", "ünïcødé " * 9)],
        [Turn("user", "w?"), Turn("assistant", "", tool_calls=(call,)), Turn("tool", "12 C", tool_call_id="call_1")],
        [Turn("user" if i % 2 == 0 else "assistant", "hi") for i in range(500)],
    ]
    for turns in conversations:
        assert engine._fewest_tokens(turns) <= asyncio.run(engine.prepare(turns)).input_tokens


def test_the_cheap_bound_counts_text_only_where_the_template_writes_every_turn(engine: MllamaEngine) -> None:
    """A configured template may drop a conversation's history: its text is then no bound on the prompt."""
    from llamascope.engines.templates import renders_every_text

    assert engine._text_counts and renders_every_text(engine.tokenizer, engine.template)
    last_only = "{{ messages[-1]['content'] }}"
    assert not renders_every_text(engine.tokenizer, last_only)


def test_cancel_frees_the_model_within_a_step(engine: MllamaEngine) -> None:
    async def scenario() -> tuple[int, float]:
        prompt = await engine.prepare([Turn("user", (RED, "Describe."))])
        stream = engine.generate(prompt, SamplingParams(max_new_tokens=4000, temperature=0))
        got = 0
        async for chunk in stream:
            got = chunk.output_tokens
            if got >= 3:
                break
        await stream.aclose()
        closed = time.monotonic()
        while engine.active:
            await asyncio.sleep(0.005)
            assert time.monotonic() - closed < 5, "generation kept running after cancel"
        # The next request runs at once: the model thread is free.
        _text, chunks = await collect(engine, [Turn("user", (RED, "Next."))], SamplingParams(max_new_tokens=2))
        return chunks[-1].output_tokens, time.monotonic() - closed

    produced, _ = asyncio.run(scenario())
    assert produced == 2
    assert engine.active == 0
