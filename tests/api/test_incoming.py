"""``api.incoming.parse_body``: orjson reads a body, and whatever it reads otherwise than Python's json did, or
refuses, json reads again, so each body is answered as before (the answers over HTTP: tests/api/openai/test_sdk.py)."""

from __future__ import annotations

import json
import math

import pytest

from llamascope import errors
from llamascope.api.incoming import MAX_JSON_DEPTH, parse_body


def nested(levels: int) -> bytes:
    """A body of ``levels`` levels: objects around a list of objects, the last two levels."""
    return b'{"a": ' * (levels - 2) + b'[{"n": 1}, {"n": 2}]' + b"}" * (levels - 2)


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": 1, "a": 2, "b": [1.5, -0, true, null, "\\ud83d\\ude00"]}',  # duplicate keys: the last wins
        b'{"seed": 18446744073709551616, "n": -9223372036854775809}',  # past 64 bits: orjson reads floats
        b'{"max_tokens": [18446744073709551617]}',
        b'{"x": 1e19, "y": -9.3e18, "z": 9223372036854775807}',
        b'{"t": NaN, "u": -Infinity, "v": 1e400}',  # json's extensions, which orjson refuses
        b'\xef\xbb\xbf{"model": "m"}',  # a UTF-8 BOM
        '{"model": "m", "t": "h\u00e9"}'.encode("utf-16"),  # json.loads reads UTF-16 and UTF-32 bytes
        nested(MAX_JSON_DEPTH),
    ],
)
def test_a_body_reads_as_json_read_it(body: bytes) -> None:
    got, expected = parse_body(body), json.loads(body)
    assert repr(got) == repr(expected)  # types too: an int stays an int; nan != nan, so compared as text


def test_a_wide_integer_stays_an_integer() -> None:
    got = parse_body(b'{"seed": 18446744073709551616, "n": [-9223372036854775809]}')
    assert got == {"seed": 2**64, "n": [-(2**63) - 1]} and type(got["seed"]) is int  # type: ignore[index]
    assert math.isinf(parse_body(b'{"v": 1e400}')["v"])  # type: ignore[index]


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH + 1, 1000, 5000])
def test_nesting_past_the_bound_is_refused(levels: int) -> None:
    with pytest.raises(errors.ServiceError, match="nested too deeply: at most 128 levels"):
        parse_body(nested(levels))
    with pytest.raises(errors.ServiceError, match="nested too deeply"):
        parse_body(b"[" * levels + b"]" * levels)


def test_nesting_at_the_bound_is_read() -> None:
    assert parse_body(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) == json.loads(b"[" * 128 + b"]" * 128)


@pytest.mark.parametrize("text", ["\\ud800", "\\udc00", "\\ud800\\u0041", "\\ude00\\ud83d"])
def test_a_lone_surrogate_is_refused_in_a_value_or_a_key(text: str) -> None:
    for body in (f'{{"a": "x{text}"}}', f'{{"{text}": 1}}'):
        with pytest.raises(errors.ServiceError, match="lone surrogate"):
            parse_body(body.encode())
    with pytest.raises(errors.ServiceError, match="lone surrogate"):  # a surrogate's UTF-8 bytes, which json reads
        parse_body(b'{"a": "\xed\xa0\x80"}')


@pytest.mark.parametrize("body", [b"", b"nope", b'{"a": 1,}', b'{"a": "\xff"}', b'{"a": "\x01"}'])
def test_what_is_not_json_is_refused_as_before(body: bytes) -> None:
    try:
        json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        message = f"The request body is not valid JSON: {exc}"
    with pytest.raises(errors.ServiceError) as refused:
        parse_body(body)
    assert refused.value.status == 400 and refused.value.message == message
