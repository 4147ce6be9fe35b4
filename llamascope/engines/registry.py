"""Served model names to engines, loaded once at start-up.

The composition root (``llamascope.server``) describes each model as an
``UpstreamModel`` or an ``InProcessModel`` and the in-process engines'
shared ``Runtime``; nothing here reads the settings. Several names may share
one engine: with no configuration both seed names are served by the one
built-in test model. PyTorch, transformers and the vision stack are imported
only when a model is served in process: a gateway (every model upstream)
never loads them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from llamascope.engines.base import Engine, ModelLoadError
from llamascope.engines.devices import Bounds
from llamascope.engines.model_dir import SERVED_MODEL_TYPES, check_model_dir
from llamascope.engines.upstream import ANSWER_SILENCE, UpstreamEngine
from llamascope.observability.metrics import upstream_label

log = logging.getLogger(__name__)

BuiltinModel = Literal["test-model", "text-test-model"]
TEST_MODEL: BuiltinModel = "test-model"  # the built-in tiny Llama 3.2 Vision, built in the cache directory on first use
TEXT_TEST_MODEL: BuiltinModel = "text-test-model"  # the built-in tiny text-only Llama 3


@dataclass(frozen=True)
class UpstreamModel:
    """A model served through OpenAI-compatible engines (see ``engines.upstream``)."""

    upstreams: tuple[str, ...]
    model: str  # the name the upstreams know it by
    api_key: str | None = None
    context_length: int = 8192
    tokenizer: str | None = None  # a local tokenizer directory, to count prompts without asking the engine
    chat_template: str | None = None
    silence: float = ANSWER_SILENCE  # seconds an engine may send nothing before its answer is given up
    # The name was set (upstream_model), not this model's own: never replaced by the one an engine lists.
    named: bool = True


@dataclass(frozen=True)
class InProcessModel:
    """A model served in this process: a Hugging Face directory (or a built-in test model) and how to run it."""

    source: Path | BuiltinModel
    dtype: str = "auto"
    quantization: str = "none"
    context_length: int = 8192
    chat_template: str | None = None
    device: str = "auto"  # auto, cpu, cuda or cuda:N


@dataclass(frozen=True)
class Runtime:
    """What every in-process engine shares: where the built-in models are built, the queue, the batch's bounds."""

    cache_dir: Path
    max_queued: int | None = None
    max_queued_bytes: int | None = None  # None: default_queue_bytes()
    max_queue_wait: float = 60.0
    prefill_chunk: int = 512
    vision_batch_tiles: int | None = None
    bounds: Bounds = field(default_factory=Bounds)
    gpu_memory_cap: str | None = None
    prefix_cache_bytes: int | None = None
    faults: bool = False


def check_model_dirs(models: Mapping[str, UpstreamModel | InProcessModel]) -> None:
    """Check each in-process model's directory, with no PyTorch imported: raise ModelLoadError naming the first
    bad one. The composition root calls this before anything loads PyTorch, so that a wrong ``--model`` path
    stops start-up in about a second instead of after seconds of imports."""
    for name, model in models.items():
        if isinstance(model, InProcessModel) and model.source not in (TEST_MODEL, TEXT_TEST_MODEL):
            try:
                check_model_dir(Path(model.source).expanduser(), SERVED_MODEL_TYPES)
            except ModelLoadError as exc:
                raise ModelLoadError(f"model {name!r}: {exc}") from exc


def load_engines(
    models: Mapping[str, UpstreamModel | InProcessModel],
    runtime: Runtime,
    progress: Callable[[str], None] = log.info,
) -> dict[str, Engine]:
    """Load every model, in order; raise ModelLoadError naming the model that failed."""
    loaded: dict[tuple[str, str, str, int, str | None, str], Engine] = {}
    engines: dict[str, Engine] = {}
    for name, model in models.items():
        if isinstance(model, UpstreamModel):
            progress(f"serving {name!r} through {', '.join(map(upstream_label, model.upstreams))}")
            counter = None
            if model.tokenizer:
                # transformers only for a model whose prompts are counted here: a gateway never loads it.
                from llamascope.engines.prompt_counter import PromptCounter

                counter = PromptCounter.load(model.tokenizer, model.chat_template)
            engines[name] = UpstreamEngine.create(
                list(model.upstreams),
                model.model,
                model.api_key,
                model.context_length,
                counter,
                model.silence,
                model.named,
            )
        else:
            engines[name] = _load_in_process(name, model, runtime, loaded, progress)
    return engines


def _load_in_process(
    name: str,
    model: InProcessModel,
    runtime: Runtime,
    loaded: dict[tuple[str, str, str, int, str | None, str], Engine],
    progress: Callable[[str], None],
) -> Engine:
    # PyTorch and transformers load here, with the first model served in process: a gateway never pays
    # their seconds and hundreds of megabytes.
    from llamascope.engines.builtin_model import ensure_test_model, ensure_text_test_model, is_test_model
    from llamascope.engines.devices import DeviceError, resolve_device
    from llamascope.engines.llama_text import LlamaTextEngine
    from llamascope.engines.mllama import MllamaEngine
    from llamascope.engines.requests import BatchLimits, default_queue_bytes

    if model.source == TEXT_TEST_MODEL:
        path = ensure_text_test_model(runtime.cache_dir)
    elif model.source == TEST_MODEL:
        path = ensure_test_model(runtime.cache_dir)
    else:
        path = Path(model.source).expanduser()
    try:
        device = resolve_device(model.device)
    except DeviceError as exc:
        raise ModelLoadError(f"model {name!r}: {exc}") from exc
    key = (str(path), model.dtype, model.quantization, model.context_length, model.chat_template, device)
    if key not in loaded:
        what = "the built-in test model" if model.source in (TEST_MODEL, TEXT_TEST_MODEL) else str(path)
        progress(f"loading {name!r} from {what} onto {device} ...")
        try:
            # Llama 3.2 Vision (mllama) or a text-only Llama 3 (llama): the directory's config says which.
            kind = check_model_dir(path, SERVED_MODEL_TYPES).get("model_type")
            engine_class = LlamaTextEngine if kind == LlamaTextEngine.MODEL_TYPE else MllamaEngine
            loaded[key] = engine_class.load(
                path,
                dtype=model.dtype,
                quantization=model.quantization,
                context_length=model.context_length,
                chat_template=model.chat_template,
                test_model=is_test_model(path),
                limits=BatchLimits(
                    max_queued=runtime.max_queued,
                    max_queued_bytes=runtime.max_queued_bytes
                    if runtime.max_queued_bytes is not None
                    else default_queue_bytes(),
                    max_queue_wait=runtime.max_queue_wait,
                    prefill_chunk=runtime.prefill_chunk,
                    vision_batch_tiles=runtime.vision_batch_tiles,
                ),
                bounds=runtime.bounds,
                device=device,
                gpu_memory_cap=runtime.gpu_memory_cap,
                prefix_cache_bytes=runtime.prefix_cache_bytes,
                faults=runtime.faults,
            )
        except ModelLoadError as exc:
            raise ModelLoadError(f"model {name!r}: {exc}") from exc
    return loaded[key]
