"""Self-attention caches appended to in place (kv_cache.GrowingLayer): what they hold, and the model's output."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from llamascope.engines.base import SamplingParams, Turn
from llamascope.engines.kv_cache import SLACK, GrowingLayer, new_cache
from llamascope.engines.mllama import MllamaEngine


def tokens(n: int, seed: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 2, n, 8)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def test_appends_in_place_and_never_changes_what_it_handed_out() -> None:
    growing, plain = GrowingLayer(), DynamicLayer()
    handed: list[tuple[torch.Tensor, torch.Tensor]] = []
    for step in range(3 * SLACK):
        keys, values = tokens(7 if step == 0 else 1, step)  # a 7-token prompt, then a token a step
        mine = growing.update(keys, values)
        theirs = plain.update(keys, values)
        assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])
        if step % 50 == 0:
            handed.append((mine[0].clone(), mine[0]))
    # A new buffer every SLACK tokens, not every token.
    assert growing.regrown <= (7 + 3 * SLACK) // SLACK + 1
    for copy, view in handed:  # later writes went past every view handed out
        assert torch.equal(copy, view)


def test_tensors_put_in_its_place_are_taken_as_they_are() -> None:
    """The scheduler replaces keys and values (rows joining or leaving a batch, a failed step taken back):
    the next token goes after what was put there, and the old buffer is not written."""
    layer = GrowingLayer()
    for step in range(5):
        layer.update(*tokens(1, step))
    old_keys = layer.keys
    before = old_keys.clone()
    kept = (layer.keys[1:].clone(), layer.values[1:].clone())  # one row leaves
    layer.keys, layer.values = kept
    keys, _ = layer.update(*tokens(1, 99, batch=1))
    assert keys.shape == (1, 2, 6, 8)
    assert torch.equal(keys[:, :, :5], kept[0]) and torch.equal(keys[:, :, 5:], tokens(1, 99, batch=1)[0])
    assert torch.equal(old_keys, before)
    # Taken back to an earlier length (a failed step): the next token overwrites the step's, nothing else.
    earlier = (layer.keys, layer.values)
    layer.update(*tokens(1, 100, batch=1))
    layer.keys, layer.values = earlier
    keys, _ = layer.update(*tokens(1, 101, batch=1))
    assert keys.shape[2] == 7 and torch.equal(keys[:, :, 6:], tokens(1, 101, batch=1)[0])


def test_the_model_reads_the_same_keys_and_values(test_model_dir: Path) -> None:
    """Prefill and 40 decode steps of the real model, fed the same tokens, with either cache: the same logits
    up to the order of float32 sums (the attention reads a strided view instead of a packed tensor)."""
    engine = MllamaEngine.load(test_model_dir, test_model=True)
    model, config = engine.model, engine.model.config.text_config
    cross = set(config.cross_attention_layers)
    prompt = torch.randint(0, 1000, (2, 30), generator=torch.Generator().manual_seed(1))
    follow = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(2))
    outputs = []
    with torch.inference_mode():
        for cache in (DynamicCache(config=config), new_cache(config, cross)):
            logits = [model(input_ids=prompt, past_key_values=cache, use_cache=True).logits[:, -1]]
            for i in range(follow.shape[1]):
                step = model(input_ids=follow[:, i : i + 1], past_key_values=cache, use_cache=True)
                logits.append(step.logits[:, -1])
            outputs.append(torch.stack(logits))
        assert any(isinstance(layer, GrowingLayer) and layer.regrown for layer in cache.layers)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)

    # Through the engine: a long answer regrows each layer's buffer every SLACK tokens.
    async def answer() -> int:
        prompt = await engine.prepare([Turn("user", "Tell me everything.")])
        greedy = SamplingParams(max_new_tokens=3 * SLACK, min_new_tokens=3 * SLACK, temperature=0)
        return [c async for c in engine.generate(prompt, greedy)][-1].output_tokens

    assert asyncio.run(answer()) == 3 * SLACK
