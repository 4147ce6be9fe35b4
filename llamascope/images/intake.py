"""The image intake service: a reference string in, a PreparedImage out.

Fetching is async; decoding is CPU work and runs in a bounded thread pool
with a time budget per image. Decoded images are cached by the SHA-256 of
their bytes and the size the model wants, in memory bounded by bytes, so a
conversation that re-sends its image every turn decodes it once. A ``data:``
URI seen before is found by the URI itself, so its next turns skip the base64
decoding and the hashing too; an image URL seen before is not fetched again
while its host's answer is fresh, and only asked whether it changed once it
is stale, where the host allows (``http_cache``). Requests that name a URL while it is being fetched wait for
that fetch and take its image (``inflight``), where its host's answer may serve them all.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from llamascope.images.inflight import InFlight
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
    """A known URL's memory: its strings, the host's validators and the header fields kept for a 304 to update
    included (an ETag may be kilobytes, and is in both), and the rest."""
    strings = (url, reuse.url, reuse.etag or "", reuse.last_modified or "", *(value for _, value in reuse.stored))
    return sum(sys.getsizeof(s) for s in strings) + 256


def _url_key(url: str) -> str:
    """An image URL as its fetch sends it (scheme and host name in lower case, no default port, no fragment, the
    path and query as written, an empty path as "/"): one key for the spellings of one address, in the caches and
    in the fetches under way."""
    import httpx  # why: its import (rich included) is 0.1-0.2 s of a gateway's start; only URLs need it

    try:
        # Not the path: httpx's is percent-decoded, and /a%2Fb is not /a/b (an S3 key, a GitLab project path).
        parsed = httpx.URL(url)
        return str(parsed.copy_with(fragment=None, raw_path=parsed.raw_path))  # an empty path as "/", as sent
    except (httpx.InvalidURL, TypeError, ValueError):  # refused by the fetch itself, with its own words
        return url


@dataclass
class _Fetched:
    """An image URL's fetch and decode as it ended, for every request that waited for it (``InFlight``)."""

    image: PreparedImage | None
    error: errors.ServiceError | None  # its refusal instead
    watch: ImageWatch  # when its bytes came, and how long the decode took
    shared: bool = True  # the host's answer may serve the requests that waited (http_cache.Reuse.keep)
    # A request has taken it: the first, which counts its decode, and which alone it serves where not shared.
    taken: bool = False

    def take(self) -> bool:
        """Whether this request is the first to take it."""
        first, self.taken = not self.taken, True
        return first

    def result(self) -> PreparedImage:
        """The image, or the refusal: each request's own, answered with its own request id."""
        if self.error is not None:
            raise dataclasses.replace(self.error, headers=dict(self.error.headers))
        assert self.image is not None
        return self.image


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
        # The image URLs whose host's last answer could serve its own request alone (no-store, private...), with
        # the memory each takes: requests that name them fetch them each at once, not after waiting for another's.
        self.unshared: SizedLRU[str, int] = SizedLRU(URL_MEMORY_BYTES // 4, lambda size: size)
        # Each image URL's fetch and decode under way, by its key and sizing rule: requests that name it meanwhile
        # wait for it, where they fetched it each (8 fetches for a 200-line batch of one URL, 8 lines at once).
        self.fetching: InFlight[tuple[str, str], _Fetched] = InFlight()

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
        """An image URL's image: not fetched while the host's answer kept for it is fresh, else fetched (``_fetch``)
        once for all the requests that name it while the fetch is under way, where its answer may serve them.

        A request that waits for another's fetch waits no longer than its own would take: that fetch began
        earlier, under the same time limits. A request that leaves stops waiting, and the fetch goes on for the
        others (``InFlight``); the server's bound on fetches at once counts it once. A URL whose host's last
        answer could serve no other request is fetched by each request at once (``unshared``): those that
        waited for that answer fetched it again after it."""
        key = _url_key(source.url)
        image = self._fresh(key, fit_key)
        if image is not None:
            watch.fetched(source.kind)
            return image
        fetch = functools.partial(self._fetch, source, key, fit, fit_key)
        alone = self.unshared.peek(key) is not None  # its host's last answer served its own request alone
        shared = functools.partial(self.fetching.join, (key, fit_key), fetch)
        fetched = await _read(fetch if alone else shared, context, fetches=True)
        first = fetched.take()
        if not (first or fetched.shared):  # no-store, private, Vary: *...: its request's own image, fetched again
            fetched = await _read(fetch, context, fetches=True)
            first = fetched.take()
        watch.took(fetched.watch, decoded=first)
        return fetched.result()

    def _fresh(self, key: str, fit_key: str, *, again: bool = False) -> PreparedImage | None:
        """The image of an image URL whose host's answer is fresh, while the decoded-image cache holds it
        (``again``: looked for a second time, not counted again)."""
        known = self.urls.peek(key) if again else self.urls.get(key)
        kept = self.cache.peek((known.digest, fit_key)) if known is not None else None
        if known is None or kept is None or not known.reuse.fresh():
            return None
        return self.cache.get((known.digest, fit_key)) or kept

    async def _fetch(self, source: UrlSource, key: str, fit: FitFunction | None, fit_key: str) -> _Fetched:
        """An image URL's image fetched (the host asked whether it changed once the answer kept is stale and
        a 304 carries no body: ``http_cache``) and decoded, or its refusal: what every request waiting for it
        takes (``_load_url``)."""
        watch = ImageWatch()  # this fetch's times, which each request waiting for it takes as its own
        try:
            image = self._fresh(key, fit_key, again=True)  # fresh since the request looked: a fetch just ended
            if image is not None:
                watch.fetched(source.kind)
                return _Fetched(image, None, watch)
            known = self.urls.peek(key)
            kept = self.cache.peek((known.digest, fit_key)) if known is not None else None
            asked = known.reuse if known is not None and kept is not None and known.reuse.validated else None
            answer = await source.fetch(asked)
            watch.fetched(source.kind)
            if answer.body is None:  # not modified: the image kept
                assert known is not None and kept is not None
                image = self.cache.get((known.digest, fit_key)) or kept
            else:
                image = await self.decode(answer.body, fit, fit_key, watch)
        except errors.ServiceError as refusal:
            # A copy: the refusal's traceback, and the exception it was raised from, held the fetch's frames
            # (its bytes read so far) for as long as the requests that wait for it hold it.
            return _Fetched(None, dataclasses.replace(refusal, headers=dict(refusal.headers)), watch)
        if answer.reuse.keep:
            self.urls.put(key, _KnownUrl(image.digest, answer.reuse, _memory(key, answer.reuse)))
            self.unshared.pop(key)
        else:
            self.urls.pop(key)
            self.unshared.put(key, sys.getsizeof(key) + 64)
        return _Fetched(image, None, watch, shared=answer.reuse.keep)

    def known(self, reference: str, fit_key: str = "") -> PreparedImage | None:
        """The image of a data: URI ``load`` read before, while it is still cached, taken at once (no fetch, no
        decode, nothing to await: its metrics counted as ``load`` counts them); None: ``load`` it. Its checks
        were passed by the same string when it was read."""
        if reference[:5].lower() != "data:" or self.data_uris.peek((reference, fit_key)) is None:
            return None
        watch = ImageWatch()
        image = self._seen(reference, fit_key)
        if image is not None:
            watch.fetched("data")
            watch.accepted(image.format)
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
