"""Where image bytes come from: ``data:`` URIs, http(s) URLs, uploaded ``oss://`` objects, allowed local files.

Each reference string becomes an ``ImageSource`` whose ``read()`` returns the
raw bytes, or raises ServiceError with a message the caller can act on.

URL fetches are hostile by default:
- the host name is resolved once, every address is checked, and the
  connection goes to the checked address (the URL is rewritten to the IP and
  the original name is sent as Host and as the TLS server name), so a second
  DNS answer cannot move the request (DNS rebinding);
- every redirect hop is checked the same way, at most ``max_redirects``;
- connect and total time are bounded, and the byte cap is counted while
  reading, whatever Content-Length said;
- refusals never name the address a host resolved to.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol
from urllib.parse import unquote, unquote_to_bytes, urljoin, urlsplit, urlunsplit

import anyio

from llamascope import errors
from llamascope.images.connections import CLIENTS
from llamascope.images.http_cache import Reuse, reuse_of
from llamascope.images.uploads import UploadStore

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Image host lookups at once, in threads of their own: a host name whose DNS never answers holds a thread for the
# resolver's whole timeout. In the event loop's default executor (loop.getaddrinfo) a few such names held every
# thread that asyncio.to_thread (an upstream engine's token counts) needed, for every request.
_RESOLVERS = anyio.CapacityLimiter(8)
_BASE64 = re.compile(r";[ ]*base64$", re.IGNORECASE)  # a data: URI's header that says its payload is base64
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# IPv6 ranges that Python's is_global (3.11) counts as global but that are not, or that lead into IPv4 where a
# network routes them: IPv4-compatible (deprecated), SIIT's IPv4-translated, NAT64's local-use prefix (RFC 8215,
# with the IPv4 address split around a reserved octet) and the deprecated site-local range.
_NOT_GLOBAL_V6 = tuple(
    ipaddress.IPv6Network(net) for net in ("::/96", "::ffff:0:0:0/96", "64:ff9b:1::/48", "fec0::/10")
)


class ImageSource(Protocol):
    kind: ClassVar[str]  # url, data, upload or local

    async def read(self) -> bytes: ...


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int = 10 * 1024 * 1024
    connect_timeout: float = 5.0
    total_timeout: float = 15.0
    max_redirects: int = 3
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    allow_hosts: frozenset[str] = field(default_factory=frozenset)
    # URL fetches at once, server-wide: each holds up to max_bytes while its body arrives. Without a bound, 40
    # slow 9 MB fetches of one key's requests held 410 MB.
    max_fetches: int = 16
    fetching: anyio.CapacityLimiter = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fetching", anyio.CapacityLimiter(self.max_fetches))

    @classmethod
    def from_allow_list(cls, allow: Iterable[str], **kwargs: object) -> FetchPolicy:
        networks, hosts = [], set()
        for item in allow:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item.lower().rstrip("."))
        return cls(allow_networks=tuple(networks), allow_hosts=frozenset(hosts), **kwargs)  # type: ignore[arg-type]


def is_public(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses, looking inside IPv6 wrappers of IPv4."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(embedded)
        if any(ip in net for net in _NOT_GLOBAL_V6):
            return False
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class SourceContext:
    """What a source may need to know about the request it serves."""

    owner: str | None = None  # the API key's id: uploads resolve only for their owner
    resolve_oss: bool = False  # the request carried X-DashScope-OssResourceResolve: enable
    # The endpoint the dashscope SDK uploads the local files it finds for first (MultiModalConversation's, and the
    # 2.x Client's with images; Generation, Tokenization and the openai SDK upload none): what a refused path is told.
    sdk_uploads: bool = False
    # Returns once the request's client has hung up (None: not watched); a URL fetch then ends at once rather
    # than running on, for nobody, until its deadline.
    hung_up: Callable[[], Awaitable[None]] | None = None


@dataclass(frozen=True)
class LocalPolicy:
    store: UploadStore | None = None
    allowed_dirs: tuple[Path, ...] = ()  # operator-allowed directories for file:// and plain paths


ANONYMOUS = SourceContext()
NO_LOCAL_FILES = LocalPolicy()


def parse_reference(
    ref: str, policy: FetchPolicy, context: SourceContext = ANONYMOUS, local: LocalPolicy = NO_LOCAL_FILES
) -> ImageSource:
    """Pick the source for an image reference, or refuse it."""
    try:
        scheme = urlsplit(ref).scheme.lower() if ":" in ref else ""
    except ValueError:  # a bracketed host that is no IPv6 address: "http://[127.0.0.1]/"
        raise errors.invalid_parameter("url error, please check url! The image URL is not valid.") from None
    if scheme == "data":
        return DataUriSource(ref, policy.max_bytes)
    if scheme in ("http", "https"):
        return UrlSource(ref, policy)
    if scheme == "oss":
        return OssSource(ref[len("oss://") :], context, local.store)
    if scheme == "file" or (not scheme and ref.startswith(("/", "~", "."))):
        return LocalFileSource(ref, local.allowed_dirs, policy.max_bytes, context.sdk_uploads)
    raise errors.invalid_parameter(
        "url error, please check url! An image must be an http(s) URL, a data: URI, or an oss:// key "
        "from the SDK's local-file upload."
    )


@dataclass
class OssSource:
    key: str
    context: SourceContext
    store: UploadStore | None
    kind: ClassVar[str] = "upload"  # for metrics and traces

    async def read(self) -> bytes:
        if not self.context.resolve_oss:
            raise errors.ServiceError(
                400,
                "InvalidParameter.DataInspection",
                "The media format is not supported or incorrect for the data inspection. "
                "(oss:// URLs are resolved only with the header X-DashScope-OssResourceResolve: enable.)",
            )
        if self.store is None or self.context.owner is None:
            raise errors.invalid_parameter("url error, please check url! This server keeps no uploads.")
        return self.store.read(self.key, self.context.owner)


@dataclass
class LocalFileSource:
    ref: str
    allowed_dirs: tuple[Path, ...]
    max_bytes: int
    sdk_uploads: bool = False  # SourceContext.sdk_uploads
    kind: ClassVar[str] = "local"  # for metrics and traces

    async def read(self) -> bytes:
        if not self.allowed_dirs and self.sdk_uploads:
            # The SDK uploads the local files it finds and sends any other path unchanged: a path arriving
            # here is most often a file the caller's SDK did not find (a typo), not a call without the SDK.
            raise errors.invalid_parameter(
                f"url error, please check url! The image {self.ref!r} was not found: the dashscope SDK uploads "
                "a local file it finds, and sent this path as it was, so check that the file exists where the "
                "program runs. This server reads no local paths itself: without the SDK, send the image as a "
                "URL or a data: URI."
            )
        if not self.allowed_dirs:  # a client that uploads nothing sent the path of a file that may well exist
            raise errors.invalid_parameter(
                f"url error, please check url! The image {self.ref!r} is a local path, and this server reads no "
                "local paths: send the image as a data: URI (the file's bytes in base64) or an http(s) URL. "
                "The dashscope SDK uploads a local file itself only to the multimodal-generation endpoint "
                "(MultiModalConversation, and the 2.x Client's calls with images)."
            )
        parts = urlsplit(self.ref)
        raw = unquote(parts.path) if parts.scheme else self.ref
        if parts.scheme and parts.netloc not in ("", "localhost"):
            raise errors.invalid_parameter("url error, please check url! file:// URLs must name a local path.")
        outside = errors.invalid_parameter(
            "url error, please check url! The path is not a file inside a directory this server may read."
        )
        try:
            path = Path(os.path.expanduser(raw)).resolve()  # symlinks followed before the check
        except (ValueError, RuntimeError):  # a NUL byte, a symlink loop
            raise outside from None
        if not any(path.is_relative_to(root.resolve()) for root in self.allowed_dirs) or not path.is_file():
            raise outside
        data = await anyio.to_thread.run_sync(self._read, path)
        if len(data) > self.max_bytes:
            raise _too_large(self.max_bytes, "the file")
        return data

    def _read(self, path: Path) -> bytes:
        with open(path, "rb") as f:
            return f.read(self.max_bytes + 1)


def _too_large(limit: int, what: str = "") -> errors.ServiceError:
    """An image over the byte limit: DashScope's own words for a data: URI, and what it was for the others."""
    if not what:
        return errors.invalid_parameter(f"Exceeded limit on max bytes per data-uri item : {limit}")
    return errors.image_download_failed(f"{what} is larger than the limit of {limit} bytes per image")


@dataclass
class DataUriSource:
    uri: str
    max_bytes: int
    kind: ClassVar[str] = "data"  # for metrics and traces

    async def read(self) -> bytes:
        header, sep, payload = self.uri.partition(",")
        if not sep:
            raise errors.invalid_parameter("url error, please check url! A data: URI needs a ',' before its data.")
        # As browsers read a data: URL (WHATWG fetch, "data: URL processor"; no library here does): spaces may
        # come between ";" and "base64", and the payload is percent-decoded before base64 (a URI put through
        # encodeURIComponent or urllib's quote has %2B, %2F, %3D, %0A; "%" is no base64 character, so a payload
        # without one is unchanged).
        if _BASE64.search(header.strip()):
            if "%" in payload:
                payload = unquote(payload)
            payload = "".join(payload.split())  # clients may wrap base64 in lines (base64 and MIME: 76 columns)
            # Refuse from the encoded length first, so an oversized URI is never decoded.
            if (len(payload) // 4) * 3 > self.max_bytes + 2:
                raise _too_large(self.max_bytes)
            payload += "=" * (-len(payload) % 4)  # and may drop the padding
            # or write the URL-safe alphabet (RFC 4648 section 5: "-" and "_" for "+" and "/"), as Go's and
            # JavaScript's URL encoders and many image tools do; no character means one thing in one and
            # another in the other, so both are read.
            payload = payload.replace("-", "+").replace("_", "/")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise errors.invalid_parameter(
                    "url error, please check url! The data: URI is not valid base64."
                ) from None
        else:
            data = unquote_to_bytes(payload)
        if len(data) > self.max_bytes:
            raise _too_large(self.max_bytes)
        if not data:
            raise errors.invalid_parameter("url error, please check url! The data: URI is empty.")
        return data


@dataclass(frozen=True)
class UrlAnswer:
    """An image URL's answer: its bytes (None: not modified since the answer kept before) and its terms of reuse."""

    body: bytes | None
    reuse: Reuse


class _Refused(Exception):
    """A fetch refused by policy; the message is safe to show (no resolved addresses)."""


@dataclass
class UrlSource:
    url: str
    policy: FetchPolicy
    kind: ClassVar[str] = "url"  # for metrics and traces

    async def read(self) -> bytes:
        answer = await self.fetch()
        assert answer.body is not None  # asked without conditions: a whole body
        return answer.body

    async def fetch(self, known: Reuse | None = None) -> UrlAnswer:
        """The image's bytes and the host's terms for reusing them; with ``known`` (the terms of an answer kept
        before), the host is asked whether it changed, and ``body`` is None if it did not (304)."""
        import httpx  # why: its import (rich included) is 0.1-0.2 s of a gateway's start; only URLs need it

        with anyio.move_on_after(self.policy.total_timeout) as waiting:  # as long again to wait for a turn
            await self.policy.fetching.acquire()
        if waiting.cancelled_caught:  # the server's fetches are all busy: not the image's fault
            log.warning("every image fetch was busy for %.1f s: an image was refused", self.policy.total_timeout)
            raise errors.throttled(1, "every image fetch of this server is busy")
        try:
            with anyio.fail_after(self.policy.total_timeout):
                return await self._fetch(known)
        except TimeoutError:
            raise errors.ServiceError(
                400,
                "InvalidParameter.DataInspection",
                "Download the media resource timed out during the data inspection process.",
            ) from None
        except _Refused as exc:
            raise errors.image_download_failed(str(exc)) from None
        except httpx.InvalidURL:  # control characters, or longer than httpx takes (not an HTTPError)
            raise errors.image_download_failed("the image URL is not valid") from None
        except httpx.RemoteProtocolError:  # a malformed answer, or a body cut short of its Content-Length
            raise errors.image_download_failed("the image host sent an invalid or incomplete HTTP answer") from None
        except httpx.HTTPError:
            raise errors.image_download_failed("the image host could not be reached") from None
        finally:
            self.policy.fetching.release()

    async def _fetch(self, known: Reuse | None) -> UrlAnswer:
        url = self.url
        for hop in range(self.policy.max_redirects + 1):
            # Validators are asked only of the address that gave them: sent along a redirect that points elsewhere
            # now, an older image's If-Modified-Since would have the new one answered 304, the old image kept.
            conditions = known.conditions() if known is not None and known.url == url else {}
            origin, request = await self._pinned_request(url, conditions)
            with CLIENTS.lend(*origin) as client:
                response = await client.send(request, stream=True)
                try:
                    if response.has_redirect_location:  # a 3xx without a Location is answered below, as it is
                        try:
                            url = urljoin(url, response.headers["location"])
                        except ValueError:
                            raise _Refused("the image host redirected to a URL that is not valid") from None
                        continue
                    if response.status_code == 304 and known is not None and conditions:
                        return UrlAnswer(None, known.renewed(response.headers, redirected=hop > 0))
                    reuse = reuse_of(response.headers, url=url, redirected=hop > 0)
                    if response.status_code != 200:
                        raise _Refused(f"the image host answered HTTP {response.status_code}")
                    return UrlAnswer(await self._read_capped(response), reuse)
                finally:
                    await response.aclose()  # read to its end (a 200), its connection goes back to the host's client
        raise _Refused(f"more than {self.policy.max_redirects} redirects")

    async def _read_capped(self, response: httpx.Response) -> bytes:
        limit = self.policy.max_bytes
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit, "the image URL's body")
        body = bytearray()
        async for piece in response.aiter_bytes():  # decoded bytes: a gzip bomb hits the cap too
            body += piece
            if len(body) > limit:
                raise _too_large(limit, "the image URL's body")
        if not body:
            raise _Refused("the image host sent an empty body")
        return bytes(body)

    async def _pinned_request(
        self, url: str, conditions: Mapping[str, str]
    ) -> tuple[tuple[str, str, int], httpx.Request]:
        """The request for ``url`` to the address its host name resolved to and that passed the check, and the
        host name's origin, whose client (``connections``) sends it."""
        import httpx  # why: see read

        try:
            parts = urlsplit(url)
            hostname = parts.hostname
        except ValueError:  # a bracketed host that is no IPv6 address
            raise _Refused("the image URL is not valid") from None
        if parts.scheme not in ("http", "https") or not hostname:
            raise _Refused("only http and https URLs with a host name can be fetched")
        if parts.username or parts.password:
            raise _Refused("URLs with credentials are not fetched")
        try:
            # The ASCII form a browser would send (IDNA): the name is checked, resolved and sent as Host and TLS
            # name in the one spelling, and "①②⑦.0.0.①" is checked as the 127.0.0.1 it stands for.
            host = hostname.rstrip(".").encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise _Refused("the image host name could not be resolved") from None
        try:
            explicit_port = parts.port
        except ValueError:
            raise _Refused("the URL's port is not valid") from None
        port = explicit_port or (443 if parts.scheme == "https" else 80)
        address = await self._checked_address(host, port)
        netloc = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
        pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        host_header = f"[{host}]" if ":" in host else host
        if explicit_port is not None:
            host_header += f":{explicit_port}"
        # Built alone, not by the client: nothing of the client's (its cookies) goes into it.
        return (parts.scheme, host, port), httpx.Request(
            "GET",
            pinned,
            headers={
                "Host": host_header,
                "Accept": "image/*",
                "Accept-Encoding": "identity",
                "User-Agent": "llamascope",
                **conditions,
            },
            extensions={
                "sni_hostname": host,
                "timeout": httpx.Timeout(self.policy.total_timeout, connect=self.policy.connect_timeout).as_dict(),
            },
        )

    async def _checked_address(self, host: str, port: int) -> IPAddress:
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            try:
                infos = await anyio.to_thread.run_sync(
                    functools.partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM),
                    abandon_on_cancel=True,  # the fetch's deadline answers; a stalled lookup ends in its thread
                    limiter=_RESOLVERS,
                )
            except (socket.gaierror, UnicodeError):
                raise _Refused("the image host name could not be resolved") from None
            addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        if not addresses:
            raise _Refused("the image host name could not be resolved")
        if host in self.policy.allow_hosts:
            return addresses[0]
        for address in addresses:
            allowed = is_public(address) or any(address in net for net in self.policy.allow_networks)
            if not allowed:
                # The operator's log may say where, and how to allow it; the caller's answer never does.
                log.warning(
                    "image URL refused: host %s resolves to %s, not a public address; to let image URLs reach "
                    "it, add the host or its network to LLAMASCOPE_IMAGE_FETCH_ALLOW (image_fetch_allow)",
                    host,
                    address,
                )
                # Say what kind of place it is, never which address.
                raise _Refused("the image URL points to a private or local network address, which is not allowed")
        return addresses[0]
