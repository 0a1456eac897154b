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
# The sizes the site shows; the tests run the notebooks at the default, smaller scale.
SITE_SCALE = os.environ.get("TUTORIAL_SCALE", "site")


def notebook_paths() -> list[Path]:
    return sorted(TUTORIALS.glob("*.ipynb"))


def execute(path: Path, database_url: str, scale: str = "test") -> nbformat.NotebookNode:
    """Run every cell of a notebook against *database_url*; raise on the first cell error.

    *scale* is "test" for the small sizes of the test run or "site" for the sizes the site
    shows; the notebooks read it from TUTORIAL_SCALE.
    """
    notebook = nbformat.read(path, as_version=4)
    settings = {"DATABASE_URL": database_url, "TUTORIAL_SCALE": scale}
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
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
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
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
                notebook = execute(path, database.url, scale=SITE_SCALE)
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
