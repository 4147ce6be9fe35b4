"""The in-process engine for the text-only Llama models (Llama 3.1 8B/70B, 3.2 1B/3B, 3.3 70B).

transformers' ``LlamaForCausalLM`` on the request path every in-process model shares
(``in_process.InProcessEngine``): the same batching scheduler (``scheduler.Scheduler``: requests join
and leave the running batch at token boundaries, chunked prefill, queue bounds), the same per-request
sampling, cancellation, token streaming and counting. Only the model, the tokenizer and the prompt
differ: prompts are rendered with the checkpoint's own chat template (Meta's ships in
``tokenizer_config.json``), or the file the operator configures, and carry no image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, LlamaForCausalLM

from llamascope.engines.base import EngineInfo, ModelLoadError, Turn
from llamascope.engines.in_process import InProcessEngine, chat_role, chat_text
from llamascope.engines.requests import BatchLimits
from llamascope.images import PreparedImage


class LlamaTextEngine(InProcessEngine):
    """Implements ``llamascope.engines.base.Engine`` for a text-only Llama in this process."""

    MODEL_TYPE = "llama"  # LlamaForCausalLM
    TAKES_IMAGES = False

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        info: EngineInfo,
        template: str,
        limits: BatchLimits | None = None,
        vision_cache_bytes: int = 0,  # nothing to cache: no vision tower
        faults: bool = False,
        prefix_cache_bytes: int | None = None,  # None: derived from free memory (prefix_cache.default_bytes)
    ) -> None:
        super().__init__(model, tokenizer, info, template, limits, 0, faults, prefix_cache_bytes)

    @staticmethod
    def _processor(path: Path) -> Any:
        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # transformers raises many types here
            raise ModelLoadError(f"{path}: the tokenizer cannot be loaded: {exc}") from exc

    @staticmethod
    def _model_class() -> Any:
        return LlamaForCausalLM

    @staticmethod
    def _template(processor: Any, path: Path) -> str:
        if not processor.chat_template:
            raise ModelLoadError(
                f"{path} has no chat template (tokenizer_config.json has no 'chat_template'); "
                'set chat_template = "/path/to/template.jinja" for this model in the config file'
            )
        return str(processor.chat_template)

    def image_size(self, width: int, height: int) -> tuple[int, int]:
        return width, height  # never asked: the conversation rules give a text-only model no image

    def _chat(self, turns: list[Turn]) -> tuple[list[dict[str, Any]], list[PreparedImage]]:
        return [{"role": chat_role(turn), "content": chat_text(turn)} for turn in turns], []
