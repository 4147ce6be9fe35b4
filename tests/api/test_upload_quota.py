"""A key keeps a bounded number of uploads and bytes (``UPLOAD_FILES_PER_KEY``, ``UPLOAD_STORAGE_PER_KEY_BYTES``):
before, only the disk reserve bounded them, so one key's uploads could fill the disk every key shares. Past
either bound the key gets no upload policy, and an upload under a policy it got earlier is refused before its
file is read: 429 Throttling.AllocationQuota naming the setting, nothing of it kept; another key is not affected."""

from __future__ import annotations

import json
import os
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


# Loaded by the server's interpreter at start (a sitecustomize on its PYTHONPATH): Python's audit hook notes, for each
# listing of a key's uploads folder ("key-..."), whether the event loop's thread (uvicorn runs it on the main
# thread) or another made it.
_WHERE_LISTED = """
import os, sys, threading
def _note(event, args):
    if event == "os.scandir" and args and "/key-" in os.fsdecode(args[0] or ""):
        loop = threading.current_thread() is threading.main_thread()
        with open(os.environ["UPLOAD_LISTINGS"], "a") as f:
            f.write("loop\\n" if loop else "thread\\n")
sys.addaudithook(_note)
"""


def test_a_keys_uploads_are_counted_off_the_event_loop(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The quota's count of a key's uploads (a listing of its folder and a stat of each: milliseconds per thousand
    on a local disk, more on a shared one) ran on the event loop as an upload's file began, holding every other
    request meanwhile. Each listing is made off it: at getPolicy, as the file begins and once it is kept."""
    tmp = tmp_path_factory.mktemp("upload-listings")
    (tmp / "hook").mkdir()
    (tmp / "hook" / "sitecustomize.py").write_text(_WHERE_LISTED)
    listings = tmp / "listings"
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(tmp / "hook")) if p)
    server = start_server(tmp, env={"PYTHONPATH": path, "UPLOAD_LISTINGS": str(listings)})
    try:
        for name in ("a.png", "b.png"):
            data = policy_for(server)
            assert upload(data, data["upload_dir"] + "/" + name, png_bytes((9, 9, 9), (32, 32))).status_code == 200
    finally:
        server.stop()
    where = listings.read_text().split()
    assert "loop" not in where, where
    assert where.count("thread") >= 6, where  # the hook saw them: at each getPolicy, file begun and file kept
