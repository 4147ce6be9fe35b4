"""An answer rendered as Markdown while it streams: every word once, in order, with its Markdown rendered.

The console here is not a terminal, so rich's live area prints only its final
state: what is left is exactly what the blocks printed for good plus the last
block, which is what a terminal shows once the answer has ended.
"""

from __future__ import annotations

import io

from rich.console import Console

from llamascope.client.display import MarkdownText, PlainText, finished_blocks


def render(text: str, step: int = 3, height: int = 12) -> str:
    out = io.StringIO()
    console = Console(file=out, width=40, height=height, force_terminal=False, color_system=None)
    with MarkdownText(console, refresh_seconds=0) as display:
        for i in range(0, len(text), step):
            display.write(text[i : i + step])
    return out.getvalue()


def test_blocks_end_at_blank_lines_outside_code_fences() -> None:
    assert finished_blocks("one\n\ntwo") == len("one\n\n")
    assert finished_blocks("one\n\n```\ncode\n\nmore") == len("one\n\n")  # the fence is still open
    assert finished_blocks("```\ncode\n\nmore\n```\n\nafter") == len("```\ncode\n\nmore\n```\n\n")
    assert finished_blocks("no blank line yet\n") == 0


def test_markdown_is_rendered_as_it_streams() -> None:
    shown = render("# Title\n\nSome **bold** words.\n\n- one\n- two\n\n```python\nx = 1\n```\n\nThe end.")
    for words in ("Title", "Some bold words.", "• one", "• two", "x = 1", "The end."):
        assert words in shown
    assert "**" not in shown and "```" not in shown and "#" not in shown


def test_a_paragraph_taller_than_the_screen_keeps_every_word_once_in_order() -> None:
    words = [f"w{i}" for i in range(600)]
    shown = render(" ".join(words), step=7, height=8)
    assert shown.split() == words


def test_a_code_block_taller_than_the_screen_is_cut_at_a_line_and_stays_code() -> None:
    lines = [f"line_{i} = {i}" for i in range(60)]
    shown = render("```python\n" + "\n".join(lines) + "\n```\n", step=5, height=8)
    assert [line.strip() for line in shown.splitlines() if line.strip()] == lines


ESCAPES = "plain \x1b[2J\x1b[31mred\x1b[0m \x1b]0;title\x07 \x1b]52;c;cHduZWQ=\x07 \x9b2J end"


def test_a_terminal_is_never_sent_the_answers_control_characters() -> None:
    """A model steered to write escape sequences (clear the screen, set the title, write the clipboard) only
    shows their printable rest; a pipe still gets the answer's exact text."""
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True, color_system="truecolor")
    with MarkdownText(console, refresh_seconds=0) as display:
        display.write(ESCAPES)
    shown = out.getvalue()
    for sequence in ("\x1b[2J", "\x1b]0;", "\x1b]52", "\x07", "\x9b"):
        assert sequence not in shown
    assert "plain" in shown and "end" in shown

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        with PlainText(stream) as plain:
            plain.write(ESCAPES)
    assert "\x1b" not in terminal.getvalue() and "\x07" not in terminal.getvalue()
    assert pipe.getvalue() == ESCAPES + "\n"
