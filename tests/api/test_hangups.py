"""A client that hangs up on a prompt count (``POST /tokenize``, ``POST /api/v1/tokenizer``) ends it, as it ends a
chat: its image fetch stops, and its key's concurrency slot is free at once, not when the fetch times out."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ADMIN_KEY, SEED_MODEL, Server


@pytest.fixture
def silent_host() -> Iterator[str]:
    """An image URL whose host takes the connection and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/never.png"
    listener.close()
    for connection in held:
        connection.close()


def _body(path: str, content: object) -> dict[str, object]:
    messages = [{"role": "user", "content": content}]
    return (
        {"model": SEED_MODEL, "messages": messages}
        if path == "/tokenize"
        else {
            "model": SEED_MODEL,
            "input": {"messages": messages},
        }
    )


@pytest.mark.parametrize("path", ["/tokenize", "/api/v1/tokenizer"])
def test_a_count_whose_client_hung_up_frees_its_keys_slot(server: Server, silent_host: str, path: str) -> None:
    created = httpx.post(
        server.base + "/admin/keys",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        json={"models": [SEED_MODEL], "concurrency": 1},
    )
    headers = {"Authorization": f"Bearer {created.json()['data']['api_key']}"}
    image = (
        [{"type": "image_url", "image_url": {"url": silent_host}}, {"type": "text", "text": "?"}]
        if path == "/tokenize"
        else [{"image": silent_host}, {"text": "?"}]
    )
    with pytest.raises(httpx.ReadTimeout):  # the client gives up on the fetch, and hangs up
        httpx.post(server.base + path, json=_body(path, image), headers=headers, timeout=1)
    deadline = time.monotonic() + 10  # well within the image fetch's own 30 s timeout
    while True:
        answer = httpx.post(server.base + path, json=_body(path, "Hello"), headers=headers, timeout=30)
        if answer.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert answer.status_code == 200, answer.text
