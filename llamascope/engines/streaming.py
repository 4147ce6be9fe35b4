"""From the model thread's token ids to a request's text: the outbox that hands them to the event loop a
burst at a time, and the incremental decoder that turns them into text deltas."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

from tokenizers.decoders import DecodeStream

from llamascope.engines.requests import Message


class IncrementalText:
    """Token ids in, text deltas out, never splitting a UTF-8 character.

    tokenizers' own incremental decoder (``DecodeStream``, in Rust), as vLLM's detokenizer uses: it keeps a
    short window, so a long answer costs linear time. Decoding the window twice per token through
    transformers' ``decode`` instead cost ten times as much, a quarter of the event loop's time with 16
    streams running. At the end, bytes that never became a whole character come out as U+FFFD, as
    ``decode`` gives them.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._pending: list[int] = []  # ids since the last text

    def add(self, ids: list[int], final: bool = False) -> str:
        text = ""
        if ids:
            piece = self._stream.step(self._tokenizer.backend_tokenizer, ids)
            if piece is None:
                self._pending += ids
            else:
                self._pending, text = [], piece
        if final and self._pending:
            text += self._tokenizer.decode(self._pending, skip_special_tokens=True)
            self._pending = []
        return text


class Outbox:
    """Messages from the model thread to one event loop, handed over a burst at a time.

    ``put`` only files a message; ``flush`` (the scheduler calls it after each prefill turn and each step)
    wakes the loop once for all of them. Waking it on each put cost far more than the write to its
    self-pipe: the loop's thread woke, took the GIL and handled that one token while the model thread,
    holding the next 15 of a step, waited for the GIL, and so on for each (py-spy: 29% of a 16-request
    decode step in ``call_soon_threadsafe``).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[tuple[asyncio.Queue[Message], Message]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, queue: asyncio.Queue[Message], message: Message) -> None:
        """From any thread. RuntimeError when the loop is closed."""
        if self._loop.is_closed():
            raise RuntimeError("the event loop is closed")
        with self._lock:
            self._items.append((queue, message))

    def flush(self) -> None:
        """Wake the loop to deliver what was put, unless a wake-up is already on its way."""
        with self._lock:
            if self._scheduled or not self._items:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop closed: its requests are gone, and their next put() says so
            with self._lock:
                self._items.clear()
                self._scheduled = False

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, deque()
            self._scheduled = False
        for queue, message in items:
            queue.put_nowait(message)
