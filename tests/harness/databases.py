"""A fresh database for each test, on the run's server, removed when the test ends."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests.harness.backends import BackendInfo
from tests.harness.server_view import ServerView
from tests.harness.urls import replace_database, set_query_parameter

# Connections the harness itself opens carry this name, so counts of a test's
# connections leave them out.
HARNESS_APPLICATION = "serverless-guide-harness"


@dataclass
class TestDatabase:
    """A database made for one test; `url` is what the code under test connects with."""

    __test__ = False  # not a test class, whatever its name

    backend: BackendInfo
    name: str
    view: ServerView = field(init=False)
    harness_connections: int = 0

    def __post_init__(self) -> None:
        self.view = ServerView(self.backend, self.name, lambda: self.harness_connections)

    @property
    def url(self) -> str:
        # The application_name marks the code under test's connections at the server.
        return set_query_parameter(
            replace_database(self.backend.admin_url, self.name), "application_name", self.name
        )

    def connect(self) -> psycopg.Connection:
        """Open a connection of the harness's own, for checks the test makes."""
        url = set_query_parameter(
            replace_database(self.backend.admin_url, self.name),
            "application_name",
            HARNESS_APPLICATION,
        )
        self.harness_connections += 1
        return psycopg.connect(url, autocommit=True)

    def execute_file(self, path: Path) -> None:
        """Run the SQL statements of a file, such as a schema a page shows."""
        with self.connect() as connection:
            connection.execute(path.read_text())

    def count_rows(self, table: str) -> int:
        with self.connect() as connection:
            return connection.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]


def create_database(backend: BackendInfo) -> TestDatabase:
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(backend.admin_url, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return TestDatabase(backend, name)


def drop_database(database: TestDatabase) -> None:
    """Drop the database, ending any session the test left open."""
    statement = (
        f"DROP DATABASE IF EXISTS {database.name} CASCADE"
        if database.backend.is_cockroachdb
        else f"DROP DATABASE IF EXISTS {database.name} WITH (FORCE)"
    )
    with psycopg.connect(database.backend.admin_url, autocommit=True) as connection:
        connection.execute(statement)
