"""The grammar library's side of structured output, as an interface: a backend compiles grammars for one model's
tokenizer and fills token masks; a grammar makes a matcher per request; a matcher follows one answer.

The engine and the tests speak only to these types; ``guidance`` implements them with llguidance (another
library, xgrammar say, would be one more module like it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from llamascope.structured.spec import GrammarSpec

Bitmask = NDArray[np.int32]  # [rows, ceil(vocab / 32)]: bit j of word w allows token 32 * w + j


class Matcher(ABC):
    """One answer's place in its grammar."""

    @abstractmethod
    def advance(self, token: int) -> bool:
        """Take the sampled token; False if the grammar does not allow it (the matcher has then failed)."""

    @property
    @abstractmethod
    def finished(self) -> bool:
        """The grammar is complete and nothing may follow but a stop token: the answer ends here."""

    @property
    @abstractmethod
    def can_end(self) -> bool:
        """What was made so far is a whole answer (a stop token is allowed now)."""

    @property
    @abstractmethod
    def failed(self) -> str:
        """Why the matcher failed, or "" while it has not."""


class Grammar(ABC):
    """A compiled grammar, shared (read-only) by every request that asks for it."""

    @abstractmethod
    def matcher(self) -> Matcher:
        """A fresh matcher at the start of the grammar."""

    @abstractmethod
    def accepts_prefix(self, tokens: Sequence[int]) -> bool:
        """Whether ``tokens`` begin some answer of the grammar (an answer cut by its length must)."""

    @abstractmethod
    def accepts(self, tokens: Sequence[int]) -> bool:
        """Whether ``tokens`` are a whole answer of the grammar."""


class Backend(ABC):
    """A grammar library set up for one model: its tokenizer, its output layer's width, its stop tokens."""

    vocab_size: int  # the logits' width: the output layer's, which may be narrower than the tokenizer
    mask_words: int  # the bitmask's width in int32 words (it may cover ids beyond vocab_size)
    stop_ids: tuple[int, ...]

    @abstractmethod
    def compile(self, spec: GrammarSpec) -> Grammar:
        """Compile ``spec`` (CPU-bound: call it off the event loop); ``ServiceError`` InvalidParameter naming
        ``spec.field`` if it cannot be."""

    @abstractmethod
    def fill_bitmask(self, matchers: Sequence[Matcher], bitmask: Bitmask, *, parallel: bool = True) -> None:
        """Write each matcher's allowed next tokens into its row of ``bitmask`` (row i for ``matchers[i]``),
        all rows at once; with ``parallel`` the library may use several threads of its own, else it fills them
        one after another on the calling thread. It does not hold the GIL while it fills."""

    def allocate_bitmask(self, rows: int) -> Bitmask:
        return np.full((rows, self.mask_words), -1, dtype=np.int32)
