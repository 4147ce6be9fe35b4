from __future__ import annotations

from pathlib import Path

import pytest

from llamascope.cli import _model_arg, usable_cores
from llamascope.settings import BUILTIN


def test_usable_cores_honours_a_cgroup_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert usable_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) >= 1
    assert usable_cores(tmp_path / "absent") >= 1


def test_model_argument() -> None:
    assert _model_arg("a=/models/x") == ("a", "/models/x")
    assert _model_arg("a=builtin") == ("a", BUILTIN)
    with pytest.raises(Exception, match="NAME=PATH"):
        _model_arg("no-equals-sign")
