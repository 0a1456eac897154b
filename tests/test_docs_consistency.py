"""Nothing on a page escapes the tests: includes resolve, and every snippet file is tested."""

from __future__ import annotations

import re

from tests.harness.page_examples import included_files, page_includes
from tests.harness.snippets import ROOT, SNIPPETS, TESTS, marked_snippets

DOCS = ROOT / "docs"

# Fence languages for text that is shown, not run; a Python or JavaScript fence is run.
SHOWN_LANGUAGES = {"bash", "console", "text", "sql", "yaml", "toml", "json", "ini", "dotenv"}
RUN_LANGUAGES = {"python", "py", "javascript", "js", "mjs"}
FENCE = re.compile(r"^ *```+ *([^\s{`]*)", re.M)


def snippet_files() -> set[str]:
    ignored = {"__pycache__", "node_modules"}
    return {
        path.relative_to(SNIPPETS).as_posix()
        for path in SNIPPETS.rglob("*")
        if path.is_file() and not ignored & set(path.parts)
    }


def snippets_named_by_tests() -> set[str]:
    found: set[str] = set()
    for test_file in TESTS.rglob("test_*.py"):
        found |= marked_snippets(test_file)
    return found


def test_every_include_exists():
    missing = {
        path: pages
        for path, pages in page_includes(DOCS).items()
        if not (SNIPPETS / path).is_file()
    }

    assert missing == {}


def test_every_snippet_included_by_page():
    not_shown = snippet_files() - set(page_includes(DOCS))

    assert not_shown == set()


def test_every_included_snippet_tested():
    untested = set(page_includes(DOCS)) - snippets_named_by_tests()

    assert untested == set()


def test_every_fence_names_its_language():
    unnamed = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text("utf-8")
        inside = False
        for match in FENCE.finditer(text):
            if not inside and match.group(1) == "":
                line = text[: match.start()].count("\n") + 1
                unnamed.append(f"{page.relative_to(ROOT)}:{line}")
            inside = not inside

    assert unnamed == []


def test_every_fence_language_known():
    unknown = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text("utf-8")
        languages = FENCE.findall(text)[::2]
        unknown += [
            f"{page.relative_to(ROOT)}: {language}"
            for language in languages
            if language and language not in SHOWN_LANGUAGES | RUN_LANGUAGES
        ]

    assert unknown == []


def test_include_only_fences_detected():
    assert included_files('--8<-- "lambda/handler.py"\n') == ["lambda/handler.py"]
    assert included_files('print("--8<--")\n') == []
