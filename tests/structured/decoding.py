"""A decode loop that stands in for the model with random logits: a grammar must hold whatever the weights."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llamascope.structured.backend import Backend, Grammar, Matcher
from llamascope.structured.masking import StepMasks


@dataclass
class Row:
    tokens: list[int]
    finish_reason: str | None = None


def random_decode(
    backend: Backend, grammars: list[Grammar | None], seed: int, max_tokens: int, *, torch_path: bool = True
) -> tuple[list[Row], list[Matcher | None]]:
    """Decode one batch (a row per grammar; None: unconstrained) from seeded random logits under the step's
    masks, as the engine will: fill, apply, pick, advance; a row ends on a stop token, when its grammar is
    complete, or at ``max_tokens``.

    With ``torch_path`` the logits are a tensor masked by ``StepMasks.apply`` and the pick is their largest;
    without it, the pick is drawn uniformly among the tokens the filled bitmask allows: the same distribution
    (the largest of independent random logits is uniform over the allowed ones) without a pass over the whole
    vocabulary per row and step, which this loop would otherwise spend most of its time on.
    """
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    masks = StepMasks(backend)
    matchers: list[Matcher | None] = [g.matcher() if g is not None else None for g in grammars]
    rows = [Row([]) for _ in grammars]
    stops = set(backend.stop_ids)
    for _ in range(max_tokens):
        live = [i for i, r in enumerate(rows) if r.finish_reason is None]
        if not live:
            break
        filled = masks.fill([matchers[i] for i in live])
        if torch_path:
            logits = torch.rand(len(live), backend.vocab_size, generator=generator)
            masks.apply(logits, filled)
            tokens = logits.argmax(-1).tolist()
        else:
            tokens = rng.integers(0, backend.vocab_size, len(live)).tolist()  # the unconstrained rows'
            if filled is not None:
                for row, bits in zip(filled.rows, filled.bitmask.numpy(), strict=True):
                    allowed = np.flatnonzero(
                        np.unpackbits(bits.view(np.uint8), bitorder="little")[: backend.vocab_size]
                    )
                    tokens[row] = int(rng.choice(allowed))
        ends = masks.advance([matchers[i] for i in live], tokens)
        for i, token, end in zip(live, tokens, ends, strict=True):
            if token in stops:
                rows[i].finish_reason = "stop"
                continue
            rows[i].tokens.append(token)
            if end:
                rows[i].finish_reason = "stop"
    for row in rows:
        row.finish_reason = row.finish_reason or "length"
    return rows, matchers
