"""A psycopg2 pool for one function instance, plus the checkout check and lifetime it lacks."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2
from psycopg2.extensions import connection as Connection
from psycopg2.pool import SimpleConnectionPool

MAX_LIFETIME_SECONDS = 30 * 60

pool: SimpleConnectionPool | None = None
# Threads of one instance may race to create it; the lock lets one win.
pool_lock = threading.Lock()

# psycopg2 connections do not record their age, so the pool's user does.
opened_at: dict[int, float] = {}


def database_url() -> str:
    if url := os.environ.get("DATABASE_URL"):
        return url
    raise RuntimeError(
        "DATABASE_URL is not set: add the connection string to the function's environment"
    )


def get_pool() -> SimpleConnectionPool:
    global pool
    with pool_lock:
        if pool is None:
            # minconn=1, not 0: putconn() closes a returned connection whenever the pool
            # already keeps minconn idle ones, so with 0 every checkout would reconnect.
            # The constructor opens minconn connections, so create the pool lazily.
            pool = SimpleConnectionPool(1, 1, database_url(), connect_timeout=5)
    return pool


def is_usable(conn: Connection) -> bool:
    """Tell whether a pooled connection is young enough and still responds to a query."""
    if conn.closed:
        return False
    age = time.monotonic() - opened_at.setdefault(id(conn), time.monotonic())
    if age > MAX_LIFETIME_SECONDS:
        return False
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1")
        conn.rollback()
    except psycopg2.Error:
        return False
    return True


def discard(current_pool: SimpleConnectionPool, conn: Connection) -> None:
    opened_at.pop(id(conn), None)
    current_pool.putconn(conn, close=True)


@contextmanager
def connection() -> Iterator[Connection]:
    """Lend a working connection for one transaction, and always take it back.

    The transaction commits when the block ends normally and rolls back when it raises.
    """
    current_pool = get_pool()
    conn = current_pool.getconn()
    if not is_usable(conn):
        # The server ended it (a restart, an idle timeout) or it is too old: replace it.
        discard(current_pool, conn)
        conn = current_pool.getconn()

    try:
        yield conn
        conn.commit()
    except BaseException:
        if not conn.closed:
            conn.rollback()
        raise
    finally:
        if conn.closed:
            discard(current_pool, conn)
        else:
            current_pool.putconn(conn)


def record_event(request_id: str, message: str) -> None:
    with connection() as conn, conn.cursor() as cursor:
        cursor.execute(
            "INSERT INTO events (request_id, message) VALUES (%s, %s) "
            "ON CONFLICT (request_id) DO NOTHING",
            (request_id, message),
        )
