"""Objects uploaded through the official SDK's local-file flow (wire spec section 4).

The SDK asks for a policy with its API key, then POSTs the file without any
key to the ``upload_host`` the policy names (llamascope itself), and finally
refers to the file as ``oss://<key>``. The unauthenticated POST is authorised
only by the policy it carries back: a base64 JSON of claims (upload directory,
expiry, size cap, model, owner) with an HMAC-SHA256 signature.

Objects live on disk under one directory, in a folder for each owner (so that
what a key keeps is one listing: ``KeyQuota`` bounds it), each stored under the
SHA-256 of its key (no client-chosen name ever becomes a path), beside a small
JSON record of its owner and expiry. They are readable only by the key that
uploaded them and only until they expire (48 hours by default); expired objects
are purged.
"""

from __future__ import annotations

import base64
import binascii
import errno
import filecmp
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from llamascope import disk, errors
from llamascope.disk import NO_KEY_QUOTA, NO_RESERVE, DiskReserve, KeyQuota, Overrun

_MAX_KEY_LENGTH = 1024
_PLACE = ".place-"  # a policy's places (``UploadStore._take_place``)
_OWNER = "key-"  # an owner's folder (``UploadStore._folder``)


@dataclass(frozen=True)
class Claims:
    dir: str
    exp: float  # policy expiry, epoch seconds
    max: int  # bytes
    owner: str  # Principal.key_id
    model: str
    # Objects the policy may store at most (a call's images, each uploaded once); 0: no bound (a policy signed
    # before there was one: it expires within minutes).
    files: int = 0


def too_large(most: int) -> errors.ServiceError:
    return errors.ServiceError(400, "EntityTooLarge", f"Your upload exceeds the maximum of {most} bytes.")


def quota_exceeded(overrun: Overrun, ttl_hours: float) -> errors.ServiceError:
    """A key at its bound of uploads: DashScope's code for a quota used up (429 Throttling.AllocationQuota), and
    no retry (``x-should-retry``: the SDK would ask twice more at once; room comes back only as uploads expire)."""
    setting = "UPLOAD_FILES_PER_KEY" if overrun.bound == "files" else "UPLOAD_STORAGE_PER_KEY_BYTES"
    return errors.ServiceError(
        429,
        "Throttling.AllocationQuota",
        f"Allocated quota exceeded for this key's uploads (the server's {setting}): {overrun.said}. Uploads are "
        f"kept {ttl_hours:g} hours, and room comes back as they expire; meanwhile send images as data: URIs or "
        "URLs.",
        headers={"x-should-retry": "false"},
    )


class Incoming:
    """An upload's file as it arrives, written to a temporary file among the objects (``.part-*``, which
    ``purge_expired`` removes if a crash leaves one): never whole in memory, and refused past its cap. It holds
    one of its policy's places (``place``) from before its first byte; ``discard`` gives it back unless kept."""

    def __init__(self, root: Path, claims: Claims, key: str, place: Path | None = None) -> None:
        self.claims = claims
        self.key = key
        self.place = place
        self.kept = False
        fd, name = tempfile.mkstemp(dir=root, prefix=".part-")
        self.path = Path(name)
        self._file: BinaryIO | None = os.fdopen(fd, "wb")
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.size += len(data)
        if self.size > self.claims.max:
            raise too_large(self.claims.max)
        assert self._file is not None
        self._file.write(data)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def discard(self) -> None:
        """Remove the temporary file (kept, the object is another name of it), and give the place back unless
        the upload was kept: refused, cut short or the same file again, it stores nothing."""
        self.close()
        self.path.unlink(missing_ok=True)
        if self.place is not None and not self.kept:
            self.place.unlink(missing_ok=True)
            self.place = None


# What link(2) answers on a filesystem that has no hard links (vfat, some FUSE and SMB mounts): EPERM, as Linux
# documents it, or "not supported".
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def _make_if_absent(source: Path, target: Path) -> None:
    """``target`` made another name of ``source`` if nothing has that name yet, else FileExistsError, atomically.
    Where the filesystem has no hard links, the name is claimed by an exclusive create and the file then moved
    onto it: as atomic against another upload to the name, though a reader finds it empty for that moment."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.replace(source, target)


def _older(path: Path, moment: float) -> bool:
    """Whether ``path`` was last written before ``moment``; a file gone since it was listed is not (an upload
    kept or given back meanwhile, another replica's purge): it must not end the purge, which runs in a loop
    that a failure ends for the server's life."""
    try:
        return path.stat().st_mtime < moment
    except FileNotFoundError:
        return False


def load_or_create_secret(path: Path) -> bytes:
    """The HMAC key for policies, kept across restarts so policies in flight stay valid."""
    if path.is_file():
        data = path.read_bytes().strip()
        if len(data) >= 32:
            return data
    path.parent.mkdir(parents=True, exist_ok=True)
    data = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return data


class UploadStore:
    def __init__(
        self,
        root: Path,
        secret: bytes,
        *,
        ttl_seconds: float = 48 * 3600,
        policy_seconds: int = 300,
        max_bytes: int = 10 * 1024 * 1024,
        reserve: DiskReserve = NO_RESERVE,
        quota: KeyQuota = NO_KEY_QUOTA,
    ) -> None:
        self.root = root
        self.reserve = reserve
        self.quota = quota
        self.secret = secret
        self.ttl_seconds = ttl_seconds
        self.policy_seconds = policy_seconds
        self.max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True)

    # -- step 1: the policy ---------------------------------------------------

    def issue_policy(self, owner: str, model: str, now: float | None = None, files: int = 0) -> dict[str, object]:
        """The ``data`` object of a getPolicy answer, less ``upload_host``. ``files``: the objects it may store
        at most (the SDK uploads a call's files under one policy: as many as the model takes images in a
        conversation); 0: no bound."""
        now = time.time() if now is None else now
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        claims = Claims(
            dir=f"llamascope/{owner[:16]}/{day}/{uuid.uuid4().hex}",
            exp=now + self.policy_seconds,
            max=self.max_bytes,
            owner=owner,
            model=model,
            files=files,
        )
        capacity = self.max_bytes * (files or 1)
        policy = base64.b64encode(json.dumps(asdict(claims), separators=(",", ":")).encode()).decode()
        return {
            "policy": policy,
            "signature": self._sign(policy),
            "upload_dir": claims.dir,
            "expire_in_seconds": self.policy_seconds,
            "max_file_size_mb": max(1, self.max_bytes // (1024 * 1024)),
            "capacity_limit_mb": max(1, capacity // (1024 * 1024)),
            "oss_access_key_id": "llamascope",
            "x_oss_object_acl": "private",
            "x_oss_forbid_overwrite": "true",
        }

    def _sign(self, policy: str) -> str:
        return base64.b64encode(hmac.new(self.secret, policy.encode(), hashlib.sha256).digest()).decode()

    # -- step 2: the unauthenticated POST ---------------------------------------

    def check_policy(self, policy: str, signature: str, now: float | None = None) -> Claims:
        """The claims of a policy this server signed and that has not expired (the POST's first check)."""
        if not hmac.compare_digest(self._sign(policy).encode(), signature.encode()):
            raise errors.ServiceError(403, "AccessDenied", "The request signature we calculated does not match.")
        try:
            claims = Claims(**json.loads(base64.b64decode(policy, validate=True)))
        except (binascii.Error, ValueError, TypeError):
            raise errors.ServiceError(400, "InvalidPolicyDocument", "The policy cannot be read.") from None
        if (time.time() if now is None else now) > claims.exp:
            raise errors.ServiceError(403, "AccessDenied", "Invalid according to Policy: Policy expired.")
        return claims

    @staticmethod
    def check_key(claims: Claims, key: str) -> None:
        """Refuse a key outside the policy's upload_dir."""
        name = key[len(claims.dir) + 1 :] if key.startswith(claims.dir + "/") else ""
        if not name or len(key) > _MAX_KEY_LENGTH or "\x00" in key or ".." in name.split("/"):
            raise errors.ServiceError(
                403, "AccessDenied", "Invalid according to Policy: the key is outside upload_dir."
            )

    def receive(self, claims: Claims, key: str) -> Incoming:
        """Where the file of an upload under ``claims`` to ``key`` is written as it arrives (a temporary file
        beside the objects, at most ``claims.max`` bytes); ``keep`` it once whole, then ``discard`` it.

        It takes one of the policy's places first, or raises the refusal before a byte of the file is read;
        not when ``key`` holds an object already (the same file again takes none, and another is refused). A
        disk short of its reserve refuses it first (507), then an owner at its quota (429)."""
        if self.reserve.full(self.root, claims.max):
            raise errors.ServiceError(507, "InsufficientStorage", disk.FULL)
        if self._path(key, claims.owner).exists():
            place = None
        else:
            self.check_quota(claims.owner)
            place = self._take_place(claims)
        try:
            return Incoming(self.root, claims, key, place)
        except BaseException:
            if place is not None:
                place.unlink(missing_ok=True)
            raise

    def keep(self, incoming: Incoming, now: float | None = None) -> int:
        """Put a whole upload in place (its size), or refuse it.

        The same bytes again are taken (200): the SDK names each upload ``<upload_dir>/<file name>``, with one
        upload_dir for a whole call, so a conversation that names one file twice (again in a later turn) uploads
        it twice, which OSS's forbid-overwrite would refuse. Two different files of the same name are refused:
        both references would name one object."""
        incoming.close()
        claims, key = incoming.claims, incoming.key
        target = self._path(key, claims.owner)
        if not target.exists():
            target.parent.mkdir(exist_ok=True)
            if incoming.place is None:  # its key held an object when it began, purged since
                incoming.place = self._take_place(claims)
            now = time.time() if now is None else now
            record = {"key": key, "owner": claims.owner, "model": claims.model, "expires": now + self.ttl_seconds}
            # Before the object: an object never stays without the record that lets it be purged. Another
            # upload to this key that loses the race below rewrote it with the same key and owner (one policy).
            self._write(target.with_suffix(".json"), json.dumps(record).encode())
            try:
                # Made only if absent, atomically, also between replicas sharing the directory (os.replace
                # after a check let two different files to one key both be taken, the last one kept).
                _make_if_absent(incoming.path, target)
            except FileExistsError:
                pass  # another upload to this key came first: the same file, or a refusal
            else:
                self._recount(claims.owner, target, incoming.size)  # refused: removed, and its place given back
                incoming.kept = True
                return incoming.size
        if self._holds(target, incoming.path):
            return incoming.size
        raise errors.ServiceError(
            409,
            "FileAlreadyExists",
            "The object you specified already exists: another file of the same name was uploaded for this call "
            "(the SDK names uploads by their file names); give the files different names.",
        )

    # -- what a key keeps ---------------------------------------------------------

    def usage(self, owner: str) -> tuple[int, int]:
        """The objects ``owner`` keeps and their bytes: one listing of its folder (an object expired and not yet
        purged counts until the purge, every few minutes, removes it; its record is not read)."""
        count = size = 0
        try:
            with os.scandir(self._folder(owner)) as entries:
                for entry in entries:
                    if entry.name.endswith(".json"):
                        continue
                    try:
                        size += entry.stat().st_size
                        count += 1
                    except FileNotFoundError:  # purged since it was listed
                        continue
        except FileNotFoundError:  # nothing uploaded yet
            pass
        return count, size

    def check_quota(self, owner: str) -> None:
        """Refuse (429) an owner at its bound of objects or bytes one more upload, before a byte of it is read:
        at getPolicy, and again as an upload's file begins (a policy handed out earlier stores up to its files)."""
        overrun = self.quota.overrun(*self.usage(owner)) if self.quota != NO_KEY_QUOTA else None
        if overrun is not None:
            raise quota_exceeded(overrun, self.ttl_seconds / 3600)

    def _recount(self, owner: str, target: Path, size: int) -> None:
        """Counted with the object just kept in, so that uploads of one key at once cannot each take the room
        left: the one that took the key over its bound is removed and refused (at worst each of them is)."""
        if self.quota == NO_KEY_QUOTA:
            return
        count, used = self.usage(owner)
        overrun = self.quota.overrun(count - 1, used - size, size)
        if overrun is not None:
            target.unlink(missing_ok=True)
            target.with_suffix(".json").unlink(missing_ok=True)
            raise quota_exceeded(overrun, self.ttl_seconds / 3600)

    def _take_place(self, claims: Claims) -> Path | None:
        """One of the policy's ``files`` places (None: it has no bound), or the refusal: one policy is no way to
        store without end. A place is a file made only if absent (atomic, also for replicas sharing the
        directory), kept until ``purge_expired`` finds the policy long expired."""
        if not claims.files:
            return None
        stem = self.root / f"{_PLACE}{hashlib.sha256(claims.dir.encode()).hexdigest()[:32]}-"
        for place in range(claims.files):
            try:
                os.close(os.open(f"{stem}{place}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                return Path(f"{stem}{place}")
            except FileExistsError:
                continue
        # The policy's bound is the model's image limit (api/uploads.py): said as the 400 for the same call with
        # URLs says it, since the SDK raises this refusal in place of that call's answer.
        images = "1 image" if claims.files == 1 else f"{claims.files} images"
        raise errors.ServiceError(
            403,
            "AccessDenied",
            f"Invalid according to Policy: it allows at most {claims.files} files (the images of one call), and "
            f"{claims.model} takes at most {images} per conversation (its max_images setting): this call has more.",
        )

    @staticmethod
    def _holds(path: Path, other: Path) -> bool:
        try:
            return filecmp.cmp(path, other, shallow=False)
        except OSError:
            return False

    def _write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    # -- step 3: oss://key --------------------------------------------------------

    def read(self, key: str, owner: str, now: float | None = None) -> bytes:
        """The object's bytes for its owner, or the same 400 for missing, expired and foreign objects."""
        gone = errors.invalid_parameter(
            "url error, please check url! The oss:// object does not exist, has expired "
            f"(uploads are kept {self.ttl_seconds / 3600:g} hours) or belongs to another API key."
        )
        target = self._path(key, owner)
        if not target.exists():  # kept before owners had folders (within the last ``ttl_seconds`` of an upgrade)
            target = self.root / hashlib.sha256(key.encode()).hexdigest()
        try:
            record = json.loads(target.with_suffix(".json").read_text())
            expired = (time.time() if now is None else now) > record["expires"]
            if expired or record["key"] != key or not hmac.compare_digest(record["owner"], owner):
                raise gone
            return target.read_bytes()
        except (OSError, ValueError, KeyError):
            raise gone from None

    def purge_expired(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        removed = 0
        for meta in [*self.root.glob("*.json"), *self.root.glob(f"{_OWNER}*/*.json")]:
            try:
                if json.loads(meta.read_text())["expires"] >= now:
                    continue
            except (OSError, ValueError, KeyError):
                pass  # unreadable records go too
            meta.with_suffix("").unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            removed += 1
        for part in self.root.glob(".part-*"):  # left by a crash mid-write
            if _older(part, now - 3600):
                part.unlink(missing_ok=True)
        for place in self.root.glob(_PLACE + "*"):  # a policy's places, once it can take no more uploads
            if _older(place, now - self.policy_seconds - 60):
                place.unlink(missing_ok=True)
        return removed

    def _folder(self, owner: str) -> Path:
        return self.root / (_OWNER + hashlib.sha256(owner.encode()).hexdigest()[:32])

    def _path(self, key: str, owner: str) -> Path:
        return self._folder(owner) / hashlib.sha256(key.encode()).hexdigest()
