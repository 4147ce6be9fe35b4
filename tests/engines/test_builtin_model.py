"""The built-in test model is built like real Llama 3.2 Vision weights and behaves like them where it matters."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoProcessor, MllamaForConditionalGeneration

from llamascope.engines.builtin_model import ensure_test_model, is_test_model
from llamascope.engines.templates import STOCK_TEMPLATE


def test_real_image_settings_and_tokens(test_model_dir: Path) -> None:
    config = json.loads((test_model_dir / "config.json").read_text())
    vision = config["vision_config"]
    assert (vision["image_size"], vision["max_num_tiles"], vision["patch_size"]) == (560, 4, 14)
    assert config["image_token_index"] == 128256
    processor = AutoProcessor.from_pretrained(test_model_dir, backend="pil")
    tok = processor.tokenizer
    real_ids = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|finetune_right_pad_id|>": 128004,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
        "<|reserved_special_token_0|>": 128002,
        "<|image|>": 128256,
    }
    assert {t: tok.convert_tokens_to_ids(t) for t in real_ids} == real_ids
    assert processor.chat_template == STOCK_TEMPLATE
    # Byte-level BPE: any text round-trips, Chinese and emoji included.
    text = "这是什么? A dog 🐶 on the beach."
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_filler_vocabulary_is_not_special(test_model_dir: Path) -> None:
    tok = AutoProcessor.from_pretrained(test_model_dir, backend="pil").tokenizer
    for token_id in (5000, 60000, 127999):
        assert tok.decode([token_id], skip_special_tokens=True).strip()


def test_gates_are_open(test_model_dir: Path) -> None:
    model = MllamaForConditionalGeneration.from_pretrained(test_model_dir)
    gates = {n: float(p.detach().abs().max()) for n, p in model.named_parameters() if n.endswith("gate")}
    assert gates and all(v > 0 for v in gates.values()), gates


def test_build_is_cached_and_deterministic(tmp_path: Path, test_model_dir: Path) -> None:
    again = ensure_test_model(tmp_path)
    assert is_test_model(again)
    assert (again / "model.safetensors").read_bytes() == (test_model_dir / "model.safetensors").read_bytes()
    assert ensure_test_model(tmp_path) == again
