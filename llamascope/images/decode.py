"""Decode image bytes into an RGB image the model can take: Pillow, or libvips where it is faster.

The format is identified from the bytes (never from a name or a Content-Type)
and must be one the hosted service lists. The pixel size is read from the
header and checked before any pixel is decoded, so a small file that would
decode to gigabytes is refused cheaply. Only then are the pixels decoded:
WEBP by libwebp's own API (images/libwebp.py), PNG by libvips (images/vips.py),
JPEG 2000 decoded whole by OpenJPEG through imagecodecs (images/jpeg2k.py; each
says why, measured), the other formats by Pillow, to the same pixels within the
resize's rounding.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from llamascope import errors
from llamascope.images import PreparedImage, jpeg2k, libwebp, vips

# Pillow's format names for the seed's list. MPO is what Pillow calls the JPEG
# files many phone cameras write (a JPEG with extra frames).
ACCEPTED_FORMATS = {
    "BMP": "BMP",
    "DIB": "DIB",
    "ICNS": "ICNS",
    "ICO": "ICO",
    "JPEG": "JPEG",
    "MPO": "JPEG",
    "JPEG2000": "JPEG2000",
    "PNG": "PNG",
    "SGI": "SGI",
    "TIFF": "TIFF",
    "WEBP": "WEBP",
}
ACCEPTED_LIST = "BMP, DIB, ICNS, ICO, JPEG, JPEG2000, PNG, SGI, TIFF, WEBP"

# Formats Pillow does not read, named so that a refusal says what was sent.
_SIGNATURES = [
    (b"%PDF", "PDF"),
    (b"<svg", "SVG"),
    (b"<?xml", "SVG or another XML document"),
    (b"GIF8", "GIF"),
]
# Classic and BigTIFF, little- and big-endian.
_TIFF_HEADERS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_ISO_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF"}


def _sniff(data: bytes) -> str | None:
    head = data[:64].lstrip()
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    if data[4:8] == b"ftyp":
        return _ISO_BRANDS.get(data[8:12], "an ISO media file (video or HEIF)")
    return None


# Icon containers (ICO, ICNS) whose frames Pillow decodes while it opens the file, before any size here is seen:
# their embedded PNG and JPEG 2000 frames are sized from the bytes first. A 240 kB ICO holding a 9000x9000 PNG
# took 340 MB, and one of 12000x12000 590 MB, to be refused after its decode.
_ICON_CONTAINERS = (b"\x00\x00\x01\x00", b"icns")
_EMBEDDED_SIZES = re.compile(
    rb"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR(?P<png>.{8})"  # PNG: width, height
    rb"|ihdr(?P<jp2>.{8})"  # JP2's image header box: height, width
    rb"|\xff\x4f\xff\x51..\x00\x00(?P<j2k>.{8})",  # a JPEG 2000 codestream's SIZ marker: width, height
    re.DOTALL,
)


def _largest_embedded_frame(data: bytes) -> int:
    """The pixels of the largest PNG or JPEG 2000 frame inside an icon container (0 if none)."""
    largest = 0
    for match in _EMBEDDED_SIZES.finditer(data):
        first, second = struct.unpack(">II", match.group(match.lastgroup or "png"))
        largest = max(largest, first * second)
    return largest


# Given an image's (width, height) as shown, the size the model will resize it to.
# Images are decoded no larger than that: the model never sees more.
FitFunction = Callable[[int, int], tuple[int, int]]

# Formats decoded at a reduced size when the model needs less. Not a progressive JPEG: libjpeg keeps every
# coefficient of the whole image across its scans, whatever the scale (6 bytes a pixel: a 1 MB file of 80 million
# pixels took 0.5 GB), so it counts at full size.
_REDUCIBLE = {"JPEG", "MPO", "JPEG2000"}
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees
_MAX_J2K_REDUCE = 5  # encoders write 5 decomposition levels by default
# A reduced decode may land this far below the model's size; one resize then brings it to the exact size.
# Decoding a 12 MP JPEG at 1/4 instead of 1/2 scale, or a JPEG2000 one more level down, costs 3-4x less,
# and the model's canvas and tiles are the same (tests/engines/test_mllama.py).
MIN_DECODE_FRACTION = 0.85


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 100_000_000  # as the header declares them
    max_decode_pixels: int = 20_000_000  # as decoded, after JPEG/JPEG2000 reduction (about 10 ms per million)
    min_side: int = 10


# OpenJPEG's thread count, from the environment: it reads OPJ_NUM_THREADS each time a decoder is created
# (Pillow creates one per image), and without it decodes JPEG 2000 on one thread. Pillow offers no setting.
OPJ_THREADS = jpeg2k.OPJ_THREADS


def configure_codec_threads(cores: int) -> None:
    """Let OpenJPEG decode each JPEG 2000 image on ``cores`` threads (the cores the process may use), unless
    ``OPJ_NUM_THREADS`` is set already (the operator's value stays).

    Process-wide (an environment variable, inherited by child processes): the server calls it once at
    start-up, before any other thread runs (``server.build``). The pixels are the same on any count
    (tests/images/test_decode.py); a 1600x1200 photo decodes in about half the time on 2 cores.
    """
    if OPJ_THREADS not in os.environ:
        os.environ[OPJ_THREADS] = str(max(1, cores))


def decode_image(
    data: bytes, limits: DecodeLimits, fit: FitFunction | None = None, *, libvips: bool = True
) -> PreparedImage:
    """Decode, check and normalise one image; with ``fit``, no larger than the model will use.

    ``libvips=False`` decodes every format with Pillow, neither libvips nor libwebp's API (for comparisons:
    both give the same pixels, within the resize's rounding)."""
    if not data:  # an empty file, uploaded by the SDK or read from an allowed directory
        raise errors.image_unreadable("The image is empty (0 bytes).")
    if data[:4] in _ICON_CONTAINERS and (frame := _largest_embedded_frame(data)) > limits.max_decode_pixels:
        raise errors.image_bad_size(
            f"The icon holds a frame of {frame} pixels; this server decodes at most {limits.max_decode_pixels} "
            "pixels of an image in this format."
        )
    digest = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89.5 million pixels (its MAX_IMAGE_PIXELS) and refuses from twice that; the limit
            # here is limits.max_pixels, checked below before any pixel is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            found = img.format or "unknown"
            if found not in ACCEPTED_FORMATS:
                raise errors.image_unreadable(f"The image is {found}; accepted formats are {ACCEPTED_LIST}.")
            width, height = img.size
            if width * height > limits.max_pixels:
                raise errors.image_bad_size(
                    f"The image is {width}x{height} pixels, more than the limit of {limits.max_pixels} pixels."
                )
            if min(width, height) < limits.min_side:
                raise errors.image_bad_size(f"[height:{height} or width:{width} must be larger than {limits.min_side}]")
            if found not in _REDUCIBLE or img.info.get("progressive"):  # decoded whole; before a pixel is read
                _check_decode_budget(img, 0, limits.max_decode_pixels)  # (Pillow's getexif reads a whole PNG)
            rgb = _decode_faster(img, data, found, fit) if libvips else None
            if rgb is None:
                target = _target(img, fit)
                level = _reduction(img, target)
                _check_decode_budget(img, level, limits.max_decode_pixels)
                loaded = _load_reduced(img, data, level, limits.max_decode_pixels, native=libvips)
                rgb = _to_rgb(ImageOps.exif_transpose(loaded))
                if target is not None and rgb.size != target:
                    rgb = rgb.resize(target, Image.Resampling.BILINEAR, reducing_gap=vips.RESIZE_GAP)
    except errors.ServiceError:
        raise
    except Image.DecompressionBombError:  # over twice Pillow's own limit, which it holds whatever ours is
        limit = min(limits.max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or limits.max_pixels))
        raise errors.image_bad_size(f"The image has more than the limit of {limit} pixels.") from None
    except UnidentifiedImageError:
        if data[:4] in _TIFF_HEADERS:  # a TIFF whose layout Pillow has no decoder for: not "an unknown format"
            raise errors.image_unreadable(
                "The image is a TIFF in a layout this server cannot decode (such as CIELab in 16 bits or floating "
                "point, or CIELab with an alpha channel); send it as PNG or JPEG, or as an 8-bit RGB TIFF."
            ) from None
        sniffed = _sniff(data)
        if sniffed:
            raise errors.image_unreadable(f"The image is {sniffed}; accepted formats are {ACCEPTED_LIST}.") from None
        raise errors.image_unreadable(
            f"The data is not an image in a known format; accepted formats are {ACCEPTED_LIST}."
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError):
        raise errors.image_unreadable("The image file is corrupt or truncated.") from None
    return PreparedImage(
        image=rgb, digest=digest, format=ACCEPTED_FORMATS[found], source_width=width, source_height=height
    )


def _target(img: Image.Image, fit: FitFunction | None) -> tuple[int, int] | None:
    """The (width, height) to decode to, as shown after EXIF rotation; None when the model wants it all."""
    return _fit_target(*img.size, img.getexif().get(0x0112, 1), fit)


def _fit_target(width: int, height: int, orientation: int, fit: FitFunction | None) -> tuple[int, int] | None:
    if fit is None:
        return None
    if orientation in _SWAPS_SIDES:
        width, height = height, width
    target = fit(width, height)
    return target if target[0] < width and target[1] < height else None


def _reduction(img: Image.Image, target: tuple[int, int] | None) -> int:
    """Pick the smallest scale the codec offers that still covers ``target`` (give or take
    MIN_DECODE_FRACTION): for JPEG, set Pillow's draft mode (img.size follows); for JPEG2000, return
    the number of halvings. Other formats decode whole: 0."""
    if target is None:
        return 0
    short_side, long_side = min(target), max(target)  # orientation-free: compare short and long sides
    need = (int(short_side * MIN_DECODE_FRACTION), int(long_side * MIN_DECODE_FRACTION))
    level = 0
    if img.format in ("JPEG", "MPO"):
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale, never below the requested size; img.size follows.
        short_first = img.size[0] <= img.size[1]
        img.draft("RGB", need if short_first else (need[1], need[0]))
    elif img.format == "JPEG2000":
        short, long = min(img.size), max(img.size)

        def still_enough(times: int) -> bool:  # OpenJPEG rounds sizes up: ceil(side / 2**times)
            return -(-short >> times) >= need[0] and -(-long >> times) >= need[1]

        while level < _MAX_J2K_REDUCE and still_enough(level + 1):
            level += 1
    return level


def _check_decode_budget(img: Image.Image, level: int, max_decode_pixels: int) -> None:
    """Refuse before decoding when even the reduced decode is more pixels than ``max_decode_pixels``.

    WEBP counts whole on both paths: libwebp scales its output, but decodes every source pixel."""
    width, height = (-(-side >> level) for side in img.size)
    if width * height > max_decode_pixels:
        what = (
            "a progressive JPEG, which is decoded whole" if img.info.get("progressive") else "an image in this format"
        )
        raise errors.image_bad_size(
            f"The image is {img.size[0]}x{img.size[1]} pixels; this server decodes at most {max_decode_pixels} "
            f"pixels of {what} (other JPEG and JPEG2000 images larger than the model needs are decoded "
            "at reduced size and may be larger)."
        )


def _decode_faster(img: Image.Image, data: bytes, fmt: str, fit: FitFunction | None) -> Image.Image | None:
    """WEBP through libwebp's API (images/libwebp.py), PNG through libvips (images/vips.py), and WEBP too
    where libwebp's API is not reachable; None where Pillow is to decode it."""
    if fmt == "WEBP":
        orientation = img.getexif().get(0x0112, 1)
        try:
            return _to_rgb(libwebp.decode(data, orientation, _fit_target(*img.size, orientation, fit)))
        except libwebp.Unsupported:
            pass
    if fmt not in vips.FORMATS:
        return None
    try:
        return vips.decode(data, fmt, functools.partial(_fit_target, fit=fit))
    except vips.Unsupported:
        return None


def _load_reduced(
    img: Image.Image, data: bytes, level: int, max_decode_pixels: int, *, native: bool = False
) -> Image.Image:
    """Decode, JPEG2000 reduced ``level`` times (JPEG's draft mode is set on ``img`` already); with ``native``,
    JPEG2000 decoded whole through imagecodecs where it takes it (images/jpeg2k.py: without holding the GIL).
    A JPEG2000 that cannot be reduced so far is decoded whole only within ``max_decode_pixels``."""
    if native and not level and img.format == "JPEG2000":
        try:
            return jpeg2k.decode(data, img.size)
        except jpeg2k.Unsupported:
            pass
    if level:
        img.reduce = level  # type: ignore[method-assign,assignment]  # Pillow's JPEG2000 reduce setting
        try:
            img.load()
            return img
        except OSError:  # a codestream with fewer levels: decode it whole
            # The budget was checked on the reduced size: a file of one resolution level (a 330 kB 6000x6000 one)
            # was decoded whole, past it (36 million pixels, 690 MB, 3.7 s with the GIL held).
            img = Image.open(io.BytesIO(data))
            _check_decode_budget(img, 0, max_decode_pixels)
    img.load()
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Flatten alpha onto white and bring every mode (CMYK, 16-bit, palette, grey) to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):  # 16- and 32-bit greyscale: scale to 8 bits rather than clip
        img = img.convert("I")
        high = img.getextrema()[1]  # one band: (min, max)
        if isinstance(high, (int, float)) and high > 255:
            img = img.point(lambda v: v * (255 / 65535))
        img = img.convert("L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")
