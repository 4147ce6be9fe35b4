"""An image as the user names it, to what goes into ``{"image": ...}``."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest

from llamascope.client.attachment import describe, image_reference
from tests.conftest import png_bytes


def decoded(uri: str) -> tuple[str, bytes]:
    header, _, payload = uri.partition(",")
    return header, base64.b64decode(payload)


def test_a_local_file_becomes_a_data_uri_typed_by_its_bytes(tmp_path: Path) -> None:
    data = png_bytes()
    path = tmp_path / "photo.jpg"  # a PNG under a JPEG name: the bytes decide
    path.write_bytes(data)
    assert decoded(image_reference(str(path))) == ("data:image/png;base64", data)
    assert image_reference(f"file://{path}") == image_reference(str(path))
    gif = png_bytes(fmt="GIF")  # passed on: the server, not the client, says what it accepts
    assert decoded(image_reference("-", io.BytesIO(gif))) == ("data:image/gif;base64", gif)
    size = -(-len(data) // 1024)
    assert describe(image_reference(str(path))) == f"data:image/png;base64 (about {size} KB) from {path}"
    copy = tmp_path / "copy.png"  # the same bytes under another name: the name they came with first
    copy.write_bytes(data)
    assert describe(image_reference(str(copy))).endswith(f" from {path}")
    tiny = png_bytes(size=(2, 2), fmt="GIF")  # under 1 KB: "about 1 KB", not 0; from standard input: no name
    assert describe(image_reference("-", io.BytesIO(tiny))) == "data:image/gif;base64 (about 1 KB)"


def test_urls_are_passed_on() -> None:
    for url in ("https://example.com/a.png", "http://example.com/a", "data:image/png;base64,AAAA", "oss://k/a.png"):
        assert image_reference(url) == url


def test_what_cannot_be_read_is_said_plainly(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"no such file: nothere\.png"):
        image_reference("nothere.png")
    with pytest.raises(OSError, match="a directory"):
        image_reference(str(tmp_path))
    with pytest.raises(OSError, match="no image on standard input"):
        image_reference("-", io.BytesIO(b""))
