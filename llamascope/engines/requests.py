"""A request on the in-process scheduler: its record from the queue to its last token, what the model thread
sends back about it, what it holds while it waits, and the bounds the queue and the running batch keep.

Pure records (no PyTorch): the scheduler (``scheduler.py``) and the batch layout (``batch.py``) work on them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from llamascope import errors
from llamascope.engines.base import FinishReason, SamplingParams
from llamascope.structured.backend import Matcher

# What the model thread sends to the request's event loop.
Tokens = list[int]
Message = Tokens | FinishReason | errors.ServiceError


# What a waiting request holds besides its tensors and its decoded image: the request, its parsed body,
# its coroutine and stream. Measured (bench/queue_memory.py): the server's resident memory grew 75 KiB a
# waiting request about one image (200 waiting; 475 KiB with 50 fetched by URL), 18.2 MiB about an image
# each (four tiles: 15 MB of pixel tensors and 2.8 MB decoded, which ``waiting_bytes`` counts apart).
WAITING_OVERHEAD_BYTES = 512 * 1024


def default_queue_bytes() -> int:
    """A quarter of the memory available now, within [256 MiB, 32 GiB]: what requests may hold waiting."""
    return min(max(psutil.virtual_memory().available // 4, 256 << 20), 32 << 30)


@dataclass(frozen=True)
class BatchLimits:
    max_batch: int = 16
    max_batch_tokens: int = 131072
    max_queued: int | None = None  # None: as many as fit in max_queued_bytes
    max_queued_bytes: int = 1 << 30
    max_queue_wait: float = 60.0
    prefill_chunk: int = 512  # prompt tokens prefilled between two decode steps
    # Tiles through the vision tower in one call (vision.ImageEncoder); None: 16 on a GPU, 1 (one image a call)
    # on the CPU, where the tower is bound by its arithmetic.
    vision_batch_tiles: int | None = None


@dataclass(eq=False)
class Sequence:
    """One request, from the queue to its last token."""

    inputs: Any  # the engine's model inputs (BatchFeature): input_ids, attention_mask, the cross-attention mask
    sampling: SamplingParams
    max_new: int
    send: Callable[[Message], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    fault: tuple[str, int] | None = None  # tests only: fail at this stage and step (``Scheduler.faults``)
    matcher: Matcher | None = None  # its answer's place in the grammar it must follow (structured output)
    grammar_field: str = ""  # the request field the grammar came from, named when it comes to a dead end
    # Its PreparedImages in the prompt's order: their digests key the vision cache, their pixels are made on a miss.
    images: tuple[Any, ...] = ()
    pixels: dict[str, Any] = field(default_factory=dict)  # pixel tensors of images not cached when prepared, by digest
    queued_at: float = field(default_factory=time.monotonic)
    background: bool = False  # a batch line: runs only on room no interactive request waits for
    images_ready: bool = False  # a batch line's images encoded ahead, off the model thread (``Scheduler``)
    # Set when it runs:
    started_at: float = 0.0
    ids: list[int] = field(default_factory=list)  # prompt and generated ids (for the repetition penalty)
    generated: int = 0
    last: int = 0  # the last token made, the next step's input
    prefilled: int = 0  # prompt tokens through the model so far
    reused: int = 0  # of those, the ones whose keys and values came from the prefix cache
    # The images its generated tokens attend to (those the prompt's last token does), by digest: rows with the same
    # ones share one copy of their keys and values in a batch. Set when its prefill ends.
    visible: tuple[str, ...] = ()
    cache: Any = None  # its own key/value cache, until it joins a batch
    mask: Any = None  # its attention mask [1, n], until it joins a batch
    cross_mask: Any = None  # the cross-attention mask row for new tokens [1, 1, 1, the visible images' real tiles]
    sampler: Any = None
    # Its images' vision-cache entries its prefill took (weak references): what its joined states are made from.
    image_sources: tuple[Any, ...] = ()
    encoded: tuple[float, float] | None = None  # when the vision tower ran on its images (monotonic), if it did
    # The engine began work on it (its images' encoding, its prefill): set before the cancel is looked at, so that a
    # request cancelled meanwhile is taken to have begun (charged its prompt) unless nothing was run for it.
    began: bool = False
    # (log-probability, [(rival id, its log-probability)]) of each token made, when sampling.logprobs asks;
    # appended before the token is sent, read by the engine's generate loop.
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)

    @property
    def has_image(self) -> bool:
        return bool(self.images)

    @property
    def images_key(self) -> str | None:
        """Its images' content hashes in order, joined (None: no image): what its every token may depend on."""
        return "+".join(image.digest for image in self.images) if self.images else None

    def __post_init__(self) -> None:
        self.budget = int(self.inputs["input_ids"].shape[1]) + self.max_new  # the most tokens it will hold
        self.waiting_bytes = waiting_bytes(self)


def waiting_bytes(seq: Sequence) -> int:
    """The memory a request holds while it waits: its model inputs, every image's pixel tensors (15 MB an image
    for Llama 3.2's four tiles, unless its vision states are cached), its decoded images, and the rest."""
    held = [*seq.inputs.values(), *(t for pixels in seq.pixels.values() for t in pixels.values())]
    tensors = sum(t.numel() * t.element_size() for t in held if hasattr(t, "element_size"))
    decoded = {image.digest: image.image for image in seq.images}
    pixels = sum(image.width * image.height * len(image.getbands()) for image in decoded.values())
    return WAITING_OVERHEAD_BYTES + tensors + pixels
