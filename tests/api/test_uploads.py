"""The SDK's local-file flow against a real server: the official dashscope package uploads into llamascope."""

from __future__ import annotations

import http.client
import json
import re
import time
from http import HTTPStatus
from pathlib import Path

import httpx
import pytest

from llamascope.api.uploads import FORM_BEFORE_FILE
from tests.api.upload_flow import answer_to_a_body_begun, generate_with, policy_for, upload
from tests.conftest import OTHER_KEY, SEED_MODEL, TEXT_MODEL, Server, png_bytes


@pytest.fixture
def cat_png(tmp_path: Path) -> Path:
    path = tmp_path / "cat.png"
    path.write_bytes(png_bytes((250, 180, 20), (500, 400)))
    return path


@pytest.mark.parametrize("form", ["plain", "file-url"])
def test_sdk_uploads_local_files(dashscope_sdk, cat_png: Path, form: str) -> None:
    from dashscope import MultiModalConversation

    image = str(cat_png) if form == "plain" else f"file://{cat_png}"
    messages = [{"role": "user", "content": [{"image": image}, {"text": "What is this?"}]}]
    response = MultiModalConversation.call(model=SEED_MODEL, messages=messages, max_tokens=4, temperature=0)
    assert response.status_code == HTTPStatus.OK, response
    assert response.usage["image_tokens"] == 6404


def test_sdk_sends_one_file_twice(dashscope_sdk, cat_png: Path, tmp_path: Path) -> None:
    """The SDK uploads a call's files under one upload_dir by their names: one file named twice (a conversation
    that shows it again) is one object; two files of one name are refused, saying so."""
    from dashscope import MultiModalConversation
    from dashscope.common.error import UploadFileException

    content = [{"image": str(cat_png)}, {"image": str(cat_png)}, {"text": "Same?"}]
    r = MultiModalConversation.call(model=SEED_MODEL, messages=[{"role": "user", "content": content}], max_tokens=2)
    assert r.status_code == HTTPStatus.OK, r
    assert r.usage["image_tokens"] == 2 * 6404
    other = tmp_path / "elsewhere" / cat_png.name
    other.parent.mkdir()
    other.write_bytes(png_bytes((0, 0, 255), (500, 400)))
    content[1] = {"image": str(other)}
    with pytest.raises(UploadFileException, match="different names"):
        MultiModalConversation.call(model=SEED_MODEL, messages=[{"role": "user", "content": content}], max_tokens=2)


def test_sdk_call_over_the_image_limit_is_refused_naming_the_limit(dashscope_sdk, tmp_path: Path) -> None:
    """Five local files in a call to a model that takes four: the SDK's fifth upload was refused with "it
    allows at most 4 files (the images of one call)", nothing saying it was the model's image limit (the
    same call with URLs gets the 400 naming it); the refusal the SDK raises now names the model and its
    max_images."""
    from dashscope import MultiModalConversation
    from dashscope.common.error import UploadFileException

    content: list[dict[str, str]] = []
    for i in range(5):
        path = tmp_path / f"photo{i}.png"
        path.write_bytes(png_bytes((40 * i, 0, 0), (32, 32)))
        content.append({"image": str(path)})
    messages = [{"role": "user", "content": [*content, {"text": "Compare them."}]}]
    limit = f"{SEED_MODEL} takes at most 4 images per conversation (its max_images setting)"
    with pytest.raises(UploadFileException, match=re.escape(limit)):
        MultiModalConversation.call(model=SEED_MODEL, messages=messages, max_tokens=2)


def test_uploaded_image_answers_like_the_same_bytes_inline(dashscope_sdk, cat_png: Path) -> None:
    import base64

    from dashscope import MultiModalConversation

    def ask(image: str) -> str:
        messages = [{"role": "user", "content": [{"image": image}, {"text": "What?"}]}]
        r = MultiModalConversation.call(model=SEED_MODEL, messages=messages, max_tokens=8, temperature=0)
        assert r.status_code == HTTPStatus.OK, r
        return r.output.choices[0].message.content[0]["text"]

    inline = "data:image/png;base64," + base64.b64encode(cat_png.read_bytes()).decode()
    assert ask(str(cat_png)) == ask(inline)


def test_v2_client_uploads_too(server: Server, cat_png: Path) -> None:
    import dashscope

    client = dashscope.Client(api_key=server.key, base_url=server.api, max_retries=0)
    messages = [
        {"role": "user", "content": [{"type": "image", "url": f"file://{cat_png}"}, {"type": "text", "text": "?"}]}
    ]
    completion = client.multimodal.chat.create(model=SEED_MODEL, messages=messages, max_tokens=3)
    assert completion.output_text


def test_policy_shape(server: Server) -> None:
    data = policy_for(server)
    for field in (
        "policy",
        "signature",
        "upload_dir",
        "upload_host",
        "expire_in_seconds",
        "max_file_size_mb",
        "capacity_limit_mb",
        "oss_access_key_id",
        "x_oss_object_acl",
        "x_oss_forbid_overwrite",
    ):
        assert field in data
    assert data["upload_host"] == server.base + "/api/v1/uploads/oss"


def test_policy_needs_key_and_known_model(server: Server) -> None:
    r = httpx.get(server.api + "/uploads", params={"action": "getPolicy", "model": SEED_MODEL})
    assert (r.status_code, r.json()["code"]) == (401, "InvalidApiKey")
    r = httpx.get(
        server.api + "/uploads",
        params={"action": "getPolicy", "model": "nope"},
        headers={"Authorization": f"Bearer {server.key}"},
    )
    assert (r.status_code, r.json()["message"]) == (400, "Model not exist.")
    # No model named: said so, as a generation call says it (was "Model not exist.").
    r = httpx.get(
        server.api + "/uploads", params={"action": "getPolicy"}, headers={"Authorization": f"Bearer {server.key}"}
    )
    assert (r.status_code, r.json()["code"]) == (400, "BadRequest.EmptyModel") and '"model"' in r.json()["message"]


def test_objects_belong_to_the_key_that_uploaded_them(server: Server) -> None:
    data = policy_for(server)
    key = data["upload_dir"] + "/cat.png"
    r = upload(data, key, png_bytes())
    assert (r.status_code, r.content) == (200, b"")
    assert generate_with(server, key, server.key).status_code == 200
    other = generate_with(server, key, OTHER_KEY)
    assert other.status_code == 400 and "belongs to another API key" in other.json()["message"]
    no_header = generate_with(server, key, server.key, resolve=False)
    assert no_header.json()["code"] == "InvalidParameter.DataInspection"
    assert upload(data, key, png_bytes()).status_code == 200  # the same bytes again: the same object
    other = upload(data, key, png_bytes(color=(0, 0, 255)))  # x-oss-forbid-overwrite: never other bytes
    assert other.status_code == 409 and "different names" in other.text


@pytest.mark.parametrize(
    ("change", "status", "words"),
    [
        ({"Signature": "bm90IHRoZSBzaWduYXR1cmU="}, 403, "signature"),
        ({"key": "llamascope/someone-else/x.png"}, 403, "outside upload_dir"),
        ({"key": "{dir}/../../../etc/x.png"}, 403, "outside upload_dir"),
    ],
)
def test_refused_uploads(server: Server, change: dict, status: int, words: str) -> None:
    data = policy_for(server)
    key = data["upload_dir"] + "/cat.png"
    change = {k: v.format(dir=data["upload_dir"]) for k, v in change.items()}
    r = upload(data, change.pop("key", key), png_bytes(), **change)
    assert r.status_code == status and words in r.json()["message"]


def test_oversized_upload(server: Server) -> None:
    data = policy_for(server)
    r = upload(data, data["upload_dir"] + "/big.png", b"\0" * (10 * 1024 * 1024 + 1))
    assert r.status_code == 400 and r.json()["code"] == "EntityTooLarge"


def test_sdk_reports_a_refused_upload(server: Server, cat_png: Path) -> None:
    """getPolicy failures reach the SDK user as its UploadFileException with our code and message."""
    import dashscope
    from dashscope import MultiModalConversation
    from dashscope.common.error import UploadFileException

    old = dashscope.base_http_api_url
    dashscope.base_http_api_url = server.api
    try:
        messages = [{"role": "user", "content": [{"image": str(cat_png)}, {"text": "?"}]}]
        with pytest.raises(UploadFileException, match="InvalidApiKey"):
            MultiModalConversation.call(model=SEED_MODEL, messages=messages, api_key="sk-wrong")
    finally:
        dashscope.base_http_api_url = old


def test_upload_garbage_is_a_clean_400(server: Server) -> None:
    r = httpx.post(
        server.base + "/api/v1/uploads/oss", content=b"not multipart", headers={"Content-Type": "text/plain"}
    )
    assert r.status_code == 400 and json.loads(r.text)["code"] == "InvalidParameter"


def test_a_bad_signature_is_refused_before_the_file_is_read(server: Server) -> None:
    """An upload is authorised by its policy alone, without a key: the policy is checked as its fields arrive,
    so a caller without one cannot make the server read (and parse) a whole body (it read 32 MB first)."""
    data = policy_for(server)
    fields = {"OSSAccessKeyId": "x", "Signature": "bm90IHRoZSBzaWduYXR1cmU=", "policy": data["policy"]}
    r = answer_to_a_body_begun(server, {**fields, "key": data["upload_dir"] + "/big.png"}, b"\0" * 4096)
    assert r.status == 403 and "signature" in json.loads(r.read())["message"]


def test_fields_before_the_file_are_bounded(server: Server) -> None:
    """What comes before the policy is checked is bounded too: a long field is refused once past the bound."""
    r = answer_to_a_body_begun(server, {"OSSAccessKeyId": "x" * (FORM_BEFORE_FILE + 1)})
    assert r.status == 400 and "before its file" in json.loads(r.read())["message"]


def test_a_file_goes_to_disk_as_it_comes_and_nothing_stays_of_one_refused(server: Server) -> None:
    """An upload's file was held in memory twice while saved (20 MiB of peak memory for a 10 MiB file); it is
    written to a temporary file as it arrives (bench/upload_memory.py). Whatever ends it early (past its cap,
    a second file of the same name, a client that hangs up mid-file), no temporary file stays."""
    store = server.log_path.parent / "data" / "uploads"
    data = policy_for(server)
    content = png_bytes((1, 2, 3), (900, 700))
    assert upload(data, data["upload_dir"] + "/a.png", content).status_code == 200
    assert content in [p.read_bytes() for p in store.glob("key-*/*") if not p.name.endswith(".json")]
    assert upload(data, data["upload_dir"] + "/a.png", content).status_code == 200  # the same bytes again
    assert upload(data, data["upload_dir"] + "/a.png", content + b"!").status_code == 409
    assert upload(data, data["upload_dir"] + "/b.png", b"\0" * (10 * 1024 * 1024 + 1)).status_code == 400
    # A body declared 5 MB long, of which 2 MB of the file are sent before the client hangs up.
    fields = {"policy": data["policy"], "Signature": data["signature"], "key": data["upload_dir"] + "/c.png"}
    head = b"".join(
        f'--b\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    )
    head += b'--b\r\nContent-Disposition: form-data; name="file"; filename="c.png"\r\n\r\n'
    connection = http.client.HTTPConnection(server.base.removeprefix("http://"), timeout=30)
    connection.putrequest("POST", "/api/v1/uploads/oss")
    connection.putheader("Content-Type", "multipart/form-data; boundary=b")
    connection.putheader("Content-Length", str(5 * 1024 * 1024))
    connection.endheaders(head + b"\0" * (2 * 1024 * 1024))
    deadline = time.monotonic() + 10
    while not list(store.glob(".part-*")):  # the file is being written as it comes
        assert time.monotonic() < deadline, "the file was not written as it came"
        time.sleep(0.02)
    connection.close()
    deadline = time.monotonic() + 10
    while [p.name for p in store.glob(".part-*")]:
        assert time.monotonic() < deadline, [p.name for p in store.glob(".part-*")]
        time.sleep(0.05)


def test_one_policy_stores_no_more_files_than_a_call_has_images(server: Server) -> None:
    """A policy is the SDK's for one call: it stores as many files as the model takes images in a conversation
    (4 for the built-in model), not any number for its five minutes."""
    data = policy_for(server)
    assert data["capacity_limit_mb"] == 40
    statuses = [upload(data, f"{data['upload_dir']}/{i}.png", png_bytes((i, 0, 0))).status_code for i in range(5)]
    assert statuses == [200] * 4 + [403]
    assert upload(data, f"{data['upload_dir']}/0.png", png_bytes((0, 0, 0))).status_code == 200  # the same again


def test_a_policy_with_no_place_left_is_refused_before_the_file_is_read(server: Server) -> None:
    """The policy's file count was checked once the whole file (up to 10 MB) had arrived: it is checked as soon
    as the policy, its signature and the key have passed, before a byte of the file is read."""
    data = policy_for(server)
    for i in range(4):
        assert upload(data, f"{data['upload_dir']}/{i}.png", png_bytes((i, 9, 9))).status_code == 200
    fields = {"policy": data["policy"], "Signature": data["signature"], "key": data["upload_dir"] + "/big.png"}
    r = answer_to_a_body_begun(server, fields, b"\0" * 4096)
    assert r.status == 403 and "at most 4 files" in json.loads(r.read())["message"]


def test_a_text_only_model_gives_no_upload_policy(text_server: Server) -> None:
    """The SDK asks for a policy only to upload a call's images: for a model that takes none, the 400 says so (it
    gave a policy of one file, and a second file was refused as over "1 image per conversation")."""
    r = httpx.get(
        text_server.api + "/uploads",
        params={"action": "getPolicy", "model": TEXT_MODEL},
        headers={"Authorization": f"Bearer {text_server.key}"},
    )
    assert r.status_code == 400 and "takes no images" in r.json()["message"] and r.json()["request_id"], r.text
