"""The operator's tools against real servers: the admin API's checks, keys made by the CLI while a server
runs, and the keys of the settings across restarts (issue 13, items 2, 4, 5, 6, 7)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    ADMIN_KEY,
    API_KEY,
    LLAMASCOPE,
    OTHER_KEY,
    SEED_MODEL,
    Server,
    free_port,
    generation_body,
    start_server,
)

PATH = "/api/v1/services/aigc/multimodal-generation/generation"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def post_key(server: Server, body: object) -> httpx.Response:
    return httpx.post(server.base + "/admin/keys", json=body, headers=ADMIN)


def test_new_keys_take_the_clis_names_and_refuse_what_they_do_not_know(server: Server) -> None:
    """Item 5: {"allowance": 5000} made a key with the default allowance, {"rpm": 5, "concurrency": 1} one
    with no limits, and "lots" said `invalid literal for int() with base 10`."""
    data = post_key(server, {"allowance": 5000}).json()["data"]
    assert [(g["model"], g["allowance_tokens"]) for g in data["grants"]] == [("*", 5000)]
    data = post_key(server, {"rpm": 5, "tpm": 900, "concurrency": 1, "model": "llama3.2-11b-vision"}).json()["data"]
    assert (data["requests_per_minute"], data["tokens_per_minute"], data["max_concurrent"]) == (5, 900, 1)
    assert [g["model"] for g in data["grants"]] == ["llama3.2-11b-vision"] and "warnings" not in data
    data = post_key(server, {"allowance_tokens": 7, "requests_per_minute": 3}).json()["data"]  # the old names
    assert data["grants"][0]["allowance_tokens"] == 7 and data["requests_per_minute"] == 3

    for body, words in [
        ({"alowance": 5000}, ["Unknown field 'alowance'", "allowance or allowance_tokens"]),
        ({"allowance_tokens": "lots"}, ["'allowance_tokens' must be", "whole number of tokens", "unlimited", "'lots'"]),
        ({"allowance": -5}, ["'allowance'", "from 1"]),
        ({"days": -3}, ["'days'", "above 0"]),
        ({"expires_days": 0}, ["'expires_days'", "above 0"]),
        ({"rpm": 0}, ["'rpm'", "whole number from 1"]),
        ({"models": "x", "model": "y"}, []),  # both spellings at once: not silently one of them
        ([1, 2], []),
    ]:
        r = post_key(server, body)
        assert (r.status_code, r.json()["code"]) == (400, "InvalidParameter"), (body, r.text)
        assert all(word in r.json()["message"] for word in words), r.json()["message"]
        assert "invalid literal" not in r.json()["message"]

    # New-user trial: {"model": []} made a key for every model, and {"model": ""} (or ["a", ""]) was refused
    # after the key had been written: an active key with no grants (or only some) was left in the store.
    listed = len(httpx.get(server.base + "/admin/keys", headers=ADMIN).json()["data"])
    for body in [{"model": []}, {"model": ""}, {"models": ["elsewhere", " "]}]:
        r = post_key(server, body)
        assert (r.status_code, r.json()["code"]) == (400, "InvalidParameter"), (body, r.text)
        assert "'model'" in r.json()["message"], r.json()["message"]
    assert len(httpx.get(server.base + "/admin/keys", headers=ADMIN).json()["data"]) == listed

    key_id = post_key(server, {}).json()["data"]["id"]
    r = httpx.post(f"{server.base}/admin/keys/{key_id}/grants", json={"model": "x", "allowance": -5}, headers=ADMIN)
    assert r.status_code == 400 and "'allowance'" in r.json()["message"]
    r = httpx.post(f"{server.base}/admin/keys/{key_id}/grants", json={"model": "elsewhere"}, headers=ADMIN)
    assert r.status_code == 200 and "not served by this server" in r.json()["data"]["warnings"][0]


@pytest.mark.parametrize("query", ["days=abc", "days=1e400", "days=-3", "days=0", "requests=x", "dayz=3"])
def test_usage_refuses_bad_queries(server: Server, query: str) -> None:
    """Item 6: days=abc and days=1e400 answered 500, with the traceback logged twice."""
    before = server.log().count("Traceback")
    r = httpx.get(f"{server.base}/admin/usage?{query}", headers=ADMIN)
    assert (r.status_code, r.json()["code"]) == (400, "InvalidParameter")
    assert query.split("=")[0] in r.json()["message"]
    assert server.log().count("Traceback") == before


def test_usage_lists_requests_with_how_they_ended(server: Server, image_host) -> None:
    r = httpx.post(
        server.base + PATH,
        json=generation_body(image_host.url("/red.png"), max_tokens=2),
        headers={"Authorization": f"Bearer {server.key}"},
        timeout=60,
    )
    rows = httpx.get(f"{server.base}/admin/usage?requests=200", headers=ADMIN).json()["data"]
    [row] = [x for x in rows if x["request_id"] == r.headers["x-request-id"]]
    assert row["status"] == "ok" and row["output_tokens"] == 2
    totals = httpx.get(f"{server.base}/admin/usage", headers=ADMIN).json()["data"]
    assert all(t["requests"] == t["ok"] + t["cancelled"] + t["failed"] for t in totals)


def test_an_admin_change_applies_to_the_next_request(server: Server, image_host) -> None:
    """Issue 29: the server remembers keys and grants between requests; what the admin API changes, and what a
    request's charge uses up, still decide the very next request."""
    made = post_key(server, {"model": SEED_MODEL, "allowance": 1}).json()["data"]
    key = made["api_key"]
    first = call(server, key, SEED_MODEL, image_host)  # held down to its prompt and one token
    assert first.status_code == 200, first.text
    spent = call(server, key, SEED_MODEL, image_host)  # the first one's charge used the allowance up
    assert (spent.status_code, spent.json()["code"]) == (403, "AllocationQuota.FreeTierOnly")
    r = httpx.post(f"{server.base}/admin/keys/{made['id']}/grants", json={"model": SEED_MODEL}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert call(server, key, SEED_MODEL, image_host).status_code == 200  # a fresh, default allowance
    assert httpx.post(f"{server.base}/admin/keys/{made['id']}/revoke", headers=ADMIN).status_code == 200
    revoked = call(server, key, SEED_MODEL, image_host)
    assert (revoked.status_code, revoked.json()["code"]) == (401, "InvalidApiKey")


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMASCOPE_")}
    return subprocess.run(
        [*LLAMASCOPE, *args], capture_output=True, text=True, env=env | {"LLAMASCOPE_DATA_DIR": str(data_dir)}
    )


def call(server: Server, key: str, model: str, image_host) -> httpx.Response:
    body = generation_body(image_host.url("/red.png"), max_tokens=1) | {"model": model}
    return httpx.post(server.base + PATH, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.mark.server
def test_cli_keys_cover_served_models_and_settings_keys_follow_the_settings(
    tmp_path: Path, test_model_dir: Path, image_host
) -> None:
    """Item 2: a key made by the CLI got 403 on a model given with --model, and `keys create --model NAME`
    said NAME is not served. Item 4: a key removed from the settings kept working, and `keys grant` to a key
    of the settings was undone at every restart."""
    data = tmp_path / "data"
    args = ["--model", "my-vision=builtin"]
    server = start_server(tmp_path, args, env={"LLAMASCOPE_API_KEYS": f"{API_KEY},{OTHER_KEY}"})
    try:
        every = cli(data, "keys", "create")
        assert every.returncode == 0, every.stderr
        assert call(server, every.stdout.strip(), "my-vision", image_host).status_code == 200
        named = cli(data, "keys", "create", "--model", "my-vision")
        assert named.returncode == 0 and "warning" in named.stderr
        assert call(server, named.stdout.strip(), "my-vision", image_host).status_code == 200
        grant = cli(data, "keys", "grant", API_KEY, "--model", "my-vision", "--allowance", "100000")
        assert grant.returncode == 0, grant.stderr
        assert call(server, OTHER_KEY, "my-vision", image_host).status_code == 200
    finally:
        server.stop()

    again = start_server(tmp_path, args, env={"LLAMASCOPE_API_KEYS": API_KEY})
    try:
        refused = call(again, OTHER_KEY, "my-vision", image_host)
        assert (refused.status_code, refused.json()["code"]) == (401, "InvalidApiKey")
        assert call(again, API_KEY, "my-vision", image_host).status_code == 200
        keys = httpx.get(again.base + "/admin/keys", headers=ADMIN).json()["data"]
        [mine] = [k for k in keys if k["prefix"] == API_KEY[:7]]
        assert {g["model"]: g["allowance_tokens"] for g in mine["grants"]} == {"*": None, "my-vision": 100000}
        assert "revoked key" in again.log() and "API keys: 3 active" in again.log()
    finally:
        again.stop()


@pytest.mark.server
@pytest.mark.parametrize("where", ["env", "config"])
def test_weak_settings_keys_stop_start_up(tmp_path: Path, where: str) -> None:
    """Item 4: `api_keys = ["sk-..."]` copied from the README, or LLAMASCOPE_API_KEYS=sk-a,sk-b, were keys."""
    env = {"LLAMASCOPE_API_KEYS": "sk-a,sk-b"}
    args: list[str] = []
    if where == "config":
        config = tmp_path / "llamascope.toml"
        config.write_text('api_keys = ["sk-..."]\n')
        env = {"LLAMASCOPE_API_KEYS": None}  # type: ignore[dict-item]
        args = ["--config", str(config)]
    server = start_server(tmp_path, args, env=env, wait=False)
    assert server.process.wait(120) == 2
    log = server.log()
    assert "must be hard to guess" in log and "llamascope keys create" in log and "token_hex(20)" in log
    assert "Traceback" not in log and not (tmp_path / "data").exists()


@pytest.mark.server
def test_an_unreachable_store_stops_commands_and_start_up_with_a_message(tmp_path: Path) -> None:
    """New-user trial: a replica whose PostgreSQL was down (or not installed, or the URL mistyped) printed 80
    lines of SQLAlchemy traceback for `keys list`, `db upgrade` and `serve`, instead of saying what is wrong."""
    down = f"postgresql+psycopg://llamascope@127.0.0.1:{free_port()}/llamascope"
    for url, said in [(down, "Connection refused"), ("not a url", "Could not parse"), ("mysql://u@h/x", "MySQLdb")]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMASCOPE_")}
        done = subprocess.run(
            [*LLAMASCOPE, "keys", "list"], capture_output=True, text=True, env=env | {"LLAMASCOPE_DATABASE_URL": url}
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and "accounts store" in done.stderr and said in done.stderr
    server = start_server(
        tmp_path, ["--model", "m=openai+http://127.0.0.1:9/v1"], env={"LLAMASCOPE_DATABASE_URL": down}, wait=False
    )
    assert server.process.wait(120) == 2
    log = server.log()
    assert "cannot start" in log and "Connection refused" in log and "Traceback" not in log


def test_keys_list_shows_a_keys_limits_whole(tmp_path: Path) -> None:
    """New-user trial: the docs' `keys create --name batch --rpm 60 --tpm 200000 --concurrency 4` was listed
    with the limits "60 rpm, 200000 tpm, 4 at onc"."""
    made = cli(tmp_path, "keys", "create", "--name", "batch", "--rpm", "60", "--tpm", "200000", "--concurrency", "4")
    assert made.returncode == 0, made.stderr
    listed = cli(tmp_path, "keys", "list")
    assert "60 rpm, 200000 tpm, 4 at once" in listed.stdout, listed.stdout
    head, row = listed.stdout.splitlines()
    assert head.index("model") == row.index("* (every model)")  # the columns still line up
