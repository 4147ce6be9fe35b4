"""Reading llamascope's wire as a client does: the DashScope SSE frames of a streamed answer."""

from __future__ import annotations

import json
import re

BLOCK = re.compile(r"id:(\d+)\nevent:result\n:HTTP_STATUS/200\ndata:(\{[^\n]*\})\n\n")


def sse_events(text: str) -> list[dict]:
    blocks = BLOCK.findall(text)
    assert "".join(f"id:{n}\nevent:result\n:HTTP_STATUS/200\ndata:{d}\n\n" for n, d in blocks) == text
    assert [int(n) for n, _ in blocks] == list(range(1, len(blocks) + 1))
    return [json.loads(d) for _, d in blocks]
