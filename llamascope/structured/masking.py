"""One decode step's token masks for a batch: filled for the constrained rows only, applied in one call.

The in-process engine's side (the one module here that imports torch). Per step::

    filled = masks.fill([seq.matcher for seq in rows])   # None for unconstrained rows; CPU, no GIL held
    logits = model(...)                                   # fill may run on a thread while this runs
    masks.apply(logits, filled)                           # before sampling; unconstrained rows untouched
    tokens = pick(...)
    ends = masks.advance([seq.matcher for seq in rows], tokens)

A batch without a constrained row costs nothing: ``fill`` returns None and ``apply`` returns at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llamascope.structured.backend import Backend, Matcher


@dataclass
class FilledMasks:
    rows: list[int]  # the batch rows the masks are for, in order
    bitmask: torch.Tensor  # [len(rows), mask_words] int32, on the CPU


class StepMasks:
    """The mask buffers of one engine: a CPU bitmask (pinned where CUDA is, for an asynchronous copy) reused
    every step, grown to the largest batch seen."""

    def __init__(self, backend: Backend, device: torch.device | str = "cpu") -> None:
        self.backend = backend
        self.device = torch.device(device)
        self._cpu = self._allocate(16)
        # Each byte of the bitmask as the 8 logit offsets it stands for: 0 for an allowed token, -inf for a
        # refused one. Applying a mask is then one gather of the mask's bytes and one addition per row, with no
        # branch on each token (masked_fill_ over a scattered mask ran at a fifth of the memory's speed: 9 ms for
        # 16 rows of 128,256 on the CPU, against 0.8 ms this way).
        bits = (np.arange(256)[:, None] >> np.arange(8)) & 1
        self._offsets = np.where(bits == 1, np.float32(0), np.float32(-np.inf)).astype(np.float32)
        self._offsets_device = torch.from_numpy(self._offsets).to(self.device)
        self._spread = np.empty((0, backend.mask_words * 4, 8), dtype=np.float32)  # the CPU's offsets, per row
        self._stops = [s for s in backend.stop_ids if s < backend.vocab_size]
        # The bits of the model's own tokens (a mask may have more: the tokenizer's ids beyond the output layer).
        whole, rest = divmod(backend.vocab_size, 32)
        self._own = np.zeros(backend.mask_words, dtype=np.uint32)
        self._own[:whole] = 0xFFFFFFFF
        if rest:
            self._own[whole] = (1 << rest) - 1

    def _allocate(self, rows: int) -> torch.Tensor:
        pin = self.device.type == "cuda"
        return torch.full((rows, self.backend.mask_words), -1, dtype=torch.int32, pin_memory=pin)

    def fill(self, matchers: Sequence[Matcher | None]) -> FilledMasks | None:
        """The masks of the rows that have a live matcher (all filled at once); None if no row has one."""
        rows = [i for i, m in enumerate(matchers) if m is not None and not m.finished]
        if not rows:
            return None
        if len(rows) > self._cpu.shape[0]:
            self._cpu = self._allocate(max(len(rows), 2 * self._cpu.shape[0]))
        bitmask = self._cpu[: len(rows)]
        words = bitmask.numpy()
        self.backend.fill_bitmask([m for m in (matchers[i] for i in rows) if m is not None], words)
        # A row whose grammar allows none of the model's tokens (a schema nothing can satisfy) is allowed its stop
        # tokens instead, so that it ends rather than sampling from all -inf.
        for row in np.flatnonzero(~(words.view(np.uint32) & self._own).any(axis=1)):
            for stop in self._stops:
                words.view(np.uint32)[row, stop // 32] |= np.uint32(1 << (stop % 32))
        return FilledMasks(rows, bitmask)

    def apply(self, logits: torch.Tensor, filled: FilledMasks | None) -> None:
        """Set the disallowed tokens' logits of the filled rows to -inf, in place (``logits``: [rows, vocab]); the
        other rows are not read or written."""
        if filled is None:
            return
        count, vocab = len(filled.rows), logits.shape[-1]
        if logits.device.type == "cpu":
            packed = filled.bitmask.numpy().view(np.uint8)
            if self._spread.shape[0] < count:  # reused: a fresh 8 MB a step cost more in page faults than the work
                self._spread = np.empty((count, *self._spread.shape[1:]), dtype=np.float32)
            spread = self._spread[:count]
            np.take(self._offsets, packed, axis=0, out=spread)
            offsets = torch.from_numpy(spread)
        else:
            packed_device = filled.bitmask.to(logits.device, non_blocking=True).view(torch.uint8).long()
            offsets = self._offsets_on(logits.device)[packed_device]
        offsets = offsets.view(count, -1)[:, :vocab]
        if filled.rows == list(range(logits.shape[0])):
            logits.add_(offsets)  # -inf where refused; a finite logit plus 0 is itself
        else:
            for j, row in enumerate(filled.rows):  # views: only these rows are read or written
                logits[row].add_(offsets[j])

    def _offsets_on(self, device: torch.device) -> torch.Tensor:
        if self._offsets_device.device != device:
            self._offsets_device = torch.from_numpy(self._offsets).to(device)
        return self._offsets_device

    @staticmethod
    def advance(matchers: Sequence[Matcher | None], tokens: Sequence[int]) -> list[bool]:
        """Give each constrained row its sampled token; True for the rows whose grammar is now complete (end
        them with "stop", or "tool_calls" for a forced call) or has failed (which a mask makes impossible)."""
        ends = [False] * len(tokens)
        for i, (matcher, token) in enumerate(zip(matchers, tokens, strict=True)):
            if matcher is not None and not matcher.finished:
                ends[i] = not matcher.advance(token) or matcher.finished
        return ends
