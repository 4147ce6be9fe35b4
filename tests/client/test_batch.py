"""``llamascope batch`` as a user runs it: a real process against a real server on the built-in model.

Its standard error is a pipe here, so the progress comes as one line per change, not a bar.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamascope.client.batch import Watch
from llamascope.client.batches import Batch
from tests.conftest import SEED_MODEL, Server, png_bytes

pytestmark = pytest.mark.server
COLORS = {"red.png": (200, 30, 30), "green.jpg": (30, 200, 30), "blue.png": (30, 30, 200)}


def environment(server: Server, home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HOME": str(home),  # no ~/.dashscope/api_key of the person running the tests
        "DASHSCOPE_HTTP_BASE_URL": server.api,
        "DASHSCOPE_API_KEY": server.key,
    }


def batch(args: list[str], server: Server, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llamascope", "batch", *args],
        capture_output=True,
        text=True,
        env=environment(server, cwd),
        cwd=cwd,
        timeout=180,
    )


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, color in COLORS.items():
        (folder / name).write_bytes(png_bytes(color, (48, 48), "JPEG" if name.endswith(".jpg") else "PNG"))
    (folder / "notes.txt").write_text("not an image: left out")
    return folder


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as table:
        return list(csv.DictReader(table))


def test_a_folder_and_a_prompt_run_to_jsonl_and_csv(server: Server, photos: Path, tmp_path: Path) -> None:
    done = batch(
        ["submit", str(photos), "What colour is it?", "--max-tokens", "4", "--interval", "0.1", "-o", "colours"],
        server,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "3 images of" in done.stderr and " to llama3.2-" in done.stderr
    assert "completed: 3/3 (0 failed)" in done.stderr
    table = rows(tmp_path / "colours.csv")
    assert sorted(r["custom_id"] for r in table) == sorted(COLORS)
    assert all(r["status"] == "ok" and r["answer"].strip() and not r["error"] for r in table)
    results = [json.loads(line) for line in (tmp_path / "colours.jsonl").read_text().splitlines()]
    by_id = {r["custom_id"]: r for r in results}
    for row in table:  # the table's answer is the response's text
        body = by_id[row["custom_id"]]["response"]["body"]
        assert body["choices"][0]["message"]["content"] == row["answer"]
        assert body["usage"]["completion_tokens"] <= 4
    batch_id = done.stderr.split("batch ", 1)[1].split()[0]

    listed = batch(["list"], server, tmp_path)
    assert listed.returncode == 0 and batch_id in listed.stdout and "completed" in listed.stdout
    status = batch(["status", batch_id, "--json"], server, tmp_path)
    obj = json.loads(status.stdout)
    assert obj["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert obj["usage"]["output_tokens"] == sum(r["response"]["body"]["usage"]["completion_tokens"] for r in results)
    # The rate shown at the end is the whole run's, by the batch's own timestamps ("-": it ran within a second).
    run = obj["finalizing_at"] - obj["in_progress_at"]
    rate = f"{obj['usage']['total_tokens'] / run:.1f}" if run > 0 else "-"
    assert f"completed: 3/3 (0 failed), {rate} tokens/s, ETA 0:00:00" in done.stderr

    # Any batch file, by its id, to standard output; the results again, by the batch's id.
    output = batch(["download", obj["output_file_id"]], server, tmp_path)
    assert sorted(json.loads(x)["custom_id"] for x in output.stdout.splitlines()) == sorted(COLORS)
    again = batch(["download", batch_id, "-o", "again"], server, tmp_path)
    assert again.returncode == 0, again.stderr
    assert rows(tmp_path / "again.csv") == table


def test_a_batch_that_ended_between_two_looks_shows_its_whole_runs_rate() -> None:
    """New-user trial: it showed "0.0 tokens/s" (the pace began at the look that saw it ended)."""

    def looks(*batches: dict[str, object]) -> list[str]:
        shown = io.StringIO()
        with Watch(live=False, stream=shown) as watch:
            for raw in batches:
                watch.show(Batch({"id": "batch_1", **raw}))
        return shown.getvalue().splitlines()

    counts = {"total": 3, "completed": 3, "failed": 0}
    ended = {"status": "completed", "request_counts": counts, "usage": {"total_tokens": 120}, "in_progress_at": 100}
    assert looks({"status": "validating"}, {**ended, "finalizing_at": 104, "completed_at": 105}) == [
        "validating: 0/0 (0 failed), - tokens/s, ETA -:--:--",  # nothing measured yet
        "completed: 3/3 (0 failed), 30.0 tokens/s, ETA 0:00:00",
    ]
    assert looks({**ended, "finalizing_at": 100, "completed_at": 100})[-1].endswith(", - tokens/s, ETA 0:00:00")


def test_an_image_too_big_for_a_line_is_named_before_anything_is_sent(
    server: Server, photos: Path, tmp_path: Path
) -> None:
    (photos / "huge.png").write_bytes(os.urandom(5 * 1024 * 1024))  # 6.7 MB as base64
    refused = batch(["submit", str(photos), "Describe it."], server, tmp_path)
    assert refused.returncode == 2
    assert "huge.png: 5.0 MB" in refused.stderr and "6 MB" in refused.stderr
    assert "red.png" not in refused.stderr
    assert "submitted" not in refused.stderr


def test_a_schema_that_is_no_json_schema_is_named_before_anything_is_sent(
    server: Server, photos: Path, tmp_path: Path
) -> None:
    """Every line would be refused with the same 400: the whole batch would run for nothing."""
    schema = tmp_path / "colour.schema.json"
    schema.write_text(json.dumps({"type": "objekt"}))
    refused = batch(["submit", str(photos), "Which colour?", "--schema", str(schema)], server, tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert f"--schema {schema}: not a JSON Schema" in refused.stderr and "objekt" in refused.stderr
    assert "submitted" not in refused.stderr


def test_on_a_terminal_a_progress_bar_and_ctrl_c_stops_watching_not_the_batch(
    server: Server, photos: Path, tmp_path: Path
) -> None:
    pexpect = pytest.importorskip("pexpect")
    args = ["submit", str(photos), "Describe it.", "--max-tokens", "32", "--interval", "0.1"]
    env = {**environment(server, tmp_path), "TERM": "xterm-256color"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "llamascope", "batch", *args],
        env=env,
        cwd=str(tmp_path),
        encoding="utf-8",
        dimensions=(24, 140),
        timeout=60,
    )
    child.expect(r"batch (batch_\w+) submitted")
    batch_id = child.match.group(1)
    child.expect("tokens/s  ETA")  # rich's bar, drawn
    child.sendintr()  # Ctrl+C
    child.expect(f"goes on. `llamascope batch watch {batch_id}` takes it up again")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 and "Traceback" not in (child.before or "")

    resumed = batch(["watch", batch_id, "--interval", "0.1", "-o", "later"], server, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"batch {batch_id}: completed" in resumed.stderr
    assert sorted(r["custom_id"] for r in rows(tmp_path / "later.csv")) == sorted(COLORS)


def test_tool_calls_and_cut_answers_show_in_the_table(server: Server, tmp_path: Path) -> None:
    """A line answered with tool calls has no text: the table's answer is its calls; and a JSON answer cut by
    max_tokens is told from a whole one by its finish_reason."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    parameters = {
        "type": "object",
        "properties": {"city": {"enum": ["Hangzhou", "Beijing"]}},
        "required": ["city"],
        "additionalProperties": False,
    }
    bodies = {
        "call": {
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": parameters}}],
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "max_tokens": 200,
        },
        "cut": {
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
            "max_tokens": 2,
        },
    }
    source = tmp_path / "requests.jsonl"
    source.write_text(
        "".join(
            json.dumps(
                {
                    "custom_id": name,
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": SEED_MODEL, "messages": [{"role": "user", "content": "Weather?"}], **body},
                }
            )
            + "\n"
            for name, body in bodies.items()
        )
    )
    done = batch(["submit", str(source), "--interval", "0.1", "-o", "answers"], server, tmp_path)
    assert done.returncode == 0, done.stderr
    table = {r["custom_id"]: r for r in rows(tmp_path / "answers.csv")}
    call, cut = table["call"], table["cut"]
    assert call["status"] == "ok" and call["finish_reason"] == "tool_calls", call
    [made] = json.loads(call["answer"])
    assert made["name"] == "get_weather" and made["arguments"]["city"] in ("Hangzhou", "Beijing"), call
    assert cut["status"] == "ok" and cut["finish_reason"] == "length" and cut["answer"].startswith("{"), cut


def test_a_jsonl_file_submitted_then_cancelled(server: Server, tmp_path: Path) -> None:
    LINES = 400  # far more than run in the seconds before the cancel comes
    image = "data:image/png;base64," + base64.b64encode(png_bytes((90, 90, 90), (16, 16))).decode()
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Say hi."}]
    lines = [
        {
            "custom_id": f"q{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": SEED_MODEL, "max_tokens": 128, "messages": [{"role": "user", "content": content}]},
        }
        for i in range(LINES)
    ]
    source = tmp_path / "requests.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert batch(["submit", str(source), "a prompt"], server, tmp_path).returncode == 2  # a file has its prompts
    submitted = batch(["submit", str(source), "--no-watch"], server, tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    cancelled = batch(["cancel", batch_id], server, tmp_path)
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"batch {batch_id}: cancel" in cancelled.stdout
    deadline = time.monotonic() + 60
    while json.loads(batch(["status", batch_id, "--json"], server, tmp_path).stdout)["status"] == "cancelling":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    saved = batch(["download", batch_id, "-o", "cancelled"], server, tmp_path)
    assert saved.returncode == 0, saved.stderr
    table = rows(tmp_path / "cancelled.csv")
    assert sorted(r["custom_id"] for r in table) == sorted(f"q{i}" for i in range(LINES))  # each exactly once
    assert {r["status"] for r in table} <= {"ok", "cancelled"} and any(r["status"] == "cancelled" for r in table)
    assert all(r["error"].startswith("batch_cancelled: ") for r in table if r["status"] == "cancelled")


def test_a_calls_arguments_go_into_the_table_as_the_model_wrote_them() -> None:
    from llamascope.client.batch_results import answer_text

    def body(arguments: str) -> dict:
        call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
        return {"choices": [{"message": {"content": None, "tool_calls": [call]}, "finish_reason": "tool_calls"}]}

    def strict(text: str) -> object:
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in {text}"))

    written = answer_text(body('{"n": 752e4124810271312, "p": 0.10}'))
    assert [call["name"] for call in strict(written)] == ["f"]  # JSON: no Infinity written
    assert '"arguments": {"n": 752e4124810271312, "p": 0.10}' in written
    assert strict(answer_text(body('{"x": NaN}'))) == [{"name": "f", "arguments": '{"x": NaN}'}]  # not JSON: a string
