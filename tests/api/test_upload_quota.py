"""A key keeps a bounded number of uploads and bytes (``UPLOAD_FILES_PER_KEY``, ``UPLOAD_STORAGE_PER_KEY_BYTES``):
before, only the disk reserve bounded them, so one key's uploads could fill the disk every key shares. Past
either bound the key gets no upload policy, and an upload under a policy it got earlier is refused before its
file is read: 429 Throttling.AllocationQuota naming the setting, nothing of it kept; another key is not affected."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path

import pytest

from tests.api.upload_flow import answer_to_a_body_begun, policy_for, upload
from tests.conftest import OTHER_KEY, SEED_MODEL, Server, png_bytes, start_server


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory, test_model_dir: Path) -> Iterator[Server]:
    """The built-in model, each key keeping 2 uploads and 100 kB."""
    server = start_server(
        tmp_path_factory.mktemp("upload-quota"),
        env={"LLAMASCOPE_UPLOAD_FILES_PER_KEY": "2", "LLAMASCOPE_UPLOAD_STORAGE_PER_KEY_BYTES": "100000"},
    )
    yield server
    server.stop()


def _objects(server: Server) -> int:
    """The objects stored, less their records and the temporary and policy-place files (``.part-``, ``.place-``)."""
    files = (Path(server.log_path).parent / "data" / "uploads").rglob("*")
    return sum(1 for p in files if p.is_file() and not p.name.endswith(".json") and not p.name.startswith("."))


def test_a_key_at_its_bound_of_uploads_is_refused_before_the_file(
    bounded: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dashscope
    from dashscope import MultiModalConversation
    from dashscope.common.error import UploadFileException

    monkeypatch.setattr(dashscope, "base_http_api_url", bounded.api)
    earlier = policy_for(bounded)  # while the key keeps nothing
    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        images[-1].write_bytes(png_bytes((i, 80, 160), (48, 48)))
    content = [{"image": str(images[0])}, {"image": str(images[1])}, {"text": "Same?"}]
    answer = MultiModalConversation.call(
        model=SEED_MODEL, messages=[{"role": "user", "content": content}], api_key=bounded.key, max_tokens=2
    )
    assert answer.status_code == HTTPStatus.OK, answer
    assert _objects(bounded) == 2

    # The SDK's next upload: refused at getPolicy, which the SDK raises with the code and message.
    messages = [{"role": "user", "content": [{"image": str(images[2])}, {"text": "?"}]}]
    with pytest.raises(UploadFileException) as raised:
        MultiModalConversation.call(model=SEED_MODEL, messages=messages, api_key=bounded.key, max_tokens=2)
    said = str(raised.value)
    assert "Get upload certificate failed, code: Throttling.AllocationQuota" in said
    assert "UPLOAD_FILES_PER_KEY" in said and "this key keeps 2 files, the most it may keep is 2" in said

    # A policy handed out before: its upload is refused as its file begins (20 MB declared, 4 KB of it sent).
    fields = {"policy": earlier["policy"], "Signature": earlier["signature"], "key": earlier["upload_dir"] + "/x.png"}
    answer_begun = answer_to_a_body_begun(bounded, fields, b"\0" * 4096)
    body = json.loads(answer_begun.read())
    assert answer_begun.status == 429 and body["code"] == "Throttling.AllocationQuota" and body["request_id"]
    assert answer_begun.getheader("x-should-retry") == "false"  # the SDK would ask twice more for nothing
    assert _objects(bounded) == 2

    # Another key is not affected; past its bytes, an upload is refused once its size is known, and not kept.
    other = policy_for(bounded, OTHER_KEY)
    assert upload(other, other["upload_dir"] + "/a.png", png_bytes((1, 2, 3), (48, 48))).status_code == 200
    big = upload(other, other["upload_dir"] + "/b.png", b"\0" * 100_000)
    assert big.status_code == 429 and big.json()["code"] == "Throttling.AllocationQuota"
    assert "UPLOAD_STORAGE_PER_KEY_BYTES" in big.json()["message"] and "this one 100000 more" in big.json()["message"]
    assert _objects(bounded) == 3
