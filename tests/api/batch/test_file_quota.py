"""A key keeps a bounded number of files and bytes in the Files API (Model Studio's 10,000 files and 100 GB an
account): one key's uploads must not take what the server keeps for every other key. Past either bound an
upload is refused saying how much the key keeps, and nothing of it is kept; another key is not affected."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path

import openai
import pytest

from tests.conftest import OTHER_KEY, SEED_MODEL, Server, form_refused_unread, free_port, start_server


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A gateway (its upstream never answers: nothing here reaches it) keeping 2 files and 100 bytes a key."""
    server = start_server(
        tmp_path_factory.mktemp("file-quota"),
        ["--model", f"{SEED_MODEL}=openai+http://127.0.0.1:{free_port()}/v1"],
        {"LLAMASCOPE_BATCH_FILES_PER_KEY": "2", "LLAMASCOPE_BATCH_STORAGE_PER_KEY_BYTES": "100"},
    )
    yield server
    server.stop()


def _client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=server.base + "/compatible-mode/v1", max_retries=0)


def _upload(client: openai.OpenAI, size: int) -> str:
    line = b'{"custom_id": "a"}'
    return client.files.create(file=("lines.jsonl", io.BytesIO(line.ljust(size - 1) + b"\n")), purpose="batch").id


def _stored(server: Server) -> int:
    return sum(1 for p in (Path(server.log_path).parent / "data" / "batch-files").glob("*") if p.is_file())


def _refused(client: openai.OpenAI, size: int) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        _upload(client, size)
    assert caught.value.status_code == HTTPStatus.BAD_REQUEST and caught.value.request_id
    assert caught.value.code == "file_quota_exceeded"
    return caught.value


def test_a_key_keeps_its_bound_of_bytes_and_files(bounded: Server) -> None:
    client = _client(bounded, bounded.key)
    first = _upload(client, 60)
    refused = _refused(client, 60)  # 120 bytes in all: over 100
    assert "60 bytes and this one 60 more, of the 100" in refused.message
    assert [f.id for f in client.files.list()] == [first] and _stored(bounded) == 1  # nothing of it kept

    second = _upload(client, 40)  # 100 in all: at the bound, taken
    assert "keeps 2 files, the most it may keep is 2" in _refused(client, 1).message

    other = _client(bounded, OTHER_KEY)  # another key keeps its own files
    other.files.delete(_upload(other, 90))

    client.files.delete(first)  # room again
    client.files.delete(_upload(client, 60))
    client.files.delete(second)
    assert _stored(bounded) == 0


def test_a_key_at_its_bound_is_refused_before_the_body_is_read(bounded: Server) -> None:
    """The refusal comes while the client has sent only the headers of a 400 MB form: nothing of it was read."""
    client = _client(bounded, bounded.key)
    kept = [_upload(client, 10), _upload(client, 10)]
    status, body = form_refused_unread(bounded)
    assert status.startswith(b"HTTP/1.1 400"), status
    assert body["error"]["code"] == "file_quota_exceeded"
    for file_id in kept:
        client.files.delete(file_id)


def test_a_key_at_its_bound_starts_no_batch(bounded: Server) -> None:
    """A batch's results are files of its key, always written: a key at its bound started batch after batch on
    one input it kept, each writing results past the bound, none refused. Refused now, before anything runs."""
    client = _client(bounded, bounded.key)
    kept = [_upload(client, 10), _upload(client, 10)]  # 2 files: at the bound
    with pytest.raises(openai.APIStatusError) as caught:
        client.batches.create(input_file_id=kept[0], endpoint="/v1/chat/completions", completion_window="24h")
    assert caught.value.status_code == HTTPStatus.BAD_REQUEST and caught.value.code == "file_quota_exceeded"
    assert "before starting another batch" in caught.value.message
    assert client.batches.list().data == []
    for file_id in kept:
        client.files.delete(file_id)


def test_an_input_deleted_while_its_batch_runs_counts_until_the_batch_ends(tmp_path: Path) -> None:
    """A batch under way keeps its input's bytes though the key deletes it (they go when it ends): uncounted, a
    key uploaded, started a batch, deleted its input, and again, past any bound, the disk every key shares."""
    server = start_server(  # its engine cannot be reached: a batch's lines wait (503), the batch stays under way
        tmp_path,
        ["--model", f"{SEED_MODEL}=openai+http://127.0.0.1:{free_port()}/v1"],
        {"LLAMASCOPE_BATCH_FILES_PER_KEY": "0", "LLAMASCOPE_BATCH_STORAGE_PER_KEY_BYTES": "1000"},
    )
    try:
        client = _client(server, server.key)
        body = {"model": SEED_MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
        line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body})
        file = client.files.create(file=("in.jsonl", (line.ljust(599) + "\n").encode()), purpose="batch")
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
        client.files.delete(file.id)
        assert client.batches.retrieve(batch.id).status not in ("completed", "failed", "expired", "cancelled")
        refused = _refused(client, 600)  # its 600 bytes still on the disk, and 600 more: over 1000
        assert "take 600 bytes and this one 600 more" in refused.message
        client.batches.cancel(batch.id)
        deadline = time.monotonic() + 60
        while client.batches.retrieve(batch.id).status != "cancelled" and time.monotonic() < deadline:
            time.sleep(0.2)
        client.files.delete(_upload(client, 600))  # its bytes gone with it: room again
    finally:
        server.stop()
