"""A model directory checked before transformers reads it, with no PyTorch or transformers imported.

``check_model_dir`` fails early with a message that says what is wrong (a hub id, no config, another model
family, no weights, no tokenizer): a bad ``--model`` stops ``serve`` in about a second, before PyTorch loads.
It raises ``base.ModelLoadError``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from llamascope.engines.base import ModelLoadError

# The model_type values the in-process engines serve: Llama 3.2 Vision and the Llama 3 text models.
SERVED_MODEL_TYPES = ("mllama", "llama")


def check_model_dir(path: Path, model_types: tuple[str, ...] = ("mllama",)) -> dict[str, Any]:
    """Fail early, with a message that says what is wrong, before transformers tries.

    ``model_types``: the ``model_type`` values the caller can serve (Llama 3.2 Vision is 'mllama')."""
    if not path.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):  # "meta-llama/Llama-3.2-11B-Vision-Instruct"
            raise ModelLoadError(
                f"{path} does not exist here, and Hugging Face hub ids are not fetched: download the model first "
                f"(huggingface-cli download {path} --local-dir /models/{path.name}) and give that directory"
            )
        raise ModelLoadError(f"{path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a directory (give the folder of a Hugging Face model)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model directory: it has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config_file} cannot be read as JSON: {exc}") from None
    model_type = config.get("model_type")
    if model_type not in model_types:
        if "vision_config" in config:
            raise ModelLoadError(
                f"{path} is a vision-language model of type {model_type!r}; the in-process engine runs "
                "Llama 3.2 Vision (model_type 'mllama')"
            )
        if "llama" in model_types:
            raise ModelLoadError(
                f"{path} has model_type {model_type!r}; llamascope serves Llama 3.2 Vision (model_type "
                "'mllama') and the Llama 3 text models (model_type 'llama', LlamaForCausalLM)"
            )
        raise ModelLoadError(
            f"{path} is a text-only model (model_type {model_type!r}); llamascope serves vision-language "
            "models such as Llama-3.2-11B-Vision-Instruct (model_type 'mllama')"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelLoadError(f"{path} has a config.json but no weights (*.safetensors)")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise ModelLoadError(f"{path} has no tokenizer (tokenizer.json)")
    return config
