"""A model's weights loaded as asked: ``load_weights`` loads in the dtype and quantization asked for, onto the
device, and raises ``base.ModelLoadError``. The directory is checked before (``model_dir.check_model_dir``).
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from transformers import BitsAndBytesConfig

from llamascope.engines import devices
from llamascope.engines.base import ModelLoadError


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
