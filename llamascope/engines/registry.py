"""Served model names to engines, loaded once at start-up.

Several names may share one engine: with no configuration both seed names
are served by the one built-in test model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from llamascope.engines.base import Engine, ModelLoadError
from llamascope.engines.builtin_model import ensure_test_model, ensure_text_test_model, is_test_model
from llamascope.engines.devices import Bounds, DeviceError, resolve_device
from llamascope.engines.llama_text import LlamaTextEngine
from llamascope.engines.loading import check_model_dir
from llamascope.engines.mllama import MllamaEngine
from llamascope.engines.requests import BatchLimits, default_queue_bytes
from llamascope.engines.upstream import UpstreamEngine
from llamascope.settings import BUILTIN_TEXT, ModelSpec, Settings

log = logging.getLogger(__name__)


def load_engines(settings: Settings, progress: Callable[[str], None] = log.info) -> dict[str, Engine]:
    """Load every configured model; raise ModelLoadError naming the model that failed."""
    loaded: dict[tuple[str, str, str, int, str | None, str], Engine] = {}
    engines: dict[str, Engine] = {}
    for name, spec in settings.models.items():
        if spec.upstreams:
            progress(f"serving {name!r} through {', '.join(spec.upstreams)}")
            engines[name] = UpstreamEngine.create(
                spec.upstreams,
                spec.upstream_model or name,
                spec.upstream_api_key,
                spec.context_length,
                spec.upstream_tokenizer,
                spec.chat_template,
            )
            continue
        path = _resolve(spec, settings)
        try:
            device = resolve_device(spec.device or settings.device)
        except DeviceError as exc:
            raise ModelLoadError(f"model {name!r}: {exc}") from exc
        key = (str(path), spec.dtype, spec.quantization, spec.context_length, spec.chat_template, device)
        if key not in loaded:
            what = "the built-in test model" if spec.is_builtin else str(path)
            progress(f"loading {name!r} from {what} onto {device} ...")
            try:
                # Llama 3.2 Vision (mllama) or a text-only Llama 3 (llama): the directory's config says which.
                kind = check_model_dir(path, ("mllama", LlamaTextEngine.MODEL_TYPE)).get("model_type")
                engine_class = LlamaTextEngine if kind == LlamaTextEngine.MODEL_TYPE else MllamaEngine
                loaded[key] = engine_class.load(
                    path,
                    dtype=spec.dtype,
                    quantization=spec.quantization,
                    context_length=spec.context_length,
                    chat_template=spec.chat_template,
                    test_model=is_test_model(path),
                    limits=BatchLimits(
                        max_queued=settings.max_queued,
                        max_queued_bytes=settings.max_queued_bytes
                        if settings.max_queued_bytes is not None
                        else default_queue_bytes(),
                        max_queue_wait=settings.max_queue_wait_seconds,
                        prefill_chunk=settings.prefill_chunk_tokens,
                        vision_batch_tiles=settings.vision_batch_tiles,
                    ),
                    bounds=Bounds(settings.max_batch_size, settings.max_batch_tokens, settings.vision_cache_bytes),
                    device=device,
                    gpu_memory_cap=settings.gpu_memory_cap,
                    prefix_cache_bytes=settings.prefix_cache_bytes,
                    faults=settings.fault_injection,
                )
            except ModelLoadError as exc:
                raise ModelLoadError(f"model {name!r}: {exc}") from exc
        engines[name] = loaded[key]
    return engines


def _resolve(spec: ModelSpec, settings: Settings) -> Path:
    if spec.path == BUILTIN_TEXT:
        return ensure_text_test_model(settings.cache_dir)
    if spec.is_builtin:
        return ensure_test_model(settings.cache_dir)
    assert spec.path is not None  # a spec has a path or upstreams (ModelSpec checks)
    return Path(spec.path).expanduser()
