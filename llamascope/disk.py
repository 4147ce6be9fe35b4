"""The free disk a server keeps for itself: what callers store (the SDK's uploads, the Files API's batch inputs)
is refused while storing the most a file may hold would leave less free than the reserve on the disk under it.
Uploads last two days and batch files until deleted; each key is bounded in what it keeps of them
(``KeyQuota``), but not every key together: without a reserve the keys could fill the disk that holds the
account store, the logs and every other caller's files.

Checked before a file's first byte is read. Uploads running at once each see the same free space, so together
they may go into the reserve by up to that many files' caps: the reserve is a margin, not an exact bound."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

log = logging.getLogger(__name__)

# What a caller is told: the server's free space is the operator's business, not every key holder's.
FULL = "The server's disk is nearly full, so it stores no more files for now. Try again later."


@dataclass(frozen=True)
class DiskReserve:
    bytes: int  # 0: none kept

    def short_by(self, directory: Path, most: int) -> int:
        """How many bytes the disk under ``directory`` lacks for a file of up to ``most`` bytes with the reserve
        kept (0: it has room)."""
        if not self.bytes:
            return 0
        return max(0, self.bytes + most - shutil.disk_usage(directory).free)

    def full(self, directory: Path, most: int) -> bool:
        """Whether a file of up to ``most`` bytes must be refused; the operator's log says why."""
        missing = self.short_by(directory, most)
        if missing:
            log.warning(
                "refused a file of up to %d bytes for %s: the disk lacks %d bytes to keep MIN_FREE_DISK_BYTES "
                "(%d) free",
                most,
                directory,
                missing,
                self.bytes,
            )
        return bool(missing)


NO_RESERVE = DiskReserve(0)


class Overrun(NamedTuple):
    """Which bound of a ``KeyQuota`` one more file would pass, and what the key keeps, said for its holder."""

    bound: Literal["files", "bytes"]
    said: str  # "this key keeps 3 files, the most it may keep is 3"


@dataclass(frozen=True)
class KeyQuota:
    """What one key may keep on the disk: files and bytes, 0: no bound (the Files API's files and the SDK's
    uploads each have one). The callers say the refusal in their own API's words."""

    files: int
    bytes: int

    def overrun(self, count: int, size: int, adding: int = 0) -> Overrun | None:
        """What a key keeping ``count`` files of ``size`` bytes passes with one more file, of ``adding`` bytes
        where known (0: before its bytes are read, only a key at its bound passes); None: it fits."""
        if self.files and count + 1 > self.files:
            return Overrun("files", f"this key keeps {count} files, the most it may keep is {self.files}")
        if self.bytes and size + max(adding, 1) > self.bytes:
            more = f" and this one {adding} more" if adding else ""
            return Overrun(
                "bytes", f"out of space: this key's files take {size} bytes{more}, of the {self.bytes} it may keep"
            )
        return None


NO_KEY_QUOTA = KeyQuota(0, 0)
