"""The llguidance backend: JSON Schema and Lark grammars over the model's own tokenizer.

llguidance (Microsoft's, the library behind guidance; vLLM's and SGLang's alternative to xgrammar) was chosen
because it needs neither torch nor triton, compiles a JSON Schema in about a millisecond (so a new schema costs
its request almost nothing), and fills a batch's masks in parallel native threads without the GIL.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llguidance
import numpy as np
from llguidance.numpy import fill_next_token_bitmask_par

from llamascope.errors import invalid_parameter
from llamascope.structured.backend import Backend, Bitmask, Grammar, Matcher
from llamascope.structured.spec import GrammarSpec


class GuidanceMatcher(Matcher):
    def __init__(self, inner: llguidance.LLMatcher) -> None:
        self.inner = inner

    def advance(self, token: int) -> bool:
        return self.inner.consume_token(token)

    @property
    def finished(self) -> bool:
        return self.inner.is_stopped()

    @property
    def can_end(self) -> bool:
        return self.inner.is_accepting()

    @property
    def failed(self) -> str:
        return self.inner.get_error()


class GuidanceGrammar(Grammar):
    def __init__(self, start: llguidance.LLMatcher) -> None:
        self._start = start  # never advanced: each request gets a copy

    def matcher(self) -> GuidanceMatcher:
        return GuidanceMatcher(self._start.deep_copy())

    def accepts_prefix(self, tokens: Sequence[int]) -> bool:
        m = self._start.deep_copy()
        return m.consume_tokens(list(tokens)) and not m.is_error()

    def accepts(self, tokens: Sequence[int]) -> bool:
        m = self._start.deep_copy()
        return m.consume_tokens(list(tokens)) and m.is_accepting()


class GuidanceBackend(Backend):
    """llguidance for one model.

    ``tokenizer_json`` is the model's ``tokenizer.json`` (a path, or its text); ``vocab_size`` its output layer's
    width (Llama 3.2 Vision's is 128,256 while its tokenizer has 128,257 ids: ``<|image|>`` is never an output);
    ``stop_ids`` the ids that end an answer (Llama 3's are 128001, 128008 and 128009), which the grammar allows
    once it is complete. ``threads`` is for the mask fill (llguidance's default: 80% of the CPUs, at most 32).
    """

    def __init__(
        self, tokenizer_json: str | Path, *, vocab_size: int, stop_ids: Sequence[int], threads: int | None = None
    ) -> None:
        self.stop_ids = tuple(stop_ids)
        tokenizer = llguidance.LLTokenizer(str(tokenizer_json), eos_token=list(self.stop_ids))
        if tokenizer.vocab_size < vocab_size:  # an output layer padded beyond the tokenizer: its ids never match
            tokenizer = llguidance.LLTokenizer(str(tokenizer_json), n_vocab=vocab_size, eos_token=list(self.stop_ids))
        # llguidance refuses a vocabulary narrower than the tokenizer, so its masks cover the tokenizer's ids and
        # the logits take only their first vocab_size columns (see masking.StepMasks.apply).
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.mask_words = (tokenizer.vocab_size + 31) // 32
        self.executor = llguidance.LLExecutor(threads)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, threads: int | None = None) -> GuidanceBackend:
        """The backend for a Hugging Face model directory: its tokenizer, its config's vocabulary size and its
        generation config's stop ids (else the config's)."""
        model_dir = Path(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        text_config = config.get("text_config", config)
        generation_path = model_dir / "generation_config.json"
        generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
        stops = generation.get("eos_token_id", text_config.get("eos_token_id", config.get("eos_token_id")))
        return cls(
            model_dir / "tokenizer.json",
            vocab_size=int(text_config["vocab_size"]),
            stop_ids=_ids(stops),
            threads=threads,
        )

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, *, vocab_size: int, stop_ids: Sequence[int], threads: int | None = None
    ) -> GuidanceBackend:
        """The backend for a loaded Hugging Face fast tokenizer (its Rust tokenizer's JSON, added tokens and all),
        for a model whose output layer is ``vocab_size`` wide and whose answers end at ``stop_ids``."""
        inner = copy.copy(tokenizer.backend_tokenizer)
        inner.no_padding()
        inner.no_truncation()
        return cls(inner.to_str(), vocab_size=vocab_size, stop_ids=stop_ids, threads=threads)

    def compile(self, spec: GrammarSpec) -> GuidanceGrammar:
        try:
            grammar = spec.llguidance_grammar()
        except ValueError as e:
            raise invalid_parameter(f"Invalid value for '{spec.field}': {_first_line(str(e))}") from None
        start = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if start.is_error():
            problem = _first_line(start.get_error())
            raise invalid_parameter(
                f"Invalid value for '{spec.field}': the schema cannot be used for decoding: {problem}"
            )
        # A schema nothing satisfies ({"$ref": "#"}, references in a circle) compiles, and its first mask allows
        # no token: the answer would end at once as "stop" with no JSON. Found here, on a copy, once per schema.
        first = start.deep_copy()
        first.compute_bitmask()
        if first.is_error():
            raise invalid_parameter(
                f"Invalid value for '{spec.field}': the schema cannot be used for decoding: no JSON value satisfies it "
                f"({_first_line(first.get_error())})."
            )
        return GuidanceGrammar(start)

    def fill_bitmask(self, matchers: Sequence[Matcher], bitmask: Bitmask, *, parallel: bool = True) -> None:
        if parallel:
            fill_next_token_bitmask_par(self.executor, [(_inner(m), i) for i, m in enumerate(matchers)], bitmask)
            return
        assert bitmask.dtype == np.int32 and bitmask.flags["C_CONTIGUOUS"], "an int32 bitmask, C-contiguous"
        row_bytes = bitmask.shape[1] * 4
        at = bitmask.ctypes.data
        for i, matcher in enumerate(matchers):
            _inner(matcher).unsafe_compute_mask_ptr(at + i * row_bytes, row_bytes)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode_str(list(tokens))


def _inner(matcher: Matcher) -> llguidance.LLMatcher:
    assert isinstance(matcher, GuidanceMatcher), "a matcher of another backend"
    return matcher.inner


def _ids(value: Any) -> list[int]:
    if value is None:
        raise ValueError("the model's configuration names no end-of-sequence token")
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else "unknown error"
