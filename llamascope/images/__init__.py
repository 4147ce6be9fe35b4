"""Image intake: many ways in (URL, data: URI), one way out (a PreparedImage).

Knows nothing of HTTP surfaces or models. Every image is untrusted: sizes,
times and pixel counts are bounded, and URLs never reach private addresses
unless the operator allows them.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class PreparedImage:
    """A decoded image, normalised to RGB, with the SHA-256 of its source bytes."""

    image: Image.Image
    digest: str
    format: str  # as detected from the bytes: "JPEG", "PNG", ...
    source_width: int
    source_height: int


__all__ = ["PreparedImage"]
