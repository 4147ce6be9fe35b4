"""A model directory's checks: each failure says what is wrong, before transformers tries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamascope.engines.base import ModelLoadError
from llamascope.engines.model_dir import check_model_dir


def test_load_errors_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        check_model_dir(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="text-only model"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "vision_config": {}}))
    with pytest.raises(ModelLoadError, match="vision-language model of type 'qwen2_vl'"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mllama"}))
    with pytest.raises(ModelLoadError, match="no weights"):
        check_model_dir(tmp_path)
