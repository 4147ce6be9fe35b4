"""Images into what Mllama's cross-attention layers read: the vision tower, batched, and one copy per image.

An image reaches the text model as cross-attention keys and values: the vision
tower and projector turn its tiles into states (6,404 of them for Llama 3.2's
four 560-pixel tiles), and every cross-attention layer projects those states to
its keys and values (``k_proj`` and ``k_norm``, ``v_proj``). transformers does
both inside the model's forward, once per request. Here:

- **Projected once.** ``VisionCache`` keeps, by image content hash, every
  cross-attention layer's keys and values of the image, not the states they
  come from. A request about a cached image (the next turn of a conversation,
  or sixteen users asking about one photo) puts views of them in its cache and
  runs no vision tower and no projection; the rows of a batch about one image
  read one copy (``attention.shared_rows``). The projection is the model's own
  modules applied as its forward applies them, so the values are those the
  stock path computes.
- **Encoded together.** Images of requests that wait for the same scheduling
  turn go through the vision tower in one call (``ImageEncoder.encode_ahead``),
  and so do a request's several images (``cross_kv``), at most ``batch_tiles``
  tiles at once (every image counts as Mllama's ``max_num_tiles``: the tower
  runs on the padding tiles too). A lone image takes the path it always took.
- **Concatenated per request.** A request about several images attends to
  their keys and values one after another, in the prompt's order (as Mllama's
  forward concatenates their states); the cache still keeps one entry per image,
  and, in the room the images leave, the joined states a conversation's answers
  attend to (``VisionCache.joined``), which its next turn takes instead of
  joining them again.

Every image is independent inside the tower (its tiles attend among
themselves), so an image encoded beside others gets its own states, up to the
order of float32 sums in the matrix products, whose blocking depends on how many
rows they multiply.

Everything here runs on the scheduler's model thread, but for batch lines' images on the CPU, which the
scheduler encodes on a thread of their own (``cross_kv`` with ``pause``: see ``Scheduler``).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llamascope.caching import SizedLRU
from llamascope.engines.devices import image_kv_bytes, out_of_memory

log = logging.getLogger(__name__)

# Per cross-attention layer, in layer order: (keys, values) [1, kv heads, tiles * states per tile, head dim].
CrossKV = tuple[tuple[Any, Any], ...]

# Tiles the vision tower takes in one call by default: four Llama 3.2 images. Its activations for them
# (about 1 GiB in bf16 for Llama 3.2's 1280-wide tower) are set aside by ``devices.plan_memory``.
DEFAULT_BATCH_TILES = 16


def batch_tiles(setting: int | None, device_type: str) -> int:
    """VISION_BATCH_TILES as set, else its default for the device: ``DEFAULT_BATCH_TILES`` on a GPU, 1 (one image
    a call) on the CPU, where the tower is bound by its arithmetic."""
    return setting or (DEFAULT_BATCH_TILES if device_type == "cuda" else 1)


def kv_bytes(kv: CrossKV) -> int:
    return sum(t.numel() * t.element_size() for pair in kv for t in pair)


# A joined entry's key: each image's digest and the tiles of it kept, in the prompt's order.
JoinKey = tuple[tuple[str, int], ...]
# What a joined entry was made from: a weak reference to each image's entry (its first layer's keys).
Sources = tuple["weakref.ref[Any]", ...]


def sources(entries: Sequence[CrossKV]) -> Sources:
    """The images' entries a joined entry is made from, as ``VisionCache.keep_joined`` and ``joined`` take them."""
    return tuple(weakref.ref(kv[0][0]) for kv in entries)


@dataclass
class _Joined:
    kv: CrossKV
    made_from: Sources
    size: int


class VisionCache(SizedLRU[str, tuple[CrossKV, int]]):
    """Each image's cross-attention keys and values (``CrossKV``) and its own tile count, by content hash.

    A multi-turn conversation sends the same image every turn; with its keys and values kept, turn 2 skips
    the vision tower and the projections, most of a request's cost at Llama 3.2's four tiles. Bounded in
    bytes; a running request keeps what it uses (views) after it is evicted, until it ends.

    Also, in the same bound, several images' keys and values joined as a request about them attends to them
    (``keep_joined``, ``joined``): the next turn of a conversation about four images took 2 to 4 ms (the
    built-in model, 2 cores) joining them again, a copy as large as the four. A joined entry is a copy, so
    it takes only the room the images leave: an image put evicts joined entries (least recently used first)
    before any image, and a joined entry that does not fit beside the images is not kept. It is served only
    while it was made from the images' entries the cache holds now (an image evicted and encoded again gets
    a new joined entry, made from its new states).
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes, lambda entry: kv_bytes(entry[0]))
        self._joins: OrderedDict[JoinKey, _Joined] = OrderedDict()  # least recently used first
        self._joins_lock = threading.Lock()
        self.joined_bytes = 0
        self.joined_hits = 0

    def put(self, key: str, value: tuple[CrossKV, int]) -> None:
        """Cache an image's entry; joined entries go first, as many as its room needs (the class's text)."""
        size = self.size(value)
        with self._joins_lock:  # held while it goes in: a joined entry kept meanwhile would take its room
            while self._joins and self.total + self.joined_bytes + size > self.max_size:
                self._drop_oldest_join()
            super().put(key, value)

    def joined(self, key: JoinKey, entries: Sequence[CrossKV]) -> CrossKV | None:
        """The images' joined keys and values, if kept and made from these entries (the images' now)."""
        with self._joins_lock:
            found = self._joins.get(key)
            if found is None:
                return None
            if len(found.made_from) != len(entries) or any(
                ref() is not kv[0][0] for ref, kv in zip(found.made_from, entries, strict=False)
            ):
                self.joined_bytes -= self._joins.pop(key).size  # made from states no longer cached
                return None
            self._joins.move_to_end(key)
            self.joined_hits += 1
            return found.kv

    def keep_joined(self, key: JoinKey, made_from: Sources, kv: CrossKV) -> bool:
        """Keep joined keys and values in the room the images leave (older joined entries go for it); whether
        they were kept."""
        size = kv_bytes(kv)
        if any(ref() is None for ref in made_from):
            return False  # an image's entry is gone: the joined entry would never be served
        with self._joins_lock:
            old = self._joins.pop(key, None)
            if old is not None:
                self.joined_bytes -= old.size
            if self.total + size > self.max_size:
                return False  # no room beside the images even with no joined entry: the others stay
            while self._joins and self.total + self.joined_bytes + size > self.max_size:
                self._drop_oldest_join()
            self._joins[key] = _Joined(kv, made_from, size)
            self.joined_bytes += size
            return True

    def _drop_oldest_join(self) -> None:
        _, dropped = self._joins.popitem(last=False)
        self.joined_bytes -= dropped.size

    def clear(self) -> None:
        with self._joins_lock:
            self._joins.clear()
            self.joined_bytes = 0
        super().clear()


class ImageEncoder:
    """The vision tower and the cross-attention projections of one Mllama model, over the vision cache."""

    def __init__(
        self,
        model: Any,
        pixels: Callable[[Any], dict[str, Any]],  # a PIL image to its pixel tensors (pixel_values, aspect ratio)
        cache: VisionCache,
        cross_layers: Iterable[int],
        batch_tiles: int = DEFAULT_BATCH_TILES,
        pausable: bool = False,  # encodes may pause between the tower's layers (``cross_kv``'s ``pause``)
    ) -> None:
        self.model = model
        self.pixels = pixels
        self.cache = cache
        self.cross_layers = sorted(cross_layers)
        self.batch_tiles = batch_tiles
        self.calls = 0  # vision-tower calls
        self.encoded = 0  # images through them
        self._failed: set[str] = set()  # images a call together failed on: encoded alone from then on
        # What an encode calls before each of the tower's layers, on the thread that runs it (``cross_kv``). The
        # hooks only where an encode may pause: elsewhere every tower call would run them for nothing.
        self._between_layers = threading.local()
        tower = getattr(getattr(model, "model", None), "vision_model", None)  # None: a text-only model
        for module in tower.modules() if tower is not None and pausable else ():
            if isinstance(module, torch.nn.ModuleList):
                for layer in module:
                    layer.register_forward_pre_hook(self._before_layer)

    @property
    def max_tiles(self) -> int:
        return int(self.model.config.vision_config.max_num_tiles)

    def entry_bytes(self) -> int:
        """What one image's ``CrossKV`` takes in the cache."""
        return image_kv_bytes(self.model.config, self.model.dtype.itemsize)

    # -- one request -----------------------------------------------------

    def _before_layer(self, module: Any, args: Any) -> None:
        pause = getattr(self._between_layers, "pause", None)
        if pause is not None:
            pause()

    def cross_kv(self, seq: Any, pause: Callable[[], None] | None = None) -> list[tuple[CrossKV, int]]:
        """Each of the request's images' keys and values and tile count, in the prompt's order: from the cache,
        else encoded and projected now (and cached), its images together in calls of at most ``batch_tiles``
        tiles. ``seq`` is a ``requests.Sequence`` about images. ``pause``: called before each layer of the
        vision tower (it may block, to let other work have the processor)."""
        self._between_layers.pause = pause
        try:
            return self._cross_kv(seq)
        finally:
            self._between_layers.pause = None

    def _cross_kv(self, seq: Any) -> list[tuple[CrossKV, int]]:
        found: dict[str, tuple[CrossKV, int]] = {}
        todo: list[Any] = []
        for image in seq.images:
            if image.digest in found or any(image.digest == t.digest for t in todo):
                continue
            entry = self.cache.get(image.digest)
            if entry is None:
                todo.append(image)
            else:
                found[image.digest] = entry
        if todo:
            started = time.monotonic()
            per_call = max(self.batch_tiles // self.max_tiles, 1)
            for start in range(0, len(todo), per_call):
                group = todo[start : start + per_call]
                for image, entry in zip(group, self._encode([(i, seq.pixels) for i in group]), strict=True):
                    found[image.digest] = entry
            seq.encoded = (started, time.monotonic())
        return [found[image.digest] for image in seq.images]

    # -- several ---------------------------------------------------------

    def encode_ahead(self, seqs: Iterable[Any]) -> int:
        """Encode the images of these waiting requests (those the scheduler expects to admit this turn, in
        order) that are not cached, together, in vision-tower calls of at most ``batch_tiles`` tiles, and
        cache them; the images encoded.

        Only worth it for two images or more (one is encoded in its request's prefill, as always), and only
        as many distinct images as the cache holds at once, counting those already there (made recent, so
        that this turn's entries do not evict them before their requests run). A failure costs only the
        batching: it is logged, its images are not tried together again (their requests encode them alone
        in their prefill, where an error stays with that request), and after running out of memory the
        calls take half as many tiles.
        """
        per_call = self.batch_tiles // self.max_tiles
        if per_call < 2:
            return 0
        room = self.cache.max_size // max(self.entry_bytes(), 1)
        seen: set[str] = set()
        todo: list[tuple[Any, Any]] = []  # (image, its request)
        for seq in seqs:
            seq.began = True  # before the cancel is looked at (``Sequence.began``): its images may be encoded now
            if seq.cancel.is_set():
                continue
            for image in seq.images:
                digest = image.digest
                if digest in seen:
                    continue
                seen.add(digest)
                if len(seen) > room:
                    break
                if self.cache.touch(digest) or digest in self._failed:
                    continue
                todo.append((image, seq))
            if len(seen) > room:
                break
        done = 0
        for start in range(0, len(todo) if len(todo) > 1 else 0, per_call):
            group = todo[start : start + per_call]
            started = time.monotonic()
            failure = self._try([(image, seq.pixels) for image, seq in group])
            if failure is not None:
                if len(self._failed) > 4096:
                    self._failed.clear()
                self._failed.update(image.digest for image, _ in group)
                if failure:
                    self.batch_tiles = max(self.batch_tiles // 2, self.max_tiles)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                return done
            ended = time.monotonic()
            for _, seq in group:
                seq.encoded = (seq.encoded[0] if seq.encoded else started, ended)
            done += len(group)
        return done

    def _try(self, group: list[tuple[Any, dict[str, Any]]]) -> bool | None:
        """``_encode`` the group: None if it went through, else whether it ran out of memory (logged)."""
        try:
            self._encode(group)
        except Exception as exc:
            if out_of_memory(exc):
                log.warning("out of memory encoding %d images together; each is encoded alone", len(group))
                return True
            log.exception("encoding %d images together failed; each is encoded alone", len(group))
            return False
        return None

    def _encode(self, images: list[tuple[Any, dict[str, Any]]]) -> list[tuple[CrossKV, int]]:
        """One vision-tower call for these images (distinct, none cached), each a PreparedImage and the pixel
        tensors its request made, by digest; each one's keys and values and tile count, cached."""
        inputs = []
        for image, pixels in images:
            made = pixels.get(image.digest)
            if made is None:  # prepared while cached, evicted since
                made = pixels[image.digest] = self.pixels(image.image)
            inputs.append(made)
        model = self.model.model
        tower = model.vision_model
        device = next(tower.parameters()).device
        # As MllamaModel.forward does with pixel_values (transformers has no method for this part alone).
        vision = tower(
            pixel_values=torch.cat([i["pixel_values"] for i in inputs]).to(device, tower.dtype),
            aspect_ratio_ids=torch.cat([i["aspect_ratio_ids"] for i in inputs]).to(device),
            aspect_ratio_mask=torch.cat([i["aspect_ratio_mask"] for i in inputs]).to(device),
        ).last_hidden_state
        states = model.multi_modal_projector(vision).reshape(-1, vision.shape[-2], model.hidden_size)
        self.calls += 1
        self.encoded += len(images)
        out = []
        for index, ((image, _), chunk) in enumerate(zip(images, states.chunk(len(images)), strict=True)):
            entry = (self._project(chunk), int(inputs[index]["aspect_ratio_mask"].sum()))
            self.cache.put(image.digest, entry)
            out.append(entry)
        return out

    def _project(self, states: Any) -> CrossKV:
        """One image's states [tiles, states per tile, hidden] to every cross-attention layer's keys and values,
        as ``MllamaTextCrossAttention.forward`` computes them (then hands them to the cache)."""
        layers = self.model.model.language_model.layers
        out = []
        for index in self.cross_layers:
            attention = layers[index].cross_attn
            here = states.to(attention.k_proj.weight.device)
            shape = (1, -1, attention.num_key_value_heads, attention.head_dim)
            keys = attention.k_norm(attention.k_proj(here).view(shape).transpose(1, 2))
            values = attention.v_proj(here).view(shape).transpose(1, 2)
            out.append((keys, values))
        return tuple(out)
