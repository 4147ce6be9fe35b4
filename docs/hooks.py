"""MkDocs hooks (mkdocs.yml): the settings page's tables are generated from llamascope/settings.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gen_settings


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri == "settings.md":
        return gen_settings.fill(markdown)
    return markdown
