"""The streamed chunks the OpenAI-compatible surface joins from parts (``TextChunks``) are the bytes its pydantic
models write, for any text."""

from __future__ import annotations

import pytest

from llamascope.api.openai.protocol import ChatCompletionChunk, ChunkChoice, Delta, TextChunks, UsageBody
from llamascope.conversation.service import Usage

TEXTS = [
    "",
    "The picture shows",
    'a "quoted" \\ back/slash',
    "\n\r\t\b\f" + "".join(map(chr, range(32))) + "\x7f\x80\x9f",
    "é 中文 😀 \u2028\u2029 \ufeff",
]


def _modelled(content: str, finish: str | None, role: bool, model: str) -> bytes:
    delta = Delta(role="assistant" if role else None, content=content)
    body = ChatCompletionChunk(
        id="chatcmpl-1f0e", created=1770285809, model=model, choices=[ChunkChoice(delta=delta, finish_reason=finish)]
    )
    return f"data: {body.model_dump_json()}\n\n".encode()


@pytest.mark.parametrize("model", ["llama3.2-11b-vision", 'odd "name" é'])
@pytest.mark.parametrize("finish", [None, "stop", "length"])
@pytest.mark.parametrize("role", [True, False])
def test_text_chunks_are_the_models_bytes(model: str, finish: str | None, role: bool) -> None:
    chunks = TextChunks("chatcmpl-1f0e", 1770285809, model)
    for text in TEXTS:
        assert chunks.text(text, finish, role) == _modelled(text, finish, role, model)


def test_usage_chunk_is_the_models_bytes() -> None:
    usage = Usage(input_tokens=20, output_tokens=8, cached_tokens=16)
    body = ChatCompletionChunk(id="chatcmpl-1f0e", created=5, model="m", choices=[], usage=UsageBody.of(usage))
    assert TextChunks("chatcmpl-1f0e", 5, "m").usage(usage) == f"data: {body.model_dump_json()}\n\n".encode()


def test_text_json_cannot_carry_is_left_to_the_model() -> None:
    assert TextChunks("chatcmpl-1f0e", 5, "m").text("a\ud800b", None, True) is None
