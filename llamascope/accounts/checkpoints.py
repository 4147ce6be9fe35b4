"""Crash-safe accounting: running requests' checkpoints, and this replica's lease.

Every running request has a ``Progress`` in memory that the request path updates as tokens come (a few
attribute writes: no store call). One writer thread saves them: every ``seconds / 2`` it writes, in one
transaction, the in-flight rows of every request that has been running for at least that long and made
tokens since its last checkpoint, and earlier when a request has ``tokens / 2`` unsaved output tokens. So
whatever a request has made is on disk within about ``seconds`` or ``tokens``. One batched write for all
due requests costs less than a write per request, and none of it is on a request's path.

The guarantee is exact for what reaches the client: before an event leaves, its request's unsaved output
must be at most ``tokens``; if it is more (the store is slow or down), the stream waits for the writer, and
after ``wait_seconds`` without a checkpoint it ends with ``503 ServiceUnavailable``. So a request that
dies with its process is charged at least what its client received, less ``tokens``, and never more than
the engine made (a checkpoint records the engine's own counts).

The same thread renews this replica's lease (every third of ``lease_seconds``), reclaims replicas that
are gone (``AccountStore.reclaim``: a lease run out, or a process that no longer exists on this host, as
after a SIGKILL and restart; after the store was unreachable, only once it has answered for a whole
lease, since no replica could renew meanwhile), and retries charges that failed while the store was
unreachable, so that no finished request's ledger row is lost when the database comes back. And it
saves the refused requests counted since its last tick (``AccountStore.record_refusal``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from llamascope import errors
from llamascope.accounts.records import Reservation, utcnow
from llamascope.accounts.store import AccountStore

log = logging.getLogger(__name__)
# AccountStore.settle's arguments: reservation, request id, input, output and image tokens, status.
Charge = tuple[Reservation, str, int, int, int, str]


@dataclass(eq=False)
class Progress:
    """A running request's tokens as the engine reported them, and as far as they are on disk."""

    request_id: str
    reservation: Reservation
    started: float = field(default_factory=time.monotonic)
    input_tokens: int = 0
    output_tokens: int = 0
    image_tokens: int = 0
    saved_input: int = 0
    saved_output: int = 0
    written: bool = False  # its in-flight row may exist: settling deletes it
    settling: bool = False  # its settle has begun (its charge may be committed before ``settled`` is set)
    settled: bool = False
    asked: bool = False  # the writer was woken for it
    waiter: asyncio.Future[None] | None = None

    @property
    def unsaved(self) -> int:
        return self.output_tokens - self.saved_output


class Checkpoints:
    def __init__(
        self,
        store: AccountStore,
        *,
        seconds: float = 1.0,
        tokens: int = 64,
        wait_seconds: float = 5.0,
        lease_seconds: float = 30.0,
    ) -> None:
        self.store = store
        self.seconds = seconds
        self.tokens = tokens
        self.wait_seconds = wait_seconds
        self.lease_seconds = lease_seconds
        self.replica_id = str(uuid.uuid4())
        self.host = this_host()
        self.process = this_process()
        self._running: dict[str, Progress] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deferred: deque[tuple[Progress | None, Charge]] = deque()  # charges to retry
        self._failing = False

    # -- the request path (event loop) -----------------------------------------------------------

    def track(self, request_id: str, reservation: Reservation, written: bool) -> Progress:
        progress = Progress(request_id, reservation, written=written)
        with self._lock:
            self._running[request_id] = progress
        return progress

    def record(self, progress: Progress, input_tokens: int, output_tokens: int, image_tokens: int) -> bool:
        """The request has made this much; True if it must wait for a checkpoint before delivering it."""
        progress.input_tokens = input_tokens
        progress.output_tokens = output_tokens
        progress.image_tokens = image_tokens
        unsaved = output_tokens - progress.saved_output
        if unsaved * 2 >= self.tokens and not progress.asked:
            progress.asked = True
            self._wake.set()
        return unsaved > self.tokens

    async def saved(self, progress: Progress) -> None:
        """Wait until the request's unsaved output is within ``tokens``, or fail after ``wait_seconds``."""
        loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_seconds
        while progress.unsaved > self.tokens:
            progress.waiter = loop.create_future()
            self._wake.set()
            try:
                await asyncio.wait_for(progress.waiter, max(0.0, deadline - loop.time()))
            except TimeoutError:
                log.error("request %s: no checkpoint for %.0f s; ending it", progress.request_id, self.wait_seconds)
                raise errors.store_unavailable() from None
            finally:
                progress.waiter = None

    def finish(self, progress: Progress) -> None:
        """The request's charge is committed."""
        progress.settled = True
        with self._lock:
            self._running.pop(progress.request_id, None)

    def defer(self, progress: Progress | None, settle_args: Charge) -> None:
        """A charge the store did not take (unreachable): the writer retries it until it does."""
        with self._lock:
            self._deferred.append((progress, settle_args))
        self._wake.set()

    # -- the writer ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Take this replica's lease, settle what replicas that are gone left, start the writer."""
        self.store.hold_lease(self.replica_id, self.host, self.process, self.lease_seconds)
        self.reclaim()
        self._thread = threading.Thread(target=self._run, name="llamascope-checkpoints", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """At a clean stop: save what is left, and give the lease up if nothing of ours is in flight."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with contextlib.suppress(Exception):
            self._settle_deferred()
            self.store.save_refusals()
            if not self._deferred:
                self.store.end_lease(self.replica_id)

    def reclaim(self) -> int:
        """Charge the interrupted requests of every replica that is gone; how many."""
        charged = 0
        for replica_id, host, process, expired in self.store.replicas():
            if replica_id == self.replica_id:
                continue
            gone = host == self.host and not process_alive(process)
            if gone or expired:
                charged += self.store.reclaim(replica_id, lease_expired=not gone)
        return charged

    def _run(self) -> None:
        tick = min(self.seconds / 2, self.lease_seconds / 3)
        next_lease = time.monotonic() + self.lease_seconds / 3
        next_reclaim = time.monotonic() + self.lease_seconds / 2
        while not self._stopping.is_set():
            self._wake.wait(tick)
            self._wake.clear()
            now = time.monotonic()
            try:
                self._flush(now)
                self._settle_deferred()
                self.store.save_refusals()
                if now >= next_lease:
                    if not self.store.hold_lease(self.replica_id, self.host, self.process, self.lease_seconds):
                        log.warning("this replica's lease had run out and its requests were reclaimed; renewed")
                    next_lease = now + self.lease_seconds / 3
                if now >= next_reclaim:
                    self.reclaim()
                    next_reclaim = now + self.lease_seconds / 2
            except Exception as exc:  # the store is unreachable: say so once, keep trying
                if not self._failing:
                    log.error("accounts store: checkpoints not saved, retrying: %s", str(exc).splitlines()[0])
                self._failing = True
                # Other replicas could not renew their leases either: once the store is back, renew ours at
                # once and give theirs a whole lease before taking any of them for dead.
                next_lease = now
                next_reclaim = max(next_reclaim, now + self.lease_seconds)
                time.sleep(min(tick, 0.25))
            else:
                if self._failing:
                    log.warning("accounts store: reachable again; checkpoints and charges saved")
                self._failing = False

    def _flush(self, now: float) -> None:
        due_age = self.seconds / 2
        with self._lock:
            running = list(self._running.values())
        due = [
            p
            for p in running
            if (p.output_tokens != p.saved_output or p.input_tokens != p.saved_input)
            and (now - p.started >= due_age or p.unsaved * 2 >= self.tokens or p.waiter is not None)
        ]
        if not due:
            return
        moment = utcnow()
        rows, marks = [], []
        for p in due:
            r = p.reservation
            counts = (p.input_tokens, p.output_tokens, p.image_tokens)
            p.written = True  # before the write: a settle from here on deletes the row
            rows.append(
                {
                    "request_id": p.request_id,
                    "replica_id": self.replica_id,
                    "grant_id": r.grant_id,
                    "key_id": r.key_id,
                    "model": r.model,
                    "reserved_tokens": r.tokens,
                    "input_tokens": counts[0],
                    "output_tokens": counts[1],
                    "image_tokens": counts[2],
                    "started_at": r.started_at,
                    "checkpoint_at": moment,
                }
            )
            marks.append((p, counts))
        self.store.save_checkpoints(rows)
        settled_meanwhile = []
        for p, (input_tokens, output_tokens, _) in marks:
            p.saved_input, p.saved_output = input_tokens, output_tokens
            p.asked = False
            # Its settle may have deleted its row before this write put it back (the row goes only if the
            # ledger has the request: a settle not committed yet deletes the row itself).
            if p.settling or p.settled:
                settled_meanwhile.append(p.request_id)
            waiter = p.waiter
            if waiter is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(_resolve, waiter)
        self.store.forget_checkpoints(settled_meanwhile)

    def _settle_deferred(self) -> None:
        while self._deferred:
            progress, args = self._deferred[0]
            self.store.settle(*args, wait=True, in_flight=progress is None or progress.written)
            self._deferred.popleft()
            if progress is not None:
                self.finish(progress)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def this_host() -> str:
    """This machine, as far as process ids mean the same thing: host name and boot id."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"[:200]


def _start_time(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (Linux), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name before ")" may hold spaces


def this_process() -> str:
    return f"{os.getpid()}:{_start_time(os.getpid()) or ''}"


def process_alive(process: str) -> bool:
    """Whether the process a replica recorded (``pid:start time``) still runs on this host."""
    pid_text, _, started = process.partition(":")
    pid = int(pid_text)
    now = _start_time(pid)
    if now is None:
        return False
    if now and started:
        return now == started  # a pid reused by another process is not the replica
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
