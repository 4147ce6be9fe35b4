"""The intake service: the decode cache and the per-image time budget."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Callable

import pytest
from PIL import Image

from llamascope import errors
from llamascope.images import PreparedImage
from llamascope.images.decode import DecodeLimits
from llamascope.images.intake import ImageIntake
from llamascope.images.source import DataUriSource, FetchPolicy


def png(size: tuple[int, int], color: tuple[int, int, int] = (1, 2, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_same_bytes_decode_once() -> None:
    intake = ImageIntake(FetchPolicy(), DecodeLimits(), cache_bytes=10 * 1024 * 1024)
    data = png((800, 600))

    async def twice() -> tuple:
        return await intake.decode(data, fit_key="m"), await intake.decode(data, fit_key="m")

    first, second = asyncio.run(twice())
    assert first is second
    assert (intake.cache.hits, intake.cache.misses) == (1, 1)
    # Another model's sizing rule is another entry.
    asyncio.run(intake.decode(data, fit=lambda w, h: (400, 300), fit_key="other"))
    assert intake.cache.misses == 2


def test_cache_is_bounded_by_bytes() -> None:
    intake = ImageIntake(FetchPolicy(), DecodeLimits(), cache_bytes=3 * 100 * 100 * 3)
    for i in range(5):
        asyncio.run(intake.decode(png((100, 100), (i, i, i))))
    assert intake.cache.total <= 3 * 100 * 100 * 3
    assert len(intake.cache) == 3


def test_decode_over_budget_is_refused() -> None:
    intake = ImageIntake(FetchPolicy(), DecodeLimits(), decode_timeout=0.001, cache_bytes=0)
    with pytest.raises(errors.ServiceError, match="took longer than"):
        asyncio.run(intake.decode(png((3000, 3000))))


def test_a_data_uri_seen_before_is_not_decoded_again(monkeypatch: pytest.MonkeyPatch) -> None:
    intake = ImageIntake(FetchPolicy(), DecodeLimits(), cache_bytes=10 * 1024 * 1024)
    uri = "data:image/png;base64," + base64.b64encode(png((80, 60))).decode()
    first = asyncio.run(intake.load(uri, fit_key="m"))

    def no_read(self: DataUriSource) -> bytes:
        raise AssertionError("read again")

    monkeypatch.setattr(DataUriSource, "read", no_read)
    # A new string with the same text, as the next turn's request body gives.
    assert asyncio.run(intake.load("".join(["data", uri[4:]]), fit_key="m")) is first
    # Another sizing rule, or the decoded image gone from its cache: read and decoded again.
    with pytest.raises(AssertionError, match="read again"):
        asyncio.run(intake.load(uri, fit_key="other"))
    intake.cache.clear()
    with pytest.raises(AssertionError, match="read again"):
        asyncio.run(intake.load(uri, fit_key="m"))


def test_a_data_uri_seen_before_is_known_without_awaiting() -> None:
    """``known``: the image of a data: URI read before and still cached, taken with nothing to await (a
    conversation's next turn takes its images so); None where ``load`` must read it."""
    intake = ImageIntake(FetchPolicy(), DecodeLimits(), cache_bytes=10 * 1024 * 1024)
    uri = "data:image/png;base64," + base64.b64encode(png((80, 60))).decode()
    assert intake.known(uri, "m") is None  # never read
    misses = intake.data_uris.misses
    first = asyncio.run(intake.load(uri, fit_key="m"))
    assert intake.known("".join(["data", uri[4:]]), "m") is first  # a new string with the same text
    assert intake.known(uri, "other") is None  # another sizing rule
    assert intake.known("https://example.com/a.png", "m") is None
    assert intake.data_uris.misses == misses + 1  # only load's own lookup counted a miss
    intake.cache.clear()
    assert intake.known(uri, "m") is None  # the decoded image gone from its cache


def slow_fit(seconds: float) -> Callable[[int, int], tuple[int, int]]:
    """A model's sizing rule that takes ``seconds``: it runs inside the decode, which it makes that slow."""

    def fit(width: int, height: int) -> tuple[int, int]:
        time.sleep(seconds)
        return width, height

    return fit


def test_the_budget_starts_when_a_decoder_takes_the_image() -> None:
    """An image queued behind another's decode is not refused for the time it waited."""
    intake = ImageIntake(FetchPolicy(), DecodeLimits(), decode_workers=1, decode_timeout=1.6, cache_bytes=0)

    async def two() -> list[object]:
        fit = slow_fit(1.0)  # each decode well within its 1.6 s; both together not
        loads = (intake.decode(png((100, 100), (i, i, i)), fit, "slow") for i in range(2))
        return await asyncio.gather(*loads, return_exceptions=True)

    assert [type(result) for result in asyncio.run(two())] == [PreparedImage, PreparedImage]


def test_an_image_no_decoder_takes_in_time_is_throttled_not_blamed() -> None:
    intake = ImageIntake(FetchPolicy(), DecodeLimits(), decode_workers=1, decode_timeout=0.3, cache_bytes=0)

    async def two() -> list[object]:
        fit = slow_fit(1.0)
        loads = (intake.decode(png((100, 100), (i, i, i)), fit, "slow") for i in range(2))
        return await asyncio.gather(*loads, return_exceptions=True)

    overran, waited = asyncio.run(two())
    assert isinstance(overran, errors.ServiceError) and "took longer than 0.3 s" in overran.message
    assert isinstance(waited, errors.ServiceError)
    assert (waited.status, waited.code, waited.headers) == (429, "Throttling", {"Retry-After": "1"})
