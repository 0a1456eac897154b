"""A psycopg 3 pool (psycopg_pool) for one function instance, with a limit on every database wait.

The limits fit a function timeout of 10 seconds: a checkout waits at most POOL_TIMEOUT_SECONDS,
opening the connection included, and each statement runs at most STATEMENT_TIMEOUT_MS.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any, LiteralString

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

CONNECT_TIMEOUT_SECONDS = 3
STATEMENT_TIMEOUT_MS = 3000
POOL_TIMEOUT_SECONDS = 4.0
# Probe a connection that carried nothing for 2 s once a second, and treat it as dead
# after 3 probes go unanswered.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 2,
    "keepalives_interval": 1,
    "keepalives_count": 3,
}

pool: ConnectionPool | None = None
# Threads of one instance may race to create it; the lock lets one win.
pool_lock = threading.Lock()


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
        settings = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        # libpq's message can quote part of the string, such as a password, so it is left out.
        raise ValueError(
            "DATABASE_URL is not a valid connection string: use the form "
            "postgresql://USER:PASSWORD@HOST:26257/DATABASE?sslmode=verify-full"
        ) from None

    settings.setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)
    for name, value in KEEPALIVES.items():
        settings.setdefault(name, value)

    # The URL's options may carry other server settings, such as -c search_path=app.
    options = str(settings.get("options", ""))
    if "statement_timeout" not in options:
        settings["options"] = f"{options} -c statement_timeout={STATEMENT_TIMEOUT_MS}".strip()
    return make_conninfo(**settings)


def get_pool() -> ConnectionPool:
    global pool
    with pool_lock:
        if pool is None:
            pool = ConnectionPool(
                connection_settings(database_url()),
                min_size=0,  # the default is 4 idle connections kept open
                max_size=1,
                max_lifetime=30 * 60,  # seconds
                check=ConnectionPool.check_connection,
                timeout=POOL_TIMEOUT_SECONDS,  # seconds a checkout may wait, connecting included
                open=True,
            )
    return pool


def fetch_all(query: LiteralString, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
    """Run one statement in a transaction of its own and return its rows.

    Raises psycopg_pool.PoolTimeout when no connection is ready within POOL_TIMEOUT_SECONDS,
    and psycopg.errors.QueryCanceled (SQLSTATE 57014) when the statement runs longer than
    STATEMENT_TIMEOUT_MS.
    """
    # The block commits on success, rolls back on an exception, and returns the
    # connection to the pool in both cases.
    with get_pool().connection() as connection:
        cursor = connection.execute(query, params)
        return cursor.fetchall() if cursor.description else []
