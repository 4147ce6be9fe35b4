"""Hypothesis properties of the message and parameter parsers, with the engine they feed.

- Every accepted conversation renders into a prompt the built-in model runs (prepare, then a token).
- Every accepted ``parameters`` object samples: the engine's own sampler picks tokens with it, and a
  short generation on the built-in model ends within its max_tokens.
- Every refusal is a 400 whose message names the field at fault: the parameter, or ``messages[i]``.

Derandomized, with no example database, so a CI run is the same run every time.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from llamascope import errors
from llamascope.conversation.parameters import MAX_SEED, parse_parameters
from llamascope.conversation.rules import parse_messages
from llamascope.engines.base import FinishReason
from llamascope.engines.mllama import MllamaEngine
from llamascope.engines.sampling import Sampler, pick
from llamascope.images import PreparedImage

CONTEXT = 64  # a short context keeps the engine's runs short; max_tokens ranges up to it
SHORT_CONTEXT = 26
IMAGE = PreparedImage(
    Image.new("RGB", (64, 48), (200, 30, 30)), digest="red", format="PNG", source_width=64, source_height=48
)
REPRODUCIBLE = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# The model's runs are slow to shrink: a failure there is reported as found.
ON_THE_MODEL = settings(REPRODUCIBLE, phases=[Phase.explicit, Phase.generate])


@pytest.fixture(scope="module")
def engine(test_model_dir: Path) -> MllamaEngine:
    return MllamaEngine.load(test_model_dir, context_length=CONTEXT, test_model=True)


@pytest.fixture(scope="module")
def short_engine(test_model_dir: Path) -> MllamaEngine:
    """Room for a short question and four tokens: the defaults (max_tokens up to the context) stay quick."""
    return MllamaEngine.load(test_model_dir, context_length=SHORT_CONTEXT, test_model=True)


# -- parameters --------------------------------------------------------------------------------------------

NOT_NUMBERS = st.one_of(st.booleans(), st.text(max_size=3), st.lists(st.integers(), max_size=1), st.just({}))
FINITE = {"allow_nan": False, "allow_infinity": False}
NOT_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


Values = tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]  # what the parser must take, and refuse


def integer(valid: st.SearchStrategy[int], invalid: st.SearchStrategy[Any]) -> Values:
    """An int or the same as a float (JSON's 5.0); or something refused."""
    return st.one_of(valid, valid.filter(lambda v: float(v) == v).map(float)), invalid


NON_INTEGERS = st.one_of(NOT_NUMBERS, NOT_FINITE, st.floats(**FINITE).filter(lambda f: f != int(f)))
PARAMETERS: dict[str, Values] = {
    "max_tokens": integer(
        st.integers(1, 8), st.one_of(NON_INTEGERS, st.integers(max_value=0), st.integers(CONTEXT + 1))
    ),
    "max_new_tokens": integer(
        st.integers(1, 8), st.one_of(NON_INTEGERS, st.integers(max_value=0), st.integers(CONTEXT + 1))
    ),
    "min_new_tokens": integer(st.integers(0, 4), st.one_of(NON_INTEGERS, st.integers(max_value=-1))),
    "top_p": (
        st.floats(0.0, 1.0, exclude_min=True),
        st.one_of(
            NOT_NUMBERS,
            NOT_FINITE,
            st.floats(max_value=0.0, **FINITE),
            st.floats(min_value=1.0, exclude_min=True, **FINITE),
        ),
    ),
    "temperature": (
        st.floats(min_value=0.0, **FINITE),
        st.one_of(NOT_NUMBERS, NOT_FINITE, st.floats(max_value=0.0, exclude_max=True, **FINITE)),
    ),
    "top_k": integer(st.integers(0, 200), st.one_of(NON_INTEGERS, st.integers(max_value=-1))),
    "seed": integer(
        st.integers(0, MAX_SEED), st.one_of(NON_INTEGERS, st.integers(max_value=-1), st.integers(MAX_SEED + 1))
    ),
    "repetition_penalty": (
        st.floats(min_value=0.0, exclude_min=True, **FINITE),
        st.one_of(NOT_NUMBERS, NOT_FINITE, st.floats(max_value=0.0, **FINITE)),
    ),
    **{
        name: (
            st.floats(-2.0, 2.0),
            st.one_of(
                NOT_NUMBERS,
                NOT_FINITE,
                st.floats(max_value=-2.0, exclude_max=True, **FINITE),
                st.floats(min_value=2.0, exclude_min=True, **FINITE),
            ),
        )
        for name in ("presence_penalty", "frequency_penalty")
    },
    "stop": (
        st.one_of(st.text(min_size=1, max_size=4), st.lists(st.text(min_size=1, max_size=4), max_size=3)),
        st.one_of(st.just(""), st.just([""]), st.lists(st.integers(), min_size=1, max_size=2), st.integers()),
    ),
    "incremental_output": (st.booleans(), st.one_of(st.integers(), st.text(max_size=3))),
}
KNOWN = set(PARAMETERS) | {"max_completion_tokens", "n"}  # n: 1 only, refused otherwise


@st.composite
def parameter_objects(draw: st.DrawFn, valid_only: bool = False) -> tuple[dict[str, Any], set[str]]:
    """A parameters object, and the names in it that must be refused."""
    params: dict[str, Any] = {}
    invalid: set[str] = set()
    for name, (valid, refused) in PARAMETERS.items():
        choice = draw(st.sampled_from(["absent", "null", "valid", "valid"] + ([] if valid_only else ["refused"])))
        if choice == "null":
            params[name] = None
        elif choice == "valid":
            params[name] = draw(valid)
        elif choice == "refused":
            params[name] = draw(refused)
            invalid.add(name)
    if params.get("max_tokens") is not None:
        invalid.discard("max_new_tokens")  # max_tokens wins; the other is not read
    extras = draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k not in KNOWN), st.integers(), max_size=2))
    return {**params, **extras}, invalid


@pytest.mark.slow
@settings(REPRODUCIBLE, max_examples=400)
@given(parameter_objects())
def test_parameters_are_accepted_exactly_when_valid_and_refusals_name_them(
    case: tuple[dict[str, Any], set[str]],
) -> None:
    params, invalid = case
    try:
        options = parse_parameters(params, CONTEXT)
    except errors.ServiceError as refusal:
        assert (refusal.status, refusal.code) == (400, "InvalidParameter")
        assert invalid, f"refused a valid object: {refusal.message}"
        assert any(name in refusal.message for name in invalid), (refusal.message, invalid)
        return
    assert not invalid, f"accepted {sorted(invalid)}"
    sampling = options.sampling
    assert 1 <= sampling.max_new_tokens <= CONTEXT and 0 <= sampling.min_new_tokens <= sampling.max_new_tokens
    # The engine's sampler picks a token with these settings, alone and beside the defaults, for a few steps.
    samplers = [Sampler(sampling), Sampler(parse_parameters({}, CONTEXT).sampling)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        logits = torch.randn(2, 512, generator=generator) * 4
        tokens = pick(samplers, [[1, 2, 3], [4]], logits)
        assert all(0 <= t < 512 for t in tokens)


@pytest.mark.slow
@settings(ON_THE_MODEL, max_examples=8)
@given(parameter_objects(valid_only=True))
def test_accepted_parameters_generate_on_the_model(
    short_engine: MllamaEngine, case: tuple[dict[str, Any], set[str]]
) -> None:
    options = parse_parameters(case[0], SHORT_CONTEXT)
    draft = parse_messages([{"role": "user", "content": [{"image": "x"}, {"text": "Describe it."}]}])

    async def generate() -> list[Any]:
        prompt = await short_engine.prepare(draft.with_images([IMAGE]))
        return [chunk async for chunk in short_engine.generate(prompt, options.sampling)]

    chunks = asyncio.run(generate())
    assert chunks[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert chunks[-1].output_tokens <= options.sampling.max_new_tokens


# -- messages --------------------------------------------------------------------------------------------

TEXT = st.text(max_size=12)
HINT = st.fixed_dictionaries({}, optional={"min_pixels": st.integers(), "type": st.sampled_from(["text", "image"])})


def text_content(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        return draw(TEXT)
    return [{"text": draw(TEXT), **draw(HINT)} for _ in range(draw(st.integers(1, 3)))]


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A conversation the rules accept: system first (or not), one image in the first user turn, user last."""
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": text_content(draw)})
    before = [{"text": t} for t in draw(st.lists(TEXT, max_size=2))]
    after = [{"text": t} for t in draw(st.lists(TEXT, max_size=2))]
    image = {"image": draw(st.sampled_from(["https://example.com/a.png", "data:image/png;base64,AAAA", "oss://k"]))}
    messages.append({"role": "user", "content": [*before, {**image, **draw(HINT)}, *after]})
    for _ in range(draw(st.integers(0, 2))):
        messages.append({"role": draw(st.sampled_from(["assistant", "user"])), "content": text_content(draw)})
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": text_content(draw)})
    return messages


@settings(ON_THE_MODEL, max_examples=25)
@given(conversations())
def test_accepted_conversations_run_on_the_model(engine: MllamaEngine, messages: list[dict[str, Any]]) -> None:
    draft = parse_messages(messages)
    assert len(draft.turns) == len(messages) and [t.role for t in draft.turns] == [m["role"] for m in messages]
    sampling = parse_parameters({"max_tokens": 1, "temperature": 0}, CONTEXT).sampling

    async def generate() -> list[Any]:
        prompt = await engine.prepare(draft.with_images([IMAGE]))
        return [chunk async for chunk in engine.generate(prompt, sampling)]

    try:
        chunks = asyncio.run(generate())
    except errors.ServiceError as refusal:  # a conversation longer than the short context: said so
        assert "Range of input length" in refusal.message
        return
    assert chunks[-1].output_tokens == 1


def _first_user(messages: list[dict[str, Any]]) -> int:
    return next(i for i, m in enumerate(messages) if m["role"] == "user")


def _text_turns(messages: list[dict[str, Any]]) -> list[int]:
    first = _first_user(messages)
    return [i for i, m in enumerate(messages) if i != first]


# Each mutation breaks one rule: (what it does, the message's fragment that names the place).
MUTATIONS = [
    "role",
    "no content",
    "content type",
    "item type",
    "video",
    "unknown key",
    "text and image",
    "image list",
    "empty image",
    "text type",
    "late system",
    "system image",
    "assistant image",
    "no image",
    "two images",
    "late image",  # a second image, over the default rule's one
    "ends with assistant",
    "not an object",
]


def mutate(draw: st.DrawFn, messages: list[dict[str, Any]], how: str) -> str:
    """Break ``messages`` in place; the fragment the refusal must carry."""
    first = _first_user(messages)
    i = draw(st.sampled_from(range(len(messages))))
    place = f"messages[{i}]"
    if how == "role":
        messages[i]["role"] = draw(st.sampled_from(["bot", "tool", None, 3, "User"]))
    elif how == "no content":
        messages[i]["content"] = None
        if draw(st.booleans()):
            del messages[i]["content"]
    elif how == "content type":
        messages[i]["content"] = draw(st.one_of(st.integers(), st.just({"text": "x"}), st.booleans()))
    elif how in ("item type", "video", "unknown key", "text and image", "text type"):
        bad = {
            "item type": draw(st.one_of(st.integers(), TEXT, st.just([]))),
            "video": {draw(st.sampled_from(["video", "audio"])): "https://example.com/v.mp4"},
            "unknown key": {"text": "x", "colour": 1},
            "text and image": {"text": "x", "image": "https://example.com/b.png"},
            "text type": {"text": draw(st.one_of(st.integers(), st.none(), st.lists(TEXT, max_size=1)))},
        }[how]
        content = messages[i]["content"]
        content = [{"text": content}] if isinstance(content, str) else content
        messages[i]["content"] = [*content, bad]
        place = f"{place} ({messages[i]['role']}) content[{len(content)}]"
    elif how in ("image list", "empty image"):
        i, place = first, f"messages[{first}]"
        item = next(x for x in messages[first]["content"] if "image" in x)
        item["image"] = ["https://example.com/a.png"] if how == "image list" else draw(st.sampled_from(["", "  ", 5]))
    elif how == "late system":
        at = draw(st.integers(1, len(messages)))
        messages.insert(at, {"role": "system", "content": "late"})
        place = f"messages[{at}]"
    elif how == "system image":
        messages.insert(0, {"role": "system", "content": [{"image": "https://example.com/b.png"}]})
        if messages[1]["role"] == "system":
            del messages[1]
        place = "messages[0]"
    elif how in ("assistant image", "late image"):
        role = "assistant" if how == "assistant image" else "user"
        at = draw(st.integers(first + 1, len(messages)))
        messages.insert(at, {"role": role, "content": [{"image": "https://example.com/b.png"}, {"text": "and?"}]})
        if at == len(messages) - 1 and role == "assistant":
            messages.append({"role": "user", "content": "?"})
        place = f"messages[{at}]"
    elif how == "no image":
        messages[first]["content"] = [x for x in messages[first]["content"] if "image" not in x] or "hello"
        place = f"messages[{first}]"
    elif how == "two images":
        messages[first]["content"].append({"image": "https://example.com/b.png"})
        place = f"messages[{first}]"
    elif how == "ends with assistant":
        messages.append({"role": "assistant", "content": "bye"})
        place = "last message"
    elif how == "not an object":
        messages[i] = draw(st.one_of(st.integers(), TEXT, st.lists(st.integers(), max_size=1)))
    return place


@st.composite
def broken_conversations(draw: st.DrawFn) -> tuple[list[dict[str, Any]], str, str]:
    messages = draw(conversations())
    how = draw(st.sampled_from(MUTATIONS))
    return messages, how, mutate(draw, messages, how)


@settings(REPRODUCIBLE, max_examples=400)
@given(broken_conversations())
def test_refused_conversations_name_the_message_at_fault(case: tuple[list[Any], str, str]) -> None:
    messages, how, place = case
    with pytest.raises(errors.ServiceError) as refused:
        parse_messages(messages)
    assert (refused.value.status, refused.value.code) == (400, "InvalidParameter"), how
    assert place in refused.value.message, (how, refused.value.message)


@settings(REPRODUCIBLE, max_examples=50)
@given(st.one_of(st.none(), st.just([]), st.integers(), TEXT, st.dictionaries(TEXT, st.integers(), max_size=2)))
def test_no_message_list_is_refused_as_such(messages: Any) -> None:
    with pytest.raises(errors.ServiceError) as refused:
        parse_messages(messages)
    assert refused.value.status == 400
    if messages in (None, []):
        assert refused.value.code == "BadRequest.EmptyInput"
    else:
        assert "messages" in refused.value.message
