"""JPEG 2000 through imagecodecs (images/jpeg2k.py): which files take it, the same pixels as Pillow's path,
the other threads running while it decodes, and the header's budgets still checked first."""

from __future__ import annotations

import io
import threading
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from llamascope import errors
from llamascope.images import jpeg2k
from llamascope.images.decode import OPJ_THREADS, DecodeLimits, decode_image

LIMITS = DecodeLimits(max_pixels=40_000_000, min_side=10)


def encode(img: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG2000", **kwargs)
    return buf.getvalue()


def photo(width: int, height: int) -> Image.Image:
    """Smooth shapes and sensor noise, as bench/images.py makes them: OpenJPEG works as on a real photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([127 + 100 * np.sin(x / 90), 127 + 100 * np.cos(y / 70), 127 + 100 * np.sin((x + y) / 200)], -1)
    grain = np.random.default_rng(0).normal(0, 12, size=(height, width, 3))
    return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))


def plain(data: bytes) -> bool:
    """Whether images/jpeg2k.py takes the file, of the size Pillow reads from its header (as decode.py passes)."""
    return jpeg2k.plain(data, Image.open(io.BytesIO(data)).size)


def test_imagecodecs_is_here() -> None:
    assert jpeg2k.available()  # a dependency (pyproject.toml): without it every test below tests Pillow twice


def test_a_photo_decodes_to_the_pillow_paths_pixels() -> None:
    data = encode(photo(800, 600))  # lossless: the same codec gives the same integers
    assert plain(data)
    ours = decode_image(data, LIMITS, lambda w, h: (560, 420))
    pillow = decode_image(data, LIMITS, lambda w, h: (560, 420), libvips=False)
    assert ours.image.size == (560, 420) and ours.format == "JPEG2000"
    assert np.array_equal(np.asarray(ours.image), np.asarray(pillow.image))
    lossy = encode(photo(640, 480), irreversible=True, quality_mode="rates", quality_layers=[20], no_jp2=True)
    assert plain(lossy)
    # Lossy: OpenJPEG's 9/7 wavelet is floating point, and the two wheels' builds of it may round apart on
    # another CPU: within one level, not bit for bit.
    gap = np.abs(
        np.asarray(decode_image(lossy, LIMITS).image, dtype=np.int16)
        - np.asarray(decode_image(lossy, LIMITS, libvips=False).image, dtype=np.int16)
    )
    assert gap.max() <= 1


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "I;16"])
@pytest.mark.parametrize("no_jp2", [False, True], ids=["jp2", "codestream"])
def test_grey_alpha_and_deep_images_as_before(mode: str, no_jp2: bool) -> None:
    """Grey and alpha the way Pillow's path gives them (alpha flattened onto white); JP2's channel definitions
    (Pillow writes them with alpha) and 16-bit samples stay with Pillow."""
    fill = {"L": 90, "LA": (90, 100), "RGBA": (10, 200, 30, 100), "I;16": 30000}[mode]
    data = encode(Image.new(mode, (64, 48), fill), no_jp2=no_jp2)
    assert plain(data) == (mode in ("L", "LA", "RGBA") and (no_jp2 or mode == "L"))
    ours, pillow = decode_image(data, LIMITS), decode_image(data, LIMITS, libvips=False)
    assert ours.image.mode == "RGB"
    assert np.array_equal(np.asarray(ours.image), np.asarray(pillow.image))


def test_what_imagecodecs_would_not_decode_as_pillow_goes_to_pillow() -> None:
    data = encode(Image.new("RGB", (64, 48), (10, 200, 30)))
    colr = data.index(b"colr")
    assert data[colr + 4] == 1 and data[colr + 7 : colr + 11] == (16).to_bytes(4, "big")  # enumerated: sRGB
    sycc = data[: colr + 7] + (18).to_bytes(4, "big") + data[colr + 11 :]  # sYCC: OpenJPEG converts it itself
    icc = data[: colr + 4] + b"\x02" + data[colr + 5 :]  # an ICC profile: imagecodecs would apply it
    assert plain(data) and not plain(sycc) and not plain(icc)
    assert not jpeg2k.plain(data[: data.index(b"jp2c") + 10], (64, 48))  # cut inside the size marker
    with pytest.raises(jpeg2k.Unsupported):
        jpeg2k.decode(sycc, (64, 48))


def test_a_codestream_of_another_size_than_the_jp2_header_says_goes_to_pillow() -> None:
    """The budgets are checked on the header's size (JP2's image header box): a codestream that declares more
    is not handed to imagecodecs, whose OpenJPEG would size its buffers by it; Pillow's decoder refuses it."""
    data = encode(Image.new("RGB", (64, 48), (10, 200, 30)))
    siz = data.index(b"\xff\x4f\xff\x51") + 8  # Xsiz, Ysiz
    bigger = data[:siz] + (6000).to_bytes(4, "big") * 2 + data[siz + 8 :]
    assert Image.open(io.BytesIO(bigger)).size == (64, 48)
    assert plain(data) and not plain(bigger)
    with pytest.raises(errors.ServiceError) as info:
        decode_image(bigger, LIMITS)
    assert info.value.message.endswith("The image file is corrupt or truncated.")


def test_a_truncated_file_is_refused_as_before() -> None:
    cut = encode(photo(256, 192))[:-3000]
    assert plain(cut)
    for libvips in (True, False):
        with pytest.raises(errors.ServiceError) as info:
            decode_image(cut, LIMITS, libvips=libvips)
        assert info.value.message.endswith("The image file is corrupt or truncated.")


@pytest.mark.parametrize("no_jp2", [False, True], ids=["jp2", "codestream"])
def test_a_bomb_is_refused_from_its_header(no_jp2: bool) -> None:
    """A 2 kB file that declares 6000x6000 (36 million pixels, under the declared limit, over the decode
    budget) or 12000x12000: refused by its size, before any decoder sees it (a decode would find it corrupt)."""
    data = encode(Image.new("RGB", (64, 48), (10, 200, 30)), no_jp2=no_jp2)
    for side, limit in [(6000, "decodes at most 20000000 pixels"), (12000, "more than the limit of 40000000")]:
        siz = data.index(b"\xff\x4f\xff\x51") + 8  # Xsiz, Ysiz
        bomb = data[:siz] + side.to_bytes(4, "big") * 2 + data[siz + 8 :]
        if not no_jp2:
            ihdr = bomb.index(b"ihdr") + 4  # height, width
            bomb = bomb[:ihdr] + side.to_bytes(4, "big") * 2 + bomb[ihdr + 8 :]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            assert Image.open(io.BytesIO(bomb)).size == (side, side)
        with pytest.raises(errors.ServiceError) as info:
            decode_image(bomb, LIMITS)
        assert limit in info.value.message


def test_other_threads_run_while_a_jpeg2000_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's decoder holds the GIL from the first byte to the last: the event loop, the scheduler and the
    other decodes stood still. Through imagecodecs a thread waking every millisecond keeps running: its longest
    wait is a small part of the decode (measured against the decode's own time, so any CPU's speed passes)."""
    monkeypatch.setenv(OPJ_THREADS, "1")
    data = encode(photo(1280, 960))  # about 0.35 s of OpenJPEG's CPU here, on its one thread
    done = threading.Event()
    worker = threading.Thread(target=lambda: (decode_image(data, LIMITS), done.set()))
    start = last = time.perf_counter()
    longest = 0.0
    worker.start()
    while not done.is_set():
        time.sleep(0.001)
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    worker.join()
    took = time.perf_counter() - start
    assert longest < took / 3, (longest, took)  # with the GIL held throughout, the one wait is the decode


@pytest.mark.slow  # imports transformers: about 10 s on two cores
def test_the_stock_processor_sees_the_same_pixel_values() -> None:
    """From the bytes to pixel_values: a 1600x1200 JPEG 2000 decoded through imagecodecs and shrunk to the
    model's 1120x840, against the stock processor given Pillow's whole image."""
    from transformers.models.mllama import MllamaImageProcessorPil

    from llamascope.engines.mllama_pixels import MllamaPixels

    stock = MllamaImageProcessorPil(  # Llama 3.2 Vision's settings, as the test model's processor
        size={"height": 560, "width": 560},
        max_image_tiles=4,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    data = encode(photo(1600, 1200))
    assert plain(data)
    shrunk = decode_image(data, LIMITS, MllamaPixels(stock).fit_size).image
    assert shrunk.size == (1120, 840)
    a = stock(images=[[Image.open(io.BytesIO(data)).convert("RGB")]], return_tensors="np")
    b = stock(images=[[shrunk]], return_tensors="np")
    assert (a["aspect_ratio_ids"] == b["aspect_ratio_ids"]).all()
    # In normalised units (1/255 is about 0.015 of them), as tests/images/test_vips.py checks libvips's path.
    assert np.abs(a["pixel_values"] - b["pixel_values"]).mean() < 0.03


def _with_components(codestream: bytes, components: bytes) -> bytes:
    """The codestream with its size marker's per-component fields (Ssiz, XRsiz, YRsiz of each) replaced."""
    start = codestream.index(b"\xff\x51") + 2 + 38  # after Lsiz, Rsiz, the eight sizes and offsets, Csiz
    return codestream[:start] + components + codestream[start + len(components) :]


@pytest.mark.parametrize(
    "components",
    [b"\x07\x02\x02" * 3, b"\x07\x01\x01\x0f\x01\x01\x07\x01\x01"],
    ids=["subsampled", "mixed-depths"],
)
def test_a_decoy_size_marker_before_the_codestream_is_not_read_for_it(components: bytes) -> None:
    """JP2's codestream is its first codestream box: bytes that look like one inside an earlier box (XML here)
    are not it. Read for it, a decoy that says 8 bits, not subsampled, sent imagecodecs a codestream it refuses
    with NotImplementedError, which no one caught: a 500 for an image Pillow decodes (or finds corrupt: a 400)."""
    data = encode(Image.new("RGB", (64, 48), (10, 200, 30)))
    box = data.index(b"jp2c") - 4
    codestream = data[box + 8 :]
    decoy = b"jp2c" + codestream[:60]  # this file's own size marker: 8-bit samples, none subsampled
    xml = (8 + len(decoy)).to_bytes(4, "big") + b"xml " + decoy
    real = _with_components(codestream, components)
    hostile = data[:box] + xml + (8 + len(real)).to_bytes(4, "big") + b"jp2c" + real
    assert Image.open(io.BytesIO(hostile)).size == (64, 48)
    assert not plain(hostile)
    assert plain(data[:box] + xml + data[box:])  # the decoy alone changes nothing
    try:
        pillow: object = np.asarray(decode_image(hostile, LIMITS, libvips=False).image)
    except errors.ServiceError as refused:
        pillow = refused.status
    try:
        ours: object = np.asarray(decode_image(hostile, LIMITS).image)
    except errors.ServiceError as refused:
        ours = refused.status
    assert np.array_equal(ours, pillow)  # type: ignore[arg-type]


def test_a_codestream_box_with_a_64_bit_length_is_found() -> None:
    data = encode(photo(128, 96))
    box = data.index(b"jp2c") - 4
    size = len(data) - box + 8  # the box, its header 8 bytes longer
    wide = data[:box] + (1).to_bytes(4, "big") + b"jp2c" + size.to_bytes(8, "big") + data[box + 8 :]
    assert plain(wide)
    assert np.array_equal(
        np.asarray(decode_image(wide, LIMITS).image), np.asarray(decode_image(wide, LIMITS, libvips=False).image)
    )


def test_the_colour_box_read_is_the_jp2_headers() -> None:
    """A colour box's bytes in a box before the JP2 header (enumerated sRGB) do not hide the header's own (an
    ICC profile here, which imagecodecs would apply and Pillow does not)."""
    data = encode(Image.new("RGB", (64, 48), (10, 200, 30)))
    colr = data.index(b"colr")
    icc = data[: colr + 4] + b"\x02" + data[colr + 5 :]
    decoy = data[colr : colr + 11]  # the sRGB colour box's type and fields
    xml = (8 + len(decoy)).to_bytes(4, "big") + b"xml " + decoy
    jp2h = icc.index(b"jp2h") - 4
    assert plain(data[:jp2h] + xml + data[jp2h:])
    assert not plain(icc[:jp2h] + xml + icc[jp2h:])


def test_a_codestream_that_cannot_be_reduced_is_decoded_whole_only_within_the_budget() -> None:
    """The decode budget is checked on the reduced size; a codestream of fewer resolution levels than the
    reduction (one here: a 330 kB 6000x6000 file) is decoded whole instead, and was past the budget (36
    million pixels against 20, 690 MB, 3.7 s with the GIL held): refused as the budget says, as a larger one is."""
    limits = DecodeLimits(max_pixels=40_000_000, max_decode_pixels=300_000, min_side=10)

    def fit(width: int, height: int) -> tuple[int, int]:
        return (300, 300)  # a reduction by 2 (400x400: 160,000 pixels) covers it

    levels = encode(photo(800, 800))
    assert decode_image(levels, limits, fit).image.size == (300, 300)
    one_level = encode(photo(800, 800), num_resolutions=1)
    with pytest.raises(errors.ServiceError) as info:
        decode_image(one_level, limits, fit)
    assert "decodes at most 300000 pixels" in info.value.message
