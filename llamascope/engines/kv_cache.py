"""Self-attention keys and values that grow in place, not by a copy of the whole cache every token.

transformers' ``DynamicLayer`` appends a token's keys and values with
``torch.cat``: every decode step copies every layer's whole cache, so a step's
memory traffic grows with the context and the batch (Llama 3.2 11B: 128 KiB a
token of context, so a batch of 64 at 2,000 tokens copies 16 GiB a step,
reading and writing, as much as reading the weights eight times). vLLM and
SGLang write each new token into preallocated blocks instead.

``GrowingLayer`` does the same within transformers' cache API: its keys and
values are views of a buffer with room for ``SLACK`` more tokens, and a step
writes its token into that room. When the room runs out the buffer is
reallocated with ``SLACK`` more (one copy every ``SLACK`` tokens). The
scheduler's own operations on the cache (joining rows into a batch, dropping
rows, a step taken back after a failure) still replace ``keys`` and
``values`` by other tensors, as they do with ``DynamicLayer``; the layer notices
that its tensors are no longer the front of its buffer and starts a new buffer
from them at the next write. A write never touches a position any view
handed out before holds: only positions past the length the layer had.

The attention then reads a view whose rows are ``capacity`` apart instead of
``length``: the same values, in a strided tensor (SDPA takes strides).
"""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import DynamicCache, DynamicLayer

# Tokens of room a buffer gets beyond what it holds: a copy of the cache every this many decode steps, not
# every step; at most this many tokens' keys and values unused per request (16 MiB for Llama 3.2 11B in bf16).
SLACK = 128


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are the front of a larger buffer, appended to in place."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._buffers: tuple[Any, Any] | None = None
        self.regrown = 0  # buffers made: a copy of the cache each (tests, benchmarks)

    def __copy__(self) -> GrowingLayer:
        """A copy (the scheduler's cache of one row of a batch) never writes into this layer's buffers."""
        mine = GrowingLayer.__new__(GrowingLayer)
        mine.__dict__.update(self.__dict__)
        mine._buffers = None
        return mine

    def _front(self) -> bool:
        """Whether ``keys`` and ``values`` are still the front of this layer's buffers (nothing replaced them)."""
        if self._buffers is None or self.keys is None or self.values is None:
            return False
        return all(
            mine.data_ptr() == buffer.data_ptr()
            and mine.shape[:2] == buffer.shape[:2]
            and mine.shape[3:] == buffer.shape[3:]
            and mine.stride() == buffer.stride()
            for mine, buffer in ((self.keys, self._buffers[0]), (self.values, self._buffers[1]))
        )

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        held = self.keys.shape[-2] if self.keys.numel() else 0
        length = held + key_states.shape[-2]
        if not self._front() or length > self._buffers[0].shape[-2]:  # type: ignore[index]
            self._regrow(key_states, value_states, held, length + SLACK)
        keys, values = self._buffers  # type: ignore[misc]
        keys[:, :, held:length].copy_(key_states)
        values[:, :, held:length].copy_(value_states)
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        return self.keys, self.values

    def _regrow(self, key_states: Any, value_states: Any, held: int, capacity: int) -> None:
        """New buffers of ``capacity`` tokens, holding what the layer holds now."""
        buffers = []
        for old, new in ((self.keys, key_states), (self.values, value_states)):
            buffer = new.new_empty((new.shape[0], new.shape[1], capacity, new.shape[3]))
            if held:
                buffer[:, :, :held].copy_(old)
            buffers.append(buffer)
        self._buffers = (buffers[0], buffers[1])
        self.regrown += 1


def new_cache(text_config: Any, cross_layers: set[int], growing: bool = True) -> Any:
    """A ``DynamicCache`` for one request: ``GrowingLayer`` for the self-attention layers (unless ``growing`` is
    off), transformers' own for the cross-attention layers (an image's keys and values, written once)."""
    cache = DynamicCache(config=text_config)
    if growing:
        cache.layers = [layer if i in cross_layers else GrowingLayer() for i, layer in enumerate(cache.layers)]
    return cache
