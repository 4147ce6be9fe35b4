"""An input file checked line by line as it streams: never loaded whole, one line in memory at a time.

Each line is ``{"custom_id", "method": "POST", "url", "body"}`` with ``url`` the batch's endpoint: OpenAI's
``/v1/chat/completions``, or (llamascope's own) the native multimodal-generation or text-generation path
with a DashScope body. What the body asks of the model is checked when the line runs, by the API itself
(its refusal goes to the error file); here only what would make the batch as a whole wrong: the envelope,
the limits, one model, unique ``custom_id``s.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from llamascope.batch.records import LineError

CHAT = "/v1/chat/completions"
MULTIMODAL = "/api/v1/services/aigc/multimodal-generation/generation"
TEXT = "/api/v1/services/aigc/text-generation/generation"
ENDPOINTS = (CHAT, MULTIMODAL, TEXT)

MAX_LINES = 50_000
MAX_FILE_BYTES = 500 * 1024 * 1024
MAX_LINE_BYTES = 6 * 1024 * 1024
MAX_ERRORS = 100  # a file wrong on every line names its first ones
Fail = Callable[..., None]  # (line, code, message, param=None)


@dataclass(frozen=True)
class Line:
    """A line that passed: where its bytes are, for the runner to read it again."""

    number: int  # its line in the file, 1-based (blank lines counted, as an editor counts them)
    custom_id: str
    offset: int
    length: int


@dataclass
class Checked:
    """What reading a whole file found: its model (None if no line named one), its line count, errors."""

    model: str | None = None
    lines: int = 0
    errors: list[LineError] | None = None


def read(stream: BinaryIO, endpoint: str, found: Checked) -> Iterator[Line]:
    """The file's lines, checked; ``found`` gathers the model, the count and the errors as they stream.

    A caller stores the lines as they come and throws them away if ``found.errors`` is set at the end."""
    errors: list[LineError] = []
    found.errors = errors
    seen: dict[str, int] = {}
    offset = 0
    number = 0  # the line in the file, named in errors
    requests = 0  # the lines not blank

    def fail(line: int | None, code: str, message: str, param: str | None = None) -> None:
        if len(errors) < MAX_ERRORS:
            errors.append(LineError(line, code, message, param))

    while True:
        data = stream.readline(MAX_LINE_BYTES + 1)
        if not data:
            break
        number += 1
        start, length = offset, len(data)
        if len(data) > MAX_LINE_BYTES and not data.endswith(b"\n"):
            while data and not data.endswith(b"\n"):
                data = stream.readline(MAX_LINE_BYTES)
                length += len(data)
            offset += length
            fail(number, "invalid_request", f"Line {number} is over 6 MB ({length} bytes).")
            continue
        offset += length
        if offset > MAX_FILE_BYTES:
            fail(None, "invalid_file", "The file is over 500 MB.")
            break
        if not data.strip():
            continue  # blank lines (a trailing newline) are not requests, but are lines of the file
        requests += 1
        if requests > MAX_LINES:
            fail(number, "invalid_file", f"The file has more than {MAX_LINES} requests.")
            break
        line = _check(data, number, endpoint, fail)
        if line is None:
            continue
        custom_id, model = line
        if custom_id in seen:
            fail(
                number,
                "duplicate_custom_id",
                f"Line {number}: custom_id {custom_id!r} is on line {seen[custom_id]} too; each must be unique.",
                "custom_id",
            )
            continue
        seen[custom_id] = number
        if found.model is None:
            found.model = model
        elif model != found.model:
            fail(
                number,
                "mismatched_model",
                f"Line {number} asks for model {model!r}, the lines before it for "
                f"{found.model!r}: a batch has one model.",
                "body.model",
            )
            continue
        yield Line(number, custom_id, start, length)
    found.lines = min(requests, MAX_LINES)
    if requests == 0:
        fail(None, "empty_file", "The file has no requests.")


def _check(data: bytes, number: int, endpoint: str, fail: Fail) -> tuple[str, str] | None:
    """A line's custom_id and model, or None after saying what is wrong with it."""
    try:
        request = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        fail(number, "invalid_json_line", f"Line {number} is not valid JSON (UTF-8, one object a line).")
        return None
    except RecursionError:  # nested past the parser's own limit (the API refuses past 128 levels)
        fail(number, "invalid_json_line", f"Line {number} is nested too deeply to be read as JSON.")
        return None
    if not isinstance(request, dict):
        fail(number, "invalid_json_line", f"Line {number} is not a JSON object.")
        return None
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        fail(number, "missing_required_parameter", f"Line {number} has no custom_id (a non-empty string).", "custom_id")
        return None
    if request.get("method") != "POST":
        fail(number, "invalid_request", f"Line {number}: method must be POST.", "method")
        return None
    url = request.get("url")
    if url != endpoint:
        fail(number, "invalid_url", f"Line {number}: url {url!r} is not the batch's endpoint {endpoint!r}.", "url")
        return None
    body = request.get("body")
    if not isinstance(body, dict):
        fail(number, "invalid_request", f"Line {number}: body must be a JSON object.", "body")
        return None
    model = body.get("model")
    if not isinstance(model, str) or not model:
        fail(number, "missing_required_parameter", f"Line {number}: body.model is missing.", "body.model")
        return None
    if body.get("stream") is True:
        fail(number, "invalid_request", f"Line {number}: a batch line cannot stream (body.stream).", "body.stream")
        return None
    return custom_id, model
