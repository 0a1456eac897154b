"""A function instance that runs the independent queries of one invocation at the same time.

Every query in flight uses a connection of its own, so the pool needs as many connections
as the invocation runs queries at once, and not one more. Each instance counts
PARALLEL_QUERIES connections in the cluster's connection budget.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, LiteralString

from psycopg_pool import ConnectionPool

# The number of queries one invocation runs at once, and so the pool maximum.
PARALLEL_QUERIES = 2

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
                min_size=0,
                max_size=PARALLEL_QUERIES,  # threads beyond this wait for a connection
                max_lifetime=30 * 60,  # seconds
                check=ConnectionPool.check_connection,
                timeout=5.0,  # seconds to wait for a connection
                open=True,
            )
    return pool


def fetch(query: LiteralString, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run one read-only query on a pooled connection and return its rows."""
    with get_pool().connection() as connection:
        return connection.execute(query, params).fetchall()


def fetch_concurrently(
    queries: Sequence[tuple[LiteralString, Sequence[Any]]],
) -> list[list[tuple[Any, ...]]]:
    """Run independent queries at once, PARALLEL_QUERIES at a time, and return rows in order."""
    if not queries:
        raise ValueError("queries is empty; pass at least one (sql, params) pair")
    with ThreadPoolExecutor(max_workers=PARALLEL_QUERIES) as executor:
        futures = [executor.submit(fetch, query, params) for query, params in queries]
        return [future.result() for future in futures]
