"""The upload flow as a client drives it over HTTP: a policy, a form post to the upload host, then a
generation that names the ``oss://`` key."""

from __future__ import annotations

import http.client

import httpx

from tests.conftest import SEED_MODEL, Server

PATH = "/api/v1/services/aigc/multimodal-generation/generation"


def policy_for(server: Server, key: str | None = None) -> dict:
    r = httpx.get(
        server.api + "/uploads",
        params={"action": "getPolicy", "model": SEED_MODEL},
        headers={"Authorization": f"Bearer {key or server.key}"},
    )
    assert r.status_code == 200, r.text
    return r.json()["data"]


def upload(data: dict, key: str, content: bytes, **overrides: str) -> httpx.Response:
    fields = {
        "OSSAccessKeyId": data["oss_access_key_id"],
        "Signature": data["signature"],
        "policy": data["policy"],
        "key": key,
        "x-oss-object-acl": data["x_oss_object_acl"],
        "x-oss-forbid-overwrite": data["x_oss_forbid_overwrite"],
        "success_action_status": "200",
        **overrides,
    }
    return httpx.post(data["upload_host"], data=fields, files={"file": ("cat.png", content)})


def generate_with(server: Server, oss_key: str, api_key: str, resolve: bool = True) -> httpx.Response:
    body = {
        "model": SEED_MODEL,
        "input": {"messages": [{"role": "user", "content": [{"image": f"oss://{oss_key}"}, {"text": "?"}]}]},
        "parameters": {"max_tokens": 2},
    }
    headers = {"Authorization": f"Bearer {api_key}"}
    if resolve:
        headers["X-DashScope-OssResourceResolve"] = "enable"
    return httpx.post(server.base + PATH, json=body, headers=headers, timeout=60)


def answer_to_a_body_begun(server: Server, fields: dict[str, str], file_start: bytes = b"") -> http.client.HTTPResponse:
    """Send a form's ``fields`` and the start of its file, declared 20 MB long, and read the answer without
    sending the rest: the server must answer from what it has (else the read times out)."""
    boundary = "b0undary"
    head = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    )
    head += f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'.encode()
    head += file_start
    connection = http.client.HTTPConnection(server.base.removeprefix("http://"), timeout=30)
    connection.putrequest("POST", "/api/v1/uploads/oss")
    connection.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
    connection.putheader("Content-Length", str(20 * 1024 * 1024))
    connection.endheaders(head)
    return connection.getresponse()
