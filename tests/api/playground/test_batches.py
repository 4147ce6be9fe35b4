"""The playground's list of the key's batches, in a real headless Chromium against a real server."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import pytest

from tests.api.playground import test_playground
from tests.api.playground.test_playground import Traffic, expect, open_page, sign_in
from tests.conftest import API_KEY, OTHER_KEY, SEED_MODEL, Server, png_bytes

pytestmark = pytest.mark.chromium
ENDED = ("completed", "failed", "expired", "cancelled")
browser = test_playground.browser  # the playground tests' Chromium, a fixture of this module too


def submit(server: Server, key: str, lines: list[dict[str, Any]]) -> str:
    """A batch of ``lines`` for ``key``, through the Batch API; its id once it has ended."""
    with httpx.Client(
        base_url=server.base + "/compatible-mode/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as client:
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        file = client.post("/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", data)}).json()
        body = {"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        batch = client.post("/batches", json=body).json()
        deadline = time.monotonic() + 120
        while batch["status"] not in ENDED:
            assert time.monotonic() < deadline, batch
            time.sleep(0.2)
            batch = client.get(f"/batches/{batch['id']}").json()
    return str(batch["id"])


def question(custom_id: str) -> dict[str, Any]:
    image = "data:image/png;base64," + base64.b64encode(png_bytes((10, 150, 90), (32, 32))).decode()
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Colour?"}]
    body = {"model": SEED_MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": content}]}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def test_the_keys_batches_are_listed_with_their_progress(browser: Any, server: Server) -> None:
    mine = submit(server, API_KEY, [question("a"), question("b")])
    theirs = submit(server, OTHER_KEY, [{"custom_id": "x", "not": "a request"}])  # fails its checks at once
    traffic = Traffic()
    context, page = open_page(browser, server, traffic)
    try:
        sign_in(page)
        page.get_by_text("Batches", exact=True).click()
        item = page.locator(f"li.batch[data-batch-id='{mine}']")
        expect(item).to_have_attribute("data-status", "completed")
        expect(item.locator(".batch-counts")).to_contain_text("2/2 done")
        expect(item.get_by_role("progressbar")).to_have_attribute("value", "2")
        expect(page.locator(f"li.batch[data-batch-id='{theirs}']")).to_have_count(0)  # another key's
        assert any(url.endswith("/compatible-mode/v1/batches?limit=20") for url in traffic.urls)
        assert not traffic.console_errors, traffic.console_errors
        # A key the API refuses is said as it says it.
        page.get_by_label("API key").fill("sk-" + "0" * 40)
        expect(page.locator("#batch-note")).to_contain_text("(HTTP 401)")
        expect(page.locator("li.batch")).to_have_count(0)
        # The key changed while its list loads (new-user trial: the first key's list came and stayed): the new
        # key's list is read and shown, the first key's, come late, is not.
        held: list[Any] = []
        first = f"Bearer {API_KEY}"
        page.route(
            "**/compatible-mode/v1/batches?limit=20",
            lambda route: (
                held.append(route) if route.request.headers.get("authorization") == first else route.continue_()
            ),
        )
        page.get_by_label("API key").fill(API_KEY)
        deadline = time.monotonic() + 30
        while not held and time.monotonic() < deadline:
            page.wait_for_timeout(50)  # lets Playwright deliver the routed request
        assert held, "the page never asked for the first key's batches"
        page.get_by_label("API key").fill(OTHER_KEY)
        expect(page.locator(f"li.batch[data-batch-id='{theirs}']")).to_have_count(1)
        with page.expect_request_finished(lambda r: r.headers.get("authorization") == first):
            held[0].continue_()
        page.wait_for_timeout(200)  # a late list would be drawn by now
        expect(page.locator(f"li.batch[data-batch-id='{mine}']")).to_have_count(0)
        expect(page.locator(f"li.batch[data-batch-id='{theirs}']")).to_have_count(1)
    finally:
        context.close()
