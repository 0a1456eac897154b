"""The harness's own promises: clear errors for bad settings, and nothing left behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.harness import backends
from tests.harness.backends import BackendUnavailable, start_backend
from tests.harness.cockroach import CockroachUnavailable
from tests.harness.local_postgres import PostgresUnavailable
from tests.harness.processes import free_port
from tests.harness.snippets import ROOT
from tests.harness.urls import InvalidDatabaseURL, parse_endpoint, redact

PASSWORD = "s3cret-Passw0rd"

SLEEPING_TEST = """
import os
import pathlib
import time

def test_sleeps(database):
    pathlib.Path(os.environ["STARTED_MARKER"]).touch()
    time.sleep(60)
"""

PASSING_TEST = """
def test_connects(database):
    with database.connect() as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)
"""


def nested_pytest(test_file: Path) -> list[str]:
    # The test file lies outside the project, so name the project's configuration.
    return [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        f"--config-file={ROOT / 'pyproject.toml'}",
        f"--rootdir={ROOT}",
        str(test_file),
    ]


def run_pytest(
    tmp_path: Path, test_source: str, environ: dict[str, str]
) -> subprocess.CompletedProcess:
    """Run a nested pytest on one test file with the harness plugin, as a user would."""
    test_file = tmp_path / "test_nested.py"
    test_file.write_text(test_source)
    return subprocess.run(
        nested_pytest(test_file),
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def clean_environment(**overrides: str) -> dict[str, str]:
    environ = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    environ.update(overrides)
    return environ


@pytest.fixture
def nested_tmpdir() -> Path:
    """A TMPDIR of its own for a nested run, so other runs on the machine do not mix in.

    It sits directly under the system temporary directory, world-searchable, because the
    stand-in server runs as an unprivileged user when the tests run as root.
    """
    directory = Path(tempfile.mkdtemp(prefix="nested-run-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_malformed_url_stops_run(tmp_path):
    url = f"postgresql://app:{PASSWORD}@db.example:port/app"

    result = run_pytest(tmp_path, PASSING_TEST, clean_environment(DATABASE_URL=url))
    output = result.stdout + result.stderr

    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert "DATABASE_URL is not a valid URL" in output
    assert PASSWORD not in output


def test_unreachable_url_names_endpoint(tmp_path):
    port = free_port()
    url = f"postgresql://app:{PASSWORD}@127.0.0.1:{port}/app?connect_timeout=3"

    result = run_pytest(tmp_path, PASSING_TEST, clean_environment(DATABASE_URL=url))
    output = result.stdout + result.stderr

    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert f"127.0.0.1:{port}" in output
    assert "unset DATABASE_URL" in output
    assert PASSWORD not in output
    assert output.count("did not accept a connection") == 1


def test_empty_url_stops_run(tmp_path):
    result = run_pytest(tmp_path, PASSING_TEST, clean_environment(DATABASE_URL=""))

    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert "DATABASE_URL is set but empty" in result.stdout + result.stderr


def test_header_names_backend(tmp_path, backend):
    url = backend.admin_url

    result = run_pytest(tmp_path, PASSING_TEST, clean_environment(DATABASE_URL=url))

    assert result.returncode == pytest.ExitCode.OK, result.stdout + result.stderr
    assert f"database: {backend.product} {backend.version} (DATABASE_URL)" in result.stdout
    assert "CockroachDB: " in result.stdout
    assert "backend: " in result.stdout


def test_stand_in_removed_after_run(tmp_path, nested_tmpdir):
    environ = clean_environment(TMPDIR=str(nested_tmpdir))

    result = run_pytest(tmp_path, PASSING_TEST, environ)

    assert result.returncode == pytest.ExitCode.OK, result.stdout + result.stderr
    assert "local PostgreSQL stand-in" in result.stdout
    assert list(nested_tmpdir.iterdir()) == []
    assert processes_mentioning(nested_tmpdir) == []


def test_stand_in_removed_after_interrupt(tmp_path, nested_tmpdir):
    test_file = tmp_path / "test_nested.py"
    test_file.write_text(SLEEPING_TEST)
    marker = tmp_path / "started"
    process = subprocess.Popen(
        nested_pytest(test_file),
        cwd=ROOT,
        env=clean_environment(TMPDIR=str(nested_tmpdir), STARTED_MARKER=str(marker)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    # Interrupt while the test body runs, with the server up and a database in use.
    started = wait_for_path(marker, timeout=120)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)

    assert started, output
    assert "KeyboardInterrupt" in output
    assert list(nested_tmpdir.iterdir()) == []
    assert processes_mentioning(nested_tmpdir) == []


def processes_mentioning(directory: Path) -> list[int]:
    """Return the ids of processes whose command line names *directory*."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(directory).encode() in command_line:
            found.append(int(entry.name))
    return found


def wait_for_path(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.1)
    return False


def test_no_backend_lists_every_attempt(monkeypatch):
    def fail(reason: str, error_type: type[Exception]):
        def start():
            raise error_type(reason)

        return start

    monkeypatch.setattr(
        backends,
        "STARTERS",
        (
            ("cockroach binary", fail("no `cockroach` binary on PATH", CockroachUnavailable)),
            ("Docker container", fail("no Docker engine", CockroachUnavailable)),
            ("local PostgreSQL stand-in", fail("initdb was not found", PostgresUnavailable)),
        ),
    )

    with pytest.raises(BackendUnavailable) as raised:
        start_backend({})

    message = str(raised.value)
    assert "cockroach binary: no `cockroach` binary on PATH" in message
    assert "Docker container: no Docker engine" in message
    assert "local PostgreSQL stand-in: initdb was not found" in message
    assert "Set DATABASE_URL" in message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql://app@db:3306/app", "has the scheme 'mysql'"),
        ("postgresql:///app", "names no host"),
        ("postgresql://app@db:99999999/app", "is not a valid URL"),
    ],
)
def test_invalid_url_explained(url, expected):
    with pytest.raises(InvalidDatabaseURL, match=expected):
        parse_endpoint(url)


def test_redact_hides_password():
    redacted = redact(f"postgresql://app:{PASSWORD}@db:26257/app")

    assert redacted == "postgresql://app:***@db:26257/app"
