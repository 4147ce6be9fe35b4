"""From token ids to a request's text: the model thread's hand-over to the event loop (every message, in order,
one wake-up per burst) and the incremental decoder (never a split character, the whole decode at the end)."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from llamascope.engines.streaming import IncrementalText, Outbox


def test_a_burst_is_delivered_in_order_with_one_wake_up() -> None:
    """Puts only file messages (the loop is idle and would otherwise wake for each); a flush hands them all
    over with one wake-up, however often it is called before the loop gets to them."""

    async def scenario() -> tuple[list[list[int]], int, int]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        schedule = loop.call_soon_threadsafe

        def counted(callback, *args):  # type: ignore[no-untyped-def]
            nonlocal wakeups
            wakeups += getattr(callback, "__self__", None) is outbox  # not asyncio.to_thread's own
            return schedule(callback, *args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        outbox = Outbox(loop)
        queues: list[asyncio.Queue] = [asyncio.Queue() for _ in range(3)]
        burst = threading.Thread(target=lambda: [outbox.put(queues[i % 3], [i]) for i in range(48)])
        burst.start()
        await asyncio.to_thread(burst.join)  # the loop runs meanwhile: nothing may arrive before the flush
        before_flush = sum(q.qsize() for q in queues)
        await asyncio.to_thread(lambda: [outbox.flush() for _ in range(3)])
        got = [[] for _ in queues]
        for q, into in zip(queues, got, strict=True):
            for _ in range(16):
                into += await asyncio.wait_for(q.get(), 5)
        return got, wakeups, before_flush

    got, wakeups, before_flush = asyncio.run(scenario())
    assert before_flush == 0
    assert got == [list(range(i, 48, 3)) for i in range(3)]
    assert wakeups == 1


def test_a_closed_loop_refuses() -> None:
    loop = asyncio.new_event_loop()
    outbox = Outbox(loop)
    loop.close()
    with pytest.raises(RuntimeError):
        outbox.put(asyncio.Queue(), [1])


@pytest.fixture(scope="module")
def tokenizer(test_model_dir: Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(test_model_dir)


def test_incremental_text_never_splits_characters(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "狗🐶 dog, 这是什么?"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    inc = IncrementalText(tokenizer)
    pieces = [inc.add([i]) for i in ids] + [inc.add([], final=True)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_incremental_text_is_the_whole_decode(tokenizer: PreTrainedTokenizerFast) -> None:
    """Random ids (the built-in model's kind of answer: special tokens, bytes of split characters), fed one
    to three at a time, as a step or a backlog delivers them, join to what decoding them all at once gives."""
    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(len(tokenizer)) for _ in range(60)]
        inc = IncrementalText(tokenizer)
        pieces, i = [], 0
        while i < len(ids):
            n = rng.choice([1, 1, 2, 3])
            pieces.append(inc.add(ids[i : i + n]))
            i += n
        pieces.append(inc.add([], final=True))
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    inc = IncrementalText(tokenizer)  # half a character at the end: U+FFFD, as decode gives it
    half = tokenizer("🐶", add_special_tokens=False).input_ids[:-1]
    assert half
    assert inc.add(half) == "" and inc.add([], final=True) == tokenizer.decode(half)
