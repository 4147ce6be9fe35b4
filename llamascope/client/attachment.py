"""An image as the user names it (a local path, an http(s) URL, ``-`` for standard input) to what the API takes.

Local files and standard input become ``data:`` URIs, not uploads through
the SDK's ``getPolicy`` flow, because:

- a ``data:`` URI works against every server of the API that takes one,
  with no second endpoint, no second host to reach and nothing stored there
  (the hosted service offers no uploads for these models);
- the conversation stays self-contained: ``/save`` writes a file that any
  key can send again later, where an uploaded ``oss://`` key is readable only
  by the key that uploaded it, and only for 48 hours;
- the cost, the image re-sent with every turn, is small on the loopback
  and the local network, and llamascope decodes it once (its decoded-image
  and vision caches are keyed by content).

URLs (``http(s)://``, ``data:``, ``oss://``) are passed on as they are:
the server fetches them, under its own rules.
"""

from __future__ import annotations

import base64
import hashlib
import io
import mimetypes
import sys
from pathlib import Path
from typing import BinaryIO

PASSED_ON = ("http://", "https://", "data:", "oss://")
# The files behind the data: URIs made here, as the user named them, by the URI's digest (not the URI: that
# would keep every image alive): what ``describe`` shows, so that a chat's images are told apart by their names.
_NAMES: dict[bytes, str] = {}


def media_type(data: bytes, name: str = "") -> str:
    """The image's media type from its bytes (Pillow's reading of its header), else from its name."""
    from PIL import Image, UnidentifiedImageError  # Pillow only when an image is attached: chat starts without it

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format and image.format in Image.MIME:
                return Image.MIME[image.format]
    except (UnidentifiedImageError, OSError, ValueError):
        pass
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"


def data_uri(data: bytes, name: str = "") -> str:
    return f"data:{media_type(data, name)};base64,{base64.b64encode(data).decode()}"


def image_reference(value: str, stdin: BinaryIO | None = None) -> str:
    """What goes into ``{"image": ...}``. OSError (for a person to read) when a local file cannot be read."""
    if value.startswith(PASSED_ON):
        return value
    if value == "-":
        data = (stdin or sys.stdin.buffer).read()
        if not data:
            raise OSError("no image on standard input")
        return data_uri(data)
    path = Path(value.removeprefix("file://")).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise OSError(f"no such file: {value}") from None
    except IsADirectoryError:
        raise OSError(f"a directory, not an image: {value}") from None
    except OSError as exc:
        raise OSError(f"cannot read {value}: {exc.strerror or exc}") from None
    uri = data_uri(data, path.name)
    _NAMES.setdefault(_digest(uri), value)  # the same bytes again (a copy) keep the name they came with first
    return uri


def _digest(uri: str) -> bytes:
    return hashlib.sha256(uri.encode()).digest()


def describe(reference: str) -> str:
    """A short, printable name for an image reference (a data: URI is not shown whole, but its file's name is)."""
    if reference.startswith("data:"):
        header, _, payload = reference.partition(",")
        data_bytes = len(payload) * 3 // 4 - payload[-2:].count("=")
        size = -(-data_bytes // 1024)  # rounded up: a small image is "about 1 KB", not 0
        name = _NAMES.get(_digest(reference))
        return f"{header} (about {size} KB)" + (f" from {name}" if name else "")
    return reference
