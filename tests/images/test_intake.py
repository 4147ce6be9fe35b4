"""The intake service: the decode cache and the per-image time budget."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image

from llamascope import errors
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
