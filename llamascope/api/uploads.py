"""The SDK's local-file upload flow over HTTP (wire spec section 4).

``GET /api/v1/uploads?action=getPolicy&model=...`` (with an API key) hands out
a signed policy whose ``upload_host`` is this server; the SDK then POSTs the
file there as multipart form data, without a key, and answers must be a bare
HTTP 200. The policy alone authorises that POST.
"""

from __future__ import annotations

from typing import Literal

import anyio
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse, Response

from llamascope import errors
from llamascope.api import openapi
from llamascope.api.errors import request_id_of
from llamascope.conversation.service import ConversationService
from llamascope.images.uploads import UploadStore

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
    data = store.issue_policy(request.state.principal.key_id, str(model))
    data["upload_host"] = upload_host(request)
    return JSONResponse({"request_id": request_id_of(request), "data": data})


@router.post(OBJECTS_PATH)
async def put_object(request: Request) -> Response:
    store: UploadStore = request.app.state.uploads
    try:
        form = await request.form(max_files=1, max_fields=16)
    except Exception:  # python-multipart's errors, and limits exceeded
        raise errors.invalid_parameter("The upload must be multipart/form-data with one file.") from None
    fields = {name: form.get(name) for name in ("policy", "Signature", "key")}
    file = form.get("file")
    if not all(isinstance(v, str) and v for v in fields.values()) or not isinstance(file, UploadFile):
        raise errors.invalid_parameter("The upload needs the fields policy, Signature, key and file.")
    claims = store.verify(str(fields["policy"]), str(fields["Signature"]), str(fields["key"]))
    await anyio.to_thread.run_sync(store.save, claims, str(fields["key"]), file.file)
    await form.close()
    return Response(status_code=200)


OPERATIONS = (
    openapi.operation(
        "GET",
        POLICY_PATH,
        "An upload policy (the SDK's first step with a local file)",
        tag="uploads",
        query=PolicyQuery,
        ok=PolicyAnswer,
        refusals=(400,),
    ),
    openapi.operation(
        "POST",
        OBJECTS_PATH,
        "Upload a file under a policy (no key: the policy authorises it)",
        tag="uploads",
        auth=None,
        form=UploadForm,
        refusals=(403, 409),
        description="Answers a bare 200 with an empty body; the image is then oss://<key>.",
    ),
)
