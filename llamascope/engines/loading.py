"""A model directory checked before transformers reads it, and its weights loaded as asked.

``check_model_dir`` fails early with a message that says what is wrong (a hub id, no config, another model
family, no weights, no tokenizer); ``load_weights`` loads in the dtype and quantization asked for, onto the
device. Both raise ``base.ModelLoadError``.
"""

from __future__ import annotations

import json
import re
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from transformers import BitsAndBytesConfig

from llamascope.engines import devices
from llamascope.engines.base import ModelLoadError


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


def _quantization_config(kind: str, compute_dtype: Any, config: dict[str, Any]) -> Any:
    """bitsandbytes weights: 4-bit NF4 (``nf4``) or LLM.int8 (``int8``), computing in ``compute_dtype``.

    Says what to install if bitsandbytes is missing. bitsandbytes quantizes in blocks of 64 inputs: a part
    whose layers take fewer (or a number not a multiple of 64) stays unquantized. For the real Llama 3.2
    Vision models nothing is left out; the tiny built-in model keeps its vision tower (width 32) and
    projector (96) as they are. int8 holds the 90B in about 90 GB, so it fits one 141 GB GPU.
    """
    missing = [name for name in ("bitsandbytes", "accelerate") if find_spec(name) is None]
    if missing:
        raise ModelLoadError(
            f"quantization {kind!r} needs {' and '.join(missing)}: pip install 'llamascope[quantized]'"
        )
    vision = config.get("vision_config", {})
    keep = ["lm_head"]  # transformers' default: the output layer stays as it is
    if vision.get("hidden_size", 1280) % 64:
        keep.append("model.vision_model")
    if vision.get("vision_output_dim", 7680) % 64:
        keep.append("model.multi_modal_projector")
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        llm_int8_skip_modules=keep,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


def load_weights(
    model_class: Any,
    path: Path,
    dtype: str,
    quantization: str,
    config: dict[str, Any],
    device: str = "cpu",
    gpu_memory_cap: str | None = None,
) -> Any:
    """``model_class.from_pretrained`` in the dtype and quantization asked for, placed on ``device``, ready for
    inference."""
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
    extra: dict[str, Any] = {}
    if quantization in ("nf4", "int8"):
        compute = torch.bfloat16 if dtype == "auto" else torch_dtype
        extra["quantization_config"] = _quantization_config(quantization, compute, config)
        torch_dtype = compute
    extra.update(devices.placement(device, devices.cuda_devices() if device != "cpu" else 0, gpu_memory_cap))
    try:
        model = model_class.from_pretrained(path, dtype=torch_dtype, **extra)
    except Exception as exc:
        raise ModelLoadError(f"{path}: the weights cannot be loaded: {exc}") from exc
    model.eval()
    return model
