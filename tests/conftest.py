"""The harness plugin is loaded through addopts in pyproject.toml; see tests/harness/plugin.py."""
