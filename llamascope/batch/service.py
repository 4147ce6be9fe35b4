"""What the Files and Batch APIs do, with no HTTP in them: each call on behalf of one key, which sees only its
own files and batches (another key's are answered as if they did not exist)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any, BinaryIO

from starlette.types import ASGIApp

from llamascope import errors
from llamascope.accounts.records import utcnow
from llamascope.batch.files import NO_QUOTA, FileQuota, FileStore
from llamascope.batch.lines import ENDPOINTS
from llamascope.batch.records import (
    BATCH,
    ENDED,
    BatchView,
    FileView,
    Status,
    completion_window,
    new_batch_id,
    new_file_id,
)
from llamascope.batch.repository import BatchRepository
from llamascope.batch.runner import Runner
from llamascope.observability.facts import BatchStats

MAX_METADATA = 16  # OpenAI's: 16 pairs, keys up to 64 characters, values up to 512


def not_found(kind: str, ident: str) -> errors.ServiceError:
    return errors.ServiceError(404, "NotFound", f"No such {kind} object: {ident}")


class BatchService:
    def __init__(
        self, repository: BatchRepository, files: FileStore, runner: Runner, quota: FileQuota = NO_QUOTA
    ) -> None:
        self.repository = repository
        self.files = files
        self.runner = runner
        self.quota = quota

    def start(self, app: ASGIApp) -> None:
        self.runner.start(app)

    async def stop(self) -> None:
        await self.runner.stop()

    def stats(self) -> BatchStats:
        """What /metrics reads of the batches (every key's; in the database shared by replicas, all of theirs)."""
        return self.repository.stats()

    # -- files ----------------------------------------------------------------------------------------

    async def has_room(self, key_id: int) -> None:
        """Refuse a key at its bound of files or bytes another upload (before its body is read), or refuse any
        upload while the disk is short of its reserve."""
        self.files.ensure_room()
        if self.quota != NO_QUOTA:
            self.quota.check(*await asyncio.to_thread(self._usage, key_id))

    def _usage(self, key_id: int) -> tuple[int, int]:
        """What the key keeps on the disk: its files, and the inputs it deleted that its batches under way still
        read (kept until they end: without them, upload, start a batch, delete, again, went past any bound)."""
        count, size = self.repository.usage(key_id)
        for file_id in self.repository.held_inputs(key_id):
            with contextlib.suppress(OSError):  # gone already: its batch has just ended
                size += self.files.path(file_id).stat().st_size
                count += 1
        return count, size

    async def upload(self, key_id: int, filename: str, purpose: str, source: BinaryIO) -> FileView:
        if purpose != BATCH:
            raise errors.invalid_parameter(
                f"Invalid value for 'purpose': {purpose!r} is not supported here, only 'batch'."
            )
        file_id = new_file_id()
        size = await asyncio.to_thread(self.files.save, file_id, source)
        view = FileView(file_id, key_id, filename[:255] or "input.jsonl", purpose, size, utcnow())
        try:
            await asyncio.to_thread(self.repository.add_file, view)
            if self.quota != NO_QUOTA:
                # Counted with this file in, so that uploads of one key at once cannot each take the room left:
                # the one that took the key over its bound is refused (at worst each of them is).
                count, used = await asyncio.to_thread(self._usage, key_id)
                try:
                    self.quota.check(count - 1, used - size, size)
                except errors.ServiceError:
                    await asyncio.to_thread(self.repository.delete_file, file_id, key_id)
                    raise
        except BaseException:
            self.files.delete(file_id)
            raise
        return view

    async def file(self, key_id: int, file_id: str) -> FileView:
        view = await asyncio.to_thread(self.repository.file, file_id, key_id)
        if view is None:
            raise not_found("File", file_id)
        return view

    async def list_files(self, key_id: int, purpose: str | None, limit: int, after: str | None) -> list[FileView]:
        return await asyncio.to_thread(self.repository.files, key_id, purpose, limit, after)

    async def content(self, key_id: int, file_id: str) -> Iterator[bytes]:
        await self.file(key_id, file_id)
        return self.files.chunks(file_id)

    async def delete_file(self, key_id: int, file_id: str) -> FileView:
        view = await self.file(key_id, file_id)
        if not await asyncio.to_thread(self.repository.delete_file, file_id, key_id):
            raise not_found("File", file_id)
        # The input of a batch under way keeps its bytes until the batch ends (the runner drops them then).
        if await asyncio.to_thread(self.repository.forsaken, file_id):
            await asyncio.to_thread(self.files.delete, file_id)
        return view

    # -- batches --------------------------------------------------------------------------------------

    async def create(
        self, key_id: int, input_file_id: str, endpoint: str, window: str, metadata: dict[str, Any] | None
    ) -> BatchView:
        if endpoint not in ENDPOINTS:
            raise errors.invalid_parameter(
                f"Invalid value for 'endpoint': {endpoint!r} is not one of {', '.join(ENDPOINTS)}."
            )
        length = completion_window(window)
        _check_metadata(metadata)
        file = await self.file(key_id, input_file_id)
        if self.quota != NO_QUOTA:
            # A batch writes its results as files of the key: one at its bound starts none, or its batches, run
            # again on one input, would keep writing past it (each result counted, none refused).
            count, used = await asyncio.to_thread(self._usage, key_id)
            self.quota.check(count, used, doing="starting another batch (its results are files of this key)")
        if file.purpose != BATCH:
            raise errors.invalid_parameter(
                f"Invalid value for 'input_file_id': file {input_file_id} was not uploaded with purpose 'batch'."
            )
        now = utcnow()
        batch = BatchView(
            id=new_batch_id(),
            key_id=key_id,
            input_file_id=input_file_id,
            endpoint=endpoint,
            completion_window=window,
            model=None,
            status=Status.VALIDATING,
            ending=None,
            errors=None,
            metadata=metadata,
            output_file_id=None,
            error_file_id=None,
            total=0,
            completed=0,
            failed=0,
            input_tokens=0,
            output_tokens=0,
            created_at=now,
            expires_at=now + length,
            in_progress_at=None,
            finalizing_at=None,
            completed_at=None,
            failed_at=None,
            expired_at=None,
            cancelling_at=None,
            cancelled_at=None,
        )
        await asyncio.to_thread(self.repository.add_batch, batch)
        self.runner.wake()
        return batch

    async def batch(self, key_id: int, batch_id: str) -> BatchView:
        view = await asyncio.to_thread(self.repository.batch, batch_id, key_id)
        if view is None:
            raise not_found("Batch", batch_id)
        return view

    async def list_batches(self, key_id: int, limit: int, after: str | None) -> list[BatchView]:
        return await asyncio.to_thread(self.repository.batches, key_id, limit, after)

    async def cancel(self, key_id: int, batch_id: str) -> BatchView:
        view = await self.batch(key_id, batch_id)
        if view.status in ENDED and view.status is not Status.CANCELLED:
            raise errors.ServiceError(
                409, "Conflict", f"Batch {batch_id} is {view.status.value}: only a running batch can be cancelled."
            )
        cancelled = await asyncio.to_thread(self.repository.cancel, batch_id, key_id)
        self.runner.wake()
        return cancelled or view


def _check_metadata(metadata: dict[str, Any] | None) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA:
        raise errors.invalid_parameter(
            f"Invalid value for 'metadata': an object of at most {MAX_METADATA} string pairs."
        )
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > 64 or len(value) > 512:
            raise errors.invalid_parameter(
                f"Invalid value for 'metadata': {json.dumps(key)}: keys are up to 64 characters, "
                "values strings up to 512."
            )
