"""The HTTP shell of the Files and Batch APIs: parse, call ``llamascope.batch.service``, answer OpenAI's shapes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse, StreamingResponse

from llamascope import errors
from llamascope.api import openapi
from llamascope.api.batch.protocol import (
    BatchList,
    BatchObject,
    BatchQuery,
    CreateBatch,
    FileDeleted,
    FileForm,
    FileList,
    FileObject,
    FileQuery,
)
from llamascope.api.incoming import read_json
from llamascope.batch.service import BatchService

router = APIRouter()
PREFIXES = ("/compatible-mode/v1", "/v1")
FILES_PATHS = tuple(f"{prefix}/files" for prefix in PREFIXES)  # uploads: a larger body limit (api.app)


def _service(request: Request) -> BatchService:
    service: BatchService | None = request.app.state.batches
    if service is None:
        raise errors.ServiceError(404, "NotFound", "The Batch API is not served here.")
    return service


def _key(request: Request) -> int:
    return int(request.state.principal.key.id)


def _invalid(exc: ValidationError) -> errors.ServiceError:
    """The first problem, worded "Invalid value for 'field': ..." so that compatible mode's ``param`` names the
    field (api.errors reads it from the message)."""
    first = exc.errors()[0]
    where = [str(part) for part in first["loc"]]
    why = "it is required" if first["type"] == "missing" else first["msg"]
    if not where:  # the body as a whole (not an object)
        return errors.invalid_parameter(f"The body: {why}")
    inner = ".".join(where[1:])
    return errors.invalid_parameter(f"Invalid value for '{where[0]}': {inner + ': ' if inner else ''}{why}")


def _query(model: Any, request: Request) -> Any:
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        raise _invalid(exc) from None


# -- files ---------------------------------------------------------------------------------------------


async def upload_file(request: Request) -> JSONResponse:
    service = _service(request)
    await service.has_room(_key(request))  # before the form, which Starlette reads whole into a temporary file
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception:  # python-multipart's errors, and limits exceeded
        raise errors.invalid_parameter("The upload must be multipart/form-data with one file.") from None
    try:
        file, purpose = form.get("file"), form.get("purpose")
        if not isinstance(file, UploadFile) or not isinstance(purpose, str):
            missing = "purpose" if isinstance(file, UploadFile) else "file"
            raise errors.invalid_parameter(f"Invalid value for '{missing}': an upload has the fields file and purpose.")
        view = await service.upload(_key(request), file.filename or "", purpose, file.file)
    finally:
        await form.close()
    return JSONResponse(FileObject.of(view).model_dump())


async def list_files(request: Request) -> JSONResponse:
    query: FileQuery = _query(FileQuery, request)
    files = await _service(request).list_files(_key(request), query.purpose, query.limit + 1, query.after)
    data = [FileObject.of(f) for f in files[: query.limit]]
    page = FileList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=len(files) > query.limit,
    )
    return JSONResponse(page.model_dump())


async def retrieve_file(request: Request) -> JSONResponse:
    view = await _service(request).file(_key(request), request.path_params["file_id"])
    return JSONResponse(FileObject.of(view).model_dump())


async def file_content(request: Request) -> StreamingResponse:
    chunks = await _service(request).content(_key(request), request.path_params["file_id"])
    return StreamingResponse(chunks, media_type="application/octet-stream")


async def delete_file(request: Request) -> JSONResponse:
    view = await _service(request).delete_file(_key(request), request.path_params["file_id"])
    return JSONResponse(FileDeleted(id=view.id).model_dump())


# -- batches -------------------------------------------------------------------------------------------


async def create_batch(request: Request) -> JSONResponse:
    service = _service(request)
    try:
        body = CreateBatch.model_validate(await read_json(request))
    except ValidationError as exc:
        raise _invalid(exc) from None
    view = await service.create(_key(request), body.input_file_id, body.endpoint, body.completion_window, body.metadata)
    return JSONResponse(BatchObject.of(view).model_dump())


async def retrieve_batch(request: Request) -> JSONResponse:
    view = await _service(request).batch(_key(request), request.path_params["batch_id"])
    return JSONResponse(BatchObject.of(view).model_dump())


async def list_batches(request: Request) -> JSONResponse:
    query: BatchQuery = _query(BatchQuery, request)
    batches = await _service(request).list_batches(_key(request), query.limit + 1, query.after)
    data = [BatchObject.of(b) for b in batches[: query.limit]]
    page = BatchList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=len(batches) > query.limit,
    )
    return JSONResponse(page.model_dump())


async def cancel_batch(request: Request) -> JSONResponse:
    view = await _service(request).cancel(_key(request), request.path_params["batch_id"])
    return JSONResponse(BatchObject.of(view).model_dump())


for prefix in PREFIXES:
    router.add_route(f"{prefix}/files", upload_file, methods=["POST"])
    router.add_route(f"{prefix}/files", list_files, methods=["GET"])
    router.add_route(f"{prefix}/files/{{file_id}}", retrieve_file, methods=["GET"])
    router.add_route(f"{prefix}/files/{{file_id}}", delete_file, methods=["DELETE"])
    router.add_route(f"{prefix}/files/{{file_id}}/content", file_content, methods=["GET"])
    router.add_route(f"{prefix}/batches", create_batch, methods=["POST"])
    router.add_route(f"{prefix}/batches", list_batches, methods=["GET"])
    router.add_route(f"{prefix}/batches/{{batch_id}}", retrieve_batch, methods=["GET"])
    router.add_route(f"{prefix}/batches/{{batch_id}}/cancel", cancel_batch, methods=["POST"])


def _operations(prefix: str) -> tuple[openapi.Operation, ...]:
    def op(method: str, path: str, summary: str, **kwargs: Any) -> openapi.Operation:
        return openapi.operation(method, prefix + path, summary, tag="batch", **kwargs)

    return (
        op("POST", "/files", "Upload a batch's input file (JSONL)", form=FileForm, ok=FileObject, refusals=(507,)),
        op("GET", "/files", "The key's files, newest first", query=FileQuery, ok=FileList, refusals=(400,)),
        op("GET", "/files/{file_id}", "A file", ok=FileObject, refusals=(404,)),
        op("DELETE", "/files/{file_id}", "Delete a file", ok=FileDeleted, refusals=(404,)),
        op(
            "GET",
            "/files/{file_id}/content",
            "A file's bytes (an input, or a batch's output or errors: JSONL)",
            ok="application/octet-stream",
            refusals=(404,),
        ),
        op("POST", "/batches", "Make a batch from an uploaded file", body=CreateBatch, ok=BatchObject, refusals=(404,)),
        op("GET", "/batches", "The key's batches, newest first", query=BatchQuery, ok=BatchList, refusals=(400,)),
        op("GET", "/batches/{batch_id}", "A batch and its progress", ok=BatchObject, refusals=(404,)),
        op(
            "POST",
            "/batches/{batch_id}/cancel",
            "Cancel a batch: no new line starts, running ones stop; what finished is kept",
            ok=BatchObject,
            refusals=(404, 409),
        ),
    )


OPERATIONS = tuple(op for prefix in PREFIXES for op in _operations(prefix))
