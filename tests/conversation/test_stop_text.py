from __future__ import annotations

import pytest

from llamascope.conversation.service import StopText


def run(stops: tuple[str, ...], pieces: list[str]) -> tuple[list[str], bool]:
    cut = StopText(stops)
    out = []
    for piece in pieces:
        text, stopped = cut.feed(piece)
        out.append(text)
        if stopped:
            return out, True
    out.append(cut.flush())
    return out, False


def test_no_stops_passes_through() -> None:
    assert run((), ["a", "b"]) == (["a", "b", ""], False)


def test_stop_split_across_pieces_is_never_emitted() -> None:
    out, stopped = run(("END",), ["hello E", "N", "D and more"])
    assert stopped and "".join(out) == "hello "
    assert out == ["hello ", "", ""]


def test_false_start_is_released() -> None:
    out, stopped = run(("END",), ["hello EN", "OUGH"])
    assert not stopped and "".join(out) == "hello ENOUGH"


def test_earliest_of_several_stops_wins() -> None:
    out, stopped = run(("\n\n", "world"), ["hello world\n\nbye"])
    assert stopped and "".join(out) == "hello "


@pytest.mark.parametrize("stop", ["。", "🐶"])
def test_multibyte_stops(stop: str) -> None:
    out, stopped = run((stop,), ["狗在海边", stop, "后面"])
    assert stopped and "".join(out) == "狗在海边"
