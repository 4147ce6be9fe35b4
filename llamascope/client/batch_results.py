"""The results of a batch as ``llamascope batch`` saves them: its output and error files as one JSONL file
(each line as the server wrote it) and a CSV table of custom_id, status, answer, error and finish_reason."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

from llamascope.client.batches import Batch, BatchClient

# finish_reason last: a table read by column position keeps its first four.
CSV_COLUMNS = ("custom_id", "status", "answer", "error", "finish_reason")


def _first_choice(body: Any) -> dict[str, Any]:
    """The first choice of a response body (chat completions, or DashScope's native message format), or {}."""
    if not isinstance(body, dict):
        return {}
    choices = body.get("choices") or (body.get("output") or {}).get("choices") or []
    return choices[0] if choices and isinstance(choices[0], dict) else {}


def answer_text(body: Any) -> str:
    """The answer in a response body: its text (chat completions, or DashScope's native shapes), or for an
    answer of tool calls, which has none, the calls as a JSON list of ``{"name", "arguments"}``."""
    if not isinstance(body, dict):
        return ""
    choice = _first_choice(body)
    if not choice:
        return str((body.get("output") or {}).get("text") or "")
    message = choice.get("message") or {}
    calls = message.get("tool_calls")
    if calls:
        return "[" + ", ".join(_call(call) for call in calls) + "]"
    content = message.get("content")
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content or "")


def _call(call: Any) -> str:
    """One call as ``{"name": ..., "arguments": ...}``, its arguments the JSON the model wrote: parsed and written
    again, a number past a float's range (752e4124810271312) came back as Infinity, which is no JSON, and 0.10 as
    0.1. Arguments that are not strict JSON are written as a string."""
    function = (call.get("function") if isinstance(call, dict) else None) or {}
    arguments = function.get("arguments")
    written = json.dumps(arguments, ensure_ascii=False)
    if isinstance(arguments, str):
        with suppress(ValueError):
            json.loads(arguments, parse_constant=_no_constant)
            written = arguments.strip()
    return f'{{"name": {json.dumps(function.get("name"), ensure_ascii=False)}, "arguments": {written}}}'


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is no JSON")


def finish_reason(body: Any) -> str:
    """Why the answer ended ("stop", "length", "tool_calls"): a JSON answer cut by max_tokens is not JSON."""
    reason = _first_choice(body).get("finish_reason")
    if reason is None and isinstance(body, dict):
        reason = (body.get("output") or {}).get("finish_reason")
    return str(reason or "")


def result_row(line: dict[str, Any]) -> dict[str, str]:
    """One result line as a row of the table: custom_id, status (ok, failed, cancelled, expired), answer, error,
    finish_reason."""
    error = line.get("error")
    response = line.get("response") or {}
    if not error:
        body = response.get("body")
        return {
            "custom_id": line.get("custom_id", ""),
            "status": "ok",
            "answer": answer_text(body),
            "error": "",
            "finish_reason": finish_reason(body),
        }
    code = str(error.get("code") or "")
    status = {"batch_cancelled": "cancelled", "batch_expired": "expired"}.get(code, "failed")
    return {
        "custom_id": line.get("custom_id", ""),
        "status": status,
        "answer": "",
        "error": f"{code}: {error.get('message', '')}",
        "finish_reason": "",
    }


def save_results(client: BatchClient, batch: Batch, prefix: Path) -> tuple[Path, Path, int]:
    """The batch's output and error files as ``prefix.jsonl`` (each line as the server wrote it) and
    ``prefix.csv`` (one row a line); the paths and the number of rows."""
    jsonl, table = prefix.with_name(prefix.name + ".jsonl"), prefix.with_name(prefix.name + ".csv")
    rows = 0
    with jsonl.open("w", encoding="utf-8") as out, table.open("w", encoding="utf-8", newline="") as sheet:
        writer = csv.DictWriter(sheet, CSV_COLUMNS)
        writer.writeheader()
        for text in _result_lines(client, batch):
            out.write(text + "\n")
            writer.writerow(result_row(json.loads(text)))
            rows += 1
    return jsonl, table, rows


def _result_lines(client: BatchClient, batch: Batch) -> Iterator[str]:
    for name in ("output_file_id", "error_file_id"):
        yield from client.lines(batch.raw.get(name))
