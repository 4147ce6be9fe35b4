"""/metrics after a small batch: its lines and tokens counted as the batch object reports them."""

from __future__ import annotations

import base64
import json
import time

import httpx
import openai
import pytest

from tests.conftest import SEED_MODEL, Server, png_bytes
from tests.observability.test_metrics import value

pytestmark = pytest.mark.server
BATCH_SERIES = (
    "llamascope:batch_lines_completed_total",
    "llamascope:batch_lines_failed_total",
    "llamascope:batch_prompt_tokens_total",
    "llamascope:batch_generation_tokens_total",
)


def figures(server: Server) -> dict[str, float]:
    text = httpx.get(server.base + "/metrics", timeout=30).text
    names = (*BATCH_SERIES, "llamascope:batch_lines_waiting", "llamascope:batch_lines_running")
    assert all(f"# TYPE {n} " in text for n in names), text
    found = {name: value(text, name) for name in names}
    found["in_progress"] = value(text, 'llamascope:batches{status="in_progress"}')
    return found


def line(custom_id: str, content: object) -> str:
    body = {"model": SEED_MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": content}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def test_a_batch_is_counted_as_its_object_reports_it(server: Server) -> None:
    client = openai.OpenAI(base_url=server.base + "/compatible-mode/v1", api_key=server.key, max_retries=0)
    image = "data:image/png;base64," + base64.b64encode(png_bytes((40, 90, 160), (32, 32))).decode()
    lines = [
        line("a", [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Colour?"}]),
        line("b", [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Shape?"}]),
        # Bytes that are no image: the line fails when it runs (a text-only question would be answered).
        line("refused", [{"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]),
    ]
    before = figures(server)
    file = client.files.create(file=("input.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.usage is not None
    after = figures(server)
    grew = {name: after[name] - before[name] for name in BATCH_SERIES}
    assert grew == {
        "llamascope:batch_lines_completed_total": 2,
        "llamascope:batch_lines_failed_total": 1,
        "llamascope:batch_prompt_tokens_total": batch.usage.input_tokens,
        "llamascope:batch_generation_tokens_total": batch.usage.output_tokens,
    }
    assert batch.usage.output_tokens > 0
    assert after["llamascope:batch_lines_waiting"] == after["llamascope:batch_lines_running"] == 0
    assert after["in_progress"] == 0
