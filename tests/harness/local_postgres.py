"""A throwaway PostgreSQL server in a temporary directory, the stand-in for CockroachDB."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import psycopg

from tests.harness.processes import free_port, log_tail, stop_process, wait_until

# initdb and postgres refuse to run as root, so as root the server runs as one of these.
UNPRIVILEGED_USERS = ("postgres", "nobody")

SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    # The connection log is how tests count the connections a snippet opens.
    "log_connections": "on",
    "max_connections": "300",
    # Durability is not under test, and these make each test's CREATE DATABASE fast.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


class PostgresUnavailable(RuntimeError):
    """PostgreSQL could not be started, with the reason in the message."""


def find_server_binaries() -> Path:
    """Return the directory that contains initdb and postgres, preferring the newest version."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("postgres"):
        return Path(os.path.realpath(on_path)).parent

    # Debian and Ubuntu keep the server binaries off PATH, one directory per major version.
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1]).parent
    raise PostgresUnavailable(
        "initdb was not found on PATH or under /usr/lib/postgresql/*/bin; "
        "install the PostgreSQL server (Debian: apt-get install postgresql)"
    )


def _unprivileged_account() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in UNPRIVILEGED_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable(
        f"running as root and none of the users {', '.join(UNPRIVILEGED_USERS)} exists "
        "to run PostgreSQL; create one (useradd postgres) or run the tests as another user"
    )


class LocalPostgres:
    """One PostgreSQL server on 127.0.0.1 with its data, socket and log in a temporary directory."""

    def __init__(self) -> None:
        self.bin_dir = find_server_binaries()
        self.account = _unprivileged_account()
        self.directory = Path(tempfile.mkdtemp(prefix="serverless-guide-pg-"))
        self.data_dir = self.directory / "data"
        self.log_path = self.directory / "server.log"
        self.port = free_port()
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _command(self, *args: str) -> list[str]:
        if self.account is None:
            return list(args)
        return [
            "setpriv",
            f"--reuid={self.account.pw_uid}",
            f"--regid={self.account.pw_gid}",
            "--clear-groups",
            "--",
            *args,
        ]

    def initialize(self) -> None:
        """Create the data directory with initdb."""
        if self.account is not None:
            os.chown(self.directory, self.account.pw_uid, self.account.pw_gid)
        result = subprocess.run(
            self._command(
                str(self.bin_dir / "initdb"),
                "--pgdata",
                str(self.data_dir),
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {result.stderr.strip()[-800:]}")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        settings = [f"--{name}={value}" for name, value in SERVER_SETTINGS.items()]
        with open(self.log_path, "ab") as log:
            # A session of its own keeps a Ctrl-C in the terminal from reaching the server,
            # so the harness stops it in order and removes its directory.
            self._process = subprocess.Popen(
                self._command(
                    str(self.bin_dir / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.directory),
                    *settings,
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if not wait_until(self._accepts_connections, timeout=60, process=self._process):
            self.stop()
            raise PostgresUnavailable(
                f"postgres did not accept connections on 127.0.0.1:{self.port}; "
                f"last lines of its log:\n{log_tail(self.log_path)}"
            )

    def _accepts_connections(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        """Stop the server with a fast shutdown, keeping its data directory."""
        if self._process is not None:
            stop_process(self._process, signal_number=signal.SIGINT)
            self._process = None

    def restart(self) -> None:
        """Stop and start the server on the same port, as a database restart does."""
        self.stop()
        self.start()

    def remove(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def version(self) -> str:
        with psycopg.connect(self.url) as connection:
            return connection.execute("SHOW server_version").fetchone()[0]
