"""Decoding: the seed's formats by their bytes, header-first pixel checks, normalisation to RGB."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from llamascope import errors
from llamascope.images.decode import OPJ_THREADS, DecodeLimits, FitFunction, configure_codec_threads, decode_image

LIMITS = DecodeLimits(max_pixels=40_000_000, min_side=10)


@pytest.fixture(params=[True, False], ids=["libvips", "pillow"])
def libvips(request: pytest.FixtureRequest) -> bool:
    """Both decode paths: libvips where it is faster (PNG, large WEBP), Pillow for all."""
    return bool(request.param)


def encode(fmt: str, mode: str = "RGB", size: tuple[int, int] = (64, 48), **kwargs: object) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (10, 200, 30, 255)[: len(mode)] if mode not in ("L", "P") else 100).save(
        buf, format=fmt, **kwargs
    )
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "expected", "kwargs"),
    [
        ("BMP", "BMP", {}),
        ("DIB", "DIB", {}),
        ("ICO", "ICO", {"sizes": [(32, 32), (64, 64)]}),
        ("ICNS", "ICNS", {}),
        ("JPEG", "JPEG", {}),
        ("JPEG2000", "JPEG2000", {}),
        ("PNG", "PNG", {}),
        ("SGI", "SGI", {}),
        ("TIFF", "TIFF", {}),
        ("WEBP", "WEBP", {}),
    ],
)
def test_seed_formats_decode_to_rgb(fmt: str, expected: str, kwargs: dict) -> None:
    size = (64, 64) if fmt in ("ICO", "ICNS") else (64, 48)
    image = decode_image(encode(fmt, size=size, **kwargs), LIMITS)
    assert image.format == expected
    assert image.image.mode == "RGB"
    # ICO and ICNS hold several sizes; the largest is the one decoded (Pillow writes ICNS up to 1024).
    assert image.image.size == ((1024, 1024) if fmt == "ICNS" else size)


@pytest.mark.parametrize("fmt", ["GIF", "PDF", "PPM"])
def test_other_formats_are_named_and_refused(fmt: str) -> None:
    with pytest.raises(errors.ServiceError) as info:
        decode_image(encode(fmt), LIMITS)
    assert info.value.code == "InvalidParameter.DataInspection"
    assert f"The image is {fmt}" in info.value.message and "JPEG2000" in info.value.message


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "HEIC"),
        (b"\x00\x00\x00\x18ftypavif\x00\x00\x00\x00", "AVIF"),
    ],
)
def test_unreadable_formats_are_named(data: bytes, name: str) -> None:
    with pytest.raises(errors.ServiceError, match=f"The image is {name}"):
        decode_image(data, LIMITS)


def test_not_an_image() -> None:
    with pytest.raises(errors.ServiceError, match="not an image"):
        decode_image(b"just some text, not a picture", LIMITS)


def test_truncated(libvips: bool) -> None:
    data = encode("PNG", size=(400, 400))
    with pytest.raises(errors.ServiceError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], LIMITS, libvips=libvips)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size in 60 bytes: the bomb's fuse without the bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [7000, 12000, 100_000])
def test_pixel_budget_checked_before_decoding(side: int, libvips: bool) -> None:
    with pytest.raises(errors.ServiceError) as info:
        decode_image(png_header_only(side, side), LIMITS, libvips=libvips)
    assert info.value.status == 400 and "pixels" in info.value.message


def test_decode_budget_checked_before_decoding(libvips: bool) -> None:
    """Within the header's budget but more to decode than the server allows: refused from the header too
    (the PNG has no pixel data, so decoding would fail otherwise). WEBP counts whole on both paths."""
    limits = DecodeLimits(max_pixels=40_000_000, max_decode_pixels=1_000_000)
    with pytest.raises(errors.ServiceError, match="decodes at most 1000000 pixels"):
        decode_image(png_header_only(2000, 1000), limits, lambda w, h: (200, 100), libvips=libvips)


def test_too_small() -> None:
    with pytest.raises(errors.ServiceError, match="must be larger than 10"):
        decode_image(encode("PNG", size=(5, 300)), LIMITS)


def test_alpha_flattened_onto_white(libvips: bool) -> None:
    buf = io.BytesIO()
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(buf, format="PNG")
    image = decode_image(buf.getvalue(), LIMITS, libvips=libvips).image
    assert image.getpixel((5, 5)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16", "LA"])
def test_modes_become_rgb(mode: str, libvips: bool) -> None:
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    buf = io.BytesIO()
    Image.new(mode, (30, 30)).save(buf, format=fmt)
    assert decode_image(buf.getvalue(), LIMITS, libvips=libvips).image.mode == "RGB"


def test_sixteen_bit_scaled_not_clipped() -> None:
    buf = io.BytesIO()
    Image.new("I;16", (30, 30), 32768).save(buf, format="PNG")
    r, g, b = decode_image(buf.getvalue(), LIMITS).image.getpixel((0, 0))
    assert 120 <= r <= 135 and r == g == b


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_applied(fmt: str, libvips: bool) -> None:
    img = Image.new("RGB", (60, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    buf = io.BytesIO()
    img.save(buf, format=fmt, exif=exif)
    assert decode_image(buf.getvalue(), LIMITS, libvips=libvips).image.size == (20, 60)


@pytest.mark.parametrize("fmt", ["JPEG", "JPEG2000", "PNG", "WEBP"])
def test_decoded_no_larger_than_the_model_wants(fmt: str, libvips: bool) -> None:
    data = encode(fmt, size=(4000, 3000))
    asked = []

    def fit(width: int, height: int) -> tuple[int, int]:
        asked.append((width, height))
        return 1120, 840

    image = decode_image(data, LIMITS, fit, libvips=libvips)
    assert asked == [(4000, 3000)]
    assert (image.source_width, image.source_height) == (4000, 3000)
    assert image.image.size == (1120, 840)


def test_fit_sees_the_rotated_size() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (3000, 2000)).save(buf, format="JPEG", exif=exif)
    asked = []

    def fit(width: int, height: int) -> tuple[int, int]:
        asked.append((width, height))
        return 560, 840

    assert decode_image(buf.getvalue(), LIMITS, fit).image.size == (560, 840)
    assert asked == [(2000, 3000)]


def test_small_images_are_not_upscaled_here(libvips: bool) -> None:
    image = decode_image(encode("PNG", size=(300, 200)), LIMITS, lambda w, h: (560, 373), libvips=libvips)
    assert image.image.size == (300, 200)  # the model's processor upscales; intake never does


def test_digest_is_of_the_source_bytes() -> None:
    import hashlib

    data = encode("PNG")
    assert decode_image(data, LIMITS).digest == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_first_frame_of_animations_and_pages(fmt: str, libvips: bool) -> None:
    frames = [Image.new("RGB", (40, 40), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    buf = io.BytesIO()
    frames[0].save(
        buf, format=fmt, save_all=True, append_images=frames[1:], **({"lossless": True} if fmt == "WEBP" else {})
    )
    r, g, b = decode_image(buf.getvalue(), LIMITS, libvips=libvips).image.getpixel((20, 20))
    assert r > 200 and g < 50 and b < 50


def test_jpeg2000_threads_default_to_the_cores_and_keep_the_operators_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(OPJ_THREADS, raising=False)
    configure_codec_threads(5)
    assert os.environ[OPJ_THREADS] == "5"
    monkeypatch.setenv(OPJ_THREADS, "3")
    configure_codec_threads(5)
    assert os.environ[OPJ_THREADS] == "3"


@pytest.mark.parametrize("fit", [None, lambda width, height: (300, 225)], ids=["whole", "reduced"])
def test_jpeg2000_on_several_threads_gives_the_same_pixels(
    monkeypatch: pytest.MonkeyPatch, fit: FitFunction | None
) -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)  # many code blocks
    data = encode_array(noise, "JPEG2000")
    decoded = {}
    for threads in ("1", "4"):  # OpenJPEG reads the variable per decoder: set after Pillow is loaded
        monkeypatch.setenv(OPJ_THREADS, threads)
        decoded[threads] = np.asarray(decode_image(data, LIMITS, fit).image)
    assert decoded["1"].shape == ((480, 640, 3) if fit is None else (225, 300, 3))
    assert np.array_equal(decoded["1"], decoded["4"])


def encode_array(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def cielab_tiff(colors: list[tuple[int, int, int]]) -> bytes:
    """An 8-bit CIELab TIFF (as Photoshop and libtiff write it: D50) of a row of sRGB ``colors``, 10x10 each."""
    from PIL import ImageCms

    rgb = Image.new("RGB", (10 * len(colors), 10))
    for i, color in enumerate(colors):
        rgb.paste(color, (10 * i, 0, 10 * i + 10, 10))
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    buf = io.BytesIO()
    ImageCms.applyTransform(rgb, to_lab).save(buf, format="TIFF")
    return buf.getvalue()


def test_a_cielab_tiff_decodes_to_its_colours() -> None:
    """Its L*a*b* values are converted to sRGB (by LittleCMS), never taken for RGB values."""
    colors = [(250, 180, 20), (220, 30, 30), (30, 160, 60), (40, 90, 200), (128, 128, 128)]
    data = cielab_tiff(colors)
    assert Image.open(io.BytesIO(data)).mode == "LAB"
    image = decode_image(data, LIMITS).image
    for i, color in enumerate(colors):
        got = image.getpixel((10 * i + 5, 5))
        assert max(abs(a - b) for a, b in zip(got, color, strict=True)) <= 12, (color, got)


def bare_tiff(photometric: int, bits: tuple[int, ...], extra_samples: tuple[int, ...] = ()) -> bytes:
    """A 16x16 uncompressed little-endian TIFF of zeros in a given layout, written field by field."""
    side, samples = 16, len(bits)
    data = bytes(side * side * sum(bits) // 8)
    entries = [
        (256, 3, 1, side),
        (257, 3, 1, side),
        (258, 3, samples, None),  # BitsPerSample: stored after the IFD
        (259, 3, 1, 1),
        (262, 3, 1, photometric),
        (273, 4, 1, None),  # StripOffsets: after the bits
        (277, 3, 1, samples),
        (278, 3, 1, side),
        (279, 4, 1, len(data)),
    ] + ([(338, 3, 1, extra_samples[0])] if extra_samples else [])
    bits_at = 8 + 2 + 12 * len(entries) + 4
    strip_at = bits_at + 2 * samples
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = {258: bits_at, 273: strip_at}.get(tag, value)
        packed = struct.pack("<HI", value, 0)[:4] if kind == 3 and tag != 258 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0\0\0\0" + struct.pack(f"<{samples}H", *bits) + data


@pytest.mark.parametrize(
    ("layout", "photometric", "bits", "extra"),
    [("16-bit CIELab", 8, (16, 16, 16), ()), ("CIELab with alpha", 8, (8, 8, 8, 8), (2,))],
)
def test_a_tiff_in_a_layout_pillow_cannot_read_is_called_a_tiff(
    layout: str, photometric: int, bits: tuple[int, ...], extra: tuple[int, ...]
) -> None:
    """It was refused as "not an image in a known format; accepted formats are ..., TIFF, ..."."""
    assert decode_image(bare_tiff(2, (8, 8, 8)), LIMITS).image.size == (16, 16)  # the same file, in RGB, reads
    with pytest.raises(errors.ServiceError) as refusal:
        decode_image(bare_tiff(photometric, bits, extra), LIMITS)
    assert "The image is a TIFF in a layout this server cannot decode" in refusal.value.message, layout
