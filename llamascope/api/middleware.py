"""Cross-cutting HTTP work as plain ASGI middleware.

- ``RequestContext``: a request id for every request (``x-request-id``); when
  it ends, the one place its reply is settled (its usage charged), its
  ``Outcome`` pushed to the metrics and the trace, and one access-log line:
  id, key prefix, route, model, tokens, finish, status, latency. Never the
  key itself. A request refused before it ran names the served model it
  asked for (``incoming.read_json`` keeps it as it reads the body).
- ``BodyLimit``: refuses bodies over the limit while they arrive, whatever
  Content-Length says.
- ``Authentication``: applies ``accounts.keys.authenticate`` to every route
  but the public ones (exact paths, and prefixes such as the playground's
  static files).
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamascope import errors
from llamascope.accounts.admission import Accounts
from llamascope.api.errors import error_response
from llamascope.batch.caller import caller_of, principal_of
from llamascope.conversation.service import Reply
from llamascope.observability import request as observed
from llamascope.observability.facts import Outcome
from llamascope.observability.logs import AccessRecord

access_log = logging.getLogger("llamascope.access")


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = str(uuid.uuid4())
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        observation = observed.begin(scope, request_id)  # metrics, trace and log context of this request
        started = time.perf_counter()
        status = 0
        disconnected = False

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                for name, _ in headers:
                    if name.lower() == b"x-request-id":
                        break
                else:
                    headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        async def receive_watching() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
            return message

        try:
            await self.app(scope, receive_watching, send_with_id)
        except BaseException:
            status = status or 500
            raise
        finally:
            reply: Reply | None = state.get("reply")  # api.incoming.open_reply keeps it there
            if reply is not None:
                await reply.settle()  # the one place a request is charged, however it ended
            principal = state.get("principal")
            outcome = Outcome(
                status=status,
                seconds=time.perf_counter() - started,
                error_code=state.get("error_code"),
                key_name=principal.key.name if principal is not None else None,
                generation=reply.generation() if reply is not None else None,
            )
            observed.end(observation, scope, outcome)
            self._log(scope, state, outcome, disconnected, observation)
            observed.finished(observation)

    @staticmethod
    def _log(
        scope: Scope,
        state: dict[str, Any],
        outcome: Outcome,
        disconnected: bool,
        observation: observed.RequestObservation,
    ) -> None:
        if scope.get("path") in ("/health", "/metrics") or not access_log.isEnabledFor(logging.INFO):
            return
        principal = state.get("principal")
        generation = outcome.generation
        fields: dict[str, Any] = {
            "request_id": state["request_id"],
            "key": principal.key_prefix if principal else None,
            "method": scope.get("method", "-"),
            "path": scope.get("path", "-"),
            "model": generation.model if generation else state.get("model"),
            "status": outcome.status,
        }
        if generation is not None:
            fields["input_tokens"] = generation.input_tokens
            fields["output_tokens"] = generation.output_tokens
            fields["image_tokens"] = generation.image_tokens
            fields["finish"] = generation.finish_reason or "-"
        fields["error"] = outcome.error_code
        if disconnected and (generation is None or generation.finish_reason is None):
            fields["client_disconnected"] = True
        fields["client_request_id"] = observation.client_request_id
        fields["trace_id"] = observation.trace_id
        fields["latency_ms"] = round(outcome.seconds * 1000, 1)
        access_log.info(AccessRecord(fields))


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, larger: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.larger = larger or {}  # paths with a limit of their own (the Files API's uploads)

    def _error(self, max_bytes: int) -> errors.ServiceError:
        return errors.ServiceError(
            413, "BadRequest.TooLarge", f"Exceeded limit on max bytes to request body : {max_bytes}"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.larger.get(scope["path"], self.max_bytes)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > max_bytes:
                scope.setdefault("state", {})["error_code"] = "BadRequest.TooLarge"
                await error_response(self._error(max_bytes), scope["state"].get("request_id", ""), scope["path"])(
                    scope, receive, send
                )
                return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise self._error(max_bytes)
            return message

        await self.app(scope, counting_receive, send)


class Authentication:
    """Every route but the public ones needs a key: an API key, or the admin key under /admin/."""

    def __init__(
        self,
        app: ASGIApp,
        accounts: Accounts,
        public_paths: frozenset[str],
        admin_key: str | None = None,
        public_prefixes: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.accounts = accounts
        self.public_paths = public_paths
        self.public_prefixes = public_prefixes
        self.admin_key = admin_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in self.public_paths or path.startswith(self.public_prefixes):
            await self.app(scope, receive, send)
            return
        authorization = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        state = scope.setdefault("state", {})
        try:
            if scope["path"].startswith("/admin/"):
                self._check_admin(authorization)
            elif (caller := caller_of(scope)) is not None:  # a batch line, run in process as its batch's key
                state["principal"] = await principal_of(self.accounts, caller)
            else:
                state["principal"] = await self.accounts.authenticate(authorization)
        except errors.ServiceError as refusal:
            state["error_code"] = refusal.code
            await error_response(refusal, state.get("request_id", ""), scope["path"])(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:  # a key's request refused before it reached a model has no ledger row: count it (no I/O)
            if (code := state.get("error_code")) and "principal" in state and "reply" not in state:
                self.accounts.store.record_refusal(state["principal"].key.id, state.get("model", ""), code)

    def _check_admin(self, authorization: str | None) -> None:
        if self.admin_key is None:
            raise errors.ServiceError(404, "NotFound", "The admin API is off (set LLAMASCOPE_ADMIN_KEY).")
        expected = f"Bearer {self.admin_key}".encode()
        if not hmac.compare_digest(expected, (authorization or "").strip().encode()):
            raise errors.invalid_api_key()
