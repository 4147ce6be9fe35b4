"""How an answer appears as it streams: plain text, or Markdown rendered by rich on a terminal.

Rendering Markdown while it streams has one difficulty: a rich ``Live``
area can only redraw what is still on the screen. So the answer is cut into
blocks as it grows: each finished block (up to a blank line outside a code
fence) is printed once, for good, and only the block still growing is
redrawn. A block that grows taller than the screen is cut at its last line
break (a code fence is closed there and opened again) or, in one long
paragraph, at its last space.
"""

from __future__ import annotations

import re
import sys
import time
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown

FENCE = re.compile(r"^(\s{0,3})(`{3,}|~{3,})(.*)$")
# What an answer may not send to a terminal: the C0 controls but tab and newline (ESC begins the sequences
# that clear the screen, set the window's title or write the clipboard, OSC 52), DEL and the C1 controls. The
# text is the model's, and whoever wrote the prompt, or the text in an image, can steer it.
TERMINAL_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def for_terminal(text: str) -> str:
    """``text`` without the control characters a terminal would act on."""
    return TERMINAL_CONTROLS.sub("", text)


class PlainText:
    """The answer as it comes, flushed at every piece (a pipe or a file gets exactly the text; a terminal, with
    ``--plain``, the text without its control characters)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.terminal = self.stream.isatty()
        self.last = "\n"

    def __enter__(self) -> PlainText:
        return self

    def write(self, text: str) -> None:
        if self.terminal:
            text = for_terminal(text)
        if text:
            self.stream.write(text)
            self.stream.flush()
            self.last = text[-1]

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.last != "\n":
            self.stream.write("\n")
        self.stream.flush()


def _open_fence(text: str) -> str | None:
    """The opening line of the code fence still open at the end of ``text``, or None."""
    opening: str | None = None
    marker = ""
    for line in text.split("\n"):
        match = FENCE.match(line)
        if not match:
            continue
        if opening is None:
            opening, marker = line.strip(), match.group(2)
        elif match.group(2).startswith(marker[0]) and len(match.group(2)) >= len(marker) and not match.group(3).strip():
            opening = None
    return opening


def finished_blocks(text: str) -> int:
    """Where the finished blocks of ``text`` end: after its last blank line outside a code fence (0: none)."""
    end = 0
    for match in re.finditer(r"\n[ \t]*\n", text):
        if _open_fence(text[: match.start()]) is None:
            end = match.end()
    return end


class MarkdownText:
    """The answer rendered as Markdown while it streams (see the module's docstring)."""

    def __init__(self, console: Console, refresh_seconds: float = 1 / 12) -> None:
        self.console = console
        self.refresh_seconds = refresh_seconds
        self.tail = ""  # the block still growing
        self.live = Live(console=console, auto_refresh=False, vertical_overflow="visible")
        self.drawn_at = 0.0

    def __enter__(self) -> MarkdownText:
        self.live.start()
        return self

    def _commit(self, block: str, gap: bool) -> None:
        if block.strip():
            self.live.console.print(Markdown(block))
            if gap:
                self.live.console.print()

    def write(self, text: str) -> None:
        self.tail += for_terminal(text)
        end = finished_blocks(self.tail)
        if end:
            self._commit(self.tail[:end], gap=True)
            self.tail = self.tail[end:]
        now = time.monotonic()
        if now - self.drawn_at < self.refresh_seconds:
            return
        self.drawn_at = now
        limit = max(4, self.console.height - 4)
        if len(self.console.render_lines(Markdown(self.tail), pad=False)) > limit:
            self._cut_tall_tail()
        self.live.update(Markdown(self.tail), refresh=True)

    def _cut_tall_tail(self) -> None:
        """Print most of a block taller than the screen for good, keeping the rest growing."""
        cut = self.tail.rfind("\n")
        if cut <= 0:
            cut = self.tail.rfind(" ")
        if cut <= 0:
            return
        head, rest = self.tail[:cut], self.tail[cut + 1 :]
        fence = _open_fence(head)
        if fence is not None:
            marker = FENCE.match(fence)
            head += "\n" + (marker.group(2) if marker else "```")
            rest = fence + "\n" + rest
        self._commit(head, gap=False)
        self.tail = rest

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.live.update(Markdown(self.tail) if self.tail.strip() else "", refresh=False)
        self.live.stop()
