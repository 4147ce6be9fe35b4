"""The SDK's local-file upload flow over HTTP (wire spec section 4).

``GET /api/v1/uploads?action=getPolicy&model=...`` (with an API key) hands out
a signed policy whose ``upload_host`` is this server; the SDK then POSTs the
file there as multipart form data, without a key, and answers must be a bare
HTTP 200. The policy alone authorises that POST.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import anyio
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from llamascope import errors
from llamascope.api import openapi
from llamascope.api.errors import request_id_of
from llamascope.conversation.service import ConversationService, Endpoint
from llamascope.disk import NO_KEY_QUOTA
from llamascope.images.uploads import Claims, Incoming, UploadStore, too_large

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

POLICY_PATH = "/api/v1/uploads"
OBJECTS_PATH = "/api/v1/uploads/oss"

router = APIRouter()


class PolicyQuery(BaseModel):
    action: Literal["getPolicy"]
    model: str = Field(description="A served model name.")


class Policy(BaseModel):
    """What the SDK reads of a policy (wire spec 4.2); it POSTs the file to upload_host with these fields."""

    policy: str
    signature: str
    upload_dir: str
    upload_host: str
    expire_in_seconds: int
    max_file_size_mb: int
    capacity_limit_mb: int
    oss_access_key_id: str
    x_oss_object_acl: str
    x_oss_forbid_overwrite: str


class PolicyAnswer(BaseModel):
    request_id: str
    data: Policy


class UploadForm(BaseModel):
    """The SDK's multipart fields (others, such as OSSAccessKeyId and success_action_status, are ignored)."""

    policy: str
    Signature: str
    key: str = Field(description="upload_dir/file name")
    file: bytes = Field(json_schema_extra={"format": "binary", "contentMediaType": "application/octet-stream"})


def upload_host(request: Request) -> str:
    base = request.app.state.public_base_url
    if not base:
        scheme = request.headers.get("x-forwarded-proto") or request.url.scheme
        host = request.headers.get("x-forwarded-host") or request.headers.get("host") or request.url.netloc
        base = f"{scheme}://{host}"
    return base.rstrip("/") + OBJECTS_PATH


@router.get(POLICY_PATH)
async def get_policy(request: Request) -> JSONResponse:
    service: ConversationService = request.app.state.service
    store: UploadStore = request.app.state.uploads
    if request.query_params.get("action") != "getPolicy":
        raise errors.invalid_parameter("action must be getPolicy.")
    model = request.query_params.get("model")
    if not model:
        raise errors.ServiceError(400, "BadRequest.EmptyModel", 'Required parameter "model" missing from request.')
    service.engine(model)  # an unknown model gets "Model not exist." like the generation call
    files = service.image_rules(model, Endpoint.MULTIMODAL).most  # the most a call may carry
    if not files:  # the SDK asks for a policy only to upload a call's images
        raise errors.invalid_parameter(f"{model} takes no images: there is nothing to upload for it.")
    owner = request.state.principal.key_id
    if store.quota != NO_KEY_QUOTA:  # a key at its bound gets no policy to upload with
        await anyio.to_thread.run_sync(store.check_quota, owner)
    data = store.issue_policy(owner, str(model), files=files)
    data["upload_host"] = upload_host(request)
    return JSONResponse({"request_id": request_id_of(request), "data": data})


@router.post(OBJECTS_PATH)
async def put_object(request: Request) -> Response:
    store: UploadStore = request.app.state.uploads
    form = PostObjectForm(store, _boundary(request.headers.get("content-type", "")))
    try:
        try:
            async for chunk in request.stream():
                # Until the file has begun, parsed in a thread: its start takes the upload in (``receive``: the
                # key's quota is a listing of its uploads and their sizes, milliseconds per thousand on a local
                # disk and more on a shared one, which held every other request meanwhile). Then on the loop.
                whole = (
                    form.feed(chunk) if form.incoming is not None else await anyio.to_thread.run_sync(form.feed, chunk)
                )
                if len(form.pending) >= SPILL or (whole and form.pending):
                    await anyio.to_thread.run_sync(form.spill)  # the file goes to disk as it comes
                if whole:
                    break  # the file is in: what follows it is not read
            else:
                form.finish()
        except (ClientDisconnect, MultipartParseError):
            raise errors.invalid_parameter(_NOT_A_FORM) from None
        assert form.incoming is not None
        await anyio.to_thread.run_sync(store.keep, form.incoming)
    finally:
        if form.incoming is not None:  # refused, cut short, or its client gone: nothing of it stays
            form.incoming.discard()
    return Response(status_code=200)


_NOT_A_FORM = "The upload must be multipart/form-data with one file."
# What is parsed of a form before its policy, signature and key have passed: the SDK's fields take about 1.5 KB
# (a policy, its signature, a key of at most 1 KiB and five short ones). Nothing without a valid policy makes
# the server read more (a form used to be parsed whole, 32 MB of it, before anything was checked).
FORM_BEFORE_FILE = 16 * 1024
# What of the file is held in memory before it is written to disk (the body comes in pieces of about 64 KiB).
SPILL = 1024 * 1024
_MAX_PARTS = 16


def _boundary(content_type: str) -> bytes:
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise errors.invalid_parameter(_NOT_A_FORM)
    return boundary


class PostObjectForm:
    """The SDK's multipart POST, read as it arrives and checked field by field.

    The policy and its signature are checked as soon as both are in and the key as soon as it is (the SDK,
    like OSS's PostObject, sends them before the file, which comes last); the first one that fails ends the
    request. The file is read only after all three passed and the policy had a place left for it (its files,
    ``UploadStore.receive``), and only up to the policy's size cap; it goes to
    the store's ``Incoming`` file as it comes (``pending``, then ``spill``), never whole in memory. Before
    that, at most ``FORM_BEFORE_FILE`` bytes are parsed."""

    def __init__(self, store: UploadStore, boundary: bytes) -> None:
        self.store = store
        self.fields: dict[str, bytearray] = {}
        self.claims: Claims | None = None
        self.key: str | None = None
        self.incoming: Incoming | None = None  # from the file's part on
        self.pending = bytearray()  # of the file, parsed and not yet written (``spill``)
        self.read_before_file = 0
        self._parts = 0
        self._header, self._value_bytes, self._disposition = bytearray(), bytearray(), b""
        self._value: bytearray | None = None  # the field being read (None in the file: it goes to ``pending``)
        self._name = ""
        self._file_ended = False
        callbacks: MultipartCallbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }
        self._parser = MultipartParser(boundary, callbacks)

    def feed(self, chunk: bytes) -> bool:
        """Parse what arrived; True once the file is whole. Raises the first refusal."""
        while chunk and not self._file_ended:
            if self.incoming is None:  # before the file: parsed only within the budget
                room = FORM_BEFORE_FILE - self.read_before_file
                if room <= 0:
                    raise errors.invalid_parameter(
                        f"The upload's form before its file exceeds {FORM_BEFORE_FILE} bytes: send the fields "
                        "policy, Signature and key, then the file."
                    )
                piece, chunk = chunk[:room], chunk[room:]
                self.read_before_file += len(piece)
            else:
                piece, chunk = chunk, b""
            self._parser.write(piece)
        return self._file_ended

    def finish(self) -> None:
        """The body ended: refuse a form without its file (or cut short in it)."""
        self._parser.finalize()
        if self.incoming is None:
            raise errors.invalid_parameter("The upload needs the fields policy, Signature, key and file.")
        if not self._file_ended:
            raise errors.invalid_parameter(_NOT_A_FORM)

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > _MAX_PARTS:
            raise errors.invalid_parameter(f"The upload's form has more than {_MAX_PARTS} parts.")
        self._disposition = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value_bytes += data[start:end]

    def _header_end(self) -> None:
        if self._header.lower() == b"content-disposition":
            self._disposition = bytes(self._value_bytes)
        self._header, self._value_bytes = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._name = _text(options.get(b"name", b""))
        if self._name != "file":
            self._value = self.fields[self._name] = bytearray()
            return
        if self.claims is None or self.key is None:
            raise errors.invalid_parameter(
                "The upload needs the fields policy, Signature and key before its file (the file comes last)."
            )
        self.incoming = self.store.receive(self.claims, self.key)
        self._value = None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._value is not None:
            self._value += data[start:end]
            return
        assert self.incoming is not None
        self.pending += data[start:end]
        if self.incoming.size + len(self.pending) > self.incoming.claims.max:  # refused before it is written
            raise too_large(self.incoming.claims.max)

    def spill(self) -> None:
        """Write what is pending of the file to its ``Incoming`` file (blocking: called in a thread)."""
        assert self.incoming is not None
        pending, self.pending = self.pending, bytearray()
        self.incoming.write(pending)

    def _part_end(self) -> None:
        if self._value is None:  # the file's part
            self._file_ended = True
            return
        policy, signature = self.fields.get("policy"), self.fields.get("Signature")
        if self.claims is None and policy and signature:
            self.claims = self.store.check_policy(_text(policy), _text(signature))
        key = self.fields.get("key")
        if self.claims is not None and self.key is None and key:
            self.store.check_key(self.claims, _text(key))
            self.key = _text(key)


def _text(value: bytes | bytearray) -> str:
    """A form value as Starlette reads one: UTF-8, else Latin-1 (every byte a character)."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1")


OPERATIONS = (
    openapi.operation(
        "GET",
        POLICY_PATH,
        "An upload policy (the SDK's first step with a local file)",
        tag="uploads",
        query=PolicyQuery,
        ok=PolicyAnswer,
        refusals=(400, 429),
    ),
    openapi.operation(
        "POST",
        OBJECTS_PATH,
        "Upload a file under a policy (no key: the policy authorises it)",
        tag="uploads",
        auth=None,
        form=UploadForm,
        refusals=(403, 409, 429, 507),
        description="Answers a bare 200 with an empty body; the image is then oss://<key>.",
    ),
)
