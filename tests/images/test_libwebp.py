"""WEBP through libwebp's API: the Pillow path's pixels (within the resize's rounding), turned and flattened as it does.

Tolerance as tests/images/test_vips.py states it for WEBP: a mean absolute difference of at most 2/255
(libwebp's scaler against Pillow's bilinear), no value more than 16/255 apart; decoded whole, the same values.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from llamascope.images import libwebp, vips
from llamascope.images.decode import DecodeLimits, FitFunction, decode_image
from tests.images.test_vips import encode, photo

LIMITS = DecodeLimits()
pytestmark = pytest.mark.skipif(not libwebp.available(), reason="libwebp's API is not reachable here")


def no_fallback(*args: object) -> None:
    raise AssertionError("libvips decoded it: libwebp's path was not taken")


def both_paths(data: bytes, fit: FitFunction | None) -> tuple[np.ndarray, np.ndarray]:
    ours = decode_image(data, LIMITS, fit).image
    pillow = decode_image(data, LIMITS, fit, libvips=False).image
    assert ours.mode == pillow.mode == "RGB" and ours.size == pillow.size
    return np.asarray(ours, dtype=np.int16), np.asarray(pillow, dtype=np.int16)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
@pytest.mark.parametrize("fit", [lambda w, h: (w // 4, h // 4), lambda w, h: (w * 5 // 6, h * 5 // 6), None])
def test_same_pixels_as_the_pillow_path(mode: str, fit: FitFunction | None, monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(photo(1200, 900, mode), "WEBP", quality=90)
    monkeypatch.setattr(vips, "decode", no_fallback)  # libwebp's path decodes it, or the test fails
    assert libwebp.decode(data, 1, None).size == (1200, 900)  # this path takes it
    ours, pillow = both_paths(data, fit)
    diff = np.abs(ours - pillow)
    assert diff.mean() <= 2 and diff.max() <= 16
    if fit is None:  # no resize: libwebp's own values, flattened onto white as Pillow's are
        assert diff.max() == 0


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_as_pillow_turns_it(orientation: int) -> None:
    img = photo(60, 20)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(img, "WEBP", lossless=True, exif=exif)
    ours, pillow = both_paths(data, None)
    assert (ours == pillow).all()
    shown = (20, 60) if orientation >= 5 else (60, 20)
    ours, pillow = both_paths(data, lambda w, h: (w // 2, h // 2))
    assert ours.shape == pillow.shape == (shown[1] // 2, shown[0] // 2, 3)
    assert np.abs(ours - pillow).mean() <= 2


def test_an_animation_is_left_to_pillow() -> None:
    frames = [Image.new("RGB", (40, 40), c) for c in ((250, 0, 0), (0, 250, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    with pytest.raises(libwebp.Unsupported):
        libwebp.decode(buf.getvalue(), 1, None)


def test_a_truncated_file_is_an_error() -> None:
    data = encode(photo(400, 300), "WEBP")
    with pytest.raises(OSError, match="status 7"):
        libwebp.decode(data[: len(data) // 2], 1, (200, 150))


def test_an_incompatible_libwebp_leaves_webp_to_the_other_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """A libwebp whose decoder ABI differs refuses the config; WEBP still decodes, by libvips or Pillow."""
    monkeypatch.setattr(libwebp, "_ABI_VERSION", 0x0309)  # a major version this libwebp does not speak
    libwebp._libwebp.cache_clear()
    try:
        assert not libwebp.available()
        data = encode(photo(1200, 900), "WEBP", quality=90)
        assert decode_image(data, LIMITS, lambda w, h: (300, 225)).image.size == (300, 225)
    finally:
        monkeypatch.undo()
        libwebp._libwebp.cache_clear()
    assert libwebp.available()
