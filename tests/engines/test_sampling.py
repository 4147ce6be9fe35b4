"""Batch sampling against transformers' own warpers: the same tokens are possible, in the same proportions."""

from __future__ import annotations

import pytest
import torch
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
