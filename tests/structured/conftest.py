"""The structured-output backend for the built-in model (its real tokenizer, vocabulary and stop ids)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llamascope.structured.compiler import GrammarCache
from llamascope.structured.guidance import GuidanceBackend


@pytest.fixture(scope="session")
def backend(test_model_dir: Path) -> GuidanceBackend:
    # test_model_dir is tests/conftest.py's: the one place that knows where the built-in model is made.
    return GuidanceBackend.from_model_dir(test_model_dir, threads=2)


@pytest.fixture(scope="session")
def grammars(backend: GuidanceBackend) -> Iterator[GrammarCache]:
    cache = GrammarCache(backend, capacity=64)
    yield cache
    cache.close()
