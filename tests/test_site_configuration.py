"""The site's configuration loads, so a broken mkdocs.yml fails the tests and not only the build."""

from __future__ import annotations

from mkdocs.config import load_config

from tests.harness.snippets import ROOT


def test_configuration_loads():
    config = load_config(str(ROOT / "mkdocs.yml"))

    assert config["site_name"]
    assert "mkdocs-jupyter" in config["plugins"]
    assert config["markdown_extensions"]
