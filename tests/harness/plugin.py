"""pytest plugin: one database server for the run, a fresh database per test, and a summary.

The controlling process starts the server and hands its description to pytest-xdist
workers, so every worker tests against the same server. The summary at the end names the
backend and counts the page examples that ran and were skipped, per language.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Iterator

import pytest

from tests.harness.backends import (
    BackendInfo,
    BackendUnavailable,
    Server,
    probe_product,
    start_backend,
    start_private_server,
)
from tests.harness.cockroach import CockroachUnavailable
from tests.harness.databases import TestDatabase, create_database, drop_database
from tests.harness.local_postgres import PostgresUnavailable
from tests.harness.snippets import SnippetLoader
from tests.harness.urls import InvalidDatabaseURL

BACKEND_KEY = pytest.StashKey[BackendInfo]()
SERVER_KEY = pytest.StashKey[Server | None]()
WORKER_INPUT_KEY = "serverless_guide_backend"

# user_properties that mark a test as one code example, or name a snippet file it ran,
# for the closing summary.
EXAMPLE_LANGUAGE = "example_language"
SNIPPET_FILE = "snippet_file"


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def _stop_on_sigterm(signal_number: int, frame: object) -> None:
    # pytest tidies up after KeyboardInterrupt, so a SIGTERM takes the same path.
    raise KeyboardInterrupt


def pytest_configure(config: pytest.Config) -> None:
    if config.option.help or config.option.collectonly:
        return

    if _is_worker(config):
        config.stash[BACKEND_KEY] = BackendInfo.from_json(config.workerinput[WORKER_INPUT_KEY])
        config.stash[SERVER_KEY] = None
        return

    try:
        info, server = start_backend(os.environ)
    except (InvalidDatabaseURL, BackendUnavailable) as error:
        raise pytest.UsageError(str(error)) from None
    config.stash[BACKEND_KEY] = info
    config.stash[SERVER_KEY] = server
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _stop_on_sigterm)


def pytest_configure_node(node) -> None:
    """Send the run's backend to a pytest-xdist worker (called only under xdist)."""
    node.workerinput[WORKER_INPUT_KEY] = node.config.stash[BACKEND_KEY].to_json()


def pytest_unconfigure(config: pytest.Config) -> None:
    server = config.stash.get(SERVER_KEY, None)
    if server is not None:
        server.remove()
        config.stash[SERVER_KEY] = None


def pytest_report_header(config: pytest.Config) -> str | None:
    info = config.stash.get(BACKEND_KEY, None)
    if info is None:
        return None
    verdict = "yes" if info.is_cockroachdb else "no, PostgreSQL stands in for it"
    return f"database: {info.describe()}; CockroachDB: {verdict}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    info = config.stash.get(BACKEND_KEY, None)
    for item in items:
        if item.get_closest_marker("cockroachdb_only") and info and not info.is_cockroachdb:
            item.add_marker(
                pytest.mark.skip(reason=f"needs CockroachDB; this run uses {info.describe()}")
            )


@pytest.fixture(scope="session")
def backend(pytestconfig: pytest.Config) -> BackendInfo:
    """The database server of the run."""
    return pytestconfig.stash[BACKEND_KEY]


@pytest.fixture
def database(backend: BackendInfo) -> Iterator[TestDatabase]:
    """A new, empty database for this test alone, dropped when the test ends."""
    created = create_database(backend)
    yield created
    drop_database(created)


@pytest.fixture
def snippets(request: pytest.FixtureRequest, database: TestDatabase) -> Iterator[SnippetLoader]:
    """Loads the files named by the test's `snippet` marks, and only those.

    The test fails if it never loads a file its marks name, so a mark is proof that the
    file ran. Pools that loaded modules leave open are closed before the database is dropped.
    """
    marked = {mark.args[0] for mark in request.node.iter_markers("snippet")}
    loader = SnippetLoader(marked)
    yield loader
    loader.close()
    request.node.user_properties.extend((SNIPPET_FILE, path) for path in sorted(loader.loaded))
    never_loaded = marked - loader.loaded
    if never_loaded:
        pytest.fail(f"marked with snippet {sorted(never_loaded)} but never loaded it")


class PrivateServer:
    """A server of the run's kind that belongs to one test, which may restart it."""

    def __init__(self, server: Server, database: TestDatabase) -> None:
        self._server = server
        self.database = database

    def restart(self) -> None:
        self._server.restart()


@pytest.fixture
def private_server(backend: BackendInfo) -> Iterator[PrivateServer]:
    """A server started for this test, with one database on it; removed afterwards."""
    try:
        server = start_private_server(backend)
    except (BackendUnavailable, CockroachUnavailable, PostgresUnavailable) as error:
        pytest.skip(f"cannot restart a database server in this run: {error}")
    try:
        product, version = probe_product(server.url)
        log_path = str(server.log_path) if server.log_path else None
        info = BackendInfo(backend.source, product, version, server.url, log_path)
        yield PrivateServer(server, create_database(info))
    finally:
        server.remove()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    info = config.stash.get(BACKEND_KEY, None)
    if info is None:
        return

    outcomes: Counter[tuple[str, str]] = Counter()
    skip_reasons: Counter[str] = Counter()
    snippet_files: set[str] = set()
    # Passing setup and teardown reports are filed under "", the rest by their outcome.
    for outcome in ("", "passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            properties = getattr(report, "user_properties", ())
            snippet_files.update(value for name, value in properties if name == SNIPPET_FILE)
            if outcome == "":
                continue
            language = dict(properties).get(EXAMPLE_LANGUAGE)
            if language is None:
                continue
            if outcome == "passed" and report.when != "call":
                continue
            outcomes[language, outcome] += 1
            if outcome == "skipped":
                skip_reasons[_skip_reason(report)] += 1

    terminalreporter.section("examples")
    terminalreporter.line(f"backend: {info.describe()}")
    for language in sorted({language for language, _ in outcomes}):
        counts = ", ".join(
            f"{outcomes[language, outcome]} {outcome}"
            for outcome in ("passed", "failed", "error", "skipped")
            if outcomes[language, outcome]
        )
        terminalreporter.line(f"{language} examples: {counts}")
    if not outcomes:
        terminalreporter.line("no code examples were selected in this run")
    if snippet_files:
        terminalreporter.line(f"snippet files executed: {len(snippet_files)}")
    for reason, count in sorted(skip_reasons.items()):
        terminalreporter.line(f"skipped {count}: {reason}")


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)
