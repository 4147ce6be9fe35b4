"""Image URLs seen before (``images/http_cache.py``, ``ImageIntake``): a real loopback host that counts what it is
asked and answers with the caching headers each test gives it."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from llamascope.images.decode import DecodeLimits
from llamascope.images.http_cache import MAX_FRESH, reuse_of
from llamascope.images.intake import ImageIntake
from llamascope.images.source import FetchPolicy


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


class Host(ThreadingHTTPServer):
    """Serves ``body`` at every path with ``headers``; honours If-None-Match against ``etag``; logs requests."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True
        self.body = png((200, 0, 0))
        self.headers: dict[str, str] = {}
        self.not_modified: dict[str, str] | None = None  # a 304's headers, when not ``headers``
        self.asked: list[dict[str, str]] = []  # each request's headers, in order
        self.location = "/photo.png"  # where /moved sends
        # Other paths' own body and headers, If-Modified-Since honoured against their Last-Modified.
        self.pages: dict[str, tuple[bytes, dict[str, str]]] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/photo.png"


class Handler(BaseHTTPRequestHandler):
    server: Host

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        host = self.server
        host.asked.append(dict(self.headers))
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", host.location)
            self.end_headers()
            return
        if self.path in host.pages:
            body, headers = host.pages[self.path]
            since = self.headers.get("If-Modified-Since")
            unchanged = since is not None and parsedate_to_datetime(headers["Last-Modified"]) <= parsedate_to_datetime(
                since
            )
            self.send_response(304 if unchanged else 200)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0" if unchanged else str(len(body)))
            self.end_headers()
            if not unchanged:
                self.wfile.write(body)
            return
        etag = host.headers.get("ETag")
        matched = etag is not None and self.headers.get("If-None-Match") == etag
        self.send_response(304 if matched else 200)
        sent = host.not_modified if matched and host.not_modified is not None else host.headers
        for name, value in sent.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0" if matched else str(len(host.body)))
        self.end_headers()
        if not matched:
            self.wfile.write(host.body)


@pytest.fixture
def host() -> Iterator[Host]:
    server = Host()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def loads(url: str, times: int, intake: ImageIntake | None = None) -> list:
    intake = intake or ImageIntake(FetchPolicy.from_allow_list(["127.0.0.0/8"]), DecodeLimits())

    async def each() -> list:
        return [await intake.load(url, fit_key="m") for _ in range(times)]

    return asyncio.run(each())


def test_a_fresh_answer_is_not_fetched_again(host: Host) -> None:
    host.headers = {"Cache-Control": "public, max-age=60"}
    first, second, third = loads(host.url, 3)
    assert len(host.asked) == 1 and first is second is third


def test_a_stale_answer_is_asked_whether_it_changed(host: Host) -> None:
    """OSS's and most hosts' way: an ETag and no freshness. The same bytes come back as a 304 with no body."""
    host.headers = {"ETag": '"v1"'}
    intake = ImageIntake(FetchPolicy.from_allow_list(["127.0.0.0/8"]), DecodeLimits())
    first, second = loads(host.url, 2, intake)
    assert [h.get("If-None-Match") for h in host.asked] == [None, '"v1"'] and second is first
    host.body, host.headers = png((0, 0, 200)), {"ETag": '"v2"'}  # changed: a whole answer, decoded anew
    (third,) = loads(host.url, 1, intake)
    assert host.asked[-1].get("If-None-Match") == '"v1"' and third.digest != first.digest
    assert third.image.getpixel((0, 0)) == (0, 0, 200)


@pytest.mark.parametrize(
    ("not_modified", "asked"),
    [
        ({}, [None, '"v1"']),  # a bare 304: the stored max-age holds again
        ({"ETag": '"v1"'}, [None, '"v1"']),  # the usual 304: validators only
        ({"ETag": '"v1"', "Expires": "0"}, [None, '"v1"']),  # the stored max-age outranks an Expires
        ({"ETag": '"v1"', "Cache-Control": "no-cache"}, [None, '"v1"', '"v1"', '"v1"']),  # its own terms replace
        ({"ETag": '"v1"', "Cache-Control": "max-age=60", "Age": "60"}, [None, '"v1"', '"v1"', '"v1"']),
    ],
    ids=["bare", "etag only", "expires only", "no-cache", "stale already"],
)
def test_a_304_updates_the_stored_answers_terms(host: Host, not_modified: dict, asked: list) -> None:
    """RFC 9111 4.3.4: the 304's header fields update the stored answer's, which keeps those the 304 does not
    send. A 304 without Cache-Control left the answer stale for good (each request asked the host again), and a
    bare one (no ETag either) made it forgotten: fetched whole from then on."""
    host.headers = {"Cache-Control": "max-age=60", "Age": "60", "ETag": '"v1"'}  # stale as it comes
    host.not_modified = not_modified
    first, *later = loads(host.url, 4)
    assert [h.get("If-None-Match") for h in host.asked] == asked
    assert all(image is first for image in later)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Cache-Control": "no-store", "ETag": '"v1"'}, {"Cache-Control": "private, max-age=60"}],
    ids=["says nothing", "no-store", "private"],
)
def test_answers_a_shared_cache_may_not_keep_are_fetched_whole_each_time(host: Host, headers: dict) -> None:
    host.headers = headers
    loads(host.url, 3)
    assert len(host.asked) == 3 and not any("If-None-Match" in h for h in host.asked)


def test_an_answer_through_a_redirect_is_asked_again(host: Host) -> None:
    host.headers = {"Cache-Control": "max-age=60", "ETag": '"v1"'}
    moved = host.url.replace("/photo.png", "/moved")
    loads(moved, 2)
    # The validators go to the address that gave them, not to the one that redirects.
    assert [h.get("If-None-Match") for h in host.asked] == [None, None, None, '"v1"']


def test_a_redirect_that_leads_elsewhere_now_is_not_asked_the_last_images_validators(host: Host) -> None:
    """An older image behind the redirect now: asked If-Modified-Since the newer one's date, it would say 304."""
    host.pages = {
        "/new.png": (png((200, 0, 0)), {"Last-Modified": "Mon, 07 Dec 2026 08:00:00 GMT"}),
        "/old.png": (png((0, 0, 200)), {"Last-Modified": "Wed, 01 Jan 2025 00:00:00 GMT"}),
    }
    intake = ImageIntake(FetchPolicy.from_allow_list(["127.0.0.0/8"]), DecodeLimits())
    moved = host.url.replace("/photo.png", "/moved")
    host.location = "/new.png"
    (first,) = loads(moved, 1, intake)
    host.location = "/old.png"
    (second,) = loads(moved, 1, intake)
    assert "If-Modified-Since" not in host.asked[-1]
    assert second.image.getpixel((0, 0)) == (0, 0, 200) and first.image.getpixel((0, 0)) == (200, 0, 0)
    host.location = "/new.png"  # back: its own validators, a 304, and the first image again
    (third,) = loads(moved, 1, intake)
    assert third.image.getpixel((0, 0)) == (200, 0, 0)


def test_an_image_no_longer_held_decoded_is_fetched_whole(host: Host) -> None:
    host.headers = {"Cache-Control": "max-age=60", "ETag": '"v1"'}
    intake = ImageIntake(FetchPolicy.from_allow_list(["127.0.0.0/8"]), DecodeLimits())
    loads(host.url, 1, intake)
    intake.cache.clear()
    loads(host.url, 1, intake)
    assert len(host.asked) == 2 and "If-None-Match" not in host.asked[1]


def test_terms_of_reuse() -> None:
    now = 1000.0
    assert reuse_of({"cache-control": "max-age=60", "age": "50"}, now=now).fresh_until == now + 10
    assert reuse_of({"cache-control": "s-maxage=5, max-age=60"}, now=now).fresh_until == now + 5
    assert reuse_of({"cache-control": "max-age=31536000, immutable"}, now=now).fresh_until == now + MAX_FRESH
    dated = {"date": "Mon, 07 Dec 2026 08:00:00 GMT", "expires": "Mon, 07 Dec 2026 08:02:00 GMT"}
    assert reuse_of(dated, now=now).fresh_until == now + 120
    assert not reuse_of({"expires": "0", "etag": '"x"'}, now=now).fresh(now)
    assert reuse_of({"expires": "0", "etag": '"x"'}, now=now).keep
    assert not reuse_of({"cache-control": "no-cache", "etag": '"x"'}, now=now).fresh(now)
    assert not reuse_of({"cache-control": "max-age=60", "vary": "*"}, now=now).keep
    assert not reuse_of({"cache-control": "max-age=-1"}, now=now).keep


def test_a_known_url_counts_its_validators_memory(host: Host) -> None:
    """An ETag of kilobytes, from a host the caller names, counts as what it holds: the 4 MB bound holds."""
    host.headers = {"ETag": '"' + "x" * 8000 + '"'}
    intake = ImageIntake(FetchPolicy.from_allow_list(["127.0.0.0/8"]), DecodeLimits())
    loads(host.url, 1, intake)
    assert intake.urls.total > 8000


def test_urls_that_differ_only_in_percent_encoding_are_different_images(host: Host) -> None:
    """/a%2Fb.png and /a/b.png are two resources (an S3 key holding a slash, a GitLab project path): one was
    taken for the other from the cache of fresh answers."""
    fresh = {"Cache-Control": "max-age=60"}
    host.pages["/a/b.png"] = (png((255, 0, 0)), fresh)
    host.pages["/a%2Fb.png"] = (png((0, 0, 255)), fresh)
    host.pages["/a%25b.png"] = (png((0, 255, 0)), fresh)
    base = host.url.removesuffix("/photo.png")
    intake = ImageIntake(FetchPolicy.from_allow_list(["127.0.0.0/8"]), DecodeLimits())
    colours = [loads(base + path, 1, intake)[0].image.convert("RGB").getpixel((0, 0)) for path in host.pages]
    assert colours == [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    assert len(host.asked) == 3


def test_the_spellings_of_one_address_are_one_key_and_others_are_not() -> None:
    from llamascope.images.intake import _url_key

    same = ["http://h.com/", "http://H.com", "HTTP://h.com:80/#top", "http://h.com#x"]
    assert {_url_key(u) for u in same} == {"http://h.com/"}
    assert len({_url_key(u) for u in ("http://h.com/a/b", "http://h.com/a%2Fb", "http://h.com/a%252Fb")}) == 3
