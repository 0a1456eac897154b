"""Login roles of a test's own, for limits that PostgreSQL does not apply to superusers."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg

from tests.harness.databases import TestDatabase


@dataclass(frozen=True)
class LoginRole:
    """A role that connection limits apply to, and a URL that logs in as it."""

    name: str
    url: str


def with_user(url: str, user: str, password: str | None = None) -> str:
    """Return *url* logging in as *user* on the same server and database."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    login = quote(user) if password is None else f"{quote(user)}:{quote(password)}"
    return urlunsplit(parts._replace(netloc=f"{login}@{host}"))


def run_as_admin(database: TestDatabase, statement: str, params: tuple = ()) -> None:
    """Run *statement* as the run's superuser, connected to the server's admin database.

    The server counts every connection to the test database against its limit, superusers'
    included, and a closed connection can linger for a moment. Connecting to the admin
    database keeps the harness's own connections out of that count.
    """
    with psycopg.connect(database.backend.admin_url, autocommit=True) as connection:
        connection.execute(statement, params)


@contextmanager
def login_role(database: TestDatabase) -> Iterator[LoginRole]:
    """Create a login role for *database*, and end its sessions and drop it afterwards."""
    name = f"fn_{database.name}"
    password = secrets.token_hex(16)
    run_as_admin(database, f"CREATE ROLE \"{name}\" LOGIN PASSWORD '{password}'")
    try:
        yield LoginRole(name, with_user(database.url, name, password))
    finally:
        run_as_admin(
            database,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
            (name,),
        )
        run_as_admin(database, f'DROP ROLE IF EXISTS "{name}"')
