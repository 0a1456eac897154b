"""The platform table on docs/platforms/index.md names only tests that exist, and every module.

The table lists, per platform and language, the pytest node ids that prove each claim. These
tests collect the platform test modules in a separate pytest process and compare.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from dataclasses import dataclass

from tests.harness.snippets import ROOT

PAGE = ROOT / "docs" / "platforms" / "index.md"
TABLE_HEADER = "| Platform | Language | Pattern |"
MODULE = re.compile(r"`(tests/test_platform_\w+\.py)`")
TEST_ID = re.compile(r"`((?:Test\w+::)?test_\w+\[\w+\])`")
# The column that names the module, and the columns that each hold at least one test.
MODULE_COLUMN = "Tests"
CLAIM_COLUMNS = ("Warm", "Concurrent", "Recovery", "Idle sessions", "Bad input")
PARAMETER_IDS = {"Python": "python", "Node.js": "node"}
COLLECT_TIMEOUT_SECONDS = 120


@dataclass(frozen=True)
class Row:
    cells: dict[str, str]

    @property
    def module(self) -> str:
        match = MODULE.search(self.cells[MODULE_COLUMN])
        return match.group(1) if match else ""

    def test_ids(self, column: str) -> list[str]:
        return TEST_ID.findall(self.cells[column])

    def node_ids(self) -> list[str]:
        return [
            f"{self.module}::{test}" for column in CLAIM_COLUMNS for test in self.test_ids(column)
        ]


def split_row(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table_rows() -> list[Row]:
    lines = PAGE.read_text().splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(TABLE_HEADER))
    header = split_row(lines[start])
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(Row(dict(zip(header, split_row(line), strict=True))))
    return rows


@functools.cache
def collected_node_ids() -> frozenset[str]:
    modules = sorted(path.relative_to(ROOT).as_posix() for path in platform_modules())
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            *modules,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=COLLECT_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return frozenset(line for line in result.stdout.splitlines() if "::" in line)


def platform_modules() -> list:
    this_module = ROOT / "tests" / "test_platform_table.py"
    return [
        path for path in sorted((ROOT / "tests").glob("test_platform_*.py")) if path != this_module
    ]


def test_table_names_existing_tests() -> None:
    named = {node_id for row in table_rows() for node_id in row.node_ids()}

    missing = named - collected_node_ids()

    assert named
    assert missing == set()


def test_every_platform_module_has_row() -> None:
    modules = {path.relative_to(ROOT).as_posix() for path in platform_modules()}

    in_table = {row.module for row in table_rows()}

    assert modules - in_table == set()


def test_every_claim_names_test() -> None:
    unproved = [
        f"{row.cells['Platform']} {row.cells['Language']}: {column}"
        for row in table_rows()
        for column in CLAIM_COLUMNS
        if not row.test_ids(column)
    ]

    assert unproved == []


def test_tests_match_row_language() -> None:
    mismatched = [
        test
        for row in table_rows()
        for column in CLAIM_COLUMNS
        for test in row.test_ids(column)
        if not test.endswith(f"[{PARAMETER_IDS[row.cells['Language']]}]")
    ]

    assert mismatched == []
