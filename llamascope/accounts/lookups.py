"""The per-request lookups (a key by its hash, a key's grant for a model), remembered until the store changes.

Every request looks up its key and its grant; they change only when someone changes them (the admin API,
``llamascope keys``, another replica) or when a request of a limited grant is charged. A remembered view is
valid while the store's stamp is unchanged:

- this store's own commits through SQLAlchemy (the admin API, reservations, reclaims) bump ``generation``:
  a change made on this server applies to its very next request;
- SQLite: ``PRAGMA data_version`` of the thread's own connection, which changes with every commit of any
  other connection, other processes included (``llamascope keys revoke`` while the server runs);
- PostgreSQL: a second's bucket of the clock as well (another replica's change applies within a second;
  its reads cost a round trip, so the win there is smaller anyway).

Views are kept per thread: a data_version is its own connection's count, not comparable across them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import replace
from typing import Any, TypeVar

from llamascope.accounts.records import GrantView

V = TypeVar("V")
MAX_VIEWS = 4096  # a thread's views, at most (then all are dropped): unknown keys are never remembered
TTL_SECONDS = 1.0  # how long a view read from a shared server (PostgreSQL) is trusted


class Lookups:
    def __init__(self, data_version: Callable[[], int] | None) -> None:
        """``data_version``: SQLite's count of others' commits on this thread's connection; None: a
        server shared by replicas, trusted for ``TTL_SECONDS``."""
        self._data_version = data_version
        self._local = threading.local()
        self.generation = 0

    def changed(self) -> None:
        """This process changed the store: forget every view, in every thread."""
        self.generation += 1

    def _stamp(self) -> tuple[int, int]:
        if self._data_version is not None:
            return self.generation, self._data_version()
        return self.generation, int(time.monotonic() / TTL_SECONDS)

    def get(self, key: Hashable, load: Callable[[], V | None]) -> V | None:
        """The view under ``key``, remembered, else ``load()``'s (a None is not remembered)."""
        stamp = self._stamp()  # before the read: a change after it shows in the next stamp
        local = self._local
        views: dict[Hashable, Any] | None = getattr(local, "views", None)
        if views is None or local.stamp != stamp or len(views) >= MAX_VIEWS:
            views = local.views = {}
            local.stamp = stamp
        view = views.get(key)
        if view is None:
            view = load()
            if view is not None:
                views[key] = view
        return view

    def charged(self, grant_id: int, used: int, held: int) -> None:
        """This thread's own connection charged an unlimited grant (a commit its data_version does not
        count): its remembered views take the charge as the database did."""
        views: dict[Hashable, Any] | None = getattr(self._local, "views", None)
        for key, view in (views or {}).items():
            if isinstance(view, GrantView) and view.id == grant_id:
                views[key] = replace(  # type: ignore[index]
                    view, used_tokens=view.used_tokens + used, reserved_tokens=view.reserved_tokens - held
                )
