"""The free disk a server keeps for itself: what callers store (the SDK's uploads, the Files API's batch inputs)
is refused while storing the most a file may hold would leave less free than the reserve on the disk under it.
Uploads last two days and batch files until deleted, and neither is bounded per key: without a reserve one key
could fill the disk that holds the account store, the logs and every other caller's files.

Checked before a file's first byte is read. Uploads running at once each see the same free space, so together
they may go into the reserve by up to that many files' caps: the reserve is a margin, not an exact bound."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DiskReserve:
    bytes: int  # 0: none kept

    def short_by(self, directory: Path, most: int) -> int:
        """How many bytes the disk under ``directory`` lacks for a file of up to ``most`` bytes with the reserve
        kept (0: it has room)."""
        if not self.bytes:
            return 0
        return max(0, self.bytes + most - shutil.disk_usage(directory).free)

    def refusal(self, directory: Path, most: int) -> str | None:
        """What to tell a caller whose file of up to ``most`` bytes does not fit (None: it fits)."""
        missing = self.short_by(directory, most)
        if not missing:
            return None
        return (
            f"The server's disk is nearly full: it keeps {self.bytes // 2**20} MB free and lacks "
            f"{-(-missing // 2**20)} MB for a file of up to {most // 2**20} MB. Try again later, or ask its operator "
            "to free space (expired uploads are removed by themselves; batch files go when deleted)."
        )


NO_RESERVE = DiskReserve(0)
