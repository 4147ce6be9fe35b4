"""The input check, line by line as the file streams: what fails a batch, and which line it names."""

from __future__ import annotations

import io
import json

import pytest

from llamascope import errors
from llamascope.batch import lines
from llamascope.batch.records import completion_window


def line(custom_id: str, model: str = "m", url: str = lines.CHAT, **fields: object) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def check(text: str | bytes, endpoint: str = lines.CHAT) -> tuple[list[lines.Line], lines.Checked]:
    found = lines.Checked()
    data = text.encode() if isinstance(text, str) else text
    return list(lines.read(io.BytesIO(data), endpoint, found)), found


def test_good_lines_are_found_with_their_place_in_the_file() -> None:
    text = "\n".join(line(f"r{i}") for i in range(3)) + "\n\n"
    passed, found = check(text)
    assert not found.errors and found.model == "m" and found.lines == 3
    raw = text.encode()
    assert [json.loads(raw[p.offset : p.offset + p.length])["custom_id"] for p in passed] == ["r0", "r1", "r2"]
    assert [p.number for p in passed] == [1, 2, 3]


def test_each_wrong_line_is_named_by_its_number() -> None:
    text = "\n".join(
        [
            line("a"),
            "{not json",
            line("a"),  # a duplicate of line 1
            line("c", model="other"),
            line("d", url=lines.MULTIMODAL),
            line("e", stream=True),
            json.dumps({"custom_id": "f", "method": "GET", "url": lines.CHAT, "body": {"model": "m"}}),
        ]
    )
    _, found = check(text)
    assert found.errors is not None
    named = {e.line: e.code for e in found.errors}
    assert named == {
        2: "invalid_json_line",
        3: "duplicate_custom_id",
        4: "mismatched_model",
        5: "invalid_url",
        6: "invalid_request",
        7: "invalid_request",
    }
    duplicate = next(e for e in found.errors if e.line == 3)
    assert "line 1" in duplicate.message


def test_a_wrong_line_after_blank_lines_is_named_by_its_line_in_the_file() -> None:
    # Line 2 and 4 are blank: the bad JSON is line 5 and the duplicate line 7, as an editor numbers them.
    text = "\n".join([line("a"), "", line("b"), "  ", "{not json", line("c"), line("a")]) + "\n\n"
    passed, found = check(text)
    assert found.errors is not None
    assert [(e.line, e.code) for e in found.errors] == [(5, "invalid_json_line"), (7, "duplicate_custom_id")]
    assert "Line 5 " in found.errors[0].message and "line 1 too" in found.errors[1].message
    assert [(p.number, p.custom_id) for p in passed] == [(1, "a"), (3, "b"), (6, "c")]
    assert found.lines == 5  # the requests: blank lines are not counted


def test_a_line_nested_past_the_parsers_limit_is_named() -> None:
    # It stopped the check with a RecursionError: the batch failed as "the input file could not be read".
    deep = line("deep").replace('"hi"}', '"hi", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    passed, found = check(line("a") + "\n" + deep + "\n" + line("b") + "\n")
    assert [p.custom_id for p in passed] == ["a", "b"]
    assert found.errors is not None and [(e.line, e.code) for e in found.errors] == [(2, "invalid_json_line")]
    assert "nested too deeply" in found.errors[0].message


def test_a_line_over_6_mb_is_refused_without_being_held() -> None:
    big = line("big", pad="x" * (lines.MAX_LINE_BYTES + 10))
    passed, found = check(line("a") + "\n" + big + "\n" + line("b") + "\n")
    assert [p.custom_id for p in passed] == ["a", "b"]
    assert found.errors is not None and [(e.line, e.code) for e in found.errors] == [(2, "invalid_request")]


def test_an_empty_file_is_refused() -> None:
    _, found = check("\n")
    assert found.errors and found.errors[0].code == "empty_file"


@pytest.mark.parametrize(("text", "hours"), [("24h", 24), ("336h", 336), ("7d", 168), ("14d", 336)])
def test_completion_windows(text: str, hours: int) -> None:
    assert completion_window(text).total_seconds() == hours * 3600


@pytest.mark.parametrize("text", ["23h", "15d", "1w", "", "24", "99999999999999999999d", "9" * 5000 + "h"])
def test_completion_windows_outside_24h_to_336h_are_refused(text: str) -> None:
    with pytest.raises(errors.ServiceError):
        completion_window(text)
