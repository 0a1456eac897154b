"""MkDocs hook: reject a notebook page whose stored outputs are incomplete or contain an error.

The site shows the outputs saved in each notebook instead of running it at build time, so
this check keeps a notebook with an error, or with cells never run, off the site.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mkdocs.exceptions import PluginError


def read_notebook(path: Path) -> dict:
    return json.loads(path.read_text("utf-8"))


def notebook_problems(notebook: dict) -> list[str]:
    """Return what is wrong with a notebook's outputs; an empty list when nothing is."""
    problems = []
    for number, cell in enumerate(notebook.get("cells", []), start=1):
        if cell.get("cell_type") != "code" or not "".join(cell.get("source", [])).strip():
            continue
        if cell.get("execution_count") is None:
            problems.append(f"cell {number} was never run")
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                problems.append(f"cell {number} raised {output.get('ename', 'an error')}")
    return problems


def on_files(files, config):
    for file in files:
        if not file.src_path.endswith(".ipynb"):
            continue
        problems = notebook_problems(read_notebook(Path(file.abs_src_path)))
        if problems:
            raise PluginError(
                f"{file.src_path}: {'; '.join(problems)}. Run `nox -s notebooks` to execute "
                "it again and save the outputs."
            )
    return files


# mkdocs-jupyter's page template carries a module script that would import Mermaid from a
# CDN when a notebook has a diagram, and an empty MathJax script tag. The site loads
# nothing from other hosts, so both are removed from notebook pages.
MODULE_SCRIPT = re.compile(r'<script type="module">((?:(?!</script>).)*)</script>', re.S)
EMPTY_SCRIPT = re.compile(r'<script src="">\s*</script>')


def strip_remote_loaders(html: str) -> str:
    """Return *html* without the template's scripts that reach other hosts."""

    def keep_local(match: re.Match[str]) -> str:
        return "" if "https://" in match.group(1) else match.group(0)

    return EMPTY_SCRIPT.sub("", MODULE_SCRIPT.sub(keep_local, html))


def on_post_page(output, page, config):
    if page.file.src_path.endswith(".ipynb"):
        return strip_remote_loaders(output)
    return output
