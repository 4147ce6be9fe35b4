"""Decode JPEG 2000 with OpenJPEG through imagecodecs: the same codec as Pillow's, without holding the GIL.

Pillow decodes JPEG 2000 with OpenJPEG while holding the GIL from the first
byte to the last: its decoder reads the file through Python calls, so every
other thread of the server (the event loop, the model's scheduler, the other
decodes of the pool) stood still for the whole decode, 300 ms to several
seconds (a lossless 1600x1200 photo: about 600 ms of CPU; measured with a
thread ticking every millisecond: one wait of 700 ms through Pillow, none over
12 ms here). imagecodecs gives OpenJPEG the bytes in memory and releases the
GIL until the pixels are out; the CPU cost is the same (the same OpenJPEG,
2.5.4; 90% of it in the entropy decoding of the code-blocks, which no option
skips), on as many threads as ``OPJ_NUM_THREADS`` says (decode.configure_codec_threads).

imagecodecs offers no reduced decode, so only images decoded whole come here;
those larger than the model needs stay with Pillow's reduced decode. Only the
plain case comes here: 8-bit samples, one to four components of the same size,
sRGB or grey (or a bare codestream), no palette, no channel definitions, no
ICC profile (imagecodecs would apply it; Pillow ignores it, as the stock
processor does). decode.py has checked the format and every size budget from
the header first. Anything else, and anything imagecodecs refuses, raises
Unsupported and Pillow decodes it as before.

If imagecodecs cannot be imported, Pillow decodes every JPEG 2000 image and
the log says so once.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from types import ModuleType

from PIL import Image

log = logging.getLogger(__name__)

# OpenJPEG's thread count, from the environment: Pillow's OpenJPEG reads it each time a decoder is created, and
# this module passes it on (decode.configure_codec_threads sets it).
OPJ_THREADS = "OPJ_NUM_THREADS"

_SIZ = b"\xff\x4f\xff\x51"  # a codestream's start (SOC) and its image and tile size marker (SIZ)
_SRGB, _GREY = 16, 17  # the JP2 colr box's enumerated colour spaces taken here
_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}  # by component count, as Pillow reads them
_ENUMERATED = {value.to_bytes(4, "big") for value in (_SRGB, _GREY)}


class Unsupported(Exception):
    """Pillow is to decode this image."""


@functools.cache
def _imagecodecs() -> ModuleType | None:
    try:
        import imagecodecs  # here, not at the top: only JPEG 2000 needs it
    except ImportError as exc:
        log.warning("imagecodecs is not available (%s); JPEG 2000 is decoded by Pillow", exc)
        return None
    return imagecodecs if imagecodecs.JPEG2K.available else None


def available() -> bool:
    return _imagecodecs() is not None


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """The JP2 boxes between ``start`` and ``end``, one after another as OpenJPEG reads them: each one's type and
    where its content starts and ends (a box of length 0 runs to ``end``, as does one cut short, the last; a
    64-bit length is read). Hand-written: Pillow's JP2 box reader is private and keeps no offsets."""
    while start + 8 <= end:
        length, kind, content = int.from_bytes(data[start : start + 4], "big"), data[start + 4 : start + 8], start + 8
        if length == 1:  # XLBox: the length in the 8 bytes after the type
            if start + 16 > end:
                return
            length, content = int.from_bytes(data[start + 8 : start + 16], "big"), start + 16
        stop = end if length == 0 else start + length
        if stop < content:
            return
        yield kind, content, min(stop, end)
        start = stop


def _codestream(data: bytes) -> tuple[int, bytes] | None:
    """Where the codestream OpenJPEG decodes starts, and the JP2 header box's content (nothing for a bare
    codestream); None where it is not found. In JP2 it is the first codestream box at the top level: found by
    walking the boxes, not by looking for its bytes, which any box before it (XML, UUID) may hold too."""
    if data.startswith(_SIZ):
        return 0, b""
    header = b""
    for kind, content, stop in _boxes(data, 0, len(data)):
        if kind == b"jp2h" and not header:
            header = data[content:stop]
        elif kind == b"jp2c":
            return (content, header) if data.startswith(_SIZ, content) else None
    return None


def plain(data: bytes, size: tuple[int, int]) -> bool:
    """Whether the file is the plain case imagecodecs gives Pillow's pixels for (see the module's docstring),
    its codestream of the ``size`` decode.py read and checked (in JP2, Pillow reads the image header box's)."""
    # Read here, byte by byte: Pillow keeps none of these fields, and imagecodecs reads no header alone.
    found = _codestream(data)
    if found is None:
        return False
    start, header = found
    if b"pclr" in header or b"cdef" in header:  # (in any box of the header: Pillow's, if only by chance)
        return False
    for kind, content, _ in _boxes(header, 0, len(header)):
        if kind == b"colr":  # the first (OpenJPEG reads no other): meth 1 (enumerated), sRGB or grey; no ICC profile
            if header[content : content + 1] != b"\x01" or header[content + 3 : content + 7] not in _ENUMERATED:
                return False
            break
    siz = data[start + 4 : start + 42]  # after the marker: Lsiz, Rsiz, eight sizes and offsets of 4 bytes, Csiz
    if len(siz) < 38:
        return False
    x, y, x0, y0 = (int.from_bytes(siz[i : i + 4], "big") for i in range(4, 20, 4))  # Xsiz, Ysiz, XOsiz, YOsiz
    if (x - x0, y - y0) != size:  # OpenJPEG would allocate for the codestream's size, not the budgeted one
        return False
    components = int.from_bytes(siz[36:38], "big")
    per_component = data[start + 42 : start + 42 + 3 * components]  # Ssiz, XRsiz, YRsiz each
    # Ssiz 7: unsigned 8-bit samples; XRsiz = YRsiz = 1: not subsampled.
    return components in _MODES and per_component == b"\x07\x01\x01" * components


def decode(data: bytes, size: tuple[int, int]) -> Image.Image:
    """Decode a whole JPEG 2000 image (already checked by decode.py, ``size`` from its header) to L, LA,
    RGB or RGBA, without the GIL. Raises Unsupported where Pillow is to decode it."""
    codecs = _imagecodecs()
    if codecs is None or not plain(data, size):
        raise Unsupported("not the plain case")
    threads = os.environ.get(OPJ_THREADS, "1")
    try:
        pixels = codecs.jpeg2k_decode(data, numthreads=max(1, int(threads)) if threads.isdigit() else 1)
    # Pillow says what it makes of the file. Not only Jpeg2kError: imagecodecs raises NotImplementedError for what
    # it does not convert (subsampled components, samples of mixed depths), a RuntimeError as Jpeg2kError is.
    except (RuntimeError, ValueError, MemoryError) as exc:
        raise Unsupported(str(exc)) from None
    bands = 1 if pixels.ndim == 2 else pixels.shape[2]
    if pixels.dtype != "uint8" or (pixels.shape[1], pixels.shape[0]) != size or bands not in _MODES:
        raise Unsupported(f"{pixels.dtype} {pixels.shape}")
    return Image.fromarray(pixels)  # L, LA, RGB or RGBA by its shape
