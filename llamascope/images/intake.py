"""The image intake service: a reference string in, a PreparedImage out.

Fetching is async; decoding is CPU work and runs in a bounded thread pool
with a time budget per image. Decoded images are cached by the SHA-256 of
their bytes and the size the model wants, in memory bounded by bytes, so a
conversation that re-sends its image every turn decodes it once. A ``data:``
URI seen before is found by the URI itself, so its next turns skip the base64
decoding and the hashing too; an image URL seen before is not fetched again
while its host's answer is fresh, and only asked whether it changed once it
is stale, where the host allows (``http_cache``).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from llamascope import errors
from llamascope.caching import SizedLRU
from llamascope.images import PreparedImage
from llamascope.images.connections import CLIENTS
from llamascope.images.decode import DecodeLimits, FitFunction, decode_image
from llamascope.images.http_cache import Reuse
from llamascope.images.source import (
    ANONYMOUS,
    NO_LOCAL_FILES,
    FetchPolicy,
    LocalPolicy,
    SourceContext,
    UrlSource,
    parse_reference,
)
from llamascope.observability.request import ImageWatch

log = logging.getLogger(__name__)


def _pixel_bytes(image: PreparedImage) -> int:
    width, height = image.image.size
    return width * height * len(image.image.getbands())


def _first(entry: tuple[int, str]) -> int:
    return entry[0]


URL_MEMORY_BYTES = 4 << 20
T = TypeVar("T")


@dataclass(frozen=True)
class _KnownUrl:
    digest: str  # of the bytes last fetched: the decoded-image cache's key
    reuse: Reuse
    size: int  # its memory, the URL's included


def _memory(url: str, reuse: Reuse) -> int:
    """A known URL's memory: its strings, the host's validators included (an ETag may be kilobytes), and the rest."""
    strings = (url, reuse.url, reuse.etag or "", reuse.last_modified or "")
    return sum(sys.getsizeof(s) for s in strings) + 256


_HUNG_UP = "ClientClosedRequest"  # the code of the answer to a client that left (which nobody reads)


async def _read(read: Callable[[], Awaitable[T]], context: SourceContext, fetches: bool) -> T:
    """``read()``'s result; a URL fetch (``fetches``) ends, its connection closed, as soon as the client hangs up."""
    if context.hung_up is None or not fetches:
        return await read()  # the others read a file or decode a string: nothing to wait for
    fetch = asyncio.ensure_future(read())
    hangup = asyncio.ensure_future(context.hung_up())
    try:
        await asyncio.wait((fetch, hangup), return_when=asyncio.FIRST_COMPLETED)
    finally:  # the request cancelled here ends both too
        hangup.cancel()
        if not fetch.done():
            fetch.cancel()
    if fetch.done():
        return fetch.result()
    await asyncio.wait((fetch,))  # its cleanup: the connection closed
    if not fetch.cancelled():
        fetch.exception()  # whatever it ended with is moot now: taken, so asyncio does not log it as lost
    # nginx's status for a client that left before its answer
    raise errors.ServiceError(499, _HUNG_UP, "The client hung up while its image was being fetched.")


class ImageIntake:
    def __init__(
        self,
        policy: FetchPolicy,
        limits: DecodeLimits,
        *,
        local: LocalPolicy = NO_LOCAL_FILES,
        decode_workers: int = 2,
        decode_timeout: float = 5.0,
        cache_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.policy = policy
        self.limits = limits
        self.local = local
        self.decode_timeout = decode_timeout
        # A bounded pool: a decode that overruns its budget is answered at once but keeps its
        # worker until it ends, so runaway decodes cannot pile up beyond the pool's size.
        self._decoders = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="llamascope-decode")
        # Decoded images by content hash and sizing rule, bounded by the bytes of their pixels.
        self.cache: SizedLRU[tuple[str, str], PreparedImage] = SizedLRU(cache_bytes, _pixel_bytes)
        # The digest of each data: URI decoded lately whose image the cache above holds, by the URI and sizing
        # rule, bounded by the URIs' own memory (a quarter more than the images' bytes, at most).
        # A conversation re-sends its images every turn: four 1120x840 photos' URIs took 5 ms a turn to decode
        # from base64 and hash (2 cores, loaded), a lookup by the string (hashed and compared whole) 0.5 ms.
        self.data_uris: SizedLRU[tuple[str, str], tuple[int, str]] = SizedLRU(cache_bytes // 4, _first)
        # Each image URL's host's terms of reuse and its image's digest (http_cache): a conversation sends its
        # URLs again every turn, which were fetched whole each time.
        self.urls: SizedLRU[str, _KnownUrl] = SizedLRU(URL_MEMORY_BYTES, lambda known: known.size)

    async def load(
        self,
        reference: str,
        context: SourceContext = ANONYMOUS,
        fit: FitFunction | None = None,
        fit_key: str = "",
    ) -> PreparedImage:
        """Fetch and decode one image. ``fit``/``fit_key``: the model's sizing rule and a name for it."""
        watch = ImageWatch()  # fetch and decode times, or why it was refused
        try:
            source = parse_reference(reference, self.policy, context, self.local)
            image = self._seen(reference, fit_key) if source.kind == "data" else None
            if isinstance(source, UrlSource):
                image = await self._load_url(source, context, fit, fit_key, watch)
            elif image is not None:
                watch.fetched(source.kind)
            else:
                data = await _read(source.read, context, fetches=False)
                watch.fetched(source.kind)
                image = await self.decode(data, fit, fit_key, watch)
                if source.kind == "data" and self.cache.peek((image.digest, fit_key)) is not None:
                    self.data_uris.put((reference, fit_key), (sys.getsizeof(reference), image.digest))
        except errors.ServiceError as refusal:
            if refusal.code != _HUNG_UP:  # no refusal of the image
                watch.refused(refusal)
            raise
        watch.accepted(image.format)
        return image

    async def _load_url(
        self, source: UrlSource, context: SourceContext, fit: FitFunction | None, fit_key: str, watch: ImageWatch
    ) -> PreparedImage:
        """An image URL's image: not fetched while the host's answer kept for it is fresh, the host asked whether
        it changed once it is stale (a 304 carries no body), else fetched whole (``http_cache``)."""
        known = self.urls.get(source.url)
        kept = self.cache.peek((known.digest, fit_key)) if known is not None else None
        if known is not None and kept is not None and known.reuse.fresh():
            watch.fetched(source.kind)
            return self.cache.get((known.digest, fit_key)) or kept
        asked = known.reuse if known is not None and kept is not None and known.reuse.validated else None
        answer = await _read(functools.partial(source.fetch, asked), context, fetches=True)
        watch.fetched(source.kind)
        if answer.body is None:  # not modified: the image kept
            assert known is not None and kept is not None
            image = self.cache.get((known.digest, fit_key)) or kept
        else:
            image = await self.decode(answer.body, fit, fit_key, watch)
        if answer.reuse.keep:
            self.urls.put(source.url, _KnownUrl(image.digest, answer.reuse, _memory(source.url, answer.reuse)))
        else:
            self.urls.pop(source.url)
        return image

    def _seen(self, uri: str, fit_key: str) -> PreparedImage | None:
        """The decoded image of a data: URI read before, while the decoded-image cache still holds it."""
        known = self.data_uris.get((uri, fit_key))
        if known is None or not self.cache.touch(key := (known[1], fit_key)):
            return None  # (its decode counts the miss, once)
        return self.cache.get(key)

    async def decode(
        self, data: bytes, fit: FitFunction | None = None, fit_key: str = "", watch: ImageWatch | None = None
    ) -> PreparedImage:
        key = (hashlib.sha256(data).hexdigest(), fit_key)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        loop = asyncio.get_running_loop()
        started = loop.time()
        began = asyncio.Event()  # set when a worker takes the image: its budget starts then, not in the queue

        def run() -> PreparedImage:
            loop.call_soon_threadsafe(began.set)
            return decode_image(data, self.limits, fit)

        work = loop.run_in_executor(self._decoders, run)
        try:
            # As long again to wait for a worker: an image queued behind others' decodes is not blamed for them.
            async with asyncio.timeout(self.decode_timeout) as budget:
                await began.wait()
                budget.reschedule(loop.time() + self.decode_timeout)
                image = await work
        except TimeoutError:
            work.cancel()  # not started yet: it never runs
            if watch is not None:
                watch.timed_out = True
            if not began.is_set():
                log.warning("every image decoder was busy for %.1f s: an image was refused", self.decode_timeout)
                raise errors.throttled(1, "every image decoder of this server is busy") from None
            log.warning("an image took more than %.1f s to decode and was refused", self.decode_timeout)
            raise errors.image_unreadable(
                f"The image took longer than {self.decode_timeout:g} s to decode; send a smaller or simpler image."
            ) from None
        if watch is not None:
            watch.decoded(started)
        self.cache.put(key, image)
        return image

    def close(self) -> None:
        self._decoders.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        """``close``, and the connections kept open to image hosts (``connections``)."""
        self.close()
        await CLIENTS.aclose()
