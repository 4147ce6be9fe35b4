"""Log lines: the default start-up output without Alembic's INFO lines, and JSON lines as they are written."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamascope.accounts.store import HEAD, MIGRATIONS, AccountStore
from llamascope.observability import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for chatty in ("alembic", "pyvips"):
        logging.getLogger(chatty).setLevel(logging.NOTSET)


def first_migration_only(path: Path) -> AccountStore:
    """A store of an older llamascope: below the head, so ``migrate`` runs Alembic (a new file would be made at
    the head without it)."""
    from alembic import command
    from alembic.config import Config

    store = AccountStore(f"sqlite:///{path}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    return store


def test_migrations_say_nothing_at_the_default_level(tmp_path: Path, capfd, restore_logging) -> None:
    a, b = first_migration_only(tmp_path / "a.db"), first_migration_only(tmp_path / "b.db")
    capfd.readouterr()
    logs.configure("info")
    a.migrate()  # the other migrations run
    assert "alembic" not in capfd.readouterr().err
    logs.configure("debug")
    b.migrate()
    assert "alembic.runtime.migration" in capfd.readouterr().err  # still there when asked for
    assert a.revision() == b.revision() == HEAD


def test_libvips_threadpool_lines_show_only_at_debug(capfd, restore_logging) -> None:
    """libvips says this now and then from its own threads, naming no request (seen in a server's log)."""
    for level, shown in (("info", False), ("debug", True)):
        logs.configure(level)
        logging.getLogger("pyvips").info("VIPS: threadpool completed with 2 workers")
        assert ("threadpool" in capfd.readouterr().err) is shown


def test_json_lines_carry_the_exception(capfd, restore_logging) -> None:
    logs.configure("info", "json")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("llamascope.test").exception("it failed: %s", "badly")
    (line,) = capfd.readouterr().err.splitlines()
    entry = json.loads(line)
    assert entry["message"] == "it failed: badly" and entry["level"] == "error" and entry["logger"] == "llamascope.test"
    assert "ValueError: boom" in entry["exception"] and "request_id" not in entry
