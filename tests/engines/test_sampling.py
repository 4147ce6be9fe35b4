"""Batch sampling against transformers' own warpers: the same tokens are possible, in the same proportions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llamascope.engines.base import SamplingParams
from llamascope.engines.sampling import TOP_P_CANDIDATES, Sampler, _first_above, argmax, pick


def allowed(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """transformers' distribution for one row after its warpers, as generate applies them."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    return warpers(torch.zeros((1, 1), dtype=torch.long), logits[None].clone())[0].softmax(-1)


def draws(logits: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    """How often each token was drawn by n rows of one batch, each row seeded apart."""
    samplers = [Sampler(SamplingParams(**{**vars(params), "seed": seed})) for seed in range(n)]
    tokens = pick(samplers, [[]] * n, logits[None].repeat(n, 1))
    return torch.bincount(torch.tensor(tokens), minlength=logits.shape[0]).float() / n


CASES = [
    SamplingParams(temperature=0.8),  # the API's defaults
    SamplingParams(temperature=1.3, top_k=7),
    SamplingParams(temperature=0.7, top_p=0.6),
    SamplingParams(temperature=1.0, top_k=12, top_p=0.8),
]


@pytest.mark.parametrize("vocab", [40, 768], ids=["one running sum", "block sums"])
@pytest.mark.parametrize("params", CASES, ids=["temperature", "top-k", "top-p", "top-k and top-p"])
def test_draws_follow_transformers_distribution(params: SamplingParams, vocab: int) -> None:
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(1)) * 2 - 30
    logits[torch.arange(40) * (vocab // 40)] += 30  # 40 likely tokens, spread over every block
    expected = allowed(logits, params)
    seen = draws(logits, params, 6000)
    assert not bool((seen[expected == 0] > 0).any()), "drew a token transformers' warpers remove"
    assert (seen - expected).abs().max() < 0.03


def test_top_p_beyond_the_candidates_sorts_the_whole_row() -> None:
    """A flat distribution: top-p's set is larger than the first candidates looked at."""
    vocab = 4 * TOP_P_CANDIDATES
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(2)) * 0.1
    params = SamplingParams(temperature=1.0, top_p=0.9)
    expected = allowed(logits, params)
    assert int((expected > 0).sum()) > TOP_P_CANDIDATES
    seen = draws(logits, params, 3000)
    assert not bool((seen[expected == 0] > 0).any())
    assert int((seen > 0).sum()) > TOP_P_CANDIDATES  # tokens beyond the candidates are drawn too


def test_a_seeded_row_draws_the_same_alone_and_in_any_batch() -> None:
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(3))
    mine = SamplingParams(temperature=0.9, top_p=0.7, seed=42)
    others = [SamplingParams(temperature=0), SamplingParams(top_k=5, seed=1), SamplingParams(temperature=1.5)]
    alone_sampler = Sampler(mine)
    alone = [pick([alone_sampler], [[]], logits[step : step + 1].clone())[0] for step in range(4)]
    samplers = [Sampler(p) for p in [*others, mine]]
    together = []
    for step in range(4):
        rows = torch.stack([logits[(step + 1) % 4]] * 3 + [logits[step]])  # the others see other logits
        together.append(pick(samplers, [[]] * 4, rows)[3])
    assert together == alone
    assert len(set(alone)) > 1


def test_greedy_with_repetition_penalty_is_transformers() -> None:
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(4))
    history = [[5, 9, 9, 17], [int(logits[1].argmax())], [1, 2]]
    params = [SamplingParams(temperature=0, repetition_penalty=1.8)] * 2 + [SamplingParams(temperature=0)]
    ours = pick([Sampler(p) for p in params], history, logits.clone())
    expected = []
    for row, (ids, p) in enumerate(zip(history, params, strict=True)):
        scores = logits[row : row + 1].clone()
        if p.repetition_penalty != 1.0:
            scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([ids]), scores)
        expected.append(int(scores.argmax()))
    assert ours == expected
    assert ours[1] != int(logits[1].argmax())  # the penalty moved the second row off its repeated token


@pytest.mark.parametrize("vocab", [128256, 1000])
def test_argmax_is_torchs_first_of_equal_maxima(vocab: int) -> None:
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(5))
    logits[1, [7, 300, vocab - 1]] = 50.0  # ties in different blocks: the first
    logits[2, [600, 601]] = 50.0  # ties in one block
    logits[3, :] = 0.0  # all equal: index 0
    logits[4, vocab - 1] = 60.0  # the very last
    expected = logits.argmax(-1)
    assert torch.equal(argmax(logits), expected)
    assert expected[1] == 7 and expected[4] == vocab - 1


def test_a_draw_never_lands_on_a_token_of_zero_weight() -> None:
    """Rounding can put u * total at or past a row's total, or a hair below zero within a block."""
    cumulative = torch.tensor([[0.0, 0.5, 0.5, 1.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0, 3.0, 3.0]])
    assert _first_above(cumulative, torch.tensor([[1.0], [3.5]])).flatten().tolist() == [3, 4]
    assert _first_above(cumulative, torch.tensor([[0.0], [0.0]])).flatten().tolist() == [1, 2]
    assert _first_above(cumulative, torch.tensor([[0.7], [2.0]])).flatten().tolist() == [3, 4]


def test_a_low_temperature_draw_is_the_top_token() -> None:
    """Nearly every weight rounds to zero; the draw must still be a token that has weight."""
    logits = torch.randn(8, 1024, generator=torch.Generator().manual_seed(6)) * 5
    samplers = [Sampler(SamplingParams(temperature=1e-4, seed=i)) for i in range(8)]
    assert pick(samplers, [[]] * 8, logits.clone()) == logits.argmax(-1).tolist()


# Every value the API accepts (conversation/parameters.py): temperature >= 0, top_p in (0, 1], top_k from 1
# (0 and above 100 turn it off), repetition_penalty > 0; finite, as JSON numbers are.
POSITIVE = st.floats(min_value=0.0, exclude_min=True, allow_infinity=False)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    temperature=st.one_of(st.just(0.0), POSITIVE, st.sampled_from([5e-324, 1e-45, 1e-38, 1e38, 1e300])),
    top_p=st.one_of(st.floats(min_value=0.0, max_value=1.0, exclude_min=True), st.sampled_from([5e-324, 1.0])),
    top_k=st.one_of(st.none(), st.integers(1, 100)),
    penalty=st.one_of(st.just(1.0), POSITIVE, st.sampled_from([5e-324, 1e-300, 1e300])),
    vocab=st.sampled_from([40, 768, 4 * TOP_P_CANDIDATES]),  # one running sum, block sums, beyond the candidates
    scale=st.sampled_from([0.01, 1.0, 30.0]),
    seed=st.integers(0, 2**63 - 1),
)
def test_any_valid_setting_draws_a_token_it_may(
    temperature: float, top_p: float, top_k: int | None, penalty: float, vocab: int, scale: float, seed: int
) -> None:
    """Extremes of the documented ranges once made NaN and a draw past the row's end (a 500 from the API)."""
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(seed % 2**32)) * scale
    held = [vocab - 1, 3]  # end-of-turn ids held back for min_new_tokens: never drawn
    logits[:, held] = float("-inf")
    history = [[3, 5, 7, vocab - 1], [1], [5, 5]]
    mine = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=penalty, seed=seed)
    others = [SamplingParams(), SamplingParams(temperature=0.7, top_k=20, seed=1)]
    tokens = pick([Sampler(mine), *map(Sampler, others)], history, logits.clone())
    for row, token in enumerate(tokens):
        assert 0 <= token < vocab and token not in held, (row, token)
    if top_k is not None and penalty == 1.0:  # among the k most likely (ties with the k-th kept)
        assert int((logits[0] > logits[0, tokens[0]]).sum()) < top_k


def test_a_tiny_temperature_or_top_p_samples_the_top_token() -> None:
    """Below float32's smallest number a temperature divided logits into inf - inf = NaN and a top-p of 1e-300
    rounded to 0 and removed every token: both drew index 5 of a top-k of 5 (``index 5 is out of bounds``)."""
    logits = torch.randn(4, 128256, generator=torch.Generator().manual_seed(7)) * 3
    for params in [
        SamplingParams(temperature=1e-40, top_k=5),
        SamplingParams(temperature=1e-40),
        SamplingParams(temperature=0.8, top_p=1e-300),
    ]:
        samplers = [Sampler(SamplingParams(**{**vars(params), "seed": i})) for i in range(4)]
        assert pick(samplers, [[]] * 4, logits.clone()) == logits.argmax(-1).tolist()


@pytest.mark.parametrize(
    ("presence", "frequency", "answer", "expected"),
    [
        (0.0, 0.0, [3], 3),  # no penalty: the top token
        (2.0, 0.0, [3], 5),  # made once: 1.0 below the second
        (0.0, 0.5, [3], 3),  # once, 0.5 down: still on top
        (0.0, 0.5, [3, 3, 3], 5),  # three times, 1.5 down
        (-2.0, 0.0, [1], 1),  # a negative presence favours what was made
    ],
)
def test_presence_and_frequency_penalties_count_the_answers_tokens_only(
    presence: float, frequency: float, answer: list[int], expected: int
) -> None:
    logits = torch.tensor([[0.0, 8.5, 0.0, 10.0, 0.0, 9.0, 0.0, 0.0]])
    sampler = Sampler(SamplingParams(temperature=0, presence_penalty=presence, frequency_penalty=frequency))
    prompt = [5] * 10  # the prompt's tokens never count
    assert pick([sampler], [prompt + answer], logits, [len(answer)]) == [expected]
