"""A psycopg2 connection for one function instance, with a limit on every database wait.

The limits fit a function timeout of 10 seconds: opening a connection takes at most
CONNECT_TIMEOUT_SECONDS and each statement runs at most STATEMENT_TIMEOUT_MS. An instance
handles one request at a time, so one connection, reused while it responds, is the whole pool.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import psycopg2
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import make_dsn, parse_dsn

CONNECT_TIMEOUT_SECONDS = 3
STATEMENT_TIMEOUT_MS = 3000
# Probe a connection that carried nothing for 2 s once a second, and treat it as dead
# after 3 probes go unanswered.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 2,
    "keepalives_interval": 1,
    "keepalives_count": 3,
}

connection: Connection | None = None
# Threads of one instance would otherwise interleave statements on the one connection.
connection_lock = threading.Lock()


def database_url() -> str:
    if url := os.environ.get("DATABASE_URL"):
        return url
    raise RuntimeError(
        "DATABASE_URL is not set: add the connection string to the function's environment"
    )


def connection_settings(url: str) -> str:
    """Return *url* as a connection string with the timeouts and keepalives added.

    A setting that the URL already contains keeps the URL's value.
    """
    try:
        settings = parse_dsn(url)
    except psycopg2.ProgrammingError:
        # libpq's message can quote part of the string, such as a password, so it is left out.
        raise ValueError(
            "DATABASE_URL is not a valid connection string: use the form "
            "postgresql://USER:PASSWORD@HOST:26257/DATABASE?sslmode=verify-full"
        ) from None

    settings.setdefault("connect_timeout", str(CONNECT_TIMEOUT_SECONDS))
    for name, value in KEEPALIVES.items():
        settings.setdefault(name, str(value))

    # The URL's options may carry other server settings, such as -c search_path=app.
    options = settings.get("options", "")
    if "statement_timeout" not in options:
        settings["options"] = f"{options} -c statement_timeout={STATEMENT_TIMEOUT_MS}".strip()
    return make_dsn(**settings)


def responds(conn: Connection) -> bool:
    """Tell whether the connection is open and the server still replies on it."""
    if conn.closed:
        return False
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1")
        conn.rollback()
    except psycopg2.Error:
        return False
    return True


def checked_connection() -> Connection:
    """Return the instance's connection, opening a new one when it is missing or broken.

    The caller must hold connection_lock.
    """
    global connection
    if connection is not None and responds(connection):
        return connection
    if connection is not None:
        connection.close()
    connection = psycopg2.connect(connection_settings(database_url()))
    return connection


def fetch_all(query: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
    """Run one statement in a transaction of its own and return its rows.

    Raises psycopg2.OperationalError ("timeout expired") when no connection opens within
    CONNECT_TIMEOUT_SECONDS, and psycopg2.errors.QueryCanceled (SQLSTATE 57014) when the
    statement runs longer than STATEMENT_TIMEOUT_MS.
    """
    with connection_lock:
        conn = checked_connection()
        try:
            with conn.cursor() as cursor:
                cursor.execute(query, params)
                rows = cursor.fetchall() if cursor.description else []
            conn.commit()
        except BaseException:
            # A failed statement leaves the transaction aborted, so end it for the next call.
            if not conn.closed:
                conn.rollback()
            raise
        return rows
