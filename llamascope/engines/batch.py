"""The running batch's tensor layout: rows that share one forward pass and one key/value cache.

A request prefilled alone joins the batch by merging its cache into the batch's: past tokens left-padded
to the longest row (the attention mask marks the padding), the cross-attention states of the images its new
tokens attend to right-padded to the most tiles (the cross-attention mask marks those). Rows that all attend
to the same images keep one copy of their states, a stride-0 view for every row (``attention.shared_rows``).
A row that leaves takes its slice with it, and padding no row needs any more goes.
"""

from __future__ import annotations

from typing import Any

import torch

from llamascope.engines.attention import shared_rows
from llamascope.engines.requests import Sequence


class Batch:
    """Running sequences that share one forward pass: one key/value cache, left-padded to a common length."""

    def __init__(self, cross_layers: set[int]) -> None:
        self.rows: list[Sequence] = []
        self.cross_layers = cross_layers
        self.cache: Any = None
        self.mask: Any = None  # [B, L] 1 for real tokens, 0 for padding
        self.cross_mask: Any = None  # [B, 1, 1, tiles] for image batches
        # The images every row attends to (``Sequence.visible``), or None. Their cross-attention keys and values
        # are then one copy that every row views (``attention.shared_rows``), not a copy per row.
        self.image: tuple[str, ...] | None = None

    def add(self, seq: Sequence) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask, self.cross_mask = [seq], seq.cache, seq.mask, seq.cross_mask
            self.image = seq.visible if seq.has_image else None
        else:
            shared = seq.has_image and seq.visible == self.image
            for index, (mine, theirs) in enumerate(zip(self.cache.layers, seq.cache.layers, strict=True)):
                if not theirs.is_initialized or theirs.keys.numel() == 0:
                    continue
                if shared and index in self.cross_layers:  # the same states as the batch's: its copy goes
                    mine.keys = shared_rows(mine.keys, len(self.rows) + 1)
                    mine.values = shared_rows(mine.values, len(self.rows) + 1)
                    continue
                # Past tokens are padded on the left to the longest row; an image's states on the right, to
                # the most tiles (a shared view becomes a copy per row here).
                left = index not in self.cross_layers
                mine.keys = _joined(mine.keys, theirs.keys, 2, left)
                mine.values = _joined(mine.values, theirs.values, 2, left)
            if not shared:
                self.image = None
            self.mask = _joined(self.mask, seq.mask, 1, left=True)
            if self.cross_mask is not None:  # padding tiles are masked out (0)
                self.cross_mask = _joined(self.cross_mask, seq.cross_mask, 3, left=False)
            self.rows.append(seq)
        seq.cache = seq.mask = None

    def keep(self, keep: list[int]) -> None:
        """Keep only these rows; drop padding columns no row needs any more."""
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = self.mask = self.cross_mask = self.image = None
            return
        images = {s.visible for s in self.rows if s.has_image}
        self.image = images.pop() if len(images) == 1 and self.rows[0].has_image else None
        index = torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask[index]
        unused = int((self.mask.sum(0) == 0).cumprod(0).sum())  # leading columns that are padding in every row
        self.mask = self.mask[:, unused:]
        tiles = before = 0  # the most tiles a remaining row's image has, and the batch's tiles before
        if self.cross_mask is not None:
            before = self.cross_mask.shape[3]
            self.cross_mask = self.cross_mask[index]
            tiles = int(self.cross_mask.sum(3).max())  # each row's real tiles come first
            self.cross_mask = self.cross_mask[..., :tiles]
        for i, layer in enumerate(self.cache.layers):
            if not layer.is_initialized or layer.keys.numel() == 0:
                continue
            cross = i in self.cross_layers
            # Rows that now all have one image keep one copy of its states (their copies are the same).
            rows = index[:1] if cross and self.image is not None else index
            keys, values = layer.keys[rows], layer.values[rows]
            if not cross and unused:
                keys, values = keys[:, :, unused:], values[:, :, unused:]
            if cross and tiles < before:  # the padding only the rows that left needed
                keys, values = _first_tiles(keys, tiles, before), _first_tiles(values, tiles, before)
            if cross and self.image is not None:
                keys, values = shared_rows(keys, len(keep)), shared_rows(values, len(keep))
            layer.keys, layer.values = keys, values


def set_layer(layer: Any, keys: Any, values: Any) -> None:
    """A cache layer made to hold these keys and values (a prefix cache lease's, an image's), as it would after
    computing them."""
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values


def positions(start: int, end: int, device: Any) -> Any:
    """Position ids [1, end - start] for the prompt tokens start..end."""
    return torch.arange(start, end, device=device)[None, :]


def _joined(mine: Any, theirs: Any, dim: int, left: bool) -> Any:
    """Two batches' tensors as one: the shorter padded with zeros along ``dim`` (on the left or right)."""
    length = max(mine.shape[dim], theirs.shape[dim])
    return torch.cat([_pad(mine, length, dim, left), _pad(theirs, length, dim, left)])


def _pad(tensor: Any, length: int, dim: int, left: bool) -> Any:
    """``tensor`` made ``length`` long along ``dim`` with zeros."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    zeros = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([zeros, tensor] if left else [tensor, zeros], dim=dim)


def _first_tiles(states: Any, tiles: int, of: int) -> Any:
    """Cross-attention keys or values [B, heads, of * per tile, dim] cut to their first ``tiles`` tiles."""
    return states[:, :, : states.shape[2] // of * tiles]


def drop_padding_tiles(cache: Any, cross_layers: set[int], tiles: list[int], all_tiles: int) -> None:
    """Keep only the tiles new tokens attend to in the cross-attention cache, for decoding: ``tiles[i]`` of
    image i's ``all_tiles`` (its real tiles if the prompt's last token attends to it, else none).

    Mllama pads every image to max_num_tiles (4) tiles of 1,601 states. The prompt needs them all:
    its tokens before the first image attend to every state, padding included (the stock model adds that
    attention output and masks only the MLP's). Every later token attends to the real tiles of the images
    before it alone, the rest masked to zero weight, so decoding over those tiles gives the same result, and
    a one-tile image costs a quarter of the cross-attention. One image: views, so the vision cache's copy
    stays the one copy (a batch of requests about other images copies them into its own tensors anyway);
    several: a copy of the tiles kept, unless every tile is (the prefill's joined states are then those kept).
    """
    if all(kept == all_tiles for kept in tiles):
        return
    for index in cross_layers:
        layer = cache.layers[index]
        layer.keys = _tiles_kept(layer.keys, tiles, all_tiles)
        layer.values = _tiles_kept(layer.values, tiles, all_tiles)


def _tiles_kept(states: Any, tiles: list[int], all_tiles: int) -> Any:
    """Cross-attention keys or values [B, heads, images * all_tiles * per tile, dim] cut to each image's first
    ``tiles[i]`` tiles."""
    per_tile = states.shape[2] // (len(tiles) * all_tiles)
    pieces = [
        states[:, :, i * all_tiles * per_tile : (i * all_tiles + kept) * per_tile]
        for i, kept in enumerate(tiles)
        if kept
    ]
    # Several images: a copy even of one piece, so that the prefill's joined states (scheduler.cross_states) go.
    return pieces[0] if len(tiles) == 1 else torch.cat(pieces, dim=2)
