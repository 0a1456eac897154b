"""Every Python block written in the pages runs against the test database, `#>` output checked."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from pytest_examples import EvalExample
from ruff.__main__ import find_ruff_bin

from tests.harness.backends import BackendInfo
from tests.harness.databases import TestDatabase
from tests.harness.page_examples import (
    SWITCH_COCKROACHDB_ONLY,
    SWITCH_SKIP,
    PageBlock,
    python_blocks,
)
from tests.harness.plugin import EXAMPLE_LANGUAGE
from tests.harness.snippets import close_pools

DOCS = Path("docs")
# Narrower than the project's 100, so a block fits the page without scrolling.
LINE_LENGTH = 88
OUTPUT_MARK = "PRINT-OUTPUT"
BLOCKS = list(python_blocks(DOCS))


def configure(eval_example: EvalExample) -> None:
    eval_example.set_config(
        line_length=LINE_LENGTH, target_version="py311", ruff_select=["E", "F", "I", "UP"]
    )


@pytest.mark.parametrize("block", BLOCKS, ids=[block.test_id for block in BLOCKS])
def test_python_block(
    block: PageBlock,
    eval_example: EvalExample,
    database: TestDatabase,
    backend: BackendInfo,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
):
    request.node.user_properties.append((EXAMPLE_LANGUAGE, "python"))
    if block.switch == SWITCH_SKIP:
        pytest.skip(block.reason)
    if block.switch == SWITCH_COCKROACHDB_ONLY and not backend.is_cockroachdb:
        pytest.skip(f"needs CockroachDB; this run uses {backend.describe()}")
    monkeypatch.setenv("DATABASE_URL", database.url)
    configure(eval_example)
    example = block.example

    if eval_example.update_examples:
        eval_example.format_ruff(example)
        formatted = ruff_formatted(example.source)
        if formatted != example.source:
            example.source = formatted
            # pytest-examples writes back only the examples marked for update.
            eval_example._mark_for_update(example)
        module_globals = eval_example.run_print_update(example)
    else:
        eval_example.lint_ruff(example)
        if ruff_formatted(example.source) != example.source:
            pytest.fail(
                f"{block.test_id} is not formatted as `ruff format` does it; "
                "run `nox -s test -- --update-examples`",
                pytrace=False,
            )
        module_globals = eval_example.run_print_check(example)

    close_pools(module_globals)


def ruff_formatted(source: str) -> str:
    """Return *source* as `ruff format` writes it, leaving `#>` output lines as they are."""
    # ruff would turn "#>" into "# >", which pytest-examples no longer reads as output.
    masked = re.sub(r"^(\s*)#>", rf"\1# {OUTPUT_MARK}", source, flags=re.M)
    result = subprocess.run(
        [find_ruff_bin(), "format", f"--line-length={LINE_LENGTH}", "-"],
        input=masked,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"ruff format failed: {result.stderr.strip()}", pytrace=False)
    return result.stdout.replace(f"# {OUTPUT_MARK}", "#>")


def test_pages_have_python_blocks():
    assert BLOCKS, "no Python blocks found under docs/; the page collector may be broken"
