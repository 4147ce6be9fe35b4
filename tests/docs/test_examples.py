"""Every example under docs/examples/ (included into the documentation pages) runs against one real server,
as a reader would run it: in a fresh process, in a folder with a picture in it, given only the address and
the key (the documented environment variables), with the built-in model and no network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ADMIN_KEY, Server, png_bytes

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
RUNNABLE = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh"))
# What none of them may print: a refusal, an error event, a traceback.
FAILURES = ("InvalidParameter", "InvalidApiKey", "event:error", "Traceback", "AccessDenied")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where a reader runs the examples: the pictures they name are there (red.png, photo.jpg)."""
    path = tmp_path_factory.mktemp("reader")
    (path / "red.png").write_bytes(png_bytes())
    (path / "photo.jpg").write_bytes(png_bytes((30, 120, 200), (800, 600), "JPEG"))
    return path


def run_example(path: Path, server: Server, folder: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    program = path.read_text().replace("http://127.0.0.1:8000", server.base)
    env = os.environ | {
        "DASHSCOPE_HTTP_BASE_URL": server.api,
        "DASHSCOPE_API_KEY": server.key,
        "LLAMASCOPE_ADMIN_KEY": ADMIN_KEY,
        "LLAMASCOPE_DATA_DIR": str(data_dir),  # `llamascope keys ...` work on a store of their own
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `llamascope`
    }
    command = [sys.executable, "-c", program] if path.suffix == ".py" else ["bash", "-euo", "pipefail", "-c", program]
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("path", RUNNABLE, ids=[p.name for p in RUNNABLE])
def test_example_runs(path: Path, text_server: Server, folder: Path, tmp_path: Path) -> None:
    out = run_example(path, text_server, folder, tmp_path / "data")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip(), out.stderr
    for failure in FAILURES:
        assert failure not in out.stdout + out.stderr, out.stdout + out.stderr


def test_every_example_is_on_a_page() -> None:
    """An example no page includes is dead weight; a page naming a missing one fails the build (check_paths)."""
    pages = "".join(p.read_text() for p in EXAMPLES.parent.glob("*.md"))
    for path in EXAMPLES.iterdir():
        assert f"--8<--\n{path.name}\n--8<--" in pages, path.name
