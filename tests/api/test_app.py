"""The app's shortcut for generation routes (``api.app.App``): taken only where FastAPI's own layers are the
ones it skips, and answering as the full stack does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from llamascope.accounts import admin as keys_admin
from llamascope.accounts.admission import Accounts
from llamascope.accounts.store import AccountStore
from llamascope.api.app import FASTAPI_LAYERS, HOT_PATHS, App, create_app, fastapi_layers
from llamascope.conversation.service import ConversationService
from llamascope.images.uploads import UploadStore
from llamascope.server import build_intake
from llamascope.settings import Settings
from tests.conftest import API_KEY, FailingEngine


@pytest.fixture
def app(tmp_path: Path) -> App:
    settings = Settings.load()
    accounts = AccountStore.for_path(tmp_path / "accounts.db")
    accounts.migrate()
    keys_admin.seed_keys(accounts, [API_KEY])
    service = ConversationService({"flaky": FailingEngine(["Hi"])}, build_intake(settings), Accounts(accounts))
    return create_app(service, UploadStore(tmp_path / "uploads", b"x" * 32), max_body_bytes=settings.max_body_bytes)


def test_the_shortcut_is_taken_only_over_the_layers_it_knows(app: App) -> None:
    """If a FastAPI upgrade changes its own layers, this fails: check what the shortcut would skip."""
    assert fastapi_layers(app) == FASTAPI_LAYERS
    assert set(app._hot) == set(HOT_PATHS)


def test_the_shortcut_answers_as_the_full_stack(app: App) -> None:
    def answers() -> list[tuple[int, Any, list[str]]]:
        out = []
        with TestClient(app, raise_server_exceptions=False) as client:
            for path in HOT_PATHS:
                for headers, body in (
                    ({}, b"{}"),  # no key
                    ({"Authorization": f"Bearer {API_KEY}"}, b"{not json"),
                    ({"Authorization": f"Bearer {API_KEY}"}, b'{"model": "nope", "messages": []}'),
                ):
                    r = client.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
                    payload = r.json()
                    payload.pop("request_id", None)
                    if isinstance(payload.get("error"), dict):
                        payload["error"].pop("request_id", None)
                    assert r.headers["x-request-id"]
                    out.append((r.status_code, payload, sorted(r.headers.keys())))
        return out

    hot = answers()
    app._hot = {}  # the full FastAPI stack
    assert answers() == hot
    assert {status for status, _, _ in hot} >= {400, 401}
