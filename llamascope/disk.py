"""The free disk a server keeps for itself: what callers store (the SDK's uploads, the Files API's batch inputs)
is refused while storing the most a file may hold would leave less free than the reserve on the disk under it.
Uploads last two days and batch files until deleted, and neither is bounded per key: without a reserve one key
could fill the disk that holds the account store, the logs and every other caller's files.

Checked before a file's first byte is read. Uploads running at once each see the same free space, so together
they may go into the reserve by up to that many files' caps: the reserve is a margin, not an exact bound."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

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
