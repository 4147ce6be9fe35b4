"""DashScope's server-sent-event framing (wire spec 5.2 and 6.2).

A result block is::

    id:N
    event:result
    :HTTP_STATUS/200
    data:{single-line JSON}

An error block is ``event:error`` (exactly: no space, lower case, or the 1.x
SDK takes it for a result and crashes), the ``:HTTP_STATUS/<s>`` comment, a
``status:<s>`` line so the 1.x SDK reports the true status (DashScope itself
does not send it; other parsers ignore it), and data with both ``code`` and
``message``. The stream ends after the last block; there is no ``[DONE]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from pydantic import BaseModel

from llamascope import errors
from llamascope.api import openapi
from llamascope.api.native.protocol import ErrorBody, GenerationResult
from llamascope.conversation.service import Event, Reply, Usage
from llamascope.engines.base import TokenLogprob
from llamascope.structured.tools import ToolCall

# A result body from (text, finish_reason, usage, request_id, tool_calls, logprobs or None when not asked):
# each API family shapes its own.
Render = Callable[[str, str, Usage, str, Sequence[ToolCall], list[TokenLogprob] | None], BaseModel]

MEDIA_TYPE = "text/event-stream;charset=UTF-8"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# For the OpenAPI document: the events a stream may carry.
EVENTS = openapi.Stream(
    (("result", GenerationResult), ("error", ErrorBody)),
    'Results (cumulative text unless parameters.incremental_output), finish_reason "null" until the last; '
    'an answer that calls tools has them all in its last result (finish_reason "tool_calls"); '
    "an error after the stream started ends it as an `error` event (with a `status:` line).",
)


def result_block(n: int, result: BaseModel) -> bytes:
    return f"id:{n}\nevent:result\n:HTTP_STATUS/200\ndata:{result.model_dump_json(exclude_none=True)}\n\n".encode()


def error_block(n: int, error: errors.ServiceError, request_id: str) -> bytes:
    body = ErrorBody(code=error.code, message=error.message, request_id=request_id)
    s = error.status
    return f"id:{n}\nevent:error\n:HTTP_STATUS/{s}\nstatus:{s}\ndata:{body.model_dump_json()}\n\n".encode()


async def stream(
    reply: Reply, events: AsyncIterator[Event], request_id: str, state: Any, render: Render = GenerationResult.of
) -> AsyncIterator[bytes]:
    """One block per event; cumulative text unless the request asked for increments. Tool calls come whole in
    the last event: the full list, which is also all that is new. Log-probabilities, when asked, come with
    the tokens new in each event in increments; without, all of them in the last event (each event repeating
    those so far would send the square of the answer's length)."""
    incremental = reply.options.incremental_output
    wants_logprobs = reply.options.sampling.logprobs is not None
    n = 0
    try:
        async for event in events:
            n += 1
            finish = event.finish_reason.value if event.finish_reason else "null"
            text = event.delta if incremental else event.text
            logprobs = None
            if wants_logprobs and (incremental or event.finish_reason):
                logprobs = event.logprobs if incremental else reply.logprobs
            yield result_block(n, render(text, finish, event.usage, request_id, event.tool_calls, logprobs))
    except errors.ServiceError as error:
        state.error_code = error.code  # for the access log
        yield error_block(n + 1, error, request_id)
