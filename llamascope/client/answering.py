"""Answering in ``llamascope chat``: one answer to a conversation, shown as it streams.

Both the one-shot command (``chat``) and the conversation mode (``interactive``)
ask through ``ask``; Ctrl+C closes the stream and keeps what arrived.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from llamascope.client.conversation import Conversation
from llamascope.client.native import Answer, APIError, Client

USAGE_KEYS = ("input_tokens", "output_tokens", "image_tokens", "total_tokens")


def show_error(error: APIError) -> None:
    print(f"error: {error.describe()}", file=sys.stderr, flush=True)
    if error.code == "ConnectionError":
        print("  (is the server running? `make serve` starts a local llamascope)", file=sys.stderr, flush=True)
    elif error.status == 401:
        print("  (check DASHSCOPE_API_KEY or --api-key)", file=sys.stderr, flush=True)
    elif error.status == 413:  # the body limit: local images go inline, as base64 (a third larger), every turn
        print(
            "  (local images are sent inline, a third larger as base64: send fewer or smaller ones, give URLs, or"
            " raise the server's MAX_BODY_BYTES)",
            file=sys.stderr,
            flush=True,
        )


class Display(Protocol):
    def write(self, text: str) -> None: ...


def make_display(markdown: bool) -> Callable[[], AbstractContextManager[Display]]:
    # rich loads only when an answer is shown: `llamascope serve` imports the chat command too.
    from llamascope.client.display import MarkdownText, PlainText

    if not markdown:
        return PlainText
    from rich.console import Console  # as above: rich only when an answer is shown

    console = Console()
    return lambda: MarkdownText(console)


def ask(
    client: Client, conversation: Conversation, stream: bool, display: Callable[[], AbstractContextManager[Display]]
) -> tuple[Answer, bool]:
    """One answer to the conversation as it stands, shown as it comes; (answer, stopped by Ctrl+C).

    APIError passes through; Ctrl+C closes the stream (so the server stops generating) and keeps
    what arrived."""
    messages, parameters = conversation.messages(), conversation.parameters
    if not stream:
        try:
            answer = client.generate(conversation.model, messages, parameters)
        except KeyboardInterrupt:
            return Answer(), True
        with display() as out:
            out.write(answer.text)
        return answer, False
    answer_stream = client.stream(conversation.model, messages, parameters)
    interrupt = DeferredInterrupt()
    try:
        with interrupt.installed(), quiet_terminal(), answer_stream, display() as out:
            for piece in answer_stream:
                with interrupt.deferred():  # never stop half way through drawing: the screen would be left torn
                    out.write(piece)
    except KeyboardInterrupt:
        return answer_stream.answer, True
    return answer_stream.answer, False


@contextmanager
def quiet_terminal() -> Iterator[None]:
    """No echo on the terminal while an answer is drawn: the ``^C`` of Ctrl+C, or keys typed meanwhile,
    would move the cursor under rich's feet and leave a line drawn twice. Typed keys wait for the prompt."""
    try:
        import termios  # POSIX only: here, where its absence is handled

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    except (ImportError, OSError, ValueError):  # not POSIX, or no standard input
        saved = None
    if saved is None:  # not a terminal: nothing to silence
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


class DeferredInterrupt:
    """Ctrl+C raises KeyboardInterrupt at once (also while waiting on the network), except inside
    ``deferred()``, where it is held until the block ends."""

    def __init__(self) -> None:
        self.deferring = False
        self.pending = False

    def _handler(self, signum: int, frame: object) -> None:
        if self.deferring:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt
