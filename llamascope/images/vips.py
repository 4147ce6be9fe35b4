"""Decode PNG with libvips, and large WEBP where libwebp's API is not reachable: streamed or shrunk while
loading, never whole in memory.

decode.py identifies the format and checks every budget from the header with
Pillow first; only then are the bytes handed here. libvips (the ``pyvips``
binding with the ``pyvips-binary`` wheel) decodes them in a pipeline that ends
at the model's size: PNG rows stream through the resize in bands, and libwebp
scales while it decodes, so neither holds the full-size image (a 20 MP PNG
needs about 60 MB decoded whole; here a few MB).

Measured per format (CPU time of decode_image to the model's size, this 2-core
machine under load; bench/images.py has the end-to-end times and peaks):
- PNG: 20 MP 85 ms against Pillow's 403 (libspng, streamed), 1600x1200 photo
  42 against 57, and no full-size buffer.
- WEBP scaled to 0.28 (12 MP to 1120x840): 491 ms against 586, a peak of about
  40 MB against 200; near the model's size (1600x1200, scale 0.7) slower, so
  Pillow keeps it (WEBP_MAX_SCALE). libwebp's API called directly (images/libwebp.py)
  is faster than both (the same 12 MP: 311 ms) and takes WEBP first; this path
  is its fallback.
- JPEG: libjpeg-turbo's reduced decode through libvips is slower (12 MP: 84 ms
  against 71; less noisy, 56 against 36); Pillow's draft mode stays.
- JPEG 2000: the wheel's libvips has no OpenJPEG (no jp2kload); imagecodecs
  (images/jpeg2k.py) or Pillow's reduced decode, on every usable core
  (decode.configure_codec_threads, called by server.build).
- BMP, ICO, ICNS, SGI, TIFF: rare, or not offered by libvips; Pillow.

Pixels follow today's Pillow path: no colour management (ICC profiles are
ignored, as the stock processor ignores them), alpha flattened onto white
before resizing, EXIF orientation applied, the resize bilinear with the same
reducing gap. Anything outside the common case (16-bit, CMYK, an odd
interpretation) is left to Pillow: decode() raises Unsupported.

If pyvips cannot load (no wheel for the platform), every image goes to Pillow
and the log says so once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)

# Pillow's format names of what this module decodes.
FORMATS = frozenset({"PNG", "WEBP"})
# libwebp in the pyvips-binary wheel decodes about 30% slower than Pillow's at full size; scaling while
# decoding wins that back only when it shrinks a lot (12 MP to 1120x840, scale 0.28: 15% faster, and a
# 1120x840 frame instead of a 12 MP one; 1600x1200, scale 0.7: 15% slower). Above this, Pillow.
WEBP_MAX_SCALE = 0.5
RESIZE_GAP = 3.0  # as decode.py's Pillow resize: integer box shrink to within 3x, then bilinear


@functools.cache
def _pyvips() -> ModuleType | None:
    """The pyvips module, or None (logged once) when libvips cannot be loaded here."""
    try:
        import pyvips  # here, not at the top: loading libvips takes about 0.1 s, only servers need it
    except (ImportError, OSError) as exc:
        log.warning("libvips is not available (%s); images are decoded with Pillow only", exc)
        return None
    # No operation cache: decoded images are cached by the intake, by content hash; libvips keeping
    # recent results as well would hold untrusted images' pixels beyond the intake's bounded cache.
    pyvips.cache_set_max(0)
    return pyvips


def available() -> bool:
    return _pyvips() is not None


class Unsupported(Exception):
    """Pillow is to decode this image: libvips would not give today's pixels, or would not be faster."""


# Given the image's stored (width, height) and EXIF orientation, the (width, height) to decode to as
# shown, or None for the image as it is.
TargetFunction = Callable[[int, int, int], "tuple[int, int] | None"]


def decode(data: bytes, fmt: str, target_for: TargetFunction) -> Image.Image:
    """Decode PNG or WEBP bytes (already checked by decode.py) to 8-bit RGB, sized by ``target_for``.

    Raises Unsupported for images the Pillow path should take, and OSError for corrupt data."""
    pyvips = _pyvips()
    if pyvips is None or fmt not in FORMATS:
        raise Unsupported(fmt)
    try:
        return _decode(pyvips, data, fmt, target_for)
    except pyvips.Error as exc:
        raise OSError(f"libvips: {exc.message}") from None


def _decode(pyvips: Any, data: bytes, fmt: str, target_for: TargetFunction) -> Image.Image:
    # fail_on="truncated": refuse a cut-off file as Pillow does, instead of padding it with grey.
    options: dict[str, Any] = {"access": "sequential", "fail_on": "truncated"}
    image = pyvips.Image.new_from_buffer(data, "", **options)  # the header only, so far
    if image.format != "uchar" or image.interpretation not in ("srgb", "b-w", "rgb") or image.bands > 4:
        raise Unsupported(f"{image.interpretation} {image.format} x{image.bands}")
    # From libvips's header, not Pillow's: Pillow reads a whole PNG to look for EXIF after its pixels.
    orientation = image.get("orientation") if image.get_typeof("orientation") else 1
    if fmt == "PNG" and not image.get_typeof("exif-data") and b"eXIf" in data:
        raise Unsupported("a PNG with its EXIF after the pixels, which only Pillow reads")
    target = target_for(image.width, image.height, orientation)
    if fmt == "WEBP":
        if target is None:
            raise Unsupported("a WEBP the model takes whole: Pillow's libwebp decodes it faster")
        # libwebp scales while decoding; one scale for both sides, so stop at the larger one and let
        # the bilinear resize below bring it to the exact size.
        turned = orientation in (5, 6, 7, 8)
        scale = max(
            target[0] / (image.height if turned else image.width), target[1] / (image.width if turned else image.height)
        )
        if scale > WEBP_MAX_SCALE:
            raise Unsupported("a WEBP near the model's size: Pillow's libwebp decodes it faster")
        image = pyvips.Image.webpload_buffer(data, scale=scale, **options)
    if orientation != 1:
        image = image.autorot()
    if image.hasalpha():
        image = image.flatten(background=[255] * (image.bands - 1))
    if image.bands == 1:
        image = image.bandjoin([image, image])
    if target is not None and (image.width, image.height) != target:
        image = image.resize(target[0] / image.width, vscale=target[1] / image.height, kernel="linear", gap=RESIZE_GAP)
    image = image.cast("uchar")
    rgb = Image.frombuffer("RGB", (image.width, image.height), image.write_to_memory(), "raw", "RGB", 0, 1)
    if target is not None and rgb.size != target:  # libvips rounded a side the other way: one pixel
        rgb = rgb.resize(target, Image.Resampling.BILINEAR)
    return rgb
