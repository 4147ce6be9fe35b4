"""What an image host says about reusing its answer: the parts of HTTP caching (RFC 9111) a cache of image URLs
needs.

A conversation sends its image URLs again every turn, and a batch job may name one URL in thousands of lines.
For each URL, the image intake keeps not the bytes (its decoded-image cache holds the image, by the bytes'
digest) but the host's word on reuse, as ``Reuse``:

- fresh (``Cache-Control: s-maxage`` or ``max-age``, else ``Expires`` against ``Date``, less ``Age``; at most
  ``MAX_FRESH``): the URL is not fetched again while the answer is fresh;
- stale, with a validator (``ETag``, ``Last-Modified``): the host is asked whether it changed
  (``If-None-Match``, ``If-Modified-Since``), and a ``304 Not Modified`` carries no body; its header fields
  update the answer's kept ones (``Reuse.renewed``), so one that sends only the ETag, as most do, makes the
  answer fresh again for its first ``max-age``;
- neither: fetched whole, every time, as before. There is no heuristic freshness: a host that says nothing
  about reuse is asked every time.

llamascope answers many callers, so it is a shared cache: ``no-store``, ``private`` and ``Vary: *`` answers are
not kept, and ``no-cache`` ones are asked again each time. Requests for a URL whose fetch is under way wait for
that fetch and take its answer (``intake``, ``inflight``; RFC 9111 section 4 lets a shared cache "collapse
requests" so) where the answer is one that is kept (``Reuse.keep``): an answer reused later only once its host
says it did not change is as good for a request that came while it was being fetched. The others are each
request's own: those that waited fetch it again. An answer reached through a redirect is never
fresh (the redirect may point elsewhere next time): it is asked again, its validators sent to the address that
gave them alone (``Reuse.url``), should the redirect still lead there.

Hand-written: hishel (the httpx cache) keeps whole responses, where this keeps the image once, decoded, and
every fetch goes to an address checked hop by hop (``source.UrlSource``), which a transport-level cache would
step around.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

MAX_FRESH = 24 * 3600.0  # seconds an answer is used without asking, whatever its host says
# The header fields of an answer that bear on its reuse, kept with it for a 304 to update (RFC 9111 3.2). Date
# and Age are not kept: they are the 304's (absent: now, and none), as the 304 is what the host said last.
STORED = ("cache-control", "expires", "etag", "last-modified", "vary")


@dataclass(frozen=True)
class Reuse:
    """One answer's terms of reuse, as its headers gave them."""

    etag: str | None = None
    last_modified: str | None = None
    fresh_until: float = 0.0  # time.monotonic(): until then the answer is used without asking
    keep: bool = False  # a shared cache may keep it
    url: str = ""  # the address that answered (a redirect's last hop): the validators are its, asked of it alone
    stored: tuple[tuple[str, str], ...] = ()  # its header fields of ``STORED``, names in lower case

    def fresh(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) < self.fresh_until

    @property
    def validated(self) -> bool:
        return self.etag is not None or self.last_modified is not None

    def conditions(self) -> dict[str, str]:
        """The request headers that ask the host whether the answer changed."""
        asked = {}
        if self.etag is not None:
            asked["If-None-Match"] = self.etag
        if self.last_modified is not None:
            asked["If-Modified-Since"] = self.last_modified
        return asked

    def renewed(self, headers: Mapping[str, str], *, redirected: bool = False, now: float | None = None) -> Reuse:
        """These terms after a ``304 Not Modified`` with ``headers``: the stored answer's header fields, each one
        the 304 sends replaced by its (RFC 9111 4.3.4, 3.2), read again. A 304 that says nothing of freshness
        (most send only the ETag) leaves the stored Cache-Control or Expires in force, counted from now."""
        fields = dict(self.stored)
        fields.update((name, headers[name]) for name in (*STORED, "date", "age") if name in headers)
        return reuse_of(fields, url=self.url, redirected=redirected, now=now)


def reuse_of(headers: Mapping[str, str], *, url: str = "", redirected: bool = False, now: float | None = None) -> Reuse:
    """The terms of reuse of the answer from ``url`` with these headers (names in any case, as httpx's Headers
    take them)."""
    now = time.monotonic() if now is None else now
    directives = _directives(headers.get("cache-control", ""))
    vary = {v.strip() for v in headers.get("vary", "").split(",")}
    etag = headers.get("etag") or None
    last_modified = headers.get("last-modified") or None
    if "no-store" in directives or "private" in directives or "*" in vary:
        return Reuse(url=url)
    lifetime = 0.0 if "no-cache" in directives or redirected else _lifetime(directives, headers)
    lifetime = min(lifetime, MAX_FRESH)
    keep = lifetime > 0 or etag is not None or last_modified is not None
    stored = tuple((name, headers[name]) for name in STORED if name in headers) if keep else ()
    return Reuse(etag, last_modified, now + lifetime if lifetime > 0 else 0.0, keep, url, stored)


def _directives(value: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for part in value.split(","):
        name, _, argument = part.strip().partition("=")
        if name:
            found[name.lower()] = argument.strip().strip('"')
    return found


def _lifetime(directives: Mapping[str, str], headers: Mapping[str, str]) -> float:
    """Seconds the answer stays fresh from now (0: stale already)."""
    for name in ("s-maxage", "max-age"):  # a shared cache reads s-maxage first
        if name in directives:
            seconds = directives[name]
            return max(0.0, float(seconds) - _age(headers)) if seconds.isdigit() else 0.0
    expires = headers.get("expires")
    if expires is None:
        return 0.0
    until = _when(expires)
    if until is None:  # "0", "-1" or anything else unreadable: already expired (RFC 9111 5.3)
        return 0.0
    date = _when(headers.get("date", "")) or datetime.now(UTC)
    return max(0.0, (until - date).total_seconds() - _age(headers))


def _age(headers: Mapping[str, str]) -> float:
    age = headers.get("age", "")
    return float(age) if age.isdigit() else 0.0


def _when(value: str) -> datetime | None:
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
