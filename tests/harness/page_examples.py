"""Find the code blocks a page shows and read the test switches written in their fences.

A fence may carry `test="skip"` with `reason="..."`, or `test="cockroachdb-only"`, in
braces after the language: ```python {test="skip" reason="prints a secret"}```. A fence
that only includes a file from snippets/ is not a block of its own, because the file is
tested as a whole by its own tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pytest_examples import CodeExample, find_examples

INCLUDE_LINE = re.compile(r'^\s*--8<--\s+"([^"]+)"\s*$')
JAVASCRIPT_FENCE = re.compile(r"(^ *```)( *)((?:js|javascript|mjs)\b.*?)\n(.+?)\1", re.M | re.S)
SETTING = re.compile(r'([A-Za-z_-]+)="([^"]*)"')

SWITCH_SKIP = "skip"
SWITCH_COCKROACHDB_ONLY = "cockroachdb-only"
SWITCHES = (SWITCH_SKIP, SWITCH_COCKROACHDB_ONLY)


class InvalidFenceSwitch(ValueError):
    """A fence's test switch is unknown or lacks its reason."""


@dataclass(frozen=True)
class PageBlock:
    """One runnable code block on a page."""

    language: str
    path: Path
    start_line: int
    end_line: int
    source: str
    switch: str | None
    reason: str | None
    example: CodeExample | None = None

    @property
    def test_id(self) -> str:
        return f"{self.path.as_posix()}:{self.start_line}-{self.end_line}"


def included_files(source: str) -> list[str]:
    """Return the snippet paths a block includes, or [] for a block with code of its own."""
    lines = [line for line in source.splitlines() if line.strip()]
    matches = [INCLUDE_LINE.match(line) for line in lines]
    if lines and all(matches):
        return [match.group(1) for match in matches if match]
    return []


def _read_switch(prefix: str, where: str) -> tuple[str | None, str | None]:
    settings = dict(SETTING.findall(prefix))
    switch = settings.get("test")
    if switch is None:
        return None, None
    if switch not in SWITCHES:
        raise InvalidFenceSwitch(
            f'{where}: test="{switch}" is not a known switch; use one of {", ".join(SWITCHES)}'
        )
    if switch == SWITCH_SKIP and not settings.get("reason"):
        raise InvalidFenceSwitch(f'{where}: test="skip" needs reason="why it cannot run"')
    return switch, settings.get("reason")


def python_blocks(docs: Path) -> Iterator[PageBlock]:
    for example in find_examples(docs):
        if example.path.suffix != ".md" or included_files(example.source):
            continue
        where = f"{example.path.as_posix()}:{example.start_line}"
        switch, reason = _read_switch(example.prefix, where)
        yield PageBlock(
            "python",
            example.path,
            example.start_line,
            example.end_line,
            example.source,
            switch,
            reason,
            example,
        )


def javascript_blocks(docs: Path) -> Iterator[PageBlock]:
    for page in sorted(docs.rglob("*.md")):
        text = page.read_text("utf-8")
        for match in JAVASCRIPT_FENCE.finditer(text):
            source = match.group(4)
            if included_files(source):
                continue
            start_line = text[: match.start()].count("\n") + 1
            where = f"{page.as_posix()}:{start_line}"
            switch, reason = _read_switch(match.group(3), where)
            yield PageBlock(
                "javascript",
                page,
                start_line,
                start_line + source.count("\n") + 1,
                source,
                switch,
                reason,
            )


def page_includes(docs: Path) -> dict[str, list[str]]:
    """Map each snippet path that pages include to the pages that include it."""
    includes: dict[str, list[str]] = {}
    for page in sorted(docs.rglob("*.md")):
        for line in page.read_text("utf-8").splitlines():
            match = INCLUDE_LINE.match(line)
            if match:
                includes.setdefault(match.group(1), []).append(page.as_posix())
    return includes
