"""Keys from settings, seeded by replicas that start at the same moment."""

from __future__ import annotations

import threading

from llamascope.accounts import admin
from llamascope.accounts.store import AccountStore

KEY = "sk-" + "5eed0123456789ab" * 2 + "c0ffee42"


def test_replicas_seeding_the_same_key_at_once_all_start(store: AccountStore) -> None:
    barrier, failures = threading.Barrier(4), []

    def replica() -> None:
        barrier.wait()
        try:
            admin.seed_keys(store, [KEY])
        except Exception as exc:  # what would stop a replica's start
            failures.append(exc)

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    ((view, grants),) = store.list_keys()
    assert store.find_key(KEY) == view
    # one grant for every model ("*"), without limit
    assert [(g.model, g.allowance_tokens) for g in grants] == [(admin.EVERY_MODEL, None)]
