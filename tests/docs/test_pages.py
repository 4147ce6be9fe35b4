"""The README and the documentation site say what the code does: the settings page is generated from
llamascope/settings.py, the architecture page's layers are the import-linter contract's, the README's
examples are the tested example files, and every config-file example loads."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from llamascope.settings import ModelSpec, Settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS))

import gen_settings  # noqa: E402


def test_the_settings_page_lists_every_setting_with_its_meaning() -> None:
    page = (DOCS / "settings.md").read_text()
    assert "<!-- settings-table -->" in page and "<!-- model-table -->" in page
    filled = gen_settings.fill(page)
    for name, field in Settings.model_fields.items():
        assert f"`LLAMASCOPE_{name.upper()}`<br>`{name}`" in filled, name
        assert field.description, f"settings.py: {name} has no Field(description=...)"
    for name, field in ModelSpec.model_fields.items():
        assert f"| `{name}` |" in filled, name
        assert field.description, f"settings.py: ModelSpec.{name} has no Field(description=...)"
    assert "IMAGE_MIN_SIDE" in filled and "UPLOAD_POLICY_SECONDS" in filled  # once missing from the README


def test_the_architecture_page_lists_the_contracts_layers() -> None:
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contract if c["type"] == "layers")
    page = (DOCS / "architecture.md").read_text()
    listed = re.findall(r"^\d+\. `([^`]+)`", page, re.M)
    assert listed == layers


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_the_readme_is_a_landing_page_whose_examples_are_the_tested_ones() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert _blocks(readme, "python")[0] == (DOCS / "examples" / "sdk_call.py").read_text()
    curl = next(block for block in _blocks(readme, "bash") if "curl" in block)
    assert curl == (DOCS / "examples" / "curl_stream.sh").read_text()
    for link, anchor in re.findall(r"\]\((docs/[^)#]+)(?:#([^)]+))?\)", readme):
        assert (ROOT / link).exists(), link
        headings = re.findall(r"^#+ (.+)$", (ROOT / link).read_text(), re.M)
        assert not anchor or anchor in {slugify(h, "-") for h in headings}, f"{link}#{anchor}"


@pytest.mark.parametrize("path", sorted((DOCS / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_config_examples_load(path: Path) -> None:
    settings = Settings.load(path)
    assert settings.models or settings.port


def test_every_python_example_on_a_page_is_a_tested_file() -> None:
    """The house rule, every example in the docs runs in a test: a page's Python is included from docs/examples/."""
    for page in sorted(DOCS.glob("*.md")):
        for block in _blocks(page.read_text(), "python"):
            assert block.startswith("--8<--\n"), f"{page.name}: move this example into docs/examples/:\n{block}"


def test_the_architecture_pages_large_modules_are_those_past_500_lines() -> None:
    page = (DOCS / "architecture.md").read_text()
    section = page.split("## Large modules", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^- `([^`]+\.py)`", section, re.M))
    package = ROOT / "llamascope"
    large = {str(p.relative_to(package)) for p in package.rglob("*.py") if len(p.read_text().splitlines()) > 500}
    assert listed == large


def test_every_benchmark_script_is_on_the_benchmarks_page() -> None:
    page = (DOCS / "benchmarks.md").read_text()
    scripts = [p for p in (ROOT / "bench").iterdir() if p.suffix in (".py", ".sh") and p.name != "harness.py"]
    for path in scripts:
        assert f"bench/{path.name}" in page, path.name


def test_the_deploy_pages_replica_config_loads_and_shares_what_replicas_must_share() -> None:
    """Found by following docs/deploy.md with two replicas: its config left `batch_files_dir` unset, so each
    replica kept batch input files under its own DATA_DIR and a batch created through the replica that did not
    receive the upload failed ("The input file could not be read."). Every setting whose meaning says it is the
    same on every replica, and the upload directory, must be in the config that page gives every replica."""
    page = (DOCS / "deploy.md").read_text()
    (block,) = _blocks(page, "toml")
    config = tomllib.loads(block)
    shared = {n for n, f in Settings.model_fields.items() if "every replica" in (f.description or "")}
    assert shared >= {"batch_files_dir", "upload_secret", "redis_url"}
    missing = ({"database_url", "upload_dir"} | shared) - config.keys()
    assert not missing, f"docs/deploy.md's replica config leaves per-replica: {sorted(missing)}"
    # With its placeholders filled in, it is a config a replica starts from.
    filled = {**config, "upload_secret": "x" * 64, "admin_key": "sk-" + "0123456789abcdef" * 2 + "01234567"}
    Settings.model_validate(filled)


def test_the_deploy_pages_nginx_proxying_is_what_the_topology_test_runs() -> None:
    """deploy.md's nginx config is checked by tests/deploy/test_topology.py, which runs its own copy: each
    directive of the page's ``location /`` (what reaches the replicas, and when nginx tries the next one)
    must be in that copy, so the page cannot drift from the tested config."""
    (block,) = _blocks((DOCS / "deploy.md").read_text(), "nginx")
    location = block.split("location / {", 1)[1].split("}", 1)[0]
    directives = [line.split("#", 1)[0].strip() for line in location.splitlines()]
    tested = (ROOT / "tests" / "deploy" / "test_topology.py").read_text()
    assert "proxy_next_upstream error timeout http_503 non_idempotent;" in directives
    for directive in filter(None, directives):
        assert directive in tested, directive
