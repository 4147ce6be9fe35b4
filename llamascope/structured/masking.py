"""One decode step's token masks for a batch: filled for the constrained rows only, applied in one call.

The in-process engine's side (the one module here that imports torch). Per step::

    filled = masks.fill([seq.matcher for seq in rows])   # None for unconstrained rows; beside the model's step
    logits = model(...)                                   # on an accelerator, before it on the CPU
    masks.apply(logits, filled)                           # before sampling; unconstrained rows untouched
    tokens = pick(...)
    ends = masks.advance([seq.matcher for seq in rows], tokens)

A batch without a constrained row costs nothing: ``fill`` returns None and ``apply`` returns at once.

On the CPU the mask is applied as index writes, not as a pass over the whole [rows, vocab] logits. ``fill``
(which the engine runs on the model thread, before the model's step) plans each row one of two ways. A row that
allows most tokens (inside a JSON string it refuses a few hundred of 128,256, in a few dozen of the bitmask's
32-token words) becomes just those words: each as the 32 logit offsets it stands for (0 allowed, -inf refused),
added where it goes in the logits seen as [rows * vocab / 32, 32]. A row that allows few (between fields: a
handful) becomes its allowed tokens: ``apply`` clears the row and puts them back. Both are numpy's work, on one
thread: torch runs an operation over more than 32,768 values on its threads, and a fill_ of one row waited 13 ms
for a core another process held (numpy's: 0.01 ms). Each numpy call costs microseconds however small its array,
so the plan takes few (in the engine, 8 of 16 rows constrained: fill and plan 0.25-0.30 ms a step, where the
library's parallel fill and the former plan took 0.45-0.55 ms; apply 0.1 ms).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from llamascope.structured.backend import Backend, Matcher

_NO_INDEX: NDArray[np.int64] = np.empty(0, dtype=np.int64)
_FULL = np.uint32(0xFFFFFFFF)


@dataclass
class IndexPlan:
    """A filled mask as index writes into the [batch, vocab] logits (CPU; vocab a multiple of 32), made and
    applied with numpy: torch runs an operation over more than 32,768 values on its threads, which waited
    milliseconds for a core another process held (a row's fill_: 13 ms where numpy's takes 0.01 ms)."""

    vocab: int  # the logits' width the indices were made for
    words: NDArray[np.int64]  # rows of the logits seen as [batch * vocab / 32, 32] that refuse some token (rows
    offsets: NDArray[np.float32]  # that allow most), and what is added to each: [len(words), 32], 0 or -inf
    cleared: NDArray[np.int64]  # batch rows to set to -inf whole (rows that allow few tokens) ...
    kept: NDArray[np.int64]  # ... but for these flat indices of the [batch * vocab] logits, whose logits are put back


@dataclass
class FilledMasks:
    rows: list[int]  # the batch rows the masks are for, in order
    bitmask: torch.Tensor  # [len(rows), mask_words] int32, on the CPU
    plan: IndexPlan | None = None  # the same masks as index writes (made for CPU logits)


class StepMasks:
    """The mask buffers of one engine: a CPU bitmask (pinned where CUDA is, for an asynchronous copy) reused
    every step, grown to the largest batch seen."""

    def __init__(self, backend: Backend, device: torch.device | str = "cpu") -> None:
        self.backend = backend
        self.device = torch.device(device)
        self._cpu = self._allocate(16)
        self._cpu_words = self._cpu.numpy().view(np.uint32)  # the same memory, as numpy's unsigned words
        # On a GPU the bitmask is spread over the row: each byte as the 8 logit offsets it stands for (0 for an
        # allowed token, -inf for a refused one), one gather and one addition, which the GPU does in microseconds.
        bits = (np.arange(256)[:, None] >> np.arange(8)) & 1
        self._offsets = torch.from_numpy(np.where(bits == 1, np.float32(0), np.float32(-np.inf)).astype(np.float32))
        self._offsets_cpu = self._offsets.numpy()  # the same table, for the CPU's plan (made in numpy)
        self._stops = [s for s in backend.stop_ids if s < backend.vocab_size]
        # The bits of the model's own tokens (a mask may have more: the tokenizer's ids beyond the output layer).
        whole, rest = divmod(backend.vocab_size, 32)
        self._whole = whole
        self._own = np.zeros(backend.mask_words, dtype=np.uint32)
        self._own[:whole] = 0xFFFFFFFF
        if rest:
            self._own[whole] = (1 << rest) - 1

    def _allocate(self, rows: int) -> torch.Tensor:
        pin = self.device.type == "cuda"
        return torch.full((rows, self.backend.mask_words), -1, dtype=torch.int32, pin_memory=pin)

    def fill(self, matchers: Sequence[Matcher | None]) -> FilledMasks | None:
        """The masks of the rows that have a live matcher (all filled at once); None if no row has one.

        ``matchers`` are the batch's rows in order; for CPU logits the masks come with their ``IndexPlan``."""
        rows = [i for i, m in enumerate(matchers) if m is not None and not m.finished]
        if not rows:
            return None
        if len(rows) > self._cpu.shape[0]:
            self._cpu = self._allocate(max(len(rows), 2 * self._cpu.shape[0]))
            self._cpu_words = self._cpu.numpy().view(np.uint32)
        words = self._cpu_words[: len(rows)]
        # On the CPU the rows are filled on this thread one after another: the library's own threads (its parallel
        # fill) waited for a core that the model's threads or another process held, 1 to 3 ms in one step of ten.
        cpu = self.device.type == "cpu"
        self.backend.fill_bitmask(
            [m for m in (matchers[i] for i in rows) if m is not None], words.view(np.int32), parallel=not cpu
        )
        bitmask = self._cpu[: len(rows)]
        if cpu and self._whole * 32 == self.backend.vocab_size:  # the plan reads the model's own tokens only
            return FilledMasks(rows, bitmask, self._plan(rows, words))
        words[:, self._whole :] &= self._own[self._whole :]  # the model's own tokens only
        self._allow_stops(words, np.flatnonzero(~words.any(axis=1)))
        return FilledMasks(rows, bitmask)

    def _allow_stops(self, words: NDArray[np.uint32], empty: NDArray[np.int64]) -> None:
        """A row whose grammar allows none of the model's tokens (a schema nothing can satisfy) is allowed its
        stop tokens instead, so that it ends rather than sampling from all -inf."""
        for row in empty:
            for stop in self._stops:
                words[row, stop // 32] |= np.uint32(1 << (stop % 32))

    def _plan(self, rows: list[int], words: NDArray[np.uint32]) -> IndexPlan:
        """Each row's mask as index writes: the words that refuse some token, or the tokens it allows (where it
        allows fewer than half).

        Made in as few numpy calls as the common step allows (each costs microseconds however small its array):
        inside a JSON string a row refuses in a few dozen words; only a row refusing in more than a sixteenth
        of them (a row the grammar leaves one token refuses in every word) has its allowed tokens counted."""
        vocab = self.backend.vocab_size
        width = vocab // 32
        own = words[:, :width]
        at = np.flatnonzero(own != _FULL)
        row, word = np.divmod(at, width)
        batch_rows = np.asarray(rows)
        cleared, kept = _NO_INDEX, _NO_INDEX
        if len(at) > width // 16:
            dense = np.flatnonzero(np.bincount(row, minlength=len(rows)) > width // 16)
            if len(dense):
                allowed = np.bitwise_count(own[dense]).sum(axis=1)
                if not allowed.all():  # refusing every token: its stops instead
                    self._allow_stops(words, dense[allowed == 0])
                    allowed[allowed == 0] = len(self._stops)
                few = dense[allowed * 2 < vocab]
                if len(few):
                    cleared = batch_rows[few]
                    kept = _flat_bits(own[few], cleared, vocab)
                    many = np.ones(len(rows), dtype=np.bool_)
                    many[few] = False
                    chosen = many[row]
                    row, word = row[chosen], word[chosen]
        offsets = self._offsets_cpu[own[row, word].view(np.uint8)].reshape(-1, 32)
        return IndexPlan(vocab, batch_rows[row] * width + word, offsets, cleared, kept)

    def apply(self, logits: torch.Tensor, filled: FilledMasks | None) -> None:
        """Set the disallowed tokens' logits of the filled rows to -inf, in place (``logits``: [rows, vocab]); the
        other rows are not read or written."""
        if filled is None:
            return
        plan = filled.plan
        fits = (
            plan is not None
            and logits.device.type == "cpu"
            and logits.is_contiguous()
            and logits.shape[-1] == plan.vocab
            and logits.dtype == torch.float32
        )
        if plan is not None and fits:
            values = logits.detach().numpy()
            if len(plan.words):  # -inf where refused; a logit plus 0 is itself (each word is indexed once)
                values.reshape(-1, 32)[plan.words] += plan.offsets
            if len(plan.cleared):
                flat = values.reshape(-1)
                kept = flat[plan.kept]
                values[plan.cleared] = -np.inf
                flat[plan.kept] = kept
            return
        count, vocab = len(filled.rows), logits.shape[-1]
        packed = filled.bitmask.to(logits.device, non_blocking=True).view(torch.uint8).long()
        offsets = self._offsets_on(logits.device)[packed].view(count, -1)[:, :vocab]
        if count == logits.shape[0]:  # every row is constrained (rows are in order, each once)
            logits.add_(offsets)  # -inf where refused; a finite logit plus 0 is itself
        else:  # only these rows are read or written
            index = torch.tensor(filled.rows).to(logits.device, non_blocking=True)
            logits.index_add_(0, index, offsets)

    def _offsets_on(self, device: torch.device) -> torch.Tensor:
        if self._offsets.device != device:
            self._offsets = self._offsets.to(device)
        return self._offsets

    @staticmethod
    def advance(matchers: Sequence[Matcher | None], tokens: Sequence[int]) -> list[bool]:
        """Give each constrained row its sampled token; True for the rows whose grammar is now complete (end
        them with "stop", or "tool_calls" for a forced call) or has failed (which a mask makes impossible)."""
        ends = [False] * len(tokens)
        for i, (matcher, token) in enumerate(zip(matchers, tokens, strict=True)):
            if matcher is not None and not matcher.finished:
                ends[i] = not matcher.advance(token) or matcher.finished
        return ends


def _flat_bits(words: NDArray[np.uint32], rows: NDArray[np.int64], vocab: int) -> NDArray[np.int64]:
    """The set bits of ``words`` ([n, mask_words], bit j of word w is token 32 * w + j) as indices into the
    flattened [batch, vocab] logits, row i of ``words`` being batch row ``rows[i]``. Only nonzero words are
    unpacked, so the cost follows the number of set bits, not the vocabulary (nonzero is over bools: over the
    words themselves it ran 8 times slower)."""
    at = np.flatnonzero(words != 0)
    row, word = np.divmod(at, words.shape[1])
    bits = np.unpackbits(words.ravel()[at].view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
    found = np.flatnonzero(bits.view(np.bool_))  # unpackbits gives 0 and 1
    which, bit = found >> 5, found & 31
    return rows[row[which]] * vocab + word[which] * 32 + bit
