"""Hostile image references sent to a real server: each gets a DashScope-shaped 400, never a 500.

The server under test (tests/conftest.py) may fetch from 127.0.0.1 (LLAMASCOPE_IMAGE_FETCH_ALLOW), where the
misbehaving image host below listens.
"""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import SEED_MODEL, Server, generation_body, png_bytes

GENERATION = "/services/aigc/multimodal-generation/generation"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/red.png":
            data = png_bytes((200, 30, 30))
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(302)
        if self.path == "/to-bad-ipv6":
            self.send_header("Location", "http://[::1/x.png")
        # /no-location: a 3xx without a Location, which is no redirect
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def hostile() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def generate(server: Server, image: str) -> httpx.Response:
    return httpx.post(
        server.api + GENERATION,
        json=generation_body(image, max_tokens=2),
        headers={"Authorization": f"Bearer {server.key}"},
        timeout=60,
    )


def refusal(server: Server, image: str) -> dict[str, str]:
    response = generate(server, image)
    body = response.json()
    assert response.status_code == 400, body
    assert body["request_id"] == response.headers["x-request-id"]
    return body


@pytest.mark.parametrize(
    "url",
    [
        "http://[127.0.0.1]/x.png",  # brackets around an IPv4 address
        "http://[::1/x.png",  # an unclosed bracket
        "oss://[dir/x.png",
        "http://{host}/x\x00.png",  # a control character
        "http://{host}/" + "a" * 70_000,  # longer than httpx takes
    ],
)
def test_malformed_urls_are_refused_not_500(server: Server, hostile: str, url: str) -> None:
    body = refusal(server, url.format(host=hostile))
    assert body["code"] == "InvalidParameter"
    assert "not valid" in body["message"]


def test_a_redirect_to_a_malformed_url_is_an_invalid_answer(server: Server, hostile: str) -> None:
    body = refusal(server, f"http://{hostile}/to-bad-ipv6")
    assert body["message"].endswith("the image host sent an invalid or incomplete HTTP answer")


def test_a_host_name_in_other_digits_is_checked_and_sent_as_ascii(server: Server, hostile: str) -> None:
    port = hostile.rsplit(":", 1)[1]
    # IDNA maps these digits to 127.0.0.1 (allowed here): fetched, with an ASCII Host header.
    assert generate(server, f"http://①②⑦.0.0.①:{port}/red.png").status_code == 200
    # ... and to 10.0.0.1, which is refused like the address it is.
    body = refusal(server, "http://①⓪.0.0.①/x.png")
    assert "private or local network" in body["message"]


def test_a_3xx_without_location_is_no_redirect_loop(server: Server, hostile: str) -> None:
    body = refusal(server, f"http://{hostile}/no-location")
    assert body["message"].endswith("the image host answered HTTP 302")


def png_declaring(width: int, height: int) -> bytes:
    """A PNG header that declares a size, with hardly any pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )


def test_the_declared_pixel_limit_is_ours_not_pillows(server: Server) -> None:
    # 95 million pixels: under IMAGE_MAX_PIXELS (100 million), over Pillow's own warning limit (89.5 million).
    # Refused for what a PNG costs to decode (IMAGE_MAX_DECODE_PIXELS), not as over the declared limit.
    uri = "data:image/png;base64," + base64.b64encode(png_declaring(9500, 10000)).decode()
    message = refusal(server, uri)["message"]
    assert "decodes at most 20000000 pixels" in message and "limit of 100000000" not in message
    uri = "data:image/png;base64," + base64.b64encode(png_declaring(10001, 10000)).decode()
    assert "limit of 100000000 pixels" in refusal(server, uri)["message"]
    assert generate(server, "data:image/png;base64," + base64.b64encode(png_bytes()).decode()).status_code == 200


def jpeg(size: tuple[int, int], progressive: bool) -> str:
    buf = io.BytesIO()
    Image.new("L", size, 90).save(buf, "JPEG", quality=50, progressive=progressive)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def test_a_progressive_jpeg_counts_at_full_size(server: Server) -> None:
    # 20.5 million pixels: a baseline JPEG decodes at 1/4 scale, but libjpeg holds all of a progressive one's
    # coefficients (120 kB of solid grey would have taken 120 MB; a 1 MB 80 MP one took 0.5 GB).
    assert generate(server, jpeg((5000, 4100), progressive=False)).status_code == 200
    message = refusal(server, jpeg((5000, 4100), progressive=True))["message"]
    assert "decodes at most 20000000 pixels of a progressive JPEG" in message
    assert generate(server, jpeg((1600, 1200), progressive=True)).status_code == 200


def test_an_empty_local_file_through_the_sdk_is_called_empty(dashscope_sdk, tmp_path: Path) -> None:
    from dashscope import MultiModalConversation

    (tmp_path / "empty.png").write_bytes(b"")
    messages = [{"role": "user", "content": [{"image": str(tmp_path / "empty.png")}, {"text": "What is this?"}]}]
    response = MultiModalConversation.call(model=SEED_MODEL, messages=messages, max_tokens=2)
    assert (response.status_code, response.code) == (400, "InvalidParameter.DataInspection")
    assert response.message.endswith("The image is empty (0 bytes).") and response.request_id


@pytest.mark.parametrize("host", ["[::7f00:1]", "[::ffff:0:7f00:1]", "[64:ff9b:1:7f00:0:100::]", "[fec0::1]"])
def test_ipv6_spellings_of_private_addresses_are_refused(server: Server, host: str) -> None:
    body = refusal(server, f"http://{host}/x.png")
    assert "private or local network" in body["message"]


@pytest.mark.parametrize("container", ["ICO", "ICNS"])
def test_an_icon_is_sized_by_its_frames_before_pillow_decodes_them(server: Server, container: str) -> None:
    # Pillow decodes an icon's frame while it opens the file: a 240 kB ICO holding a 9000x9000 PNG took 340 MB
    # before it was refused. The frames are sized from their bytes first.
    frame = png_declaring(5000, 4100)
    if container == "ICO":
        icon = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(frame), 22) + frame
    else:
        entry = b"ic10" + struct.pack(">I", 8 + len(frame)) + frame
        icon = b"icns" + struct.pack(">I", 8 + len(entry)) + entry
    message = refusal(server, "data:image/x-icon;base64," + base64.b64encode(icon).decode())["message"]
    assert "The icon holds a frame of 20500000 pixels; this server decodes at most 20000000" in message
