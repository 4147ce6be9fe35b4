"""An upstream model's prompt counted here, with its tokenizer and chat template from a local directory.

For ``upstream_tokenizer``: the prompt's exact count without asking the engine.
transformers loads only for such a model (``engines.registry`` imports this
module then): a gateway that counts through the engine's ``/tokenize`` never
loads it. transformers stays, rather than the bare tokenizers library and
Jinja: its chat-template rendering (its own Jinja globals and filters) is what
makes the count the engine's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from llamascope.engines.base import ModelLoadError
from llamascope.structured.tools import TOOL_RESULT_ROLE, call_text


class PromptCounter:
    """The model's tokenizer and chat template, from a local directory: counts a prompt as the engine will.

    The template must be the engine's (``chat_template`` where the engine was given its own), or the count
    is off; the engine's reported usage stays what is charged.
    """

    def __init__(self, tokenizer: Any, template: str) -> None:
        self.tokenizer = tokenizer
        self.template = template

    @classmethod
    def load(cls, directory: str, chat_template: str | None) -> PromptCounter:
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except Exception as exc:  # transformers raises many types here
            raise ModelLoadError(f"upstream_tokenizer {directory}: the tokenizer cannot be loaded: {exc}") from exc
        template = Path(chat_template).read_text() if chat_template else _directory_template(Path(directory))
        if template is None:
            raise ModelLoadError(f"upstream_tokenizer {directory} has no chat template: give chat_template")
        return cls(tokenizer, template)

    def count(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int:
        """``messages`` in OpenAI's form (as the engine is sent them), ``tools`` OpenAI's function tools."""
        conversation = [
            {
                "role": TOOL_RESULT_ROLE if m["role"] == "tool" else m["role"],
                "content": _content(m),
            }
            for m in messages
        ]
        extra: dict[str, Any] = {"tools": tools} if tools and "tools" in self.template else {}
        prompt = self.tokenizer.apply_chat_template(
            conversation, chat_template=self.template, tokenize=False, add_generation_prompt=True, **extra
        )
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])


def _content(message: dict[str, Any]) -> Any:
    """A message's content as the template takes it: an image part as {"type": "image"}, tool calls as the
    model writes them."""
    content = message.get("content")
    if message.get("tool_calls"):
        written = call_text(message["tool_calls"])
        return f"{content}{written}" if isinstance(content, str) and content.strip() else written
    if content is None or isinstance(content, str):
        return content or ""
    return [{"type": "image"} if p["type"] == "image_url" else p for p in content]


def _directory_template(directory: Any) -> str | None:
    """The chat template a Hugging Face model directory carries (the tokenizer's, or the processor's file)."""
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".jinja"):
            return str(path.read_text())
        template = json.loads(path.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    return None
