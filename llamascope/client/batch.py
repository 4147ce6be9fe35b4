"""``llamascope batch``: a folder of images and a prompt as one batch job, watched to its end, its results saved.

``add_parser`` registers the command and its subcommands, ``run`` carries them out, ``Watch`` shows a batch's
progress. The input made from a folder is ``batch_input``'s, the saved results ``batch_results``', the HTTP
side ``batches``' (imports point that way).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from llamascope.client.answering import show_error
from llamascope.client.batch_input import InputProblem, build_input, endpoint_of
from llamascope.client.batch_results import save_results
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
    watch.add_argument("batch_id", help="the batch's id (batch_...)")
    actions.add_parser("list", help="your batches, newest first").add_argument(
        "--limit", type=int, default=20, help="at most this many (default 20, at most 100)"
    )
    status = actions.add_parser("status", help="a batch's status, counts, tokens, files and input errors")
    status.add_argument("batch_id", help="the batch's id (batch_...)")
    status.add_argument("--json", action="store_true", help="the batch object as the API sends it")
    actions.add_parser("cancel", help="cancel a batch (lines done keep their results)").add_argument(
        "batch_id", help="the batch's id (batch_...)"
    )
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


# -- watching -----------------------------------------------------------------------------------------------


@dataclass
class Pace:
    """Tokens a second and the time left: from what changed since watching began, and for a batch that has
    ended from its own timestamps (watching may have begun as it ended)."""

    started: float
    tokens: int
    lines: int

    def rates(self, batch: Batch, now: float) -> tuple[float | None, float | None]:
        """Tokens a second (None: nothing to measure yet) and seconds left (None: unknown)."""
        if batch.ended:
            return _whole_run_rate(batch), 0.0
        elapsed = now - self.started
        if elapsed <= 0:
            return None, None
        tokens = max(0, batch.tokens() - self.tokens) / elapsed
        ended = batch.count("completed") + batch.count("failed")
        lines = (ended - self.lines) / elapsed
        left = batch.count("total") - ended
        return tokens, (left / lines if lines > 0 else None)


# The stamps that end a batch's run of lines, whichever came first.
_RUN_ENDS = ("finalizing_at", "cancelling_at", "completed_at", "failed_at", "expired_at", "cancelled_at")


def _whole_run_rate(batch: Batch) -> float | None:
    """The tokens a second of an ended batch over its run, by its own timestamps (whole seconds): None if it
    never ran, or ran within one second."""
    started = batch.raw.get("in_progress_at")
    ends = [batch.raw[name] for name in _RUN_ENDS if isinstance(batch.raw.get(name), int | float)]
    if not isinstance(started, int | float) or not ends or min(ends) <= started:
        return None
    return batch.tokens() / (min(ends) - started)


def _rate(tokens_per_second: float | None) -> str:
    return "-" if tokens_per_second is None else f"{tokens_per_second:.1f}"


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
                TextColumn("failed {task.fields[failed]}  {task.fields[rate]} tokens/s  ETA {task.fields[eta]}"),
                console=Console(file=self.stream),
            )
            self.task = self.progress.add_task("validating", total=None, failed=0, rate="-", eta="-:--:--")
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
                rate=_rate(rate),
                eta=_eta(left),
            )
            return
        line = f"{batch.status}: {done + failed}/{total} ({failed} failed)"
        if line != self.last:
            print(f"{line}, {_rate(rate)} tokens/s, ETA {_eta(left)}", file=self.stream, flush=True)
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
        if batch_id is None:
            print("\nstopped: nothing was submitted", file=sys.stderr)
            return 130
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
