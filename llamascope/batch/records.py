"""A batch's states, its ids and completion window, and the views of batches and files handed out."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from llamascope import errors


class Status(str, Enum):
    """OpenAI's batch statuses (DashScope's are the same)."""

    VALIDATING = "validating"  # the input is being checked; nothing runs yet
    FAILED = "failed"  # the input failed its checks (``errors`` names the lines); nothing ran or was charged
    IN_PROGRESS = "in_progress"  # lines are run
    FINALIZING = "finalizing"  # every line has ended: the result files are being written
    COMPLETED = "completed"
    EXPIRED = "expired"  # the window ended first: the lines not run are in the error file, neither run nor billed
    CANCELLING = "cancelling"  # no new line starts; running ones are being stopped
    CANCELLED = "cancelled"  # with what had finished before


# What may follow what (the repository's conditional updates keep to it).
NEXT: dict[Status, frozenset[Status]] = {
    Status.VALIDATING: frozenset({Status.FAILED, Status.IN_PROGRESS, Status.CANCELLING}),
    Status.IN_PROGRESS: frozenset({Status.FINALIZING, Status.CANCELLING}),
    Status.FINALIZING: frozenset({Status.COMPLETED, Status.EXPIRED}),
    Status.CANCELLING: frozenset({Status.CANCELLED}),
}
ENDED = frozenset({Status.FAILED, Status.COMPLETED, Status.EXPIRED, Status.CANCELLED})
CANCELLABLE = frozenset({Status.VALIDATING, Status.IN_PROGRESS})

# Line states (BatchLine.state).
PENDING, RUNNING, DONE = "pending", "running", "done"

# Purposes of the Files API.
BATCH, BATCH_OUTPUT = "batch", "batch_output"

MIN_WINDOW, MAX_WINDOW = timedelta(hours=24), timedelta(hours=336)
_WINDOW = re.compile(r"^\s*(\d+)\s*([hd])\s*$")

# The error codes of lines that never ran, as OpenAI writes them.
EXPIRED_CODE = "batch_expired"
CANCELLED_CODE = "batch_cancelled"


def completion_window(text: str) -> timedelta:
    """``24h`` to ``336h``, or ``1d`` to ``14d``; ServiceError otherwise."""
    found = _WINDOW.match(str(text))
    if found is None:
        raise errors.invalid_parameter(
            f"Invalid value for 'completion_window': {text!r} is not a number of hours or days, such as 24h or 7d."
        )
    # In whole hours, its length checked first: a number of thousands of digits is refused by int(), one of 20
    # overflows a timedelta (either was a 500).
    digits = found.group(1).lstrip("0")
    hours = int(digits or "0") * (24 if found.group(2) == "d" else 1) if len(digits) <= 6 else None
    if hours is None or not MIN_WINDOW <= timedelta(hours=hours) <= MAX_WINDOW:
        raise errors.invalid_parameter(
            f"Invalid value for 'completion_window': {text!r} is outside 24h to 336h (1d to 14d)."
        )
    return timedelta(hours=hours)


def new_file_id() -> str:
    return "file-batch-" + secrets.token_hex(12)


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


def new_result_id() -> str:
    return "batch_req_" + secrets.token_hex(12)


@dataclass(frozen=True)
class LineError:
    """Why the input failed its checks, at which line (None: the file as a whole)."""

    line: int | None
    code: str
    message: str
    param: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True)
class FileView:
    id: str
    key_id: int
    filename: str
    purpose: str
    bytes: int
    created_at: datetime


@dataclass(frozen=True)
class BatchView:
    id: str
    key_id: int
    input_file_id: str
    endpoint: str
    completion_window: str
    model: str | None
    status: Status
    ending: Status | None
    errors: list[dict[str, Any]] | None
    metadata: dict[str, str] | None
    output_file_id: str | None
    error_file_id: str | None
    total: int
    completed: int
    failed: int
    input_tokens: int
    output_tokens: int
    created_at: datetime
    expires_at: datetime
    in_progress_at: datetime | None
    finalizing_at: datetime | None
    completed_at: datetime | None
    failed_at: datetime | None
    expired_at: datetime | None
    cancelling_at: datetime | None
    cancelled_at: datetime | None
