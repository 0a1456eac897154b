"""Tutorial notebooks: the stored outputs are complete, and a fresh run raises no error."""

from __future__ import annotations

from pathlib import Path

import pytest

from hooks.notebooks import notebook_problems, read_notebook
from tests.harness.databases import TestDatabase
from tests.harness.notebooks import execute, notebook_paths
from tests.harness.plugin import EXAMPLE_LANGUAGE

NOTEBOOKS = notebook_paths()
IDS = [path.name for path in NOTEBOOKS]


def test_tutorials_exist():
    assert NOTEBOOKS, "no notebooks under docs/tutorials"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_stored_outputs_complete(path: Path):
    assert notebook_problems(read_notebook(path)) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_cleanly(path: Path, database: TestDatabase, request: pytest.FixtureRequest):
    request.node.user_properties.append((EXAMPLE_LANGUAGE, "notebook"))

    notebook = execute(path, database.url)

    assert notebook_problems(notebook) == []
