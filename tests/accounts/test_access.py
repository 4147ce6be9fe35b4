"""Keys, grants, allowances and rate limits through the official SDK against a real server."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from datetime import timedelta
from http import HTTPStatus
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from llamascope.accounts.access import grant_refusal, key_refusal, key_weakness
from llamascope.accounts.records import GrantView, KeyView, utcnow
from llamascope.accounts.schema import Grant
from llamascope.accounts.store import AccountStore
from tests.conftest import ADMIN_KEY, SEED_MODEL, Server, generation_body, start_server, user_turn

PATH = "/api/v1/services/aigc/multimodal-generation/generation"
OTHER_MODEL = "llama3.2-11b-vision"


def admin(server: Server, method: str, path: str, **body: object) -> dict:
    r = httpx.request(
        method, server.base + "/admin" + path, json=body or None, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert r.status_code == 200, r.text
    return r.json()["data"]


def new_key(server: Server, **body: object) -> tuple[str, int]:
    data = admin(server, "POST", "/keys", **body)
    return data["api_key"], data["id"]


def grant_of(server: Server, key_id: int, model: str = SEED_MODEL) -> dict:
    [key] = [k for k in admin(server, "GET", "/keys") if k["id"] == key_id]
    return next(g for g in key["grants"] if g["model"] == model)


def call(image_url: str, key: str, model: str = SEED_MODEL, **kwargs: object):
    from dashscope import MultiModalConversation

    return MultiModalConversation.call(model=model, messages=[user_turn(image_url)], api_key=key, **kwargs)


DASHSCOPE_KEY = "sk-" + "9f86d081884c7d659a2feaa0c55ad015"  # DashScope's own format: 32 hex digits, 128 bits


def test_keys_of_dashscope_s_format_are_strong_enough() -> None:
    """Issue 27, item 2: keys moved over from DashScope (sk- and 32 hex digits) were refused as too weak."""
    assert key_weakness(DASHSCOPE_KEY) is None
    assert key_weakness(DASHSCOPE_KEY.upper().replace("SK-", "sk-")) is None
    assert key_weakness("sk-" + "5ca3e903596fc2d3361b8f0ff4bbd2e3c92bab3b") is None  # as llamascope makes them
    assert key_weakness("sk-" + "Zq3_x9-KpL0mW7vB2nR8tY4hJ6") is None  # 26 of 64 characters: 156 bits


@pytest.mark.parametrize(
    "key",
    [
        "sk-" + "9f86d081884c7d659a2feaa0c55ad01",  # 31 hex digits: 124 bits
        "sk-" + "0" * 40,
        "sk-" + "0123456789abcdef" * 2,  # every hex digit, in order, twice
        "sk-" + "abcdefghij" * 4,
        "sk-a",
        "sk-...",
        "9f86d081884c7d659a2feaa0c55ad015",  # no sk-
    ],
)
def test_guessable_keys_are_still_refused(key: str) -> None:
    assert key_weakness(key) is not None


def test_keys(dashscope_sdk, server: Server, image_host) -> None:
    key, key_id = new_key(server, models=[SEED_MODEL], allowance_tokens="unlimited")
    assert call(image_host.url("/red.png"), key, max_tokens=2).status_code == HTTPStatus.OK
    admin(server, "POST", f"/keys/{key_id}/revoke")
    revoked = call(image_host.url("/red.png"), key, max_tokens=2)  # the very next request
    assert (revoked.status_code, revoked.code) == (401, "InvalidApiKey")
    for bad in ("sk-never-issued-000000000000000000000", "sk-"):
        r = httpx.post(
            server.base + PATH,
            json=generation_body(image_host.url("/red.png")),
            headers={"Authorization": f"Bearer {bad}"},
        )
        assert (r.status_code, r.json()["code"]) == (401, "InvalidApiKey")


def server_store(server: Server) -> AccountStore:
    """The server's own store (its SQLite file): a test moves a key's or a grant's end into the past there,
    as if the time had passed, and the server's next request sees it."""
    return AccountStore.for_path(server.log_path.parent / "data" / "llamascope.db")


def test_expiry_decisions() -> None:
    """What the server decides at the moment a key or an allowance ends, on the decisions' own clock."""
    now = utcnow()
    key = KeyView(1, "sk-abcd", "", now, now + timedelta(days=1), None, None, None, None)
    assert key_refusal(key, now) is None
    assert key_refusal(key, now + timedelta(days=1)).code == "InvalidApiKey"
    grant = GrantView(1, 1, SEED_MODEL, None, 0, 0, now, now + timedelta(seconds=1), None)
    assert grant_refusal(SEED_MODEL, grant, now) is None
    refused = grant_refusal(SEED_MODEL, grant, now + timedelta(seconds=1))
    assert refused.code == "AllocationQuota.FreeTierOnly" and "expired on" in refused.message


def test_expired_key(dashscope_sdk, server: Server, image_host) -> None:
    key, key_id = new_key(server, expires_days=1)
    assert call(image_host.url("/red.png"), key, max_tokens=1).status_code == HTTPStatus.OK
    server_store(server).update_key(key_id, expires_at=utcnow() - timedelta(seconds=1))
    assert call(image_host.url("/red.png"), key).code == "InvalidApiKey"


def test_grants(dashscope_sdk, server: Server, image_host) -> None:
    key, _ = new_key(server, models=[SEED_MODEL])
    denied = call(image_host.url("/red.png"), key, model=OTHER_MODEL)
    assert (denied.status_code, denied.code) == (403, "AccessDenied.Unpurchased")
    assert denied.message.startswith("Access to model denied.")
    unknown = call(image_host.url("/red.png"), key, model="qwen-vl-max")
    assert (unknown.status_code, unknown.message) == (400, "Model not exist.")


def test_used_up_allowance(dashscope_sdk, server: Server, image_host) -> None:
    key, key_id = new_key(server, models=[SEED_MODEL], allowance_tokens=40)
    first = call(image_host.url("/red.png"), key, max_tokens=30, min_new_tokens=30)
    assert first.status_code == HTTPStatus.OK  # admitted with allowance left, cut to what was left
    used = first.usage.input_tokens + first.usage.output_tokens
    assert used == 40 and grant_of(server, key_id)["used_tokens"] == used
    refused = call(image_host.url("/red.png"), key, max_tokens=2)
    assert (refused.status_code, refused.code) == (403, "AllocationQuota.FreeTierOnly")
    assert re.search(r"was used up on \d{4}-\d\d-\d\d", refused.message)
    events = list(call(image_host.url("/red.png"), key, stream=True))
    assert (events[0].status_code, events[0].code) == (403, "AllocationQuota.FreeTierOnly")


def test_an_allowance_caps_max_tokens(dashscope_sdk, server: Server, image_host) -> None:
    """Issue 13, item 8: a request may make only what its allowance has left, so at the default max_tokens
    (512) a 50-token allowance is charged 50, not 531; and a request whose prompt alone is more than what is
    left makes one token, overrunning by less than its prompt. Usage reports what was made."""
    key, key_id = new_key(server, model=SEED_MODEL, allowance=50)
    r = call(image_host.url("/red.png"), key, min_new_tokens=600)  # the model may not stop early
    assert r.status_code == HTTPStatus.OK, r
    prompt = r.usage.input_tokens
    assert prompt < 50
    assert r.usage.output_tokens == 50 - prompt and r.output.choices[0].finish_reason == "length"
    assert grant_of(server, key_id)["used_tokens"] == 50
    assert call(image_host.url("/red.png"), key).code == "AllocationQuota.FreeTierOnly"

    key, key_id = new_key(server, model=SEED_MODEL, allowance=5)
    r = call(image_host.url("/red.png"), key, max_tokens=100, stream=True, incremental_output=True)
    *_, last = list(r)
    assert last.status_code == HTTPStatus.OK and last.usage.output_tokens == 1
    used = grant_of(server, key_id)["used_tokens"]
    assert used == last.usage.input_tokens + 1 and used - 5 <= last.usage.input_tokens


def test_expired_allowance(dashscope_sdk, server: Server, image_host) -> None:
    key, key_id = new_key(server, models=[SEED_MODEL], days=1)
    assert call(image_host.url("/red.png"), key, max_tokens=1).status_code == HTTPStatus.OK
    with server_store(server).session() as s:
        s.execute(update(Grant).where(Grant.key_id == key_id).values(expires_at=utcnow() - timedelta(seconds=1)))
    refused = call(image_host.url("/red.png"), key)
    assert (refused.status_code, refused.code) == (403, "AllocationQuota.FreeTierOnly")
    assert "expired on" in refused.message


def test_rate_limits(dashscope_sdk, server: Server, image_host) -> None:
    key, _ = new_key(server, models=[SEED_MODEL], requests_per_minute=2)
    assert [call(image_host.url("/red.png"), key, max_tokens=1).status_code for _ in range(2)] == [200, 200]
    r = httpx.post(
        server.base + PATH,
        json=generation_body(image_host.url("/red.png"), max_tokens=1),
        headers={"Authorization": f"Bearer {key}"},
    )
    assert (r.status_code, r.json()["code"]) == (429, "Throttling.RateQuota")
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert call(image_host.url("/red.png"), key).code == "Throttling.RateQuota"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=[pytest.mark.server, pytest.mark.postgres])])
def any_store_server(request: pytest.FixtureRequest, server: Server, tmp_path: Path, test_model_dir: Path):
    """The session server (SQLite), or one on PostgreSQL when LLAMASCOPE_TEST_DATABASE_URL is set."""
    if request.param == "sqlite":
        yield server
        return
    url = os.environ.get("LLAMASCOPE_TEST_DATABASE_URL")
    if not url:
        pytest.skip("LLAMASCOPE_TEST_DATABASE_URL is not set")
    pg = start_server(tmp_path, env={"LLAMASCOPE_DATABASE_URL": url})
    yield pg
    pg.stop()


def test_fifty_concurrent_requests_on_a_nearly_spent_allowance(any_store_server: Server, image_host) -> None:
    server = any_store_server
    key, key_id = new_key(server, models=[SEED_MODEL], allowance_tokens=100)
    body = generation_body(image_host.url("/red.png"), max_tokens=20, temperature=0)
    first = httpx.post(server.base + PATH, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    per_request = first.json()["usage"]["input_tokens"] + first.json()["usage"]["output_tokens"]
    responses: list[httpx.Response] = []

    def request() -> None:
        responses.append(
            httpx.post(server.base + PATH, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        )

    threads = [threading.Thread(target=request) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in responses if r.status_code == 200]
    assert all(r.json()["code"] == "AllocationQuota.FreeTierOnly" for r in responses if r.status_code != 200)
    reported = per_request + sum(r.json()["usage"]["input_tokens"] + r.json()["usage"]["output_tokens"] for r in ok)
    grant = grant_of(server, key_id)
    assert grant["used_tokens"] == reported and grant["reserved_tokens"] == 0
    # Only the last request admitted may go past the allowance.
    assert reported - 100 < per_request
    rows = admin(server, "GET", f"/usage?key={key_id}")
    assert sum(r["input_tokens"] + r["output_tokens"] for r in rows) == reported
    assert sum(r["requests"] for r in rows) == 1 + len(ok)


def test_disconnect_mid_stream_charges_what_was_streamed(server: Server, image_host) -> None:
    key, key_id = new_key(server, models=[SEED_MODEL], allowance_tokens="unlimited")
    body = generation_body(image_host.url("/red.png"), max_tokens=3000)
    headers = {"Authorization": f"Bearer {key}", "X-DashScope-SSE": "enable"}
    with httpx.stream("POST", server.base + PATH, json=body, headers=headers, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data:"):
                seen += 1
                if seen == 5:
                    break
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not admin(server, "GET", f"/usage?key={key_id}"):
        time.sleep(0.1)
    [row] = admin(server, "GET", f"/usage?key={key_id}")
    assert 5 <= row["output_tokens"] < 3000
    assert grant_of(server, key_id)["used_tokens"] == row["input_tokens"] + row["output_tokens"]


def test_admin_api_needs_the_admin_key(server: Server) -> None:
    for headers in ({}, {"Authorization": f"Bearer {server.key}"}):
        r = httpx.get(server.base + "/admin/keys", headers=headers)
        assert (r.status_code, r.json()["code"]) == (401, "InvalidApiKey")


@pytest.mark.server
def test_ledger_survives_a_restart_and_the_cli_reads_it(tmp_path: Path, test_model_dir: Path, image_host) -> None:
    import subprocess
    import sys

    env = {"LLAMASCOPE_API_KEYS": None}
    first = start_server(tmp_path, env=env)
    key = re.search(r"API key: (sk-\w+)", first.log()).group(1)
    for _ in range(3):
        r = httpx.post(
            first.base + PATH,
            json=generation_body(image_host.url("/red.png"), max_tokens=2),
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert r.status_code == 200
    first.stop(signal.SIGTERM)
    second = start_server(tmp_path, env=env)
    second.stop()
    cli_env = {**__import__("os").environ, "LLAMASCOPE_DATA_DIR": str(tmp_path / "data")}
    out = subprocess.run([sys.executable, "-m", "llamascope", "usage"], capture_output=True, text=True, env=cli_env)
    assert out.returncode == 0, out.stderr
    [row] = [line for line in out.stdout.splitlines() if SEED_MODEL in line]
    assert row.split()[3] == "3"  # requests
    listing = subprocess.run(
        [sys.executable, "-m", "llamascope", "keys", "list"], capture_output=True, text=True, env=cli_env
    )
    assert key[:7] in listing.stdout and key not in listing.stdout
