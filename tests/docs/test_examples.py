"""Every example under docs/examples/ (included into the documentation pages) runs against one real server,
as a reader would run it: in a fresh process, in a folder with a picture in it, given only the address and
the key (the documented environment variables), with the built-in model and no network."""

from __future__ import annotations

import os
import re
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


def test_the_keys_example_acts_on_the_key_it_made_in_a_store_that_has_keys(
    text_server: Server, folder: Path, tmp_path: Path
) -> None:
    """A reader's store already holds the key the first start made; the example grants and revokes its own."""
    env = os.environ | {"LLAMASCOPE_DATA_DIR": str(tmp_path)}
    keys = [sys.executable, "-m", "llamascope", "keys"]
    subprocess.run([*keys, "create", "--name", "first start"], env=env, check=True, capture_output=True)
    out = run_example(EXAMPLES / "keys.sh", text_server, folder, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    listing = subprocess.run([*keys, "list"], env=env, check=True, capture_output=True, text=True).stdout
    rows = re.split(r"\n(?=\s+\d+\s+sk-)", listing)  # one a key, with its grants' continuation lines
    first = next(row for row in rows if "first start" in row)
    alice = next(row for row in rows if "alice" in row)
    assert "active" in first and "90b" not in first, listing
    assert "revoked" in alice and "llama3.2-90b-vision-instruct" in alice, listing


def test_the_clients_pages_addresses_reach_llamascope_from_the_environment_alone(
    text_server: Server, tmp_path: Path
) -> None:
    """The table of addresses in clients.md: the 2.x Client and the openai SDK take theirs from the environment."""
    program = (
        "import dashscope, openai\n"
        "m = [{'role': 'user', 'content': 'hi'}]\n"
        "print(dashscope.Client().chat.completions.create(model='llama3.2-11b-vision', messages=m, max_tokens=2))\n"
        "print(openai.OpenAI().chat.completions.create(model='llama3.2-11b-vision', messages=m, max_tokens=2))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DASHSCOPE_", "OPENAI_"))} | {
        "DASHSCOPE_BASE_URL": text_server.api,
        "DASHSCOPE_API_KEY": text_server.key,
        "OPENAI_BASE_URL": text_server.base + "/compatible-mode/v1",
        "OPENAI_API_KEY": text_server.key,
        "HOME": str(tmp_path),  # no ~/.dashscope of the machine's
    }
    out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("finish_reason='length'") == 2, out.stdout
