"""Issue 27, item 5: requests refused before they reached a model are counted per key, model, code and day,
and shown by ``llamascope usage`` and the admin API's usage (they have no ledger row)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from llamascope.accounts import admin
from llamascope.accounts.records import utcnow
from llamascope.accounts.refusals import RefusalCounts
from llamascope.accounts.store import AccountStore
from tests.conftest import ADMIN_KEY, API_KEY, SEED_MODEL, generation_body, start_server

PATH = "/api/v1/services/aigc/multimodal-generation/generation"
DASHSCOPE_KEY = "sk-9f86d081884c7d659a2feaa0c55ad015"  # DashScope's format (issue 27, item 2)


def test_counts_are_added_in_batches_and_merged_into_the_usage(store: AccountStore) -> None:
    _, a = store.create_key("a")
    _, b = store.create_key("b")
    grant = store.grant(a.id, "m", None, None)
    store.settle(store.reserve(grant.key_id, "m", 10), "r1", 5, 3, 0, "ok")
    for _ in range(3):
        store.record_refusal(a.id, "m", "InvalidParameter")
    store.record_refusal(a.id, "m", "Throttling.RateQuota")
    store.save_refusals()
    store.record_refusal(a.id, "m", "InvalidParameter")  # a second batch adds to the first
    store.record_refusal(b.id, "", "InvalidParameter")  # no served model named
    [row_a, row_b] = store.usage()  # saves what this process counted before it reads
    assert (row_a["prefix"], row_a["model"], row_a["requests"], row_a["ok"]) == (a.prefix, "m", 1, 1)
    assert row_a["refused"] == 5 and row_a["refusals"] == {"InvalidParameter": 4, "Throttling.RateQuota": 1}
    assert (row_b["key_id"], row_b["model"], row_b["requests"], row_b["input_tokens"]) == (b.id, "", 0, 0)
    assert row_b["refusals"] == {"InvalidParameter": 1}
    assert [r["refused"] for r in store.usage(b.id)] == [1]
    table = admin.usage_table(store.usage())
    assert "InvalidParameter=4 Throttling.RateQuota=1" in table and "InvalidParameter=1" in table


def test_counts_are_kept_per_day_and_until_saved(store: AccountStore) -> None:
    _, key = store.create_key()
    counts = RefusalCounts(store.engine)
    now = utcnow()
    counts.count(key.id, "m", "Throttling.RateQuota", now=now - timedelta(days=2))
    counts.count(key.id, "m", "Throttling.RateQuota", now=now)
    assert counts.totals(None, None) == []  # nothing saved yet
    counts.save()
    days = {day: n for _, _, _, day, _, n in counts.totals(key.id, None)}
    assert days == {str((now - timedelta(days=2)).date()): 1, str(now.date()): 1}
    assert [n for *_, n in counts.totals(key.id, now - timedelta(days=1))] == [1]


@pytest.mark.server
def test_refusals_through_a_server_show_in_usage_per_key_and_code(
    tmp_path: Path, test_model_dir: Path, image_host
) -> None:
    """A key of DashScope's format from the settings, refused for a bad parameter; a key made with a rate
    limit, throttled; a request with no valid key, counted for no key. The admin API's usage and
    ``llamascope usage`` show each key's refusals by code, beside its requests."""
    server = start_server(tmp_path, env={"LLAMASCOPE_API_KEYS": f"{API_KEY},{DASHSCOPE_KEY}"})
    admin_headers = {"Authorization": f"Bearer {ADMIN_KEY}"}

    def post(key: str, **parameters: object) -> httpx.Response:
        body = generation_body(image_host.url("/red.png"), **parameters)
        return httpx.post(server.base + PATH, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    try:
        for _ in range(3):
            assert post(DASHSCOPE_KEY, temperature=-1).json()["code"] == "InvalidParameter"
        assert post("sk-never-issued-0000000000000000000000").json()["code"] == "InvalidApiKey"
        made = httpx.post(
            server.base + "/admin/keys", json={"model": SEED_MODEL, "rpm": 1}, headers=admin_headers
        ).json()["data"]
        limited, limited_id = made["api_key"], made["id"]
        assert post(limited, max_tokens=2).status_code == 200
        assert [post(limited, max_tokens=2).json()["code"] for _ in range(2)] == ["Throttling.RateQuota"] * 2

        answer = httpx.get(server.base + "/admin/usage", headers=admin_headers).json()
        assert all(r["requests"] for r in answer["data"])  # the ledger's rows, as before; refusals-only apart
        rows = answer["data"] + answer["refused_only"]
        by_key = {r["prefix"]: r for r in rows}
        mine = by_key[DASHSCOPE_KEY[:7]]
        assert (mine["model"], mine["requests"], mine["refused"]) == (SEED_MODEL, 0, 3)
        assert mine["refusals"] == {"InvalidParameter": 3}
        theirs = by_key[limited[:7]]
        assert (theirs["key_id"], theirs["requests"], theirs["ok"]) == (limited_id, 1, 1)
        assert theirs["refusals"] == {"Throttling.RateQuota": 2}
        assert sum(r["refused"] for r in rows) == 5  # the request with no valid key is nobody's
        assert "InvalidApiKey" not in str(rows)
    finally:
        server.stop(signal.SIGTERM)

    # The server saved its last counts as it stopped; the command reads them from the store.
    env = {**os.environ, "LLAMASCOPE_DATA_DIR": str(tmp_path / "data")}
    out = subprocess.run([sys.executable, "-m", "llamascope", "usage"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[-2:] == ["refused", "refusals"]
    [mine_line] = [line for line in lines if DASHSCOPE_KEY[:7] in line]
    assert mine_line.split()[-2:] == ["3", "InvalidParameter=3"]
    [theirs_line] = [line for line in lines if limited[:7] in line]
    assert theirs_line.split()[-2:] == ["2", "Throttling.RateQuota=2"] and theirs_line.split()[3] == "1"
