"""The database server's own view of client sessions: how many a test opened and what they do.

Tests count connections here, at the server, rather than trusting what a pool reports.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tests.harness.backends import BackendInfo

SETTLE_SECONDS = 10.0


@dataclass(frozen=True)
class Session:
    """One client session open at the server."""

    session_id: str
    state: str
    application_name: str


class ServerView:
    """Counts and ends the sessions of one test database.

    A test's sessions are those whose application_name is the test database's name, which
    the test URL sets. On PostgreSQL they must also be connected to that database.
    `harness_connections` returns how many connections the harness itself opened to the
    database, because the statistics-based count cannot tell those apart.
    """

    def __init__(
        self, backend: BackendInfo, database: str, harness_connections: Callable[[], int]
    ) -> None:
        self.backend = backend
        self.database = database
        self._harness_connections = harness_connections

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.backend.admin_url, autocommit=True) as connection:
            return connection.execute(sql, params).fetchall()

    def sessions(self) -> list[Session]:
        """Return the sessions open now, leaving out the harness's own."""
        if self.backend.is_cockroachdb:
            rows = self._query(
                "SELECT session_id::STRING, "
                "CASE WHEN kv_txn IS NULL THEN 'idle' ELSE 'idle in transaction' END, "
                "application_name FROM crdb_internal.cluster_sessions "
                "WHERE application_name = %s AND status = 'ACTIVE'",
                (self.database,),
            )
        else:
            rows = self._query(
                "SELECT pid::text, coalesce(state, ''), application_name FROM pg_stat_activity "
                "WHERE datname = %s AND application_name = %s AND backend_type = 'client backend'",
                (self.database, self.database),
            )
        return [Session(*row) for row in rows]

    def connections_opened(self) -> int:
        """Return how many connections were opened to the test database since it was created."""
        if self.backend.is_cockroachdb:
            # NOTE: counts on CockroachDB keeping closed sessions in cluster_sessions (its
            # closed-session cache, v23.1 and newer); a run with DATABASE_URL at an older
            # release would undercount.
            rows = self._query(
                "SELECT count(DISTINCT session_id) FROM crdb_internal.cluster_sessions "
                "WHERE application_name = %s",
                (self.database,),
            )
            return rows[0][0]
        if self.backend.log_path:
            return self._count_logged_connections(Path(self.backend.log_path))
        return self._count_database_sessions()

    def _count_logged_connections(self, log_path: Path) -> int:
        # The stand-in runs with log_connections=on; each client connection logs one line.
        pattern = re.compile(
            rf"connection authorized: .*\bdatabase={re.escape(self.database)} "
            rf"application_name={re.escape(self.database)}(\s|$)"
        )
        return sum(
            1 for line in log_path.read_text(errors="replace").splitlines() if pattern.search(line)
        )

    def _count_database_sessions(self) -> int:
        # pg_stat_database.sessions (PostgreSQL 14+) lags by up to about a second, because
        # backends flush their statistics when idle; read until two readings agree.
        sql = "SELECT sessions FROM pg_stat_database WHERE datname = %s"
        previous = None
        deadline = time.monotonic() + SETTLE_SECONDS
        while time.monotonic() < deadline:
            with psycopg.connect(self.backend.admin_url, autocommit=True) as connection:
                connection.execute("SELECT pg_stat_clear_snapshot()")
                current = connection.execute(sql, (self.database,)).fetchone()[0]
            if current == previous:
                return current - self._harness_connections()
            previous = current
            time.sleep(1.2)
        return previous - self._harness_connections()

    def terminate(self) -> int:
        """End every session of the test database from the server side and return how many."""
        if self.backend.is_cockroachdb:
            ended = self._query(
                "SELECT session_id::STRING FROM crdb_internal.cluster_sessions "
                "WHERE application_name = %s AND status = 'ACTIVE'",
                (self.database,),
            )
            for (session_id,) in ended:
                self._query("CANCEL SESSION %s", (session_id,))
        else:
            ended = self._query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND application_name = %s AND backend_type = 'client backend'",
                (self.database, self.database),
            )
        self._wait_for_no_sessions()
        return len(ended)

    def _wait_for_no_sessions(self) -> None:
        deadline = time.monotonic() + SETTLE_SECONDS
        while self.sessions():
            if time.monotonic() > deadline:
                raise TimeoutError(f"sessions of {self.database} were still open after terminate")
            time.sleep(0.05)
