"""Constrained decoding over the built-in model's tokenizer, with random logits in place of the model.

Whatever the weights, an answer that ends must parse and validate against its schema, and an answer cut by its
length must be a prefix the grammar accepts.
"""

from __future__ import annotations

import json
import zlib

import jsonschema
import pytest
import torch

from llamascope.errors import ServiceError
from llamascope.structured.compiler import GrammarCache
from llamascope.structured.guidance import GuidanceBackend
from llamascope.structured.masking import StepMasks
from llamascope.structured.spec import GrammarSpec
from tests.structured.decoding import random_decode
from tests.structured.schemas import SCHEMAS

ROWS = 20  # answers per schema, each its own random draws
MAX_TOKENS = 120


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_answers_hold_to_their_schema(name: str, backend: GuidanceBackend, grammars: GrammarCache) -> None:
    schema = SCHEMAS[name]
    grammar = grammars.get_blocking(GrammarSpec.json_schema(schema, "response_format.json_schema.schema"))
    rows, matchers = random_decode(backend, [grammar] * ROWS, zlib.crc32(name.encode()), MAX_TOKENS, torch_path=False)
    for row, matcher in zip(rows, matchers, strict=True):
        text = backend.decode(row.tokens)
        if row.finish_reason == "stop":
            assert grammar.accepts(row.tokens), text
            jsonschema.validate(json.loads(text), schema)
        else:
            assert grammar.accepts_prefix(row.tokens), text
            assert matcher is not None and not matcher.failed
    if "cut" not in name and name != "json_object":
        assert sum(r.finish_reason == "stop" for r in rows) >= ROWS // 2, "the grammar should end most answers"


def test_the_engine_path_holds_in_a_mixed_batch(backend: GuidanceBackend, grammars: GrammarCache) -> None:
    """Through ``StepMasks.apply`` on a logits tensor: constrained rows on both sides of an unconstrained one."""
    schema = SCHEMAS["enums and const"]
    grammar = grammars.get_blocking(GrammarSpec.json_schema(schema, "response_format.json_schema.schema"))
    rows, _ = random_decode(backend, [grammar, None, grammar], seed=7, max_tokens=40)
    for row in (rows[0], rows[2]):
        if row.finish_reason == "stop":
            jsonschema.validate(json.loads(backend.decode(row.tokens)), schema)
        else:
            assert grammar.accepts_prefix(row.tokens)
    assert rows[1].finish_reason == "length" or not backend.decode(rows[1].tokens).startswith("{")


def test_unconstrained_rows_are_untouched(backend: GuidanceBackend, grammars: GrammarCache) -> None:
    grammar = grammars.get_blocking(GrammarSpec.json_schema(SCHEMAS["flat receipt"], "response_format"))
    matchers = [None, grammar.matcher(), None, grammar.matcher()]
    masks = StepMasks(backend)
    logits = torch.randn(4, backend.vocab_size, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    masks.apply(logits, masks.fill(matchers))
    assert torch.equal(logits[[0, 2]], before[[0, 2]])
    for row in (1, 3):  # a receipt starts with "{": only tokens that are a prefix of '{"merchant": "' are left
        allowed = torch.isfinite(logits[row]).nonzero().flatten().tolist()
        assert allowed and all('{"merchant": "'.startswith(backend.decode([t])) for t in allowed)
    assert masks.fill([None, None]) is None


def test_stop_tokens_come_from_the_model(backend: GuidanceBackend) -> None:
    assert backend.stop_ids == (128001, 128008, 128009)
    assert backend.vocab_size == 128256  # the output layer: <|image|> (128256) is beyond it
    assert backend.mask_words * 32 >= 128257


def test_a_grammar_is_compiled_once(backend: GuidanceBackend) -> None:
    cache = GrammarCache(backend, capacity=2)
    specs = [
        GrammarSpec.json_schema({"type": "object", "properties": {"n": {"const": i}}}, "response_format")
        for i in range(3)
    ]
    first = cache.get_blocking(specs[0])
    assert cache.get_blocking(specs[0]) is first
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)
    cache.get_blocking(specs[1])
    cache.get_blocking(specs[2])  # the least recently used (specs[0]) goes
    assert len(cache) == 2
    assert cache.get_blocking(specs[0]) is not first
    cache.close()


def test_a_grammar_without_the_models_tokens_ends_the_answer(backend: GuidanceBackend) -> None:
    """A mask allowing none of the model's tokens (here only <|image|>, which is beyond the output layer) would
    leave only -inf to sample from: the stop tokens are allowed instead."""
    grammar = backend.compile(GrammarSpec("lark", "start: <[128256]>"))
    masks = StepMasks(backend)
    logits = torch.zeros(1, backend.vocab_size)
    masks.apply(logits, masks.fill([grammar.matcher()]))
    assert set(torch.isfinite(logits[0]).nonzero().flatten().tolist()) == set(backend.stop_ids)


def test_an_unsatisfiable_schema_is_refused_when_compiled(backend: GuidanceBackend) -> None:
    with pytest.raises(ServiceError) as caught:
        backend.compile(GrammarSpec.json_schema({"type": "integer", "minimum": 5, "maximum": 1}, "response_format"))
    assert "'response_format'" in caught.value.message and caught.value.code == "InvalidParameter"


def test_a_schema_whose_forced_start_dead_ends_is_refused_when_compiled(backend: GuidanceBackend) -> None:
    """Every answer begins "{" and llguidance finds no way on after it (the object requires itself for ever)."""
    endless = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
    with pytest.raises(ServiceError) as caught:
        backend.compile(GrammarSpec.json_schema(endless, "response_format.json_schema.schema"))
    assert "no answer can be completed after '{'" in caught.value.message
    assert "'response_format.json_schema.schema'" in caught.value.message
    optional = {"type": "object", "properties": {"a": {"$ref": "#"}}}  # "{}" satisfies it
    assert backend.compile(GrammarSpec.json_schema(optional, "response_format")).accepts(
        backend.tokenizer.tokenize_str("{}")
    )
