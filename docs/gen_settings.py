"""The settings page's tables, generated from llamascope/settings.py so that they cannot drift.

``python docs/gen_settings.py`` prints them; docs/hooks.py puts them into docs/settings.md at build time.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the checkout's llamascope, also where the package is not installed
    sys.path.insert(0, str(ROOT))

from pydantic.fields import FieldInfo  # noqa: E402

from llamascope.settings import ModelSpec, Settings  # noqa: E402

ENV_PREFIX = "LLAMASCOPE_"


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Annotated:
        return _type(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in args)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is list:
        return f"list of {_type(args[0])}"
    if origin is dict:
        return "table of models"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _size(value: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size and value % size == 0:
            return f"{value // size} {unit}"
    return f"{value:,}"


def _default(name: str, field: FieldInfo) -> str:
    if field.default_factory is not None:
        made = field.default_factory()  # type: ignore[call-arg]
        return "none" if made in ([], {}) else "see meaning"
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int) and name.endswith("_bytes"):
        return _size(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:g}" if isinstance(value, float) else f"{value:,}" if value >= 10_000 else str(value)
    return f"`{value}`" if value != "" else '`""`'


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def settings_table() -> str:
    """One row a server setting: environment variable and config-file key, type, default, meaning."""
    rows = [
        "| environment variable / config key | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for name, field in Settings.model_fields.items():
        rows.append(
            f"| `{env_name(name)}`<br>`{name}` | {_type(field.annotation)} | {_default(name, field)} "
            f"| {_cell(field.description or '')} |"
        )
    return "\n".join(rows)


def model_table() -> str:
    """One row a key of a `[models."NAME"]` table in the config file."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in ModelSpec.model_fields.items():
        rows.append(
            f"| `{name}` | {_type(field.annotation)} | {_default(name, field)} | {_cell(field.description or '')} |"
        )
    return "\n".join(rows)


MARKERS = {"<!-- settings-table -->": settings_table, "<!-- model-table -->": model_table}


def fill(markdown: str) -> str:
    """The page with each marker replaced by its generated table."""
    for marker, table in MARKERS.items():
        markdown = markdown.replace(marker, table())
    return markdown


if __name__ == "__main__":
    print(settings_table(), model_table(), sep="\n\n")
