"""The access decisions, as pure functions of records and time (no I/O, nothing heavy imported).

- ``key_weakness``: is a key given in the settings too easy to guess?
- ``bearer_key``: the key in an Authorization header, or None;
- ``key_refusal``: may this key call at all? (missing, unknown, revoked, expired: 401 InvalidApiKey);
- ``grant_refusal``: may it call this model now? (no grant: 403 AccessDenied.Unpurchased;
  allowance expired or used up: 403 AllocationQuota.FreeTierOnly, saying which and since when).
"""

from __future__ import annotations

import math
from datetime import datetime

from llamascope import errors
from llamascope.accounts.records import GrantView, KeyView

# A key of the settings must be as hard to guess as DashScope's own ("sk-" and 32 hex digits: 128 bits)
# or one llamascope makes ("sk-" and 40 hex digits: 160 bits).
KEY_ALPHABET = frozenset("0123456789abcdefABCDEFghijklmnopqrstuvwxyzGHIJKLMNOPQRSTUVWXYZ-_")
MIN_KEY_BITS = 128
MIN_DISTINCT_CHARS = 8  # a random 32-hex key has 8 or more distinct characters all but never fails this
KEY_RULE = "a key is sk- and random characters worth at least 128 bits (32 hex digits, as DashScope's keys)"
MAKE_A_KEY = (
    "make one with `llamascope keys create`, or: python3 -c 'import secrets; print(\"sk-\" + secrets.token_hex(20))'"
)
_HEX = (frozenset("0123456789abcdef"), frozenset("0123456789ABCDEF"))
_CLASSES = (frozenset("0123456789"), frozenset("abcdefghijklmnopqrstuvwxyz"), frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))


def key_bits(body: str) -> float:
    """At most how many bits of chance a key's characters (after sk-) hold: their number times the bits of
    the alphabet they are drawn from, as far as the characters show it (hex digits, else the classes used:
    digits, lower case, upper case, - and _)."""
    chars = set(body)
    if any(chars <= hex_digits for hex_digits in _HEX):
        size = 16
    else:
        size = sum(len(c) for c in _CLASSES if chars & c) + (2 if chars & {"-", "_"} else 0)
    return len(body) * math.log2(size) if size > 1 else 0.0


def _periodic(body: str) -> bool:
    """A short run of characters repeated ("0123456789abcdef0123456789abcdef"): not random."""
    return any(body == (body[:n] * (len(body) // n + 1))[: len(body)] for n in range(1, len(body) // 2 + 1))


def key_weakness(key: str) -> str | None:
    """Why a key given in the settings is too easy to guess, or None if it is not."""
    body = key.removeprefix("sk-")
    if not key.startswith("sk-"):
        return "it does not start with sk-"
    if not set(body) <= KEY_ALPHABET:
        return "it has characters other than letters, digits, - and _"
    if (bits := key_bits(body)) < MIN_KEY_BITS:
        return f"its {len(body)} characters after sk- hold at most {bits:.0f} bits of chance, fewer than {MIN_KEY_BITS}"
    if len(set(body)) < MIN_DISTINCT_CHARS or _periodic(body):
        return "it repeats a few characters: it is not random"
    return None


def bearer_key(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


def key_refusal(key: KeyView | None, now: datetime) -> errors.ServiceError | None:
    if key is None or key.revoked_at is not None or (key.expires_at is not None and now >= key.expires_at):
        return errors.invalid_api_key()
    return None


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def grant_refusal(model: str, grant: GrantView | None, now: datetime) -> errors.ServiceError | None:
    if grant is None:
        return errors.ServiceError(
            403,
            "AccessDenied.Unpurchased",
            "Access to model denied. Please make sure you are eligible for using the model. "
            f"(This API key has no grant for {model}.)",
        )
    if grant.expires_at is not None and now >= grant.expires_at:
        return errors.ServiceError(
            403,
            "AllocationQuota.FreeTierOnly",
            f"The token allowance for {model} expired on {_when(grant.expires_at)}.",
        )
    if grant.allowance_tokens is not None and grant.used_tokens + grant.reserved_tokens >= grant.allowance_tokens:
        if grant.used_tokens >= grant.allowance_tokens:
            since = f" on {_when(grant.exhausted_at)}" if grant.exhausted_at else ""
            detail = f"was used up{since} ({grant.used_tokens} of {grant.allowance_tokens} tokens)"
        else:
            detail = f"is held by requests still running ({grant.allowance_tokens - grant.used_tokens} tokens left)"
        return errors.ServiceError(403, "AllocationQuota.FreeTierOnly", f"The token allowance for {model} {detail}.")
    return None
