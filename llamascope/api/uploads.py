"""The SDK's local-file upload flow over HTTP (wire spec section 4).

``GET /api/v1/uploads?action=getPolicy&model=...`` (with an API key) hands out
a signed policy whose ``upload_host`` is this server; the SDK then POSTs the
file there as multipart form data, without a key, and answers must be a bare
HTTP 200. The policy alone authorises that POST.
"""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse, Response

from llamascope import errors
from llamascope.api.errors import request_id_of
from llamascope.conversation.service import ConversationService
from llamascope.images.uploads import UploadStore

POLICY_PATH = "/api/v1/uploads"
OBJECTS_PATH = "/api/v1/uploads/oss"

router = APIRouter()


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
