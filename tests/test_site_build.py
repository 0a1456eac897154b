"""The built site loads nothing from other hosts, so it works without a network."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.commands.build import build
from mkdocs.config import load_config

from tests.harness.snippets import ROOT

# A script or image source, a stylesheet, or a dynamic import that points off the site.
REMOTE_LOAD = re.compile(
    r'<script[^>]+src="https?://|<img[^>]+src="https?://'
    r'|<link[^>]+rel="stylesheet"[^>]+href="https?://'
    r"|import\(\s*[\"']https?://"
)


def test_site_loads_nothing_remote(tmp_path: Path):
    config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path / "site"))
    build(config)

    offending = [
        f"{page.relative_to(tmp_path)}: {match.group(0)}"
        for page in sorted((tmp_path / "site").rglob("*.html"))
        for match in REMOTE_LOAD.finditer(page.read_text("utf-8"))
    ]

    assert offending == []
