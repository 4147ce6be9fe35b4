"""The batch runner: validates new batches, runs their lines on the capacity interactive requests leave free,
stops cancelled and expired ones, and writes each batch's result files when its lines have ended.

Every line goes through the whole request path, in process: the runner posts the line's body to its ``url``
on the app itself (``httpx.ASGITransport``), as the batch's key (``caller``). So a line is parsed, checked,
rendered, rate-limited and charged to the key's grant exactly as the same call made over HTTP, its usage is
the API's own, and a refusal is the API's own code and message in the error file.

Fair to interactive traffic: a line's request is made in the engines' ``background``: the in-process engine
admits it only when no interactive request waits and never counts it in the queue interactive requests are
refused from (engines/scheduler.py). At most ``in_flight`` lines of a model run at once (through an upstream
engine, only this bound applies). Each line is charged ``price`` of its tokens (the caller's extension carries it).

Limits slow a batch down, never fail it. A key's lines run no more at once than its ``max_concurrent``. A line
refused for now (a rate limit's 429, 503, 408, or an allowance that running requests hold but have not used up)
goes back to the queue, as often as it takes, and what refused it pauses: the key for as long as its Retry-After
says (a held allowance: until one of its lines here ends, or a second), the model for a 503 or 408; and the
key's lines that may run at once are halved (one more comes back at each line that runs). Only the batch's window
or a cancel ends the wait. An allowance used up or expired is a line's answer, and so is the failure of a line
whose request ran and was charged: it is never run again.

A line running when its batch is cancelled or expires is stopped; if its request was charged by then, it goes
to the error file with the usage it was charged for (``response.status_code`` 499), not as a line not run.

Woken by events, not by polling: a batch made or cancelled here (``wake``), a line ended, a step done, a
pause over. The database is looked at on a timer (``poll_seconds``) only for what no event here tells: batches
made, cancelled or left behind by other replicas (a dead one's claims run out with its lease), and windows
ending.

One runner per process. Several processes on one database share the work through the repository's claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import OperationalError
from starlette.types import ASGIApp

from llamascope.accounts.access import grant_refusal
from llamascope.accounts.admission import UNREACHABLE
from llamascope.accounts.limits import to_the_end
from llamascope.accounts.records import utcnow
from llamascope.accounts.store import AccountStore
from llamascope.batch import lines as input_lines
from llamascope.batch.caller import BatchCaller, LineCall, as_key, current_line
from llamascope.batch.files import FileStore
from llamascope.batch.records import (
    BATCH_OUTPUT,
    CANCELLED_CODE,
    EXPIRED_CODE,
    BatchView,
    FileView,
    LineError,
    Status,
    new_file_id,
    new_result_id,
)
from llamascope.batch.repository import INSERT_CHUNK, BatchRepository
from llamascope.engines.base import Engine, background

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("llamascope.batch")

TRANSIENT = frozenset({408, 429, 503})  # refused for now, not for what the line asks: try it again later
PAUSE_SECONDS = 1.0  # the wait after a refusal for now that gives no Retry-After
MAX_PAUSE_SECONDS = 3600.0  # the longest Retry-After taken as it is
ALLOWANCE_CODE = "AllocationQuota.FreeTierOnly"
STOPPED_STATUS = 499  # a line stopped while running: the status logged for a request its client stopped
STOP_SECONDS = 10.0  # at shutdown, how long the lines stopped may take to save what they made
SAVE_PAUSE_SECONDS = 1.0  # the first wait before a line's state is written again to a store that did not answer
MAX_SAVE_PAUSE_SECONDS = 30.0


class Runner:
    def __init__(
        self,
        repository: BatchRepository,
        files: FileStore,
        engines: Mapping[str, Engine],
        store: AccountStore,
        *,
        replica_id: str,
        in_flight: int = 8,
        poll_seconds: float = 10.0,
        price: float = 1.0,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.repository = repository
        self.files = files
        self.engines = engines
        self.store = store
        self.replica_id = replica_id
        self.in_flight = in_flight
        self.poll_seconds = poll_seconds
        self.price = price
        self.stopping = stopping
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._app: ASGIApp | None = None
        self._clients: dict[int, httpx.AsyncClient] = {}
        self._lines: dict[str, dict[int, asyncio.Task[None]]] = defaultdict(dict)  # batch -> line -> its task
        self._running: dict[str, int] = defaultdict(int)  # model -> lines running here
        self._key_running: dict[int, int] = defaultdict(int)  # key -> lines running here
        # ("model", name) or ("key", id) -> monotonic time it may take lines again: a model that answered 503
        # or 408, a key refused by a rate limit (its Retry-After) or by an allowance its running lines hold.
        self._paused: dict[tuple[str, Any], float] = {}
        # key -> its lines running here when an allowance they hold refused one: paused until another ends
        self._held: dict[int, int] = {}
        # key -> how many of its lines may run here at once: halved at each refusal for now, one more at each
        # line that ran, up to ``in_flight``; so a limited key's lines do not all knock at once.
        self._window: dict[int, float] = {}
        self._limits: dict[int, tuple[float, int | None]] = {}  # key -> (when read, its max_concurrent)
        self._stopped: dict[str, Status] = {}  # batch -> how it ends, while its running lines are stopped
        self._steps: set[str] = set()  # batches being validated or finalized here
        # batch -> the wait before its step, failed here, is taken again (doubling): the step's end wakes the next
        # round, which took it again at once, in a tight loop for as long as the failure lasted
        self._step_pauses: dict[str, float] = {}
        self._unsure: dict[str, list[str]] = {}  # batch -> result files its ending, not confirmed, may name

    # -- life ----------------------------------------------------------------------------------------

    def start(self, app: ASGIApp) -> None:
        """Run in the background, calling ``app`` (the whole app, middleware included) for each line."""
        self._app = app
        self._loop = asyncio.create_task(self._run(), name="llamascope-batch-runner")

    def wake(self) -> None:
        """Look for work now (a batch was made or cancelled, a line ended)."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop taking lines, end the running ones, and hand every line held here back to the queue."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        tasks = [task for batch in self._lines.values() for task in batch.values()]
        for task in tasks:
            task.cancel()
        if tasks:  # each saves what its line made to its end (to_the_end): bounded, so a stalled store stalls no exit
            _, stuck = await asyncio.wait(tasks, timeout=STOP_SECONDS)
            if stuck:
                log.warning(
                    "batch runner: %d lines still saving after %.0f s at shutdown; left", len(stuck), STOP_SECONDS
                )
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.repository.release_all, self.replica_id)
        for client in self._clients.values():
            await client.aclose()

    async def _run(self) -> None:
        polled = -math.inf  # when the timer's round last ran (monotonic)
        while True:
            now = time.monotonic()
            polled = now if now - polled >= self.poll_seconds else polled
            try:
                if not self.stopping():
                    await self._tick(expire=polled == now)
            except OperationalError as exc:  # the store unreachable: said in one line, as the accounts say it
                log.error("batch runner: the store is unreachable, trying again: %s", str(exc).splitlines()[0])
            except Exception:  # a bug: its traceback, and keep going
                log.exception("batch runner: a round failed; trying again")
            now = time.monotonic()
            pauses = [until - now for until in self._paused.values() if until > now]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min([polled + self.poll_seconds - now, *pauses]))
            self._wake.clear()

    # -- one round -----------------------------------------------------------------------------------

    async def _tick(self, expire: bool) -> None:
        repository = self.repository
        if expire:
            await asyncio.to_thread(repository.expire_due)
        for batch in await asyncio.to_thread(repository.with_status, Status.VALIDATING):
            claim = repository.claim_step
            if self._step_waits(batch.id) or batch.id in self._steps:
                continue
            if await asyncio.to_thread(claim, batch.id, batch.status, self.replica_id):
                self._step(batch.id, self._validate(batch))
        active = Status.IN_PROGRESS, Status.CANCELLING, Status.FINALIZING
        batches = await asyncio.to_thread(repository.with_status, *active)
        await self._forget({batch.key_id for batch in batches}, {batch.model or "" for batch in batches})
        for batch in batches:
            stopped = batch.status is Status.CANCELLING or batch.ending is not None
            if stopped:
                self._stop_lines(batch.id, batch.ending or Status.CANCELLED)
            elif batch.status is Status.IN_PROGRESS:
                await self._take(batch)
            if batch.id in self._steps or self._lines.get(batch.id) or self._step_waits(batch.id):
                continue
            pending, running = await asyncio.to_thread(repository.unfinished, batch.id)
            if running == 0 and (pending == 0 or stopped):
                self._step(batch.id, self._finalize(batch.id))

    async def _forget(self, keys: set[int], models: set[str]) -> None:
        """Drop what is kept for keys and models with no batch under way and no line running here (their
        window, limit, pauses and client), so that a long-lived server's tables hold its active keys only."""
        now = time.monotonic()
        for scope, until in list(self._paused.items()):
            kind, name = scope
            if until <= now and name not in (keys if kind == "key" else models):
                del self._paused[scope]
        for key in set(self._window) | set(self._limits) | set(self._clients) | set(self._key_running):
            if key in keys or self._key_running.get(key):
                continue
            for table in (self._window, self._limits, self._held, self._key_running):
                table.pop(key, None)
            client = self._clients.pop(key, None)
            if client is not None:
                await client.aclose()
        for model in [model for model, running in self._running.items() if not running and model not in models]:
            del self._running[model]

    def _step(self, batch_id: str, work: Any) -> None:
        self._steps.add(batch_id)
        task = asyncio.create_task(work)

        def done(task: asyncio.Task[None]) -> None:
            self._steps.discard(batch_id)
            failure = None if task.cancelled() else task.exception()
            if failure is not None:  # a bug, or a disk that failed: its traceback, and the step later
                log.error("batch %s: a step failed; trying again", batch_id, exc_info=failure)
                self._step_failed(batch_id)
            self.wake()

        task.add_done_callback(done)

    def _step_failed(self, batch_id: str) -> None:
        """Take the batch's step again after a pause: a second, doubling up to ``MAX_SAVE_PAUSE_SECONDS``."""
        pause = self._step_pauses.get(batch_id, SAVE_PAUSE_SECONDS)
        self._paused[("step", batch_id)] = time.monotonic() + pause
        self._step_pauses[batch_id] = min(pause * 2, MAX_SAVE_PAUSE_SECONDS)

    def _step_done(self, batch_id: str) -> None:
        self._step_pauses.pop(batch_id, None)
        self._paused.pop(("step", batch_id), None)

    def _step_waits(self, batch_id: str) -> bool:
        return self._paused.get(("step", batch_id), 0) > time.monotonic()

    async def _take(self, batch: BatchView) -> None:
        """Claim as many of the batch's lines as its model and its key have room for now, and start them."""
        model, key = batch.model or "", batch.key_id
        now = time.monotonic()
        if self._paused.get(("model", model), 0) > now or self._paused.get(("key", key), 0) > now:
            return
        window = min(int(self._window.get(key, self.in_flight)), await self._concurrency(key))
        room = min(self.in_flight - self._running[model], window - self._key_running[key])
        if room <= 0:
            return
        for line in await asyncio.to_thread(self.repository.claim_lines, batch.id, self.replica_id, room):
            self._running[model] += 1
            self._key_running[key] += 1
            task = asyncio.create_task(self._line(batch, line))
            self._lines[batch.id][line.number] = task
            task.add_done_callback(functools.partial(self._ended, batch.id, line.number, model, key))

    async def _concurrency(self, key_id: int) -> int:
        """How many lines of the key may run here at once: ``in_flight``, or its ``max_concurrent`` if fewer
        (read again every ``poll_seconds``), so that its lines do not knock on a limit known beforehand."""
        now = time.monotonic()
        read_at, limit = self._limits.get(key_id, (-math.inf, None))
        if now - read_at >= self.poll_seconds:
            try:
                limit = (await asyncio.to_thread(self.store.key, key_id)).max_concurrent
            except LookupError:  # deleted: its lines are refused as such
                limit = None
            self._limits[key_id] = now, limit
        return min(self.in_flight, limit or self.in_flight)

    def _ended(self, batch_id: str, number: int, model: str, key: int, _: object = None) -> None:
        self._running[model] -= 1
        self._key_running[key] -= 1
        if key in self._held and self._key_running[key] < self._held[key] - 1:
            del self._held[key]  # a line other than the refused one ended, releasing its hold: try again now
            self._paused.pop(("key", key), None)
        lines = self._lines.get(batch_id)
        if lines is not None:
            lines.pop(number, None)
            if not lines:
                del self._lines[batch_id]
        self.wake()

    def _stop_lines(self, batch_id: str, ending: Status) -> None:
        """Stop the batch's running lines (cancelled, or its window ended): each is written as stopped."""
        self._stopped[batch_id] = ending
        for task in self._lines.get(batch_id, {}).values():
            if not task.cancelling():
                task.cancel()

    # -- a line --------------------------------------------------------------------------------------

    def _client(self, key_id: int) -> httpx.AsyncClient:
        client = self._clients.get(key_id)
        if client is None:
            import httpx  # why: its import (rich included) is 0.1-0.2 s of every start; only batches need it

            assert self._app is not None
            transport = httpx.ASGITransport(
                as_key(self._app, BatchCaller(key_id, self.price)), raise_app_exceptions=False
            )
            client = httpx.AsyncClient(transport=transport, base_url="http://batch.llamascope", timeout=None)
            self._clients[key_id] = client
        return client

    async def _line(self, batch: BatchView, line: input_lines.Line) -> None:
        background.set(True)  # this line's task's own context: its request waits behind interactive ones
        call = LineCall()
        current_line.set(call)  # as_key keeps the request's state there: what it made, if it is stopped
        try:
            await self._send(batch, line)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # to its end, however often the line is cancelled meanwhile
                await to_the_end(self._stopped_line(batch, line, call))
            raise

    async def _send(self, batch: BatchView, line: input_lines.Line) -> None:
        try:
            raw = await asyncio.to_thread(self.files.read_range, batch.input_file_id, line.offset, line.length)
            request = json.loads(raw)
            # Sent with every non-ASCII character escaped, as a client may send it: a lone surrogate ("\ud83d"),
            # which json reads but no UTF-8 holds, then meets the API's own check (a 400, as an interactive request
            # gets) instead of failing to encode here (a 500). The line's other values go as they were read: NaN
            # and Infinity too (json reads them, and so does the API, whose check then names the field).
            content = json.dumps(request["body"]).encode()
            headers = {"Content-Type": "application/json"}
            response = await self._client(batch.key_id).post(request["url"], content=content, headers=headers)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the input file changed under the batch, or the disk failed
            log.error("batch %s line %d could not be read: %s", batch.id, line.number, exc)
            unread = {"code": "internal_error", "message": "This line of the input file could not be read."}
            await self._finish(batch, line, 500, None, unread, {})
            return
        status = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = {"message": response.text}
        error = None if status == 200 else error_of(body, status)
        call = current_line.get()
        charged = call is not None and sum(_made(call)) > 0  # it ran, and failed: its answer, never run again
        if (
            error is not None
            and not charged
            and await self._waits(batch, status, error, response.headers.get("retry-after"))
        ):
            await self._save(batch, line, "hand-back", self._release(batch, line))
            return
        key = batch.key_id
        self._window[key] = min(float(self.in_flight), self._window.get(key, self.in_flight) + 1)
        await self._finish(batch, line, status, response.headers.get("x-request-id"), error, body)

    async def _waits(self, batch: BatchView, status: int, error: dict[str, Any], retry_after: str | None) -> bool:
        """Is this refusal one to wait out? Then the line goes back to the queue, and what refused it pauses:
        the key, for a rate limit (as long as its Retry-After says) or for an allowance held by running
        requests (until one of its lines here ends, or ``PAUSE_SECONDS``: the hold may be another request's);
        the model, for a 503 or 408. An allowance used up or expired, and every other refusal, is the line's
        answer."""
        key, now, code = batch.key_id, time.monotonic(), error["code"]
        if status in TRANSIENT:
            scope = ("key", key) if code.startswith("Throttling.RateQuota") else ("model", batch.model or "")
            self._pause(scope, now + _seconds(retry_after), key)
            return True
        if status == 403 and code == ALLOWANCE_CODE and await self._asks_again(batch, error):
            self._held[key] = self._key_running[key]
            self._pause(("key", key), now + PAUSE_SECONDS, key)
            return True
        return False

    def _pause(self, scope: tuple[str, Any], until: float, key: int) -> None:
        self._paused[scope] = max(self._paused.get(scope, 0.0), until)
        self._window[key] = max(1.0, self._window.get(key, self.in_flight) / 2)

    async def _asks_again(self, batch: BatchView, error: dict[str, Any]) -> bool:
        try:
            return await asyncio.to_thread(self._ask_again, batch, error)
        except UNREACHABLE:  # the grant cannot be read now: as if held, asked again later
            return True

    def _ask_again(self, batch: BatchView, error: dict[str, Any]) -> bool:
        """An allowance refused the line: ask again later if it refuses only for what running requests hold
        (it would admit a request if nothing were held: not used up, not expired), or if its refusal now is
        not the one the line got (it changed meanwhile: the line's answer is the refusal as it stands)."""
        model, now = batch.model or "", utcnow()
        grant = self.store.find_grant(batch.key_id, model, True)
        if grant is None:
            return False
        if grant_refusal(model, dataclasses.replace(grant, reserved_tokens=0), now) is None:
            return True
        refusal = grant_refusal(model, grant, now)
        return refusal is not None and refusal.message != error["message"]

    async def _stopped_line(self, batch: BatchView, line: input_lines.Line, call: LineCall) -> None:
        """A line stopped before its answer. Stopped by its batch's cancel or window, after its request was
        charged for tokens: written to the error file with what it made (the charge is the batch price of it).
        Otherwise (the server stopping, or nothing charged yet): back to the queue, to be run again or reported
        as not run."""
        if call.written:
            return
        ending = self._stopped.get(batch.id)
        made = _made(call)
        if ending is None or sum(made) == 0:
            await self._save(batch, line, "hand-back", self._release(batch, line))
            return
        code, why = _ending_words(ending)
        message = (
            f"This request was stopped while running: {why}. It was charged for the tokens it had used "
            "(response.body.usage), at the batch price."
        )
        body = {"usage": _usage_body(batch.endpoint, *made)}
        error = {"code": code, "message": message}
        await self._finish(batch, line, STOPPED_STATUS, call.state.get("request_id"), error, body)

    async def _finish(
        self,
        batch: BatchView,
        line: input_lines.Line,
        status: int,
        request_id: str | None,
        error: dict[str, Any] | None,
        body: Any,
    ) -> None:
        result = {
            "id": new_result_id(),
            "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": error,
        }
        if (call := current_line.get()) is not None:
            call.written = True
        input_tokens, output_tokens = _usage(body)
        text = json.dumps(result, ensure_ascii=False, separators=(",", ":"))
        finish = self.repository.finish_line
        args = (batch.id, line.number, self.replica_id, error is None, text, input_tokens, output_tokens)
        # To its end: a cancel arriving now (or a second, the server stopping) must not lose a result the key has
        # been charged for, nor leave it being written after ``stop`` has handed the line back.
        await to_the_end(self._save(batch, line, "result", functools.partial(finish, *args)))

    def _release(self, batch: BatchView, line: input_lines.Line) -> Callable[[], None]:
        return functools.partial(self.repository.release_lines, batch.id, [line.number], self.replica_id)

    async def _save(self, batch: BatchView, line: input_lines.Line, what: str, write: Callable[[], Any]) -> None:
        """``write``, a line's result or its hand-back, tried again until the store answers. Given up, it left the
        line claimed by this live process, never to be run again or reported: the batch stayed in progress until
        the server was restarted (and a line charged, run again then, was charged twice)."""
        pause = SAVE_PAUSE_SECONDS
        while True:
            try:
                await asyncio.to_thread(write)
                return
            except UNREACHABLE as exc:
                log.error(
                    "batch %s line %d: %s not saved, retrying until the store answers: %s",
                    batch.id,
                    line.number,
                    what,
                    _first(exc),
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_SAVE_PAUSE_SECONDS)

    # -- whole batches -------------------------------------------------------------------------------

    async def _validate(self, batch: BatchView) -> None:
        try:
            await asyncio.to_thread(self._check, batch)
        except UNREACHABLE as exc:  # not the input's fault: checked again from its start at a later round
            log.error("batch %s: not validated, the store did not answer; trying again: %s", batch.id, _first(exc))
            self._step_failed(batch.id)
            return
        except Exception:
            log.exception("batch %s: validation failed", batch.id)
            problem = LineError(None, "internal_error", "The input file could not be read.")
            await asyncio.to_thread(self.repository.invalid, batch.id, self.replica_id, [problem], None)
        await asyncio.to_thread(self._drop_input, batch)
        self._step_done(batch.id)

    def _drop_input(self, batch: BatchView) -> None:
        """The batch's input file, deleted through the Files API while the batch read it: its bytes go once
        no batch under way reads them."""
        if self.repository.forsaken(batch.input_file_id):
            self.files.delete(batch.input_file_id)

    def _check(self, batch: BatchView) -> None:
        """Stream the input once: its lines stored as they pass, then the model and the key's grant for it."""
        found = input_lines.Checked()
        first = True
        with self.files.open(batch.input_file_id) as stream:
            passed = input_lines.read(stream, batch.endpoint, found)
            while chunk := list(itertools.islice(passed, INSERT_CHUNK)):
                if not found.errors:
                    self.repository.add_lines(batch.id, chunk, first)
                    first = False
        problems = list(found.errors or ())
        if not problems and found.model is not None:
            problems = self._model_problems(batch.key_id, found.model)
        if problems:
            self.repository.invalid(batch.id, self.replica_id, problems, found.model)
            log.info("batch %s failed validation: %s", batch.id, problems[0].message)
            return
        assert found.model is not None
        self.repository.validated(batch.id, self.replica_id, found.model, found.lines)

    def _model_problems(self, key_id: int, model: str) -> list[LineError]:
        if model not in self.engines:
            return [LineError(1, "model_not_found", f"The model {model!r} is not served here.", "body.model")]
        refusal = grant_refusal(model, self.store.find_grant(key_id, model), utcnow())
        if refusal is not None:
            return [LineError(1, refusal.code, refusal.message, "body.model")]
        return []

    async def _finalize(self, batch_id: str) -> None:
        try:
            if batch_id in self._unsure:
                await asyncio.to_thread(self._drop_unsure, batch_id)
            batch = await asyncio.to_thread(self.repository.begin_finalizing, batch_id, self.replica_id)
            if batch is not None:
                await asyncio.to_thread(self._write_results, batch)
                await asyncio.to_thread(self._drop_input, batch)
        except UNREACHABLE as exc:  # written again at a later round
            log.error("batch %s: results not saved, the store did not answer; trying again: %s", batch_id, _first(exc))
            self._step_failed(batch_id)
            return
        self._stopped.pop(batch_id, None)
        self._step_done(batch_id)

    def _drop_unsure(self, batch_id: str) -> None:
        """The result files of a try whose end the store did not confirm: deleted unless the batch names them."""
        batch = self.repository.batch(batch_id)
        kept = {batch.output_file_id, batch.error_file_id} if batch is not None else set()
        for file_id in self._unsure.pop(batch_id):
            if file_id not in kept:
                self.files.delete(file_id)

    def _write_results(self, batch: BatchView) -> None:
        """The output and error files, streamed from the lines' results in input order; then the batch ends."""
        ending = batch.ending or Status.COMPLETED
        code, why = _ending_words(ending)
        not_run = 0

        def unrun() -> Iterator[str]:
            nonlocal not_run
            for custom_id in self.repository.not_run(batch.id):
                not_run += 1
                error = {"code": code, "message": f"This request was not run: {why}."}
                line = {"id": new_result_id(), "custom_id": custom_id, "response": None, "error": error}
                yield json.dumps(line, ensure_ascii=False, separators=(",", ":"))

        made: list[FileView] = []
        ids: list[str | None] = []
        try:
            for name, results in (
                ("output", self.repository.results(batch.id, True)),
                ("error", itertools.chain(self.repository.results(batch.id, False), unrun())),
            ):
                file_id = new_file_id()
                size = self.files.write_lines(file_id, results)
                if size == 0:
                    self.files.delete(file_id)
                    ids.append(None)
                    continue
                made.append(FileView(file_id, batch.key_id, f"{batch.id}_{name}.jsonl", BATCH_OUTPUT, size, utcnow()))
                ids.append(file_id)
        except BaseException:  # the store or the disk failed midway: the files made so far are no one's
            for file in made:
                self.files.delete(file.id)
            raise
        try:
            recorded = self.repository.finalized(batch.id, self.replica_id, ending, made, ids[0], ids[1], not_run)
        except BaseException:
            # Whether the batch was ended with these files is not known: a store may commit, then fail to say so
            # (a connection cut). Deleted now, a batch so ended would name files that are gone, its results lost;
            # the next try (``_finalize``) deletes them once the store shows they are not the batch's.
            self._unsure[batch.id] = [file.id for file in made]
            raise
        if not recorded:  # another replica took the step over meanwhile: its files count
            for file in made:
                self.files.delete(file.id)
            return
        log.info(
            "batch %s %s: %d completed, %d failed", batch.id, ending.value, batch.completed, batch.failed + not_run
        )


def error_of(body: Any, status: int) -> dict[str, Any]:
    """The API's code and message, from either surface's error shape."""
    if isinstance(body, dict):
        inner: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else body
        return {"code": inner.get("code") or str(status), "message": inner.get("message") or ""}
    return {"code": str(status), "message": str(body)}


def _first(exc: BaseException) -> str:
    """An error's first line (SQLAlchemy's add the statement and its parameters: a whole result line)."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _ending_words(ending: Status) -> tuple[str, str]:
    """The error code of a line a batch's end left unfinished, and why, in words."""
    if ending is Status.EXPIRED:
        return EXPIRED_CODE, "the batch's completion window ended"
    return CANCELLED_CODE, "the batch was cancelled"


def _made(call: LineCall) -> tuple[int, int]:
    """The input and output tokens a line's request was charged for (none if it was refused before it ran)."""
    reply = call.state.get("reply")  # the request path keeps its reply there (api.incoming.open_reply)
    usage = getattr(reply, "usage", None) if getattr(reply, "admission", None) is not None else None
    return (int(usage.input_tokens), int(usage.output_tokens)) if usage is not None else (0, 0)


def _seconds(retry_after: str | None) -> float:
    """A Retry-After in seconds (none, or not a number: ``PAUSE_SECONDS``)."""
    try:
        seconds = float(retry_after) if retry_after is not None else PAUSE_SECONDS
    except ValueError:
        seconds = PAUSE_SECONDS
    return min(max(seconds, 0.0), MAX_PAUSE_SECONDS) if math.isfinite(seconds) else PAUSE_SECONDS


def _usage_body(endpoint: str, input_tokens: int, output_tokens: int) -> dict[str, int]:
    """A usage object in the endpoint's own words."""
    total = input_tokens + output_tokens
    if endpoint == input_lines.CHAT:
        return {"prompt_tokens": input_tokens, "completion_tokens": output_tokens, "total_tokens": total}
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": total}


def _usage(body: Any) -> tuple[int, int]:
    """Input and output tokens of an answer, in either surface's words (none: 0, 0)."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    if "prompt_tokens" in usage:
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
