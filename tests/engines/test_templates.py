"""llamascope's prompt template equals the stock Llama 3.2 Vision one, except that it allows system + image."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from llamascope.engines.templates import LLAMASCOPE_TEMPLATE, STOCK_TEMPLATE
from llamascope.structured.spec import Tool
from llamascope.structured.tools import tools_prompt

IMAGE = {"type": "image"}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


CONVERSATIONS = [
    [{"role": "user", "content": [IMAGE, text("What is this?")]}],
    [{"role": "user", "content": [text("Look "), IMAGE, text(" here")]}],
    [
        {"role": "user", "content": [IMAGE, text("这是什么?")]},
        {"role": "assistant", "content": [text("一只狗。")]},
        {"role": "user", "content": [text("做一首诗")]},
    ],
    [{"role": "user", "content": "text only, as a string"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [text("no image")]}],
]


@pytest.fixture(scope="module")
def tokenizer(test_model_dir: Path):
    return AutoTokenizer.from_pretrained(test_model_dir)


def render(tokenizer, messages: list[dict], template: str) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True, date_string="26 Jul 2024"
    )


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_same_as_stock_wherever_stock_works(tokenizer, messages: list[dict]) -> None:
    assert render(tokenizer, messages, LLAMASCOPE_TEMPLATE) == render(tokenizer, messages, STOCK_TEMPLATE)


def test_system_with_image(tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [IMAGE, text("What?")]}]
    with pytest.raises(Exception, match="incompatible with system messages"):
        render(tokenizer, messages, STOCK_TEMPLATE)
    assert render(tokenizer, messages, LLAMASCOPE_TEMPLATE) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<|image|>What?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def test_tools_go_where_metas_template_puts_them(tokenizer) -> None:
    messages = [{"role": "user", "content": [text(" Hi ")]}, {"role": "ipython", "content": "42"}]
    rendered = tokenizer.apply_chat_template(
        messages, chat_template=LLAMASCOPE_TEMPLATE, tokenize=False, tools=[TOOL], date_string="26 Jul 2024"
    )
    assert rendered == tokenizer.apply_chat_template(
        messages, chat_template=STOCK_TEMPLATE, tokenize=False, tools=[TOOL], date_string="26 Jul 2024"
    )
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
        + tools_prompt([Tool("f", {"type": "object", "properties": {}})])
        + " Hi <|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n42<|eot_id|>"
    )


def test_tools_with_an_image_keep_the_image(tokenizer) -> None:
    messages = [{"role": "user", "content": [IMAGE, text("Which city?")]}]
    rendered = tokenizer.apply_chat_template(messages, chat_template=LLAMASCOPE_TEMPLATE, tokenize=False, tools=[TOOL])
    assert "Environment" not in rendered  # no system turn with an image, as Meta's
    assert rendered.endswith('"properties": {}\n        }\n    }\n}\n\n<|image|>Which city?<|eot_id|>')
