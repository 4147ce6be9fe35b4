"""A disk short of the reserve refuses what callers store (the SDK's uploads, batch input files) before reading
it, saying why, and keeps nothing: one key's files must not fill the disk the account store and logs live on."""

from __future__ import annotations

import io
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path

import pytest

from llamascope.disk import DiskReserve
from tests.conftest import SEED_MODEL, Server, form_refused_unread, free_port, png_bytes, start_server


def test_the_reserve_and_the_file_must_both_fit(tmp_path: Path) -> None:
    assert not DiskReserve(0).full(tmp_path, 10 * 2**50)  # none kept: never full
    assert not DiskReserve(2**20).full(tmp_path, 2**20)  # this disk has at least 2 MiB free
    assert DiskReserve(2**60).full(tmp_path, 10 * 2**20)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A gateway (its upstream never answers: nothing here reaches it) whose disk is always short of its reserve."""
    tmp = tmp_path_factory.mktemp("disk-reserve")
    server = start_server(
        tmp,
        ["--model", f"{SEED_MODEL}=openai+http://127.0.0.1:{free_port()}/v1"],
        {"LLAMASCOPE_MIN_FREE_DISK_BYTES": str(2**60)},
    )
    yield server
    server.stop()


def _stored(server: Server) -> list[Path]:
    data = Path(server.log_path).parent / "data"
    return [p for d in ("uploads", "batch-files") for p in (data / d).glob("*") if p.name != "upload-secret"]


def test_an_upload_to_a_full_disk_is_refused_saying_why(
    full: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dashscope
    from dashscope import MultiModalConversation
    from dashscope.common.error import UploadFileException

    image = tmp_path / "cat.png"
    image.write_bytes(png_bytes((250, 180, 20), (64, 64)))
    monkeypatch.setattr(dashscope, "base_http_api_url", full.api)
    messages = [{"role": "user", "content": [{"image": str(image)}, {"text": "?"}]}]
    with pytest.raises(UploadFileException, match="disk is nearly full"):
        MultiModalConversation.call(model=SEED_MODEL, messages=messages, api_key=full.key)
    assert _stored(full) == []
    assert "lacks" in full.log() and "MIN_FREE_DISK_BYTES" in full.log()  # the operator is told by how much


def test_a_batch_file_to_a_full_disk_is_refused_saying_why(full: Server) -> None:
    import openai

    client = openai.OpenAI(api_key=full.key, base_url=full.base + "/compatible-mode/v1", max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=("lines.jsonl", io.BytesIO(b'{"custom_id": "a"}\n')), purpose="batch")
    assert caught.value.status_code == HTTPStatus.INSUFFICIENT_STORAGE
    assert "disk is nearly full" in caught.value.message and caught.value.request_id
    assert _stored(full) == []


def test_a_batch_file_is_refused_before_its_body_is_read(full: Server) -> None:
    """The refusal comes while the client has sent only the headers of a 400 MB form: nothing of it was read."""
    status, body = form_refused_unread(full)
    assert status.startswith(b"HTTP/1.1 507"), status
    assert body["error"]["code"] == "insufficient_storage"
