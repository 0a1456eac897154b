"""Run every JavaScript block the pages show with node, against the test's database.

A block runs as an ES module (block.mjs) in a directory of its own, with DATABASE_URL set
to the test database. Blocks that only include a file from snippets/ are tested by that
file's own tests instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.backends import BackendInfo
from tests.harness.databases import TestDatabase
from tests.harness.node import require_node, run_javascript
from tests.harness.page_examples import (
    SWITCH_COCKROACHDB_ONLY,
    SWITCH_SKIP,
    PageBlock,
    javascript_blocks,
)
from tests.harness.plugin import EXAMPLE_LANGUAGE
from tests.harness.snippets import ROOT

NO_BLOCKS_REASON = "no JavaScript blocks on the pages"
OUTPUT_TAIL_LINES = 40


def _block_id(block: PageBlock) -> str:
    # The same form as PageBlock.test_id, relative to the repository whatever the cwd.
    return f"{block.path.relative_to(ROOT).as_posix()}:{block.start_line}-{block.end_line}"


def _parameters() -> list:
    blocks = list(javascript_blocks(ROOT / "docs"))
    if not blocks:
        return [pytest.param(None, id="no-blocks")]
    return [pytest.param(block, id=_block_id(block)) for block in blocks]


def _tail(text: str) -> str:
    lines = text.strip().splitlines()[-OUTPUT_TAIL_LINES:]
    return "\n".join(lines) if lines else "(no output)"


@pytest.mark.parametrize("block", _parameters())
def test_javascript_block(
    block: PageBlock | None,
    backend: BackendInfo,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    if block is None:
        pytest.skip(NO_BLOCKS_REASON)

    # Set before any skip, so that skipped blocks count as examples in the summary too.
    request.node.user_properties.append((EXAMPLE_LANGUAGE, "javascript"))

    if block.switch == SWITCH_SKIP:
        pytest.skip(block.reason or "the page marks this block to be skipped")
    if block.switch == SWITCH_COCKROACHDB_ONLY and not backend.is_cockroachdb:
        pytest.skip(f"needs CockroachDB; this run uses {backend.describe()}")
    require_node()

    # Requested here, so that skipped blocks create no database.
    database: TestDatabase = request.getfixturevalue("database")
    result = run_javascript(
        tmp_path, block.source, env={"DATABASE_URL": database.url}, filename="block.mjs"
    )

    if result.returncode != 0:
        pytest.fail(
            f"{_block_id(block)} exited with code {result.returncode}. Output of node:\n"
            f"{_tail(result.stdout + result.stderr)}",
            pytrace=False,
        )
