"""API keys and the access decision.

``authenticate`` is a pure function of the Authorization header and a key
store; a thin middleware applies it to every route that needs it. The store
behind it is a protocol, so that the accounts work (keys in a database, with
grants and allowances) can replace ``StaticKeys`` without touching the check.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from llamascope import errors

KEY_PREFIX_LEN = 7  # "sk-" and four characters: enough to tell keys apart in a log, useless to an attacker


def key_prefix(key: str) -> str:
    return key[:KEY_PREFIX_LEN] + "…"


@dataclass(frozen=True)
class Principal:
    """Who a request is from, as far as the rest of llamascope needs to know."""

    key_prefix: str
    key_id: str  # stable id of the key (a hash), never the key itself


@dataclass(frozen=True)
class AccessDecision:
    principal: Principal | None = None
    error: errors.ServiceError | None = None


class KeyStore(Protocol):
    def lookup(self, key: str) -> Principal | None: ...


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class StaticKeys:
    """Keys given in settings. Compared by hash in constant time; the keys themselves are not kept."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [(_digest(k), Principal(key_prefix(k), _digest(k).hex()[:16])) for k in keys]

    def lookup(self, key: str) -> Principal | None:
        candidate = _digest(key)
        found = None
        for digest, principal in self._digests:  # no early exit: time does not depend on which key matched
            if hmac.compare_digest(digest, candidate):
                found = principal
        return found


def authenticate(authorization: str | None, store: KeyStore) -> AccessDecision:
    """Decide from the Authorization header alone. Only ``Bearer <key>`` is accepted."""
    if not authorization:
        return AccessDecision(error=errors.invalid_api_key())
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return AccessDecision(error=errors.invalid_api_key())
    principal = store.lookup(key)
    if principal is None:
        return AccessDecision(error=errors.invalid_api_key())
    return AccessDecision(principal=principal)


def ensure_key_file(path: Path) -> tuple[str, bool]:
    """The key a fresh install serves with: read from ``path``, or made and saved there (mode 0600).

    Returns the key and whether it was just created.
    """
    if path.is_file():
        key = path.read_text().strip()
        if key:
            return key, False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "sk-" + secrets.token_urlsafe(32).replace("-", "").replace("_", "")[:40]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, True
