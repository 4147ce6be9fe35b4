"""Crash-safe accounting with real processes: SIGKILL mid-stream, and an upstream engine killed mid-stream.

The bound asserted (accounts/checkpoints.py): for each request a crash interrupted, the output tokens
charged after the restart are at least what its client received less the checkpoint window
(LLAMASCOPE_CHECKPOINT_TOKENS), and at most what the engine had made: what the client received plus the
one event that was on its way when the process died.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from llamascope import cli
from llamascope.accounts.store import AccountStore
from tests.conftest import SEED_MODEL, start_server, wait_ready
from tests.faults.conftest import Stream, limited_key, until

pytestmark = pytest.mark.server
WINDOW = 8  # LLAMASCOPE_CHECKPOINT_TOKENS in these tests: small, so that a few dozen tokens cross it
IN_FLIGHT_EVENT = 8  # at most this many tokens in the one event a dying server had not sent yet


def test_sigkill_mid_stream_then_restart_charges_what_was_delivered(
    tmp_path: Path, image_host, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    env = {"LLAMASCOPE_CHECKPOINT_TOKENS": str(WINDOW)}
    server = start_server(tmp_path, env=env)
    # Half the streams on a key with an allowance (its reservation is held in the store), half unlimited.
    limited = limited_key(server)
    image = image_host.url("/red.png")
    streams = [Stream(server, image, 3000, key=limited if i % 2 else "").start() for i in range(8)]
    until(lambda: all(s.delivered >= 3 * WINDOW for s in streams), what="every stream past 3 windows")
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(30)
    for s in streams:
        s.join()
    delivered = {s.request_id: s.delivered for s in streams}
    assert len(delivered) == 8

    again = start_server(tmp_path, env=env)  # the same data directory
    try:
        store = AccountStore.for_path(data / "llamascope.db")
        rows = {r.request_id: r for r in store.ledger() if r.request_id in delivered}
        assert sorted(rows) == sorted(delivered), "one ledger row for each interrupted request"
        for s in streams:
            row = rows[s.request_id]
            assert row.status == "interrupted"
            assert row.input_tokens == s.usage["input_tokens"] and row.image_tokens == s.usage["image_tokens"]
            assert s.delivered - WINDOW <= row.output_tokens <= s.delivered + IN_FLIGHT_EVENT, (s.delivered, row)
        charged = sum(r.output_tokens for r in rows.values())
        print(f"SIGKILL: {sum(delivered.values())} tokens delivered, {charged} output tokens charged after restart")
        grants = {g.key_id: g for _, gs in store.list_keys() for g in gs if g.model == SEED_MODEL}
        for key_id, grant in grants.items():
            expected = sum(r.input_tokens + r.output_tokens for r in rows.values() if r.key_id == key_id)
            assert grant.used_tokens == expected and grant.reserved_tokens == 0, grant
        assert any(g.allowance_tokens for g in grants.values())  # the limited key's reservations were released
        with store.engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT count(*) FROM in_flight").scalar() == 0
        monkeypatch.setenv("LLAMASCOPE_DATA_DIR", str(data))
        capsys.readouterr()
        assert cli.main(["usage"]) == 0  # `llamascope usage`, in this process
        report = capsys.readouterr().out
        column = report.splitlines()[0].split().index("interrupted")
        assert sum(int(line.split()[column]) for line in report.splitlines()[1:]) == 8, report
    finally:
        again.stop()


def test_upstream_killed_mid_stream_gets_an_error_and_is_charged(tmp_path: Path, image_host) -> None:
    """A second llamascope serves the built-in model as the engine behind the first."""
    for part in ("engine", "gateway"):
        (tmp_path / part).mkdir()
    engine = start_server(tmp_path / "engine", wait=False)
    config = tmp_path / "gateway.toml"
    engine_url = f"{engine.base}/compatible-mode/v1"
    config.write_text(f'[models."{SEED_MODEL}"]\nupstreams = ["{engine_url}"]\nupstream_api_key = "{engine.key}"\n')
    gateway = start_server(tmp_path / "gateway", ["--config", str(config)])
    wait_ready(engine)
    try:
        stream = Stream(gateway, image_host.url("/red.png"), 3000).start()
        until(lambda: stream.delivered >= 10, what="tokens through the gateway")
        engine.process.send_signal(signal.SIGKILL)
        started = time.monotonic()
        stream.join()
        assert stream.ended_at - started < 30
        assert stream.error is not None and stream.error["code"] == "InternalError.Algo", stream
        assert stream.error["request_id"] == stream.request_id
        store = AccountStore.for_path(tmp_path / "gateway" / "data" / "llamascope.db")
        until(lambda: any(r.request_id == stream.request_id for r in store.ledger()), 30, "the ledger row")
        (row,) = [r for r in store.ledger() if r.request_id == stream.request_id]
        assert row.status == "InternalError.Algo"
        assert row.output_tokens >= stream.delivered > 0 and row.input_tokens > 0
    finally:
        gateway.stop()
        engine.stop(signal.SIGKILL)
