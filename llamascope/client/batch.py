"""``llamascope batch``: a folder of images and a prompt as one batch job, watched to its end, its results saved.

``add_parser`` registers the command and its subcommands, ``run`` carries them out. The input file is built on
disk (``build_input``), one chat-completions request an image with the image inline as a ``data:`` URI, so a
folder of any size never sits in memory; ``Watch`` polls the batch and shows its progress; ``save_results``
writes its output and error files as one JSONL file and a CSV table. The HTTP side is
``llamascope.client.batches``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, TextIO

from llamascope.client.answering import show_error
from llamascope.client.attachment import data_uri
from llamascope.client.batches import CHAT_ENDPOINT, Batch, BatchClient, compatible_base
from llamascope.client.chat import discover_model, resolve_api_key, schema_format
from llamascope.client.native import DEFAULT_BASE_URL, APIError, Client

DESCRIPTION = """\
Run many requests as one batch job through the Batch API: a local llamascope
by default, or the server that DASHSCOPE_HTTP_BASE_URL and DASHSCOPE_API_KEY
name (--base-url and --api-key override them, as for `llamascope chat`).

`submit FOLDER PROMPT` asks PROMPT of every image in FOLDER (one request an
image, custom_id the file name), watches the batch with a progress bar and,
once it has ended, writes its results as JSONL and CSV. Ctrl+C stops watching,
not the batch: `watch ID` takes it up again. `submit FILE.jsonl` sends a
batch input file you made yourself."""

EPILOG = """\
examples:
  llamascope batch submit photos/ "Caption this photo." --max-tokens 64
  llamascope batch submit scans/ "Read the receipt." --schema receipt.schema.json
  llamascope batch submit requests.jsonl --no-watch
  llamascope batch watch batch_0a1b...        (after Ctrl+C)
  llamascope batch list
  llamascope batch download batch_0a1b... -o captions    (captions.jsonl, captions.csv)"""

# The Batch API's limits (DashScope's and llamascope's): a line, a file, lines in a file.
MAX_LINE_BYTES = 6 * 1024 * 1024
MAX_FILE_BYTES = 500 * 1024 * 1024
MAX_LINES = 50_000
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jp2"})
CSV_COLUMNS = ("custom_id", "status", "answer", "error")
MB = 1024 * 1024


def add_parser(commands: Any) -> None:
    """Register ``batch`` and its subcommands on the ``llamascope`` command's subparsers."""
    batch = commands.add_parser(
        "batch",
        help="batch jobs: a folder of images and a prompt, watched to the end; list, status, cancel, download",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = batch.add_subparsers(dest="action", required=True)

    submit = actions.add_parser("submit", help="submit a folder of images and a prompt, or a JSONL batch input file")
    submit.add_argument("source", type=Path, help="a folder of images, or a JSONL file of requests")
    submit.add_argument("prompt", nargs="?", help="what to ask of each image (with a folder)")
    submit.add_argument("-m", "--model", help="model name (default: the first the server lists)")
    submit.add_argument("-s", "--system", help="system prompt")
    submit.add_argument("--max-tokens", type=int, help="at most this many tokens an answer")
    submit.add_argument("--temperature", type=float, help="sampling temperature")
    submit.add_argument(
        "--schema", metavar="FILE", type=Path, help="a JSON Schema each answer is held to (response_format)"
    )
    submit.add_argument(
        "--endpoint", help=f"each line's url, for a JSONL file (default: its first line's, else {CHAT_ENDPOINT})"
    )
    submit.add_argument("--window", default="24h", help="completion window: 24h to 336h, or 1d to 14d (default 24h)")
    submit.add_argument("--no-watch", action="store_true", help="print the batch's id and exit")

    watch = actions.add_parser("watch", help="show a batch's progress until it ends, then save its results")
    watch.add_argument("batch_id")
    actions.add_parser("list", help="your batches, newest first").add_argument(
        "--limit", type=int, default=20, help="at most this many (default 20, at most 100)"
    )
    status = actions.add_parser("status", help="a batch's status, counts, tokens, files and input errors")
    status.add_argument("batch_id")
    status.add_argument("--json", action="store_true", help="the batch object as the API sends it")
    actions.add_parser("cancel", help="cancel a batch (lines done keep their results)").add_argument("batch_id")
    download = actions.add_parser("download", help="a batch's results (JSONL and CSV), or any batch file by its id")
    download.add_argument("id", help="a batch id (batch_...) or a file id")
    for command in (submit, watch, download):
        command.add_argument(
            "-o",
            "--output",
            type=Path,
            help="results: PATH.jsonl and PATH.csv (default: the batch's id, here); a file id: the file "
            "(default: standard output)",
        )
    for command in (submit, watch):
        command.add_argument("--interval", type=float, default=1.0, help="seconds between two looks (default 1)")
    for command in actions.choices.values():
        command.add_argument(
            "--base-url", help=f"the API's base URL (default: $DASHSCOPE_HTTP_BASE_URL or {DEFAULT_BASE_URL})"
        )
        command.add_argument("--api-key", help="API key (default: $DASHSCOPE_API_KEY, then the SDK's key files)")


class InputProblem(Exception):
    """The batch cannot be built or sent as asked: the message says why, for a person."""


# -- the input file -----------------------------------------------------------------------------------------


def images_in(folder: Path) -> list[Path]:
    """The images directly in ``folder``, by name (hidden files and other files left out)."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def request_line(custom_id: str, image: str, prompt: str, model: str, parameters: dict[str, Any]) -> bytes:
    """One line of the input: a chat-completions request with the image and the prompt."""
    messages: list[dict[str, Any]] = []
    if parameters.get("system"):
        messages.append({"role": "system", "content": parameters["system"]})
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": prompt}]
    messages.append({"role": "user", "content": content})
    body = {"model": model, "messages": messages, **{k: v for k, v in parameters.items() if k != "system"}}
    line = {"custom_id": custom_id, "method": "POST", "url": CHAT_ENDPOINT, "body": body}
    return json.dumps(line, ensure_ascii=False).encode()


def build_input(folder: Path, prompt: str, model: str, parameters: dict[str, Any], target: BinaryIO) -> int:
    """Write one request an image of ``folder`` to the binary file ``target``; the number of lines.
    InputProblem (before anything is sent) names every image whose line is over the API's 6 MB, and a folder
    with no image or over the API's other limits."""
    images = images_in(folder)
    if not images:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise InputProblem(f"no images in {folder} (files ending in {suffixes})")
    if len(images) > MAX_LINES:
        raise InputProblem(f"{len(images)} images in {folder}: a batch takes at most {MAX_LINES:,}; split the folder")
    too_big: list[str] = []
    written = 0
    for path in images:
        data = path.read_bytes()
        line = request_line(path.name, data_uri(data, path.name), prompt, model, parameters)
        if len(line) > MAX_LINE_BYTES:
            too_big.append(f"  {path.name}: {len(data) / MB:.1f} MB, its request line {len(line) / MB:.1f} MB")
            continue
        if not too_big:
            target.write(line + b"\n")
            written += len(line) + 1
            if written > MAX_FILE_BYTES:
                raise InputProblem(f"the images of {folder} make over 500 MB of requests, a batch's limit: split it")
    if too_big:
        raise InputProblem(
            "over the 6 MB a request line may have (an image grows by a third as base64, so about 4.5 MB an "
            "image at most); shrink these or move them out of the folder:\n" + "\n".join(too_big)
        )
    return len(images)


def endpoint_of(path: Path) -> str:
    """The ``url`` of a JSONL input file's first line (the batch's endpoint must equal it)."""
    with path.open("rb") as source:
        first = source.readline(MAX_LINE_BYTES + 1)
    try:
        url = json.loads(first).get("url")
    except (ValueError, AttributeError):
        url = None
    return url if isinstance(url, str) and url else CHAT_ENDPOINT


# -- watching -----------------------------------------------------------------------------------------------


@dataclass
class Pace:
    """Tokens a second and the time left, from what changed since watching began."""

    started: float
    tokens: int
    lines: int

    def rates(self, batch: Batch, now: float) -> tuple[float, float | None]:
        elapsed = now - self.started
        if elapsed <= 0:
            return 0.0, None
        tokens = max(0, batch.tokens() - self.tokens) / elapsed
        ended = batch.count("completed") + batch.count("failed")
        lines = (ended - self.lines) / elapsed
        left = batch.count("total") - ended
        return tokens, (left / lines if lines > 0 else None)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class Watch:
    """A batch's progress: a rich bar on a terminal (done, failed, tokens/s, ETA), else a line per change."""

    def __init__(self, live: bool, stream: TextIO | None = None) -> None:
        self.live = live
        self.stream = stream or sys.stderr
        self.pace: Pace | None = None
        self.counted = False  # the batch had lines (was past validating) when the pace began
        self.last = ""
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> Watch:
        if self.live:
            # rich's progress bar only on a terminal (rich loads with it).
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("failed {task.fields[failed]}  {task.fields[rate]:.1f} tokens/s  ETA {task.fields[eta]}"),
                console=Console(file=self.stream),
            )
            self.task = self.progress.add_task("validating", total=None, failed=0, rate=0.0, eta="-:--:--")
            self.progress.start()
        return self

    def show(self, batch: Batch) -> None:
        now = time.monotonic()
        done, failed, total = batch.count("completed"), batch.count("failed"), batch.count("total")
        if self.pace is None or (total and not self.counted):  # the pace counts from the lines' start
            self.pace = Pace(now, batch.tokens(), done + failed)
            self.counted = bool(total)
        rate, left = self.pace.rates(batch, now)
        if self.live:
            self.progress.update(
                self.task,
                description=batch.status,
                total=total or None,
                completed=done + failed,
                failed=failed,
                rate=rate,
                eta=_eta(left),
            )
            return
        line = f"{batch.status}: {done + failed}/{total} ({failed} failed)"
        if line != self.last:
            print(f"{line}, {rate:.1f} tokens/s, ETA {_eta(left)}", file=self.stream, flush=True)
            self.last = line

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.progress is not None:
            self.progress.stop()


def watch(client: BatchClient, batch_id: str, interval: float, live: bool) -> Batch:
    """Look at the batch every ``interval`` seconds until it has ended; KeyboardInterrupt (Ctrl+C) goes up."""
    with Watch(live) as progress:
        while True:
            batch = client.retrieve(batch_id)
            progress.show(batch)
            if batch.ended:
                return batch
            time.sleep(interval)


# -- results ------------------------------------------------------------------------------------------------


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


# -- the command --------------------------------------------------------------------------------------------


def native_base(base_url: str) -> str:
    base = base_url.rstrip("/")
    for suffix in ("/compatible-mode/v1", "/v1"):
        if base.endswith(suffix) and not base.endswith("/api/v1"):
            return base.removesuffix(suffix) + "/api/v1"
    return base


def run(args: argparse.Namespace) -> int:
    """``llamascope batch ...``: the exit status (1: the API refused; 2: the command could not be carried out;
    130: watching stopped by Ctrl+C)."""
    base_url = args.base_url or os.environ.get("DASHSCOPE_HTTP_BASE_URL") or DEFAULT_BASE_URL
    key = resolve_api_key(args.api_key)
    if not key:
        print("llamascope batch: no API key: give --api-key or set DASHSCOPE_API_KEY", file=sys.stderr)
        return 2
    batch_id = getattr(args, "batch_id", None)
    try:
        with BatchClient(compatible_base(base_url), key) as client:
            if args.action == "submit":
                batch_id = submit(client, args, native_base(base_url), key)
                if args.no_watch:
                    print(batch_id)
                    return 0
                return follow(client, batch_id, args)
            if args.action == "watch":
                return follow(client, args.batch_id, args)
            if args.action == "list":
                print(batches_table(client.list(limit=args.limit)))
            elif args.action == "status":
                batch = client.retrieve(args.batch_id)
                print(json.dumps(batch.raw, indent=2) if args.json else describe(batch))
            elif args.action == "cancel":
                print(describe(client.cancel(args.batch_id)))
            elif args.action == "download":
                return download(client, args.id, args.output)
    except APIError as error:
        show_error(error)
        return 1
    except InputProblem as problem:
        print(f"llamascope batch: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\nstopped watching; batch {batch_id} goes on. `llamascope batch watch {batch_id}` takes it up again, "
            f"`llamascope batch cancel {batch_id}` stops it.",
            file=sys.stderr,
        )
        return 130
    return 0


def submit(client: BatchClient, args: argparse.Namespace, native_url: str, key: str) -> str:
    """Build (for a folder) and upload the input, create the batch: its id."""
    source: Path = args.source
    if source.is_dir():
        if not args.prompt:
            raise InputProblem(f"{source} is a folder: give the prompt to ask of each image")
        parameters: dict[str, Any] = {"system": args.system} if args.system else {}
        if args.max_tokens is not None:
            parameters["max_tokens"] = args.max_tokens
        if args.temperature is not None:
            parameters["temperature"] = args.temperature
        if args.schema is not None:
            try:
                parameters["response_format"] = schema_format(args.schema)
            except (OSError, ValueError) as exc:
                raise InputProblem(f"--schema {args.schema}: {exc}") from None
        with Client(native_url, key) as native:
            model, _ = discover_model(native, args.model)
        with tempfile.TemporaryDirectory(prefix="llamascope-batch-") as scratch:
            path = Path(scratch) / f"{source.resolve().name or 'images'}.jsonl"
            with path.open("wb") as target:
                count = build_input(source, args.prompt, model, parameters, target)
            print(f"{count} images of {source}, to {model}", file=sys.stderr)
            file = client.upload(path)
        endpoint = CHAT_ENDPOINT
    elif source.is_file():
        if args.prompt:
            raise InputProblem(f"{source} is a batch input file: its lines hold the prompts (give no prompt)")
        endpoint = args.endpoint or endpoint_of(source)
        file = client.upload(source)
    else:
        raise InputProblem(f"no such folder or file: {source}")
    batch = client.create(file["id"], endpoint, args.window)
    print(f"batch {batch.id} submitted", file=sys.stderr, flush=True)
    return batch.id


def follow(client: BatchClient, batch_id: str, args: argparse.Namespace) -> int:
    """Watch the batch to its end, then save its results: 0 when it completed."""
    live = sys.stderr.isatty()
    if not live:
        print(f"watching batch {batch_id} (Ctrl+C stops watching, not the batch)", file=sys.stderr, flush=True)
    batch = watch(client, batch_id, args.interval, live)
    print(describe(batch), file=sys.stderr)
    if batch.status == "failed":
        return 1
    jsonl, table, rows = save_results(client, batch, args.output or Path(batch.id))
    print(f"{rows} results in {jsonl} and {table}", file=sys.stderr)
    return 0 if batch.status == "completed" else 1


def download(client: BatchClient, ident: str, output: Path | None) -> int:
    if ident.startswith("batch_"):
        batch = client.retrieve(ident)
        if not batch.ended:
            print(f"llamascope batch: batch {ident} is {batch.status}: results come once it has ended", file=sys.stderr)
            return 2
        jsonl, table, rows = save_results(client, batch, output or Path(batch.id))
        print(f"{rows} results in {jsonl} and {table}", file=sys.stderr)
        return 0
    if output is None:
        for chunk in client.content(ident):
            sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        return 0
    with output.open("wb") as target:
        for chunk in client.content(ident):
            target.write(chunk)
    return 0


def describe(batch: Batch) -> str:
    """A batch for a person: status, counts, tokens, its files, and why its input failed."""
    raw = batch.raw
    lines = [
        f"batch {batch.id}: {batch.status}, model {raw.get('model') or '-'}",
        f"  lines: {batch.count('total')} in all, {batch.count('completed')} done, {batch.count('failed')} failed",
        f"  tokens: {batch.tokens('input_tokens')} in, {batch.tokens('output_tokens')} out",
    ]
    for name, label in (("input_file_id", "input"), ("output_file_id", "output"), ("error_file_id", "errors")):
        if raw.get(name):
            lines.append(f"  {label} file: {raw[name]}")
    lines.extend(f"  line {e.get('line') or '-'}: {e.get('code')}: {e.get('message')}" for e in batch.errors)
    return "\n".join(lines)


def batches_table(batches: Iterable[Batch]) -> str:
    rows: list[tuple[str, ...]] = [("id", "status", "model", "done", "failed", "total", "created")]
    for b in batches:
        created = datetime.fromtimestamp(int(b.raw.get("created_at") or 0)).strftime("%Y-%m-%d %H:%M")
        rows.append(
            (
                b.id,
                b.status,
                str(b.raw.get("model") or "-"),
                *(str(b.count(n)) for n in ("completed", "failed", "total")),
                created,
            )
        )
    if len(rows) == 1:
        return "no batches"
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )
