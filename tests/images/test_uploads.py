"""The upload store: policies, signatures, keys, sizes, owners, expiry."""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import os
import threading
import time
from pathlib import Path

import pytest

from llamascope import errors
from llamascope.disk import KeyQuota
from llamascope.images.uploads import Claims, UploadStore, load_or_create_secret

NOW = 1_800_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> UploadStore:
    return UploadStore(tmp_path / "objects", b"s" * 64, ttl_seconds=3600, policy_seconds=300, max_bytes=1000)


def verify(store: UploadStore, policy: str, signature: str, key: str, now: float | None = None) -> Claims:
    """The POST's checks in the order the form brings their fields: the policy, then the key."""
    claims = store.check_policy(policy, signature, now)
    store.check_key(claims, key)
    return claims


def save(store: UploadStore, claims: Claims, key: str, stream: io.BytesIO, now: float | None = None) -> int:
    """An upload as the POST stores it: received in pieces, kept whole, the temporary file discarded."""
    incoming = store.receive(claims, key)
    try:
        while chunk := stream.read(1024):
            incoming.write(chunk)
        return store.keep(incoming, now)
    finally:
        incoming.discard()


def stored(store: UploadStore) -> list[Path]:
    """The files under the store's directory, its owners' folders included."""
    return [p for p in store.root.rglob("*") if p.is_file()]


def refused(call, *args, **kwargs) -> errors.ServiceError:
    with pytest.raises(errors.ServiceError) as info:
        call(*args, **kwargs)
    return info.value


def test_round_trip(store: UploadStore) -> None:
    policy = store.issue_policy("owner-a", "m", now=NOW)
    key = policy["upload_dir"] + "/cat.png"
    claims = verify(store, policy["policy"], policy["signature"], key, now=NOW + 10)
    assert save(store, claims, key, io.BytesIO(b"image bytes"), now=NOW) == 11
    assert store.read(key, "owner-a", now=NOW + 100) == b"image bytes"


def test_tampered_policy_or_signature(store: UploadStore) -> None:
    policy = store.issue_policy("owner-a", "m", now=NOW)
    key = policy["upload_dir"] + "/cat.png"
    claims = json.loads(base64.b64decode(policy["policy"]))
    claims["max"] = 10**12
    forged = base64.b64encode(json.dumps(claims).encode()).decode()
    assert refused(verify, store, forged, policy["signature"], key, now=NOW).status == 403
    assert refused(verify, store, policy["policy"], "AAAA" + policy["signature"][4:], key, now=NOW).status == 403
    other = UploadStore(store.root, b"t" * 64)  # another server's secret
    assert refused(verify, other, policy["policy"], policy["signature"], key, now=NOW).status == 403


def test_expired_policy(store: UploadStore) -> None:
    policy = store.issue_policy("owner-a", "m", now=NOW)
    error = refused(verify, store, policy["policy"], policy["signature"], policy["upload_dir"] + "/x", now=NOW + 301)
    assert error.message == "Invalid according to Policy: Policy expired."


@pytest.mark.parametrize("suffix", ["", "/", "/../../etc/passwd", "/a/../../b", "-sibling/x.png"])
def test_keys_outside_the_upload_dir(store: UploadStore, suffix: str) -> None:
    policy = store.issue_policy("owner-a", "m", now=NOW)
    error = refused(verify, store, policy["policy"], policy["signature"], policy["upload_dir"] + suffix, now=NOW)
    assert error.status == 403 and "outside upload_dir" in error.message


def test_size_cap_and_no_overwrite(store: UploadStore) -> None:
    policy = store.issue_policy("owner-a", "m", now=NOW)
    key = policy["upload_dir"] + "/cat.png"
    claims = verify(store, policy["policy"], policy["signature"], key, now=NOW)
    assert refused(save, store, claims, key, io.BytesIO(b"x" * 1001)).code == "EntityTooLarge"
    save(store, claims, key, io.BytesIO(b"first"))
    assert refused(save, store, claims, key, io.BytesIO(b"second")).status == 409
    assert save(store, claims, key, io.BytesIO(b"first")) == 5  # the same file again (the SDK, one file named twice)
    assert store.read(key, "owner-a") == b"first"


def test_only_the_owner_reads_and_only_until_expiry(store: UploadStore) -> None:
    policy = store.issue_policy("owner-a", "m", now=NOW)
    key = policy["upload_dir"] + "/cat.png"
    save(store, verify(store, policy["policy"], policy["signature"], key, now=NOW), key, io.BytesIO(b"c"), now=NOW)
    foreign = refused(store.read, key, "owner-b", now=NOW)
    expired = refused(store.read, key, "owner-a", now=NOW + 3601)
    missing = refused(store.read, policy["upload_dir"] + "/dog.png", "owner-a", now=NOW)
    assert foreign.message == expired.message == missing.message  # no telling them apart
    assert store.purge_expired(now=NOW + 3601) == 1
    assert stored(store) == []


def test_objects_are_stored_under_hashes(store: UploadStore) -> None:
    policy = store.issue_policy("owner-a", "m", now=NOW)
    key = policy["upload_dir"] + "/we ird name;rm -rf.png"
    save(store, verify(store, policy["policy"], policy["signature"], key, now=NOW), key, io.BytesIO(b"c"))
    names = sorted(p.name for p in stored(store))
    assert len(names) == 2 and all(len(n.split(".")[0]) == 64 for n in names)
    assert [p.name for p in store.root.iterdir()] == ["key-" + hashlib.sha256(b"owner-a").hexdigest()[:32]]


def test_secret_is_kept(tmp_path: Path) -> None:
    first = load_or_create_secret(tmp_path / "secret")
    assert load_or_create_secret(tmp_path / "secret") == first and len(first) >= 32
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600


def test_a_policy_stores_at_most_its_files(store: UploadStore) -> None:
    """One policy let its holder store any number of files for its five minutes (each up to the cap): a disk
    filled from one getPolicy. It stores at most ``files`` objects; the same object again takes no place."""
    policy = store.issue_policy("owner-a", "m", now=NOW, files=2)
    assert policy["capacity_limit_mb"] == 1  # two files of 1000 bytes, as the policy says
    claims = verify(store, policy["policy"], policy["signature"], policy["upload_dir"] + "/a.png", now=NOW)
    for name in ("a.png", "a.png", "b.png"):
        save(store, claims, policy["upload_dir"] + "/" + name, io.BytesIO(b"bytes of " + name.encode()), now=NOW)
    third = refused(save, store, claims, policy["upload_dir"] + "/c.png", io.BytesIO(b"c"), now=NOW)
    assert (third.status, third.code) == (403, "AccessDenied") and "at most 2 files" in third.message
    assert not list(store.root.glob(".part-*"))
    store.purge_expired(now=time.time() + 3600)  # the policy long expired: its places go
    assert not list(store.root.glob(".place-*"))


def test_a_policys_places_are_checked_before_the_file_and_given_back_by_a_failed_keep(store: UploadStore) -> None:
    """The place was taken only once the whole file (10 MB) had arrived, and a place taken by an upload that then
    failed to be kept was lost: the policy stored fewer files than it said."""
    policy = store.issue_policy("owner-a", "m", now=NOW, files=1)
    key = policy["upload_dir"] + "/a.png"
    claims = verify(store, policy["policy"], policy["signature"], key, now=NOW)
    record = (
        store.root
        / f"key-{hashlib.sha256(b'owner-a').hexdigest()[:32]}/{hashlib.sha256(key.encode()).hexdigest()}.json"
    )
    record.mkdir(parents=True)  # a directory: its write fails
    with pytest.raises(OSError):
        save(store, claims, key, io.BytesIO(b"a"), now=NOW)
    record.rmdir()
    save(store, claims, key, io.BytesIO(b"a"), now=NOW)  # its place was given back
    second = refused(store.receive, claims, policy["upload_dir"] + "/b.png")  # before a byte of the file
    assert (second.status, second.code) == (403, "AccessDenied") and "at most 1 files" in second.message
    assert save(store, claims, key, io.BytesIO(b"a"), now=NOW) == 1  # the same file again takes no place
    assert not list(store.root.glob(".part-*"))


def test_two_files_uploaded_to_one_key_at_once_do_not_both_win(store: UploadStore) -> None:
    """Replicas sharing the directory (here: threads) checked that the key held nothing, then each replaced the
    object: both uploads were answered 200, and one reference named the other's file."""
    policy = store.issue_policy("owner-a", "m", now=NOW)
    claims = verify(store, policy["policy"], policy["signature"], policy["upload_dir"] + "/0.png", now=NOW)
    for i in range(200):
        key = f"{policy['upload_dir']}/{i}.png"
        barrier, kept = threading.Barrier(2), []

        def upload(content: bytes, key: str = key, barrier: threading.Barrier = barrier, kept: list = kept) -> None:
            incoming = store.receive(claims, key)
            try:
                incoming.write(content)
                barrier.wait()
                store.keep(incoming, now=NOW)
                kept.append(content)
            except errors.ServiceError as error:
                assert error.status == 409
            finally:
                incoming.discard()

        threads = [threading.Thread(target=upload, args=(content,)) for content in (b"one", b"two")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(kept) == 1, (i, kept)
        assert store.read(key, "owner-a") == kept[0]


def test_a_file_gone_while_the_purge_looks_does_not_end_it(store: UploadStore) -> None:
    """A place given back (a refused upload) or a temporary file kept between the purge's listing and its look
    at the file's age raised FileNotFoundError: the loop that purges every few minutes ended for the server's
    life. A dangling link is such a file, listed and then not found."""
    policy = store.issue_policy("owner-a", "m", now=NOW, files=1)
    key = policy["upload_dir"] + "/a.png"
    claims = verify(store, policy["policy"], policy["signature"], key, now=NOW)
    save(store, claims, key, io.BytesIO(b"a"), now=NOW)
    (store.root / ".part-gone").symlink_to(store.root / "nothing")
    (store.root / ".place-gone").symlink_to(store.root / "nothing")
    assert store.purge_expired(now=NOW + 7200) == 1
    assert not list(store.root.glob(".place-*[0-9]"))  # the policy's own place, long expired, went all the same


@pytest.mark.parametrize("answer", [errno.EPERM, errno.EOPNOTSUPP])
def test_a_directory_without_hard_links_still_stores_uploads(
    store: UploadStore, monkeypatch: pytest.MonkeyPatch, answer: int
) -> None:
    """On a filesystem without hard links (vfat, some FUSE or SMB mounts) os.link fails: every upload was a 500
    with no word of why, where before the objects were made by a rename. Such a filesystem's answer stands in
    for it here (no test machine has one mounted)."""

    def no_link(source: object, target: object) -> None:
        raise OSError(answer, os.strerror(answer))

    monkeypatch.setattr(os, "link", no_link)
    policy = store.issue_policy("owner-a", "m", now=NOW, files=2)
    key = policy["upload_dir"] + "/a.png"
    claims = verify(store, policy["policy"], policy["signature"], key, now=NOW)
    assert save(store, claims, key, io.BytesIO(b"a"), now=NOW) == 1
    assert save(store, claims, key, io.BytesIO(b"a"), now=NOW) == 1  # the same file again
    other = refused(save, store, claims, key, io.BytesIO(b"b"), now=NOW)
    assert other.status == 409
    assert store.read(key, "owner-a", now=NOW) == b"a"
    assert not list(store.root.glob(".part-*"))


def _upload(store: UploadStore, owner: str, name: str, size: int, now: float = NOW) -> int:
    policy = store.issue_policy(owner, "m", now=now)
    key = f"{policy['upload_dir']}/{name}"
    return save(
        store, verify(store, policy["policy"], policy["signature"], key, now=now), key, io.BytesIO(b"x" * size), now=now
    )


def test_a_key_keeps_at_most_its_bound_of_uploads(tmp_path: Path) -> None:
    """Uploads were bounded by the disk reserve only: one key could fill the disk every key shares. A key keeps
    at most ``files`` objects and ``bytes`` bytes: one more is refused (429 Throttling.AllocationQuota, naming
    the setting) before a byte of it is read, or once its size is known past the bytes; nothing of it stays."""
    store = UploadStore(tmp_path / "objects", b"s" * 64, ttl_seconds=3600, max_bytes=1000, quota=KeyQuota(2, 1500))
    assert _upload(store, "owner-a", "a.png", 1000) == 1000
    over = refused(_upload, store, "owner-a", "b.png", 600)  # its size is known once it has arrived
    assert (over.status, over.code) == (429, "Throttling.AllocationQuota")
    assert (
        "UPLOAD_STORAGE_PER_KEY_BYTES" in over.message
        and "1000 bytes and this one 600 more, of the 1500" in over.message
    )
    assert over.headers["x-should-retry"] == "false"  # room comes back only as uploads expire
    assert store.usage("owner-a") == (1, 1000) and not list(store.root.glob(".part-*"))
    assert _upload(store, "owner-a", "b.png", 400) == 400  # its place was given back: the policy takes it
    policy = store.issue_policy("owner-a", "m", now=NOW)
    key = policy["upload_dir"] + "/c.png"
    full = refused(store.receive, verify(store, policy["policy"], policy["signature"], key, now=NOW), key)
    assert (full.status, full.code) == (429, "Throttling.AllocationQuota")  # before the file: no Incoming made
    assert (
        "UPLOAD_FILES_PER_KEY" in full.message and "this key keeps 2 files, the most it may keep is 2" in full.message
    )
    assert refused(store.check_quota, "owner-a").message == full.message  # what getPolicy asks first
    assert _upload(store, "owner-b", "a.png", 1000) == 1000  # another key is not affected
    store.purge_expired(now=NOW + 3601)  # expired and purged: room again
    assert store.usage("owner-a") == (0, 0) and _upload(store, "owner-a", "c.png", 10, now=time.time()) == 10


def test_an_object_kept_before_owners_had_folders_is_still_read_and_purged(store: UploadStore) -> None:
    """Objects stored flat (before the per-key bound) stay readable by their owner until they expire."""
    policy = store.issue_policy("owner-a", "m", now=NOW)
    key = policy["upload_dir"] + "/cat.png"
    save(store, verify(store, policy["policy"], policy["signature"], key, now=NOW), key, io.BytesIO(b"old"), now=NOW)
    for path in stored(store):  # as an older llamascope kept it
        path.rename(store.root / path.name)
    assert store.read(key, "owner-a", now=NOW) == b"old"
    refused(store.read, key, "owner-b", now=NOW)
    assert store.purge_expired(now=NOW + 3601) == 1 and stored(store) == []
