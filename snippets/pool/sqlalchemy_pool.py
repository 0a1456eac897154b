"""A SQLAlchemy engine whose pool suits one function instance."""

from __future__ import annotations

import os
import threading

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

# The URL's scheme picks the dialect: cockroachdb:// needs the sqlalchemy-cockroachdb
# package, postgresql:// is SQLAlchemy's own. Both use psycopg 3 here.
DRIVERS = {"cockroachdb": "cockroachdb+psycopg", "postgresql": "postgresql+psycopg"}

engine: Engine | None = None
# Threads of one instance may race to create it; the lock lets one win.
engine_lock = threading.Lock()


def database_url() -> str:
    if url := os.environ.get("DATABASE_URL"):
        return url
    raise RuntimeError(
        "DATABASE_URL is not set: add the connection string to the function's environment"
    )


def get_engine() -> Engine:
    global engine
    with engine_lock:
        if engine is None:
            url = make_url(database_url())
            backend = url.get_backend_name()
            if backend not in DRIVERS:
                raise ValueError(
                    f"DATABASE_URL has the scheme {url.drivername!r}; "
                    f"use one of {', '.join(f'{name}://' for name in DRIVERS)}"
                )
            engine = create_engine(
                url.set(drivername=DRIVERS[backend]),
                pool_size=1,
                max_overflow=0,  # never more than pool_size connections
                pool_recycle=30 * 60,  # seconds; checked at checkout
                pool_pre_ping=True,  # a round trip at checkout, replaced when it fails
                pool_timeout=5,  # seconds to wait for the connection
            )
    return engine


def record_event(request_id: str, message: str) -> None:
    # begin() commits when the block ends normally, rolls back when it raises, and
    # returns the connection to the pool in both cases.
    with get_engine().begin() as connection:
        connection.execute(
            text(
                "INSERT INTO events (request_id, message) VALUES (:request_id, :message) "
                "ON CONFLICT (request_id) DO NOTHING"
            ),
            {"request_id": request_id, "message": message},
        )
