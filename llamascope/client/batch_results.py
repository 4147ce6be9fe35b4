"""The results of a batch as ``llamascope batch`` saves them: its output and error files as one JSONL file
(each line as the server wrote it) and a CSV table of custom_id, status, answer and error."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llamascope.client.batches import Batch, BatchClient

CSV_COLUMNS = ("custom_id", "status", "answer", "error")


def answer_text(body: Any) -> str:
    """The answer's text in a response body: chat completions, or DashScope's native shapes."""
    if not isinstance(body, dict):
        return ""
    choices = body.get("choices") or (body.get("output") or {}).get("choices") or []
    if not choices:
        return str((body.get("output") or {}).get("text") or "")
    content = (choices[0].get("message") or {}).get("content")
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content or "")


def result_row(line: dict[str, Any]) -> dict[str, str]:
    """One result line as a row of the table: custom_id, status (ok, failed, cancelled, expired), answer, error."""
    error = line.get("error")
    response = line.get("response") or {}
    if not error:
        return {
            "custom_id": line.get("custom_id", ""),
            "status": "ok",
            "answer": answer_text(response.get("body")),
            "error": "",
        }
    code = str(error.get("code") or "")
    status = {"batch_cancelled": "cancelled", "batch_expired": "expired"}.get(code, "failed")
    return {
        "custom_id": line.get("custom_id", ""),
        "status": status,
        "answer": "",
        "error": f"{code}: {error.get('message', '')}",
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
