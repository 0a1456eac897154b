"""Choose the database server for a test run: the best one that can be had on this machine.

The order is: DATABASE_URL, a `cockroach` binary on PATH, a Docker engine running the
CockroachDB container, and last a local PostgreSQL started as a wire-compatible stand-in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Protocol

import psycopg

from tests.harness.cockroach import CockroachBinary, CockroachContainer, CockroachUnavailable
from tests.harness.local_postgres import LocalPostgres, PostgresUnavailable
from tests.harness.urls import parse_endpoint, to_libpq

COCKROACHDB = "CockroachDB"
POSTGRESQL = "PostgreSQL"

SOURCE_ENVIRONMENT = "DATABASE_URL"
SOURCE_BINARY = "cockroach binary"
SOURCE_CONTAINER = "Docker container"
SOURCE_STAND_IN = "local PostgreSQL stand-in"


class BackendUnavailable(RuntimeError):
    """No database server could be used; the message lists what was tried and how to fix it."""


class Server(Protocol):
    """A database server process that the harness started and must stop."""

    url: str
    log_path: object

    def start(self) -> None: ...
    def restart(self) -> None: ...
    def remove(self) -> None: ...


@dataclass(frozen=True)
class BackendInfo:
    """The database a run uses, in a form that pytest-xdist can send to its workers."""

    source: str
    product: str
    version: str
    admin_url: str
    log_path: str | None = None

    @property
    def is_cockroachdb(self) -> bool:
        return self.product == COCKROACHDB

    def describe(self) -> str:
        return f"{self.product} {self.version} ({self.source})"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BackendInfo:
        return cls(**json.loads(text))


def probe_product(url: str) -> tuple[str, str]:
    """Connect to *url* and return the product name and its version."""
    with psycopg.connect(url, connect_timeout=10) as connection:
        banner = connection.execute("SELECT version()").fetchone()[0]
        if banner.startswith("CockroachDB"):
            # The banner looks like "CockroachDB CCL v24.1.1 (x86_64-pc-linux-gnu, ...)".
            release = next((word for word in banner.split() if word.startswith("v")), banner)
            return COCKROACHDB, release
        return POSTGRESQL, connection.execute("SHOW server_version").fetchone()[0].split()[0]


def _environment_backend(url: str) -> BackendInfo:
    if not url.strip():
        raise BackendUnavailable(
            "DATABASE_URL is set but empty. Set it to "
            "postgresql://USER:PASSWORD@HOST:PORT/DATABASE or unset it to let the tests "
            "start a database."
        )
    endpoint = parse_endpoint(url)
    try:
        product, version = probe_product(to_libpq(url))
    except psycopg.Error as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BackendUnavailable(
            f"DATABASE_URL points at {endpoint}, which did not accept a connection: {reason}. "
            "Start that server or correct the URL, or unset DATABASE_URL to let the tests "
            "start a database."
        ) from None
    return BackendInfo(SOURCE_ENVIRONMENT, product, version, to_libpq(url))


def _start_stand_in() -> LocalPostgres:
    server = LocalPostgres()
    try:
        server.initialize()
        server.start()
    except PostgresUnavailable:
        server.remove()
        raise
    return server


def _start_binary() -> CockroachBinary:
    server = CockroachBinary()
    try:
        server.start()
    except CockroachUnavailable:
        server.remove()
        raise
    return server


def _start_container() -> CockroachContainer:
    server = CockroachContainer()
    server.start()
    return server


STARTERS: tuple[tuple[str, Callable[[], Server]], ...] = (
    (SOURCE_BINARY, _start_binary),
    (SOURCE_CONTAINER, _start_container),
    (SOURCE_STAND_IN, _start_stand_in),
)


def start_backend(environ: Mapping[str, str]) -> tuple[BackendInfo, Server | None]:
    """Return the backend for the run and the server the caller must remove, if any.

    A DATABASE_URL that is set is used or reported, never passed over in silence.
    """
    if "DATABASE_URL" in environ:
        return _environment_backend(environ["DATABASE_URL"]), None

    failures = []
    for source, start in STARTERS:
        try:
            server = start()
        except (CockroachUnavailable, PostgresUnavailable) as error:
            failures.append(f"  - {source}: {error}")
            continue
        product, version = probe_product(server.url)
        log_path = str(server.log_path) if server.log_path else None
        return BackendInfo(source, product, version, server.url, log_path), server

    raise BackendUnavailable(
        "No database server could be started. Tried, in order:\n"
        + "\n".join(failures)
        + "\nSet DATABASE_URL to a CockroachDB or PostgreSQL server, put `cockroach` on PATH, "
        "start Docker, or install the PostgreSQL server package."
    )


def start_private_server(info: BackendInfo) -> Server:
    """Start a server of the same kind as the run's, for a test that restarts it.

    Raises BackendUnavailable with the reason when that kind cannot be restarted here.
    """
    if info.source == SOURCE_STAND_IN:
        return _start_stand_in()
    if info.source == SOURCE_BINARY:
        server = CockroachBinary(in_memory=False)
        server.start()
        return server
    raise BackendUnavailable(
        f"the run's database comes from {info.source}, which these tests cannot restart"
    )
