"""The wire shapes of the Files and Batch APIs, as OpenAI's (the ``openai`` SDK reads them unchanged)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from llamascope.batch.records import BatchView, FileView


def _seconds(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: Literal["processed"] = "processed"

    @classmethod
    def of(cls, file: FileView) -> FileObject:
        return cls(
            id=file.id,
            bytes=file.bytes,
            created_at=int(file.created_at.timestamp()),
            filename=file.filename,
            purpose=file.purpose,  # type: ignore[arg-type]
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: Literal[True] = True


class FileForm(BaseModel):
    """``client.files.create(file=..., purpose="batch")``: multipart form data."""

    file: bytes = Field(
        description="JSONL, one request a line (at most 50,000 lines, 6 MB a line, 500 MB in all)",
        json_schema_extra={"format": "binary", "contentMediaType": "application/octet-stream"},
    )
    purpose: Literal["batch"]


class FileQuery(BaseModel):
    purpose: str | None = Field(None, description="only files of this purpose (batch, batch_output)")
    limit: int = Field(100, ge=1, le=10000)
    after: str | None = Field(None, description="a file id: the files older than it")


class BatchQuery(BaseModel):
    limit: int = Field(20, ge=1, le=100)
    after: str | None = Field(None, description="a batch id: the batches older than it")


class CreateBatch(BaseModel):
    input_file_id: str = Field(description="a file uploaded with purpose batch")
    endpoint: Literal[
        "/v1/chat/completions",
        "/api/v1/services/aigc/multimodal-generation/generation",
        "/api/v1/services/aigc/text-generation/generation",
    ] = Field(description="each line's url; the native paths take DashScope bodies (llamascope's own)")
    completion_window: str = Field(description="24h to 336h, in hours (24h) or days (7d)", examples=["24h"])
    metadata: dict[str, str] | None = Field(None, description="up to 16 pairs, kept with the batch")


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class TokenDetails(BaseModel):
    cached_tokens: int = 0


class OutputDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    input_tokens: int
    input_tokens_details: TokenDetails = TokenDetails()
    output_tokens: int
    output_tokens_details: OutputDetails = OutputDetails()
    total_tokens: int


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
    ]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    usage: BatchUsage
    metadata: dict[str, str] | None

    @classmethod
    def of(cls, batch: BatchView) -> BatchObject:
        moments: dict[str, Any] = {
            name: _seconds(getattr(batch, name))
            for name in (
                "in_progress_at",
                "expires_at",
                "finalizing_at",
                "completed_at",
                "failed_at",
                "expired_at",
                "cancelling_at",
                "cancelled_at",
            )
        }
        return cls(
            id=batch.id,
            endpoint=batch.endpoint,
            model=batch.model,
            errors=BatchErrors(data=[BatchError(**e) for e in batch.errors]) if batch.errors else None,
            input_file_id=batch.input_file_id,
            completion_window=batch.completion_window,
            status=batch.status.value,
            output_file_id=batch.output_file_id,
            error_file_id=batch.error_file_id,
            created_at=int(batch.created_at.timestamp()),
            request_counts=RequestCounts(total=batch.total, completed=batch.completed, failed=batch.failed),
            usage=BatchUsage(
                input_tokens=batch.input_tokens,
                output_tokens=batch.output_tokens,
                total_tokens=batch.input_tokens + batch.output_tokens,
            ),
            metadata=batch.metadata,
            **moments,
        )


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
