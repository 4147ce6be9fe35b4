"""Self-attention keys and values of past requests, reused by later requests that start the same way.

A multi-turn conversation re-sends its whole history every turn; without this pool every turn runs the
whole history through the model again, so time to first token grows with the conversation. As vLLM's
automatic prefix caching does, the pool holds the keys and values in blocks of ``block_tokens`` tokens,
each named by a hash chained over everything before it: ``hash(parent's hash, block's tokens)``, starting
from the digests of the images the request is about, in order (or none). A new request walks its prompt block by
block and takes the longest run of blocks found; it prefills only the rest (at least its last token,
whose logits it needs).

The images are the chain's root because with Mllama every position depends on every image of the prompt:
a token after an image attends to it, and the tokens before the first image (the prompt's start) attend to
all of them, padding tiles included (the stock model's fully masked rows attend to everything and only the
MLP's output is masked), and every later token attends to those. So every block's tokens can see every image:
the same text about other images (or about none, or about the same first image and then another) has other
keys and values, and never shares a block.
Cross-attention states themselves are not here (the vision cache keeps them, by image).

A block holds every self-attention layer's keys and values for its tokens, without padding:
[self-attention layers, 2 (keys, values), key/value heads, block_tokens, head dim], on the model's
device. The pool is bounded in bytes: least recently used blocks go first, never one a running request
took (each block counts the requests holding it), and the later blocks of a chain before the earlier
ones (they are useless without them). A block that does not fit once every free block is gone is not
kept. Everything runs on the scheduler's model thread but the counters, which ``stats`` reads under the
lock from any thread.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

BLOCK_TOKENS = 16
# Blocks live in slots carved from tensors of up to this many bytes, made as the pool fills and kept: one
# large allocation each, not a small one per block. Thousands of small long-lived tensors among a decode
# step's large short-lived ones fragmented glibc's heap: a server's resident memory grew without bound
# under load (bench/soak.py: 879 MB after a minute, 2,044 MB after five) while the pool held 133 MB.
SLAB_BYTES = 64 << 20
# The default bound: this share of the memory available at start-up (the device's for a GPU), at most this.
DEFAULT_SHARE = 0.1
DEFAULT_CAP = 8 << 30


def default_bytes(device: Any = None) -> int:
    """The pool's bound when none is set: a tenth of the free memory where the keys and values live, at most
    8 GiB (0 where it cannot be known)."""
    free = 0
    if device is not None and getattr(device, "type", "cpu") == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not a POSIX system that says
            free = 0
    return min(int(free * DEFAULT_SHARE), DEFAULT_CAP)


@dataclass(eq=False)
class _Block:
    kv: Any  # [layers, 2, kv heads, block_tokens, head dim]
    size: int
    holders: int = 0  # running requests that took it


class _Slots:
    """Room for blocks of one shape, carved from slabs of up to ``SLAB_BYTES``: at most ``max_bytes`` in all."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.made = 0  # slots in the slabs made so far
        self._slabs: list[Any] = []
        self._free: list[Any] = []

    def take(self, shape: tuple[int, ...], like: Any) -> Any | None:
        """A free slot [shape], like ``like`` (dtype, device); None if the bound allows no more."""
        if not self._free:
            size = like.element_size()
            for n in shape:
                size *= n
            count = min(self.max_bytes // size - self.made, max(SLAB_BYTES // size, 1))
            if count <= 0:
                return None
            slab = like.new_empty((count, *shape))
            self._slabs.append(slab)
            self._free.extend(slab[i] for i in reversed(range(count)))
            self.made += count
        return self._free.pop()

    def give_back(self, slot: Any) -> None:
        self._free.append(slot)


@dataclass
class Lease:
    """The blocks a request took: their keys and values, and what it must give back when it ends."""

    tokens: int = 0  # prompt tokens covered
    layers: list[tuple[Any, Any]] = field(default_factory=list)  # per self-attention layer: [1, heads, tokens, dim]
    hashes: list[bytes] = field(default_factory=list)


def _root(image: str | None) -> bytes:
    """The chain's root: ``image`` is the prompt's image digests in order, joined (``Sequence.images_key``)."""
    return hashlib.blake2b(b"image:" + (image or "").encode(), digest_size=16).digest()


def _chain(ids: Sequence[int], image: str | None, block_tokens: int, blocks: int) -> list[bytes]:
    """The hashes of the first ``blocks`` full blocks of ``ids`` about ``image``."""
    parent = _root(image)
    out = []
    for b in range(blocks):
        tokens = ",".join(map(str, ids[b * block_tokens : (b + 1) * block_tokens])).encode()
        parent = hashlib.blake2b(parent + tokens, digest_size=16).digest()
        out.append(parent)
    return out


class PrefixCache:
    """The pool; see the module's text. ``max_bytes`` 0 turns reuse off."""

    def __init__(self, max_bytes: int, block_tokens: int = BLOCK_TOKENS) -> None:
        if block_tokens < 1:
            raise ValueError("block_tokens must be at least 1")
        self.max_bytes = max_bytes
        self.block_tokens = block_tokens
        self.bytes = 0
        self.hits = 0  # requests that took at least one block
        self.misses = 0  # requests that took none
        self.tokens_reused = 0
        self.tokens_queried = 0  # prompt tokens of the requests that looked (as vLLM's prefix_cache_queries)
        self.evicted = 0  # blocks
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()  # least recently used first
        self._slots = _Slots(max_bytes)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._blocks)

    def take(self, ids: Sequence[int], image: str | None) -> Lease:
        """The longest run of cached blocks that ``ids`` (a prompt about ``image``) starts with, leaving at least
        its last token to prefill; the blocks are held until ``give_back``."""
        lease = Lease()
        if not self.enabled:
            return lease
        found: list[bytes] = []
        chain = _chain(ids, image, self.block_tokens, (len(ids) - 1) // self.block_tokens)
        with self._lock:
            self.tokens_queried += len(ids)
            for key in chain:
                if key not in self._blocks:
                    break
                found.append(key)
            if not found:
                self.misses += 1
                return lease
            blocks = [self._blocks[key] for key in found]
            for block in blocks:
                block.holders += 1
            self._touch(found)
            self.hits += 1
            self.tokens_reused += len(found) * self.block_tokens
        kv = blocks[0].kv if len(blocks) == 1 else torch.cat([b.kv for b in blocks], dim=3)
        lease.tokens = len(found) * self.block_tokens
        lease.layers = [(kv[i, 0][None], kv[i, 1][None]) for i in range(kv.shape[0])]
        lease.hashes = found
        return lease

    def give_back(self, lease: Lease) -> None:
        """The request holding ``lease`` ended: its blocks may be evicted again."""
        with self._lock:
            for key in lease.hashes:
                block = self._blocks.get(key)
                if block is not None:
                    block.holders -= 1
        lease.hashes = []
        lease.layers = []

    def store(self, ids: Sequence[int], image: str | None, layers: list[tuple[Any, Any]]) -> None:
        """Keep the full blocks of ``ids`` (tokens about ``image``) whose keys and values ``layers`` hold: per
        self-attention layer, keys and values [kv heads, len(ids) or more, dim] whose last len(ids) positions
        are these tokens'. Blocks already here only become recent."""
        if not self.enabled or not layers:
            return
        count = len(ids) // self.block_tokens
        if count == 0:
            return
        keys = _chain(ids, image, self.block_tokens, count)
        offset = layers[0][0].shape[-2] - len(ids)  # padding before the tokens, if any
        with self._lock:
            for b, key in enumerate(keys):
                if key in self._blocks:
                    continue
                start = offset + b * self.block_tokens
                piece = slice(start, start + self.block_tokens)
                heads, _, dim = layers[0][0].shape
                shape = (len(layers), 2, heads, self.block_tokens, dim)
                size = layers[0][0].element_size() * len(layers) * 2 * heads * self.block_tokens * dim
                if not self._make_room(size, keep=set(keys)):
                    break  # the later blocks are useless without this one
                kv = self._slots.take(shape, layers[0][0])
                if kv is None:
                    break
                for i, (k, v) in enumerate(layers):  # a copy, into the slot
                    kv[i, 0].copy_(k[:, piece])
                    kv[i, 1].copy_(v[:, piece])
                self._blocks[key] = _Block(kv, size)
                self.bytes += size
            self._touch(keys)

    def _touch(self, keys: list[bytes]) -> None:
        """These blocks (one chain, in order) become the most recent, the chain's end least recent among them."""
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def _make_room(self, size: int, keep: set[bytes]) -> bool:
        """Evict least recently used free blocks, but those in ``keep`` (the chain being stored), until ``size``
        more bytes fit; False if they cannot."""
        if self.bytes + size <= self.max_bytes:
            return True
        free = sum(b.size for k, b in self._blocks.items() if b.holders == 0 and k not in keep)
        if self.bytes - free + size > self.max_bytes:
            return False
        for key in list(self._blocks):
            if self.bytes + size <= self.max_bytes:
                break
            block = self._blocks[key]
            if block.holders == 0 and key not in keep:
                del self._blocks[key]
                self._slots.give_back(block.kv)
                self.bytes -= block.size
                self.evicted += 1
        return True

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "prefix_cache_bytes": self.bytes,
                "prefix_cache_max_bytes": self.max_bytes,
                "prefix_cache_blocks": len(self._blocks),
                "prefix_cache_held_blocks": sum(1 for b in self._blocks.values() if b.holders),
                "prefix_cache_hits": self.hits,
                "prefix_cache_misses": self.misses,
                "prefix_cache_tokens_reused": self.tokens_reused,
                "prefix_cache_tokens_queried": self.tokens_queried,
                "prefix_cache_evicted": self.evicted,
            }
