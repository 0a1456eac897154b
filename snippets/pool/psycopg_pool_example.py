"""A psycopg 3 pool (psycopg_pool) for one function instance."""

from __future__ import annotations

import os
import threading

from psycopg_pool import ConnectionPool

pool: ConnectionPool | None = None
# Threads of one instance may race to create it; the lock lets one win.
pool_lock = threading.Lock()


def database_url() -> str:
    if url := os.environ.get("DATABASE_URL"):
        return url
    raise RuntimeError(
        "DATABASE_URL is not set: add the connection string to the function's environment"
    )


def get_pool() -> ConnectionPool:
    global pool
    with pool_lock:
        if pool is None:
            pool = ConnectionPool(
                database_url(),
                min_size=0,  # the default is 4 idle connections kept open
                max_size=1,
                max_lifetime=30 * 60,  # seconds
                check=ConnectionPool.check_connection,
                timeout=5.0,
                open=True,
            )
    return pool


def record_event(request_id: str, message: str) -> None:
    # The block commits on success, rolls back on an exception, and returns the
    # connection to the pool in both cases.
    with get_pool().connection() as connection:
        connection.execute(
            "INSERT INTO events (request_id, message) VALUES (%s, %s) "
            "ON CONFLICT (request_id) DO NOTHING",
            (request_id, message),
        )
