"""The batch file store: each file's bytes under its id, in one directory (``DATA_DIR/batch-files`` by default;
a directory every replica shares in a replicated deployment). Written whole before a file's id is handed
out: an upload goes to a temporary name and is renamed when complete."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from llamascope import disk, errors
from llamascope.disk import NO_RESERVE, DiskReserve, KeyQuota

CHUNK = 1024 * 1024
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class FileQuota(KeyQuota):
    """What one key may keep in the Files API: its inputs and its batches' results, until it deletes them.
    Model Studio keeps 10,000 files and 100 GB for an account; 0 here: no bound. Only uploads are refused:
    a batch's results are written whatever the key keeps (they count against its next upload)."""

    def check(self, count: int, size: int, adding: int = 0, doing: str = "uploading more") -> None:
        """Refuse (400) a key keeping ``count`` files of ``size`` bytes one more file, of ``adding`` bytes where
        known (0: before its bytes are read, refused only once the key is at its bound)."""
        overrun = self.overrun(count, size, adding)
        if overrun is not None:
            raise errors.ServiceError(
                400,
                "file_quota_exceeded",
                overrun.said[0].upper() + overrun.said[1:] + ": delete some (DELETE /files/{file_id}, or "
                f"files.delete in the SDKs) before {doing}.",
            )


NO_QUOTA = FileQuota(0, 0)


class FileStore:
    def __init__(self, root: Path, max_bytes: int, reserve: DiskReserve = NO_RESERVE) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.reserve = reserve
        root.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        if not _ID.match(file_id):  # ids are ours, but never let one name a path elsewhere
            raise ValueError(f"not a file id: {file_id!r}")
        return self.root / file_id

    def save(self, file_id: str, source: BinaryIO) -> int:
        """Copy ``source`` in, a chunk at a time; its size. Over ``max_bytes``, or the disk short of its
        reserve for a file that large (checked first): ServiceError, nothing kept."""
        self.ensure_room()
        size = 0
        with self._writing(file_id) as out:
            while chunk := source.read(CHUNK):
                size += len(chunk)
                if size > self.max_bytes:
                    raise errors.ServiceError(
                        400, "invalid_file", f"The file is over {self.max_bytes // (1024 * 1024)} MB."
                    )
                out.write(chunk)
        return size

    def ensure_room(self) -> None:
        """Refuse a new file (507) while the disk is short of its reserve for one of ``max_bytes``."""
        if self.reserve.full(self.root, self.max_bytes):
            raise errors.ServiceError(507, "insufficient_storage", disk.FULL)

    def write_lines(self, file_id: str, lines: Iterable[str]) -> int:
        """A result file from its lines (JSON, one a line); its size."""
        size = 0
        with self._writing(file_id) as out:
            for line in lines:
                data = line.encode() + b"\n"
                out.write(data)
                size += len(data)
        return size

    @contextmanager
    def _writing(self, file_id: str) -> Iterator[BinaryIO]:
        target = self.path(file_id)
        fd, temporary = tempfile.mkstemp(dir=self.root, prefix=".writing-")
        try:
            with os.fdopen(fd, "wb") as out:
                yield out
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @contextmanager
    def open(self, file_id: str) -> Iterator[BinaryIO]:
        with open(self.path(file_id), "rb") as stream:
            yield stream

    def read_range(self, file_id: str, offset: int, length: int) -> bytes:
        with open(self.path(file_id), "rb") as stream:
            stream.seek(offset)
            return stream.read(length)

    def chunks(self, file_id: str) -> Iterator[bytes]:
        with open(self.path(file_id), "rb") as stream:
            while chunk := stream.read(CHUNK):
                yield chunk

    def delete(self, file_id: str) -> None:
        self.path(file_id).unlink(missing_ok=True)
