"""What a failed decode step costs: only the requests it fails for.

A step that fails is taken back (``Checkpoint``: it replaces the cache's tensors by longer ones rather than
writing into them, so keeping the old ones is enough) and every row is tried alone (``recover``): a request
that fails alone ends with an error, and the others go on as if it had never been in the batch. Out of
memory, the caches are emptied and the newest request is shed until the step fits (``shed``).

Runs on the scheduler's model thread.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

from llamascope import errors
from llamascope.engines.batch import Batch
from llamascope.engines.devices import out_of_memory
from llamascope.engines.requests import Sequence

log = logging.getLogger(__name__)

# One decode step of a batch: each row's next token (the scheduler's ``_decode``).
Decode = Callable[[Batch], list[int]]


def out_of_memory_error() -> errors.ServiceError:
    return errors.ServiceError(
        500,
        "InternalError.Algo",
        "The model ran out of device memory for this request; the other requests go on. "
        "Try again, or with a shorter prompt or a smaller max_tokens.",
    )


class Checkpoint:
    """What a decode step changes, to take it back: the mask, each cache layer's tensors (a step replaces
    them by longer ones, it does not write into them) and the random generators of the rows that sample."""

    def __init__(self, batch: Batch) -> None:
        self.mask = batch.mask
        self.cache = batch.cache
        self.layers = [(layer, layer.keys, layer.values, layer.is_initialized) for layer in batch.cache.layers]
        self.generators = {id(seq): seq.sampler.generator.get_state() for seq in batch.rows if not seq.sampler.greedy}

    def restore(self, batch: Batch) -> None:
        batch.mask = self.mask
        for layer, keys, values, initialized in self.layers:
            layer.keys, layer.values, layer.is_initialized = keys, values, initialized
        for seq in batch.rows:
            self.restore_generator(seq)

    def restore_generator(self, seq: Sequence) -> None:
        state = self.generators.get(id(seq))
        if state is not None:
            seq.sampler.generator.set_state(state)

    def row_cache(self, row: int) -> Any:
        """A cache of row ``row`` alone: views of the checkpoint's tensors, in copies of its layer objects."""
        cache = copy.copy(self.cache)
        cache.layers = []
        for layer, keys, values, initialized in self.layers:
            mine = copy.copy(layer)
            mine.is_initialized = initialized
            if keys is not None and keys.numel():
                mine.keys, mine.values = keys[row : row + 1], values[row : row + 1]
            cache.layers.append(mine)
        return cache


def recover(batch: Batch, before: Checkpoint, decode: Decode) -> list[int] | None:
    """After a failed step: the step again without the rows that fail alone, or None if it cannot be had.

    The batch is taken back to ``before``. Each row is then tried alone, on a cache of its own slices
    of the batch's (the batch's own tensors are not written: the cache's layers grow by new tensors),
    its random generator put back afterwards. Those that fail alone end with an error; the step is run
    again for the rest, which then make the tokens they would have made without them. When every row
    or none fails alone, the failure is the batch's: it ends for every row.
    """
    rows = list(batch.rows)
    before.restore(batch)
    culprits = []
    for i, seq in enumerate(rows):
        alone = Batch(batch.cross_layers)
        alone.rows, alone.cache = [seq], before.row_cache(i)
        alone.mask = batch.mask[i : i + 1]
        alone.cross_mask = batch.cross_mask[i : i + 1] if batch.cross_mask is not None else None
        try:
            decode(alone)
        except Exception:
            culprits.append(seq)
        before.restore_generator(seq)
    if 0 < len(culprits) < len(rows):
        log.warning("%d of %d requests fail alone; the batch goes on without them", len(culprits), len(rows))
        batch.keep([i for i, s in enumerate(rows) if s not in culprits])
        for seq in culprits:
            seq.send(errors.internal_error())
        try:
            return decode(batch)
        except Exception:
            log.exception("decode step failed again without the requests that failed alone")
            rows = list(batch.rows)
    batch.keep([])
    for seq in rows:
        seq.send(errors.internal_error())
    return None


def shed(batch: Batch, before: Checkpoint, decode: Decode, release_memory: Callable[[], None]) -> list[int] | None:
    """Out of memory in a decode step: the caches emptied and the step run again; each time it still does
    not fit, the newest request ends with an error (as vLLM preempts the newest) and the step is tried
    again without it. The others go on, making the tokens they would have made."""
    while True:
        before.restore(batch)
        release_memory()
        try:
            return decode(batch)
        except Exception as exc:
            before.restore(batch)
            if not out_of_memory(exc):
                return recover(batch, before, decode)
        rows = batch.rows
        newest = max(range(len(rows)), key=lambda i: rows[i].queued_at)
        log.warning("out of memory in a decode step of %d requests; ending the newest", len(rows))
        ended = rows[newest]
        batch.keep([i for i in range(len(rows)) if i != newest])
        ended.send(out_of_memory_error())
        if not batch.rows:
            return None
        before = Checkpoint(batch)
