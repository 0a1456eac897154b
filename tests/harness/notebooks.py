"""Execute the tutorial notebooks against a database, for the tests and to refresh the site.

`python -m tests.harness.notebooks` runs every notebook under docs/tutorials against the
run's backend (chosen as for the tests) and saves the outputs into the notebook files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from tests.harness.backends import BackendUnavailable, start_backend
from tests.harness.databases import create_database, drop_database
from tests.harness.urls import InvalidDatabaseURL

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = ROOT / "docs" / "tutorials"
CELL_TIMEOUT_SECONDS = 600


def notebook_paths() -> list[Path]:
    return sorted(TUTORIALS.glob("*.ipynb"))


def execute(path: Path, database_url: str) -> nbformat.NotebookNode:
    """Run every cell of a notebook with DATABASE_URL set; raise on the first cell error."""
    notebook = nbformat.read(path, as_version=4)
    previous = os.environ.get("DATABASE_URL")
    os.environ["DATABASE_URL"] = database_url
    try:
        client = NotebookClient(
            notebook,
            timeout=CELL_TIMEOUT_SECONDS,
            kernel_name="python3",
            allow_errors=False,
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()
    finally:
        if previous is None:
            os.environ.pop("DATABASE_URL", None)
        else:
            os.environ["DATABASE_URL"] = previous
    return notebook


def refresh() -> int:
    """Execute each notebook and save its outputs; return a process exit code."""
    try:
        backend, server = start_backend(os.environ)
    except (InvalidDatabaseURL, BackendUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    try:
        print(f"database: {backend.describe()}")
        for path in notebook_paths():
            database = create_database(backend)
            try:
                notebook = execute(path, database.url)
            finally:
                drop_database(database)
            nbformat.write(notebook, path)
            print(f"refreshed {path.relative_to(ROOT)}")
    finally:
        if server is not None:
            server.remove()
    return 0


if __name__ == "__main__":
    sys.exit(refresh())
