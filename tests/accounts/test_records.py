"""The accounts' value records: how keys are made, hashed and told from prefixes, and rows made views."""

from __future__ import annotations

from datetime import UTC, datetime

from llamascope.accounts.access import key_weakness
from llamascope.accounts.records import KeyView, hash_key, is_whole_key, new_key, view_of


def test_a_new_key_is_strong_and_stored_as_its_hash() -> None:
    key = new_key()
    assert key.startswith("sk-") and len(key) == 43 and key_weakness(key) is None and key != new_key()
    assert hash_key(key) == hash_key(key) and len(hash_key(key)) == 64 and key not in hash_key(key)


def test_whole_keys_and_prefixes() -> None:
    assert is_whole_key(new_key()) and is_whole_key("sk-9f86d081884c7d659a2feaa0c55ad015")  # DashScope's
    assert not is_whole_key("sk-9f86d081") and not is_whole_key("9f86d081884c7d659a2feaa0c55ad015abc")


def test_a_view_from_a_row_has_its_datetimes_in_utc() -> None:
    """SQLite gives datetimes without their zone, or as text through the stdlib driver."""
    row = (1, "sk-abcd", "a", "2030-01-02 03:04:05.000006", datetime(2031, 1, 1), None, 5, None, None)
    view = view_of(KeyView, row)
    assert view is not None and view.created_at == datetime(2030, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    assert view.expires_at == datetime(2031, 1, 1, tzinfo=UTC) and view.revoked_at is None
    assert view_of(KeyView, None) is None
