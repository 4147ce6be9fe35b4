"""Decode WEBP with libwebp's own API: scaled to the model's size while decoding, with its second thread.

Pillow decodes WEBP through libwebp's animation decoder with default options:
every image whole, into an RGBA canvas, on one thread, then converted to RGB.
libvips asks libwebp for a second thread and for scaling, but the libwebp
built into the pyvips-binary wheel is much slower. This module calls the
libwebp that Pillow already loaded, through its C API (``WebPDecode``), the way
libvips does: RGB straight into the output buffer, the second thread on,
scaled to the exact size the model wants.

Measured on a 12 MP photo at quality 90 (this 2-core machine, median of 5):
Pillow's full decode to RGB 499 ms; libvips scaled to 1120x840 431 ms;
libwebp here, scaled, 311 ms (347 on one thread). What is left is libwebp's
entropy decoding and reconstruction of every macroblock, which no option
skips (bypass_filtering and no_fancy_upsampling gained nothing measurable).

Decoded whole, the pixels are libwebp's own, as Pillow's (the same values).
Scaled, they differ from the Pillow path by its resize: libwebp's
area-averaging scaler instead of Pillow's reduce and bilinear; and where both
sides shrink below 3/4, libwebp itself skips its in-loop filter and fancy
upsampling, which the averaging hides. A mean difference of about 1/255
(tests/images/test_libwebp.py bounds it). Alpha comes back straight (libwebp
weights its scaler by alpha) and is flattened onto white by decode.py, as
every other path's is.

libwebp's API is reached with ctypes through Pillow's ``_webp`` extension (its
dependencies resolve the symbols). Where that fails (a Pillow that links
libwebp statically without exporting it, an incompatible ABI), decode()
raises Unsupported and the other paths take WEBP, as before.
"""

from __future__ import annotations

import ctypes
import functools
import logging

from PIL import Image

try:
    from PIL import _webp  # the extension that links libwebp (Pillow loads it for any WEBP)

    _EXTENSION: str | None = _webp.__file__
except ImportError:  # a Pillow built without WEBP: it reads no WEBP at all, so nothing comes here
    _EXTENSION = None

log = logging.getLogger(__name__)

_ABI_VERSION = 0x0209  # WEBP_DECODER_ABI_VERSION of decode.h; libwebp refuses a different major version
_MODE_RGB, _MODE_RGBA = 0, 1  # WEBP_CSP_MODE: MODE_RGB, MODE_RGBA (not premultiplied)


class Unsupported(Exception):
    """Another path is to decode this image (an animation, or no libwebp API here)."""


# decode.h's structures (ABI 0x0209), field for field.
class _Features(ctypes.Structure):
    _fields_ = [
        ("width", ctypes.c_int),
        ("height", ctypes.c_int),
        ("has_alpha", ctypes.c_int),
        ("has_animation", ctypes.c_int),
        ("format", ctypes.c_int),
        ("pad", ctypes.c_uint32 * 5),
    ]


class _RGBABuffer(ctypes.Structure):
    _fields_ = [("rgba", ctypes.c_void_p), ("stride", ctypes.c_int), ("size", ctypes.c_size_t)]


class _YUVABuffer(ctypes.Structure):  # not used; sizes the union as libwebp lays it out
    _fields_ = [(name, ctypes.c_void_p) for name in ("y", "u", "v", "a")]
    _fields_ += [(name, ctypes.c_int) for name in ("y_stride", "u_stride", "v_stride", "a_stride")]
    _fields_ += [(name, ctypes.c_size_t) for name in ("y_size", "u_size", "v_size", "a_size")]


class _Buffers(ctypes.Union):
    _fields_ = [("RGBA", _RGBABuffer), ("YUVA", _YUVABuffer)]


class _DecBuffer(ctypes.Structure):
    _fields_ = [
        ("colorspace", ctypes.c_int),
        ("width", ctypes.c_int),
        ("height", ctypes.c_int),
        ("is_external_memory", ctypes.c_int),
        ("u", _Buffers),
        ("pad", ctypes.c_uint32 * 4),
        ("private_memory", ctypes.c_void_p),
    ]


_OPTIONS = (
    "bypass_filtering no_fancy_upsampling use_cropping crop_left crop_top crop_width crop_height use_scaling "
    "scaled_width scaled_height use_threads dithering_strength flip alpha_dithering_strength"
).split()


class _Options(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in _OPTIONS] + [("pad", ctypes.c_uint32 * 5)]


class _Config(ctypes.Structure):
    _fields_ = [("input", _Features), ("output", _DecBuffer), ("options", _Options)]


@functools.cache
def _libwebp() -> ctypes.CDLL | None:
    """libwebp's decoding API, from the library Pillow loaded, or None (logged once)."""
    try:
        if _EXTENSION is None:
            raise ImportError("Pillow has no WEBP support")
        lib = ctypes.CDLL(_EXTENSION)  # CDLL: each call releases the GIL, as the decode pool needs
        bytes_in, size = ctypes.c_char_p, ctypes.c_size_t
        for name, arguments in [
            ("WebPGetFeaturesInternal", [bytes_in, size, ctypes.POINTER(_Features), ctypes.c_int]),
            ("WebPInitDecoderConfigInternal", [ctypes.POINTER(_Config), ctypes.c_int]),
            ("WebPDecode", [bytes_in, size, ctypes.POINTER(_Config)]),
        ]:
            function = getattr(lib, name)
            function.argtypes, function.restype = arguments, ctypes.c_int
        if not lib.WebPInitDecoderConfigInternal(ctypes.byref(_Config()), _ABI_VERSION):
            raise OSError(f"libwebp's decoder ABI is not {_ABI_VERSION:#06x}")
    except (ImportError, OSError, AttributeError) as exc:
        log.warning("libwebp's API is not reachable (%s); WEBP is decoded by libvips or Pillow", exc)
        return None
    return lib


def available() -> bool:
    return _libwebp() is not None


# Pillow's ImageOps.exif_transpose, by EXIF orientation.
_TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def decode(data: bytes, orientation: int, target: tuple[int, int] | None) -> Image.Image:
    """Decode WEBP bytes (already checked by decode.py) to 8-bit RGB, or RGBA where the image has alpha, shown
    as ``orientation`` says, at ``target`` (width, height as shown) or whole.

    Raises Unsupported for an animation or where libwebp's API is not reachable, OSError for corrupt data."""
    lib = _libwebp()
    if lib is None:
        raise Unsupported("no libwebp API")
    data = bytes(data)  # ctypes passes only bytes as a char pointer (a bytes object is not copied)
    config = _Config()
    if not lib.WebPInitDecoderConfigInternal(ctypes.byref(config), _ABI_VERSION):
        raise Unsupported("libwebp's ABI")
    status = lib.WebPGetFeaturesInternal(data, len(data), ctypes.byref(config.input), _ABI_VERSION)
    if status != 0:  # VP8StatusCode: not a WEBP bitstream, or its header cut off
        raise OSError(f"libwebp: status {status}")
    if config.input.has_animation:
        raise Unsupported("an animation: Pillow takes its first frame")
    width, height = config.input.width, config.input.height
    if target is not None:
        width, height = (target[1], target[0]) if orientation in (5, 6, 7, 8) else target
        config.options.use_scaling, config.options.scaled_width, config.options.scaled_height = 1, width, height
    alpha = bool(config.input.has_alpha)
    channels = 4 if alpha else 3
    pixels = bytearray(width * height * channels)  # libwebp checks that its output fits this size
    output = (ctypes.c_char * len(pixels)).from_buffer(pixels)
    config.output.colorspace = _MODE_RGBA if alpha else _MODE_RGB
    config.output.is_external_memory = 1
    config.output.u.RGBA.rgba = ctypes.addressof(output)
    config.output.u.RGBA.stride = width * channels
    config.output.u.RGBA.size = len(pixels)
    config.options.use_threads = 1  # a second thread (filtering, or scaling and colour), as libvips asks
    status = lib.WebPDecode(data, len(data), ctypes.byref(config))
    del output  # (the buffer's export: Pillow shares its memory below)
    if status != 0:  # VP8StatusCode: a truncated (7) or corrupt bitstream
        raise OSError(f"libwebp: status {status}")
    mode = "RGBA" if alpha else "RGB"
    image = Image.frombuffer(mode, (width, height), pixels, "raw", mode, 0, 1)
    return image.transpose(_TURNS[orientation]) if orientation in _TURNS else image
