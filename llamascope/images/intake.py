"""The image intake service: a reference string in, a PreparedImage out."""

from __future__ import annotations

import anyio

from llamascope.images import PreparedImage
from llamascope.images.decode import DecodeLimits, decode_image
from llamascope.images.source import FetchPolicy, parse_reference
from llamascope.settings import Settings


class ImageIntake:
    def __init__(self, policy: FetchPolicy, limits: DecodeLimits, decode_workers: int = 2) -> None:
        self.policy = policy
        self.limits = limits
        # Decoding is CPU work: keep it off the event loop, in a bounded pool.
        self._decoders = anyio.CapacityLimiter(decode_workers)

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageIntake:
        policy = FetchPolicy.from_allow_list(
            settings.image_fetch_allow,
            max_bytes=settings.image_max_bytes,
            connect_timeout=settings.image_fetch_connect_timeout,
            total_timeout=settings.image_fetch_timeout,
            max_redirects=settings.image_fetch_max_redirects,
        )
        limits = DecodeLimits(max_pixels=settings.image_max_pixels, min_side=settings.image_min_side)
        return cls(policy, limits)

    async def load(self, reference: str) -> PreparedImage:
        data = await parse_reference(reference, self.policy).read()
        return await anyio.to_thread.run_sync(decode_image, data, self.limits, limiter=self._decoders)
