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
    assert _model_arg("a=/models/x")[1].path == "/models/x"
    assert _model_arg("a=builtin")[1].path == BUILTIN
    upstream = _model_arg("a=openai+http://h1:30000/v1,openai+http://h2:30000/v1")[1]
    assert upstream.path is None and upstream.upstreams == ["http://h1:30000/v1", "http://h2:30000/v1"]
    with pytest.raises(Exception, match="NAME=PATH"):
        _model_arg("no-equals-sign")


@pytest.mark.parametrize(
    "environment,expected",
    [({}, "30000"), ({"GOMP_SPINCOUNT": "5"}, "5"), ({"OMP_WAIT_POLICY": "passive"}, None)],
    ids=["default", "user's spin count", "user's wait policy"],
)
def test_openmp_spinning_is_set_before_torch_loads(environment: dict[str, str], expected: str | None) -> None:
    """In a fresh process, as the server starts: set before torch loads libgomp, never over the user's own."""
    import json
    import os
    import subprocess
    import sys

    script = (
        "import json, os, sys\n"
        "from llamascope.cli import configure_torch\n"
        "configure_torch(1)\n"
        "print(json.dumps([os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")} | environment
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [expected, True]
