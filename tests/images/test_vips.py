"""The libvips path: which images take it, and that it gives the Pillow path's pixels and the stock processor's.

Tolerance: the two paths resize with different code (libvips's and Pillow's bilinear, libwebp's scaler),
so values may differ by the resize's rounding: a mean absolute difference of at most 1/255 for PNG
(lossless: only the resize differs) and 2/255 for WEBP (libwebp scales while decoding), no value more
than 16/255 apart.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from llamascope.images import vips
from llamascope.images.decode import DecodeLimits, decode_image

LIMITS = DecodeLimits()
pytestmark = pytest.mark.skipif(not vips.available(), reason="no libvips on this platform")


def photo(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Smooth shapes plus grain, like a photo: every resize difference shows."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([127 + 100 * np.sin(x / 37), 127 + 100 * np.cos(y / 23), 127 + 100 * np.sin((x + y) / 51)], axis=-1)
    grain = np.random.default_rng(0).normal(0, 8, size=(height, width, 3))
    img = Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))
    if mode in ("RGBA", "LA"):
        alpha = Image.fromarray((np.clip(x / width, 0, 1) * 255).astype(np.uint8))
        img = img.convert(mode[:-1])
        img.putalpha(alpha)
        return img
    return img.convert(mode)


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def quarter(width: int, height: int) -> tuple[int, int]:
    return width // 4, height // 4


def both_paths(data: bytes, fit: object = quarter) -> tuple[np.ndarray, np.ndarray]:
    ours = decode_image(data, LIMITS, fit, libvips=True).image  # type: ignore[arg-type]
    pillow = decode_image(data, LIMITS, fit, libvips=False).image  # type: ignore[arg-type]
    assert ours.mode == pillow.mode == "RGB" and ours.size == pillow.size
    return np.asarray(ours, dtype=np.int16), np.asarray(pillow, dtype=np.int16)


def taken_by_libvips(data: bytes, fmt: str, fit: object = quarter) -> bool:
    def target_for(width: int, height: int, orientation: int) -> tuple[int, int] | None:
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        return fit(width, height) if fit else None  # type: ignore[operator]

    try:
        vips.decode(data, fmt, target_for)
    except vips.Unsupported:
        return False
    return True


@pytest.mark.parametrize(
    ("mode", "fmt", "kwargs", "mean_at_most"),
    [
        ("RGB", "PNG", {}, 1),
        ("RGBA", "PNG", {}, 1),
        ("L", "PNG", {}, 1),
        ("LA", "PNG", {}, 1),
        ("P", "PNG", {}, 1),
        ("RGB", "WEBP", {"quality": 90}, 2),
        ("RGBA", "WEBP", {"quality": 90}, 2),
    ],
)
def test_same_pixels_as_the_pillow_path(mode: str, fmt: str, kwargs: dict, mean_at_most: float) -> None:
    data = encode(photo(1200, 900, mode), fmt, **kwargs)
    assert taken_by_libvips(data, fmt)
    ours, pillow = both_paths(data)
    assert ours.shape == (225, 300, 3)
    diff = np.abs(ours - pillow)
    assert diff.mean() <= mean_at_most and diff.max() <= 16


def test_palette_transparency_flattened_onto_white() -> None:
    img = Image.new("P", (40, 40), 0)
    img.putpalette([200, 0, 0, 0, 0, 200])
    img.paste(1, (0, 0, 20, 40))
    data = encode(img, "PNG", transparency=1)
    assert taken_by_libvips(data, "PNG", None)
    image = decode_image(data, LIMITS).image
    assert image.getpixel((5, 5)) == (255, 255, 255) and image.getpixel((30, 5)) == (200, 0, 0)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_exif_orientation_applied_before_sizing(fmt: str) -> None:
    img = photo(1200, 400)
    img.paste((255, 0, 0), (0, 0, 200, 200))  # top left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: the red corner goes top right
    data = encode(img, fmt, exif=exif, **({"quality": 95} if fmt == "WEBP" else {}))
    asked = []

    def fit(width: int, height: int) -> tuple[int, int]:
        asked.append((width, height))
        return width // 4, height // 4

    assert taken_by_libvips(data, fmt, fit)
    image = decode_image(data, LIMITS, fit).image
    assert asked[-1] == (400, 1200) and image.size == (100, 300)
    r, g, b = image.getpixel((90, 10))
    assert r > 200 and g < 60 and b < 60
    ours, pillow = both_paths(data)
    assert np.abs(ours - pillow).mean() <= 2


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_as_pillow_turns_it(orientation: int) -> None:
    img = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(img, "PNG", exif=exif)
    assert taken_by_libvips(data, "PNG", None)
    ours, pillow = both_paths(data, None)
    assert (ours == pillow).all()  # no resize: exactly the same pixels


@pytest.mark.slow  # imports transformers: about 10 s on two cores
def test_the_stock_processor_sees_the_same_pixel_values() -> None:
    """From the bytes to pixel_values: libvips's shrunk image against the stock processor given the whole one."""
    from transformers.models.mllama import MllamaImageProcessorPil

    from llamascope.engines.mllama_pixels import MllamaPixels

    stock = MllamaImageProcessorPil(  # Llama 3.2 Vision's settings, as the test model's processor
        size={"height": 560, "width": 560},
        max_image_tiles=4,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    fit = MllamaPixels(stock).fit_size
    for fmt, kwargs in [("PNG", {}), ("WEBP", {"quality": 95})]:
        data = encode(photo(2240, 1680), fmt, **kwargs)  # 1120x840 for the model: WEBP scaled 0.5
        assert taken_by_libvips(data, fmt, fit)
        shrunk = decode_image(data, LIMITS, fit).image
        whole = Image.open(io.BytesIO(data)).convert("RGB")
        a = stock(images=[[whole]], return_tensors="np")
        b = stock(images=[[shrunk]], return_tensors="np")
        assert (a["aspect_ratio_ids"] == b["aspect_ratio_ids"]).all()
        # In normalised units (1/255 is about 0.015 of them), as tests/engines/test_mllama.py checks the Pillow path.
        assert np.abs(a["pixel_values"] - b["pixel_values"]).mean() < 0.03, fmt


def test_pillow_keeps_what_libvips_would_not_reproduce() -> None:
    sixteen_bit = encode(Image.new("I;16", (300, 300), 32768), "PNG")
    small_webp = encode(photo(400, 300), "WEBP")  # near the model's size: Pillow's libwebp is faster
    assert not taken_by_libvips(sixteen_bit, "PNG")
    assert not taken_by_libvips(small_webp, "WEBP", lambda w, h: (w - 10, h - 10))
    assert not taken_by_libvips(small_webp, "WEBP", None)
    assert not taken_by_libvips(encode(photo(400, 300), "JPEG"), "JPEG")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_exif_after_the_pixels_goes_to_pillow() -> None:
    """libvips reads a PNG's EXIF only before the pixels; Pillow finds it anywhere, so Pillow takes it."""
    data = encode(photo(60, 20), "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    end = data.rindex(b"IEND") - 4
    data = data[:end] + _png_chunk(b"eXIf", exif.tobytes()) + data[end:]
    assert not taken_by_libvips(data, "PNG", None)
    assert decode_image(data, LIMITS).image.size == (20, 60)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_truncated_is_refused(fmt: str) -> None:
    from llamascope import errors

    data = encode(photo(1200, 900), fmt)
    with pytest.raises(errors.ServiceError, match="corrupt or truncated"):
        decode_image(data[: len(data) * 2 // 3], LIMITS, quarter)


def test_without_libvips_pillow_decodes_everything() -> None:
    """No pyvips for the platform: images still decode, and the log says so once."""
    script = (
        "import io, logging, sys; sys.modules['pyvips'] = None\n"  # as when the import fails
        "logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
        "from PIL import Image\n"
        "from llamascope.images.decode import DecodeLimits, decode_image\n"
        "buf = io.BytesIO(); Image.new('RGB', (800, 600), (1, 2, 3)).save(buf, format='PNG')\n"
        "for _ in range(3):\n"
        "    assert decode_image(buf.getvalue(), DecodeLimits(), lambda w, h: (400, 300)).image.size == (400, 300)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("libvips is not available") == 1
