"""The pool page's claims about psycopg2, psycopg_pool and SQLAlchemy, checked at the server."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import psycopg
import psycopg2
import pytest
import sqlalchemy.exc
from psycopg2.pool import PoolError, SimpleConnectionPool
from psycopg_pool import ConnectionPool

from tests.harness.databases import TestDatabase
from tests.harness.snippets import SnippetLoader

SCHEMA = "lambda/schema.sql"
PSYCOPG2 = "pool/psycopg2_pool.py"
PSYCOPG3 = "pool/psycopg_pool_example.py"
SQLALCHEMY = "pool/sqlalchemy_pool.py"


@pytest.fixture
def function_database(database: TestDatabase, snippets: SnippetLoader, monkeypatch) -> TestDatabase:
    """The test database with the events table, set as the function's DATABASE_URL."""
    database.execute_file(snippets.path(SCHEMA))
    url = database.url
    if database.backend.is_cockroachdb:
        # SQLAlchemy needs the CockroachDB dialect there; psycopg and psycopg2 take both.
        url = url.replace("postgresql://", "cockroachdb://", 1)
    monkeypatch.setenv("DATABASE_URL", url)
    return database


def record(module) -> None:
    module.record_event(str(uuid.uuid4()), "hello")


def run_in_threads(work: Callable[[], None], count: int = 4) -> list[BaseException]:
    failures: list[BaseException] = []

    def guarded() -> None:
        try:
            work()
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=guarded) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures


def wait_for_connections(database: TestDatabase, expected: int, timeout: float = 5.0) -> int:
    """Return the server's count once it reaches *expected*, or after *timeout* seconds.

    Some pools open connections in a background thread, so the count can lag a call.
    """
    deadline = time.monotonic() + timeout
    opened = database.view.connections_opened()
    while opened < expected and time.monotonic() < deadline:
        time.sleep(0.05)
        opened = database.view.connections_opened()
    return opened


class TestPsycopg2Library:
    """What psycopg2's own pool does, which the page's psycopg2 code works around."""

    def test_minconn_zero_reconnects_every_checkout(self, database):
        pool = SimpleConnectionPool(0, 1, database.url)

        for _ in range(5):
            connection = pool.getconn()
            pool.putconn(connection)
        pool.closeall()

        assert database.view.connections_opened() == 5

    def test_closed_flag_misses_termination(self, database):
        connection = psycopg2.connect(database.url)

        database.view.terminate()

        assert connection.closed == 0
        with pytest.raises(psycopg2.OperationalError), connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        assert connection.closed != 0


@pytest.mark.snippet(PSYCOPG2)
@pytest.mark.snippet(SCHEMA)
class TestPsycopg2Pool:
    def test_warm_calls_share_one_connection(self, function_database, snippets):
        module = snippets.load(PSYCOPG2)

        for _ in range(20):
            record(module)

        assert function_database.view.connections_opened() == 1
        assert function_database.count_rows("events") == 20

    def test_raising_calls_return_connection(self, function_database, snippets):
        module = snippets.load(PSYCOPG2)

        for number in range(20):
            if number % 2:
                with pytest.raises(ZeroDivisionError), module.connection() as conn:
                    conn.cursor().execute(
                        "INSERT INTO events (request_id, message) VALUES (%s, 'lost')",
                        (str(number),),
                    )
                    raise ZeroDivisionError
            else:
                record(module)

        assert len(module.pool._used) == 0
        assert len(function_database.view.sessions()) <= 1
        assert function_database.count_rows("events") == 10

    def test_replaces_terminated_connection(self, function_database, snippets):
        module = snippets.load(PSYCOPG2)
        record(module)

        function_database.view.terminate()
        record(module)

        assert function_database.view.connections_opened() == 2

    def test_replaces_connection_past_lifetime(self, function_database, snippets):
        module = snippets.load(PSYCOPG2)
        module.MAX_LIFETIME_SECONDS = 0.5
        record(module)

        time.sleep(0.7)
        record(module)

        assert function_database.view.connections_opened() == 2

    def test_missing_putconn_exhausts_pool(self, function_database, snippets):
        module = snippets.load(
            PSYCOPG2, (("            current_pool.putconn(conn)\n", "            pass\n"),)
        )
        record(module)

        with pytest.raises(PoolError, match="exhausted"):
            record(module)

    def test_closed_flag_check_fails_after_terminate(self, function_database, snippets):
        module = snippets.load(PSYCOPG2, (("    if not is_usable(conn):", "    if conn.closed:"),))
        record(module)

        function_database.view.terminate()

        with pytest.raises(psycopg2.OperationalError):
            record(module)

    def test_missing_database_url_named(self, function_database, snippets, monkeypatch):
        monkeypatch.delenv("DATABASE_URL")
        module = snippets.load(PSYCOPG2)

        with pytest.raises(RuntimeError, match="DATABASE_URL is not set"):
            module.get_pool()


class TestPsycopgPoolLibrary:
    def test_default_min_size_opens_four(self, database):
        with ConnectionPool(database.url, open=True) as pool:
            pool.wait()

            assert pool.min_size == 4
            assert wait_for_connections(database, 4) == 4


@pytest.mark.snippet(PSYCOPG3)
@pytest.mark.snippet(SCHEMA)
class TestPsycopgPool:
    def test_opens_nothing_before_first_use(self, function_database, snippets):
        module = snippets.load(PSYCOPG3)

        pool = module.get_pool()
        time.sleep(0.3)

        assert pool.min_size == 0
        assert function_database.view.connections_opened() == 0

    def test_threads_share_one_connection(self, function_database, snippets):
        module = snippets.load(PSYCOPG3)

        failures = run_in_threads(lambda: [record(module) for _ in range(10)])

        assert failures == []
        assert function_database.view.connections_opened() == 1
        assert function_database.count_rows("events") == 40

    def test_replaces_terminated_connection(self, function_database, snippets):
        module = snippets.load(PSYCOPG3)
        record(module)

        function_database.view.terminate()
        record(module)

        assert function_database.view.connections_opened() == 2

    def test_replaces_connection_past_lifetime(self, function_database, snippets):
        module = snippets.load(PSYCOPG3, (("max_lifetime=30 * 60,", "max_lifetime=0.5,"),))
        record(module)

        time.sleep(0.7)
        record(module)

        # The pool notices the age when the connection comes back and opens the next one
        # in a background worker.
        assert wait_for_connections(function_database, 2) == 2

    def test_no_check_fails_after_terminate(self, function_database, snippets):
        module = snippets.load(
            PSYCOPG3, (("            check=ConnectionPool.check_connection,", ""),)
        )
        record(module)

        function_database.view.terminate()

        with pytest.raises(psycopg.OperationalError):
            record(module)

    def test_missing_database_url_named(self, function_database, snippets, monkeypatch):
        monkeypatch.delenv("DATABASE_URL")
        module = snippets.load(PSYCOPG3)

        with pytest.raises(RuntimeError, match="DATABASE_URL is not set"):
            module.get_pool()


@pytest.mark.snippet(SQLALCHEMY)
@pytest.mark.snippet(SCHEMA)
class TestSQLAlchemyPool:
    def test_threads_share_one_connection(self, function_database, snippets):
        module = snippets.load(SQLALCHEMY)

        failures = run_in_threads(lambda: [record(module) for _ in range(10)])

        assert failures == []
        assert function_database.view.connections_opened() == 1
        assert function_database.count_rows("events") == 40

    def test_pre_ping_replaces_terminated_connection(self, function_database, snippets):
        module = snippets.load(SQLALCHEMY)
        record(module)

        function_database.view.terminate()
        record(module)

        assert function_database.view.connections_opened() == 2

    def test_recycle_replaces_old_connection(self, function_database, snippets):
        module = snippets.load(SQLALCHEMY, (("pool_recycle=30 * 60,", "pool_recycle=0.5,"),))
        record(module)

        time.sleep(0.7)
        record(module)

        assert function_database.view.connections_opened() == 2

    def test_no_pre_ping_fails_after_terminate(self, function_database, snippets):
        module = snippets.load(SQLALCHEMY, (("pool_pre_ping=True,", "pool_pre_ping=False,"),))
        record(module)

        function_database.view.terminate()

        with pytest.raises(sqlalchemy.exc.OperationalError):
            record(module)

    def test_unknown_scheme_rejected(self, function_database, snippets, monkeypatch):
        monkeypatch.setenv("DATABASE_URL", "mysql://user@127.0.0.1/app")
        module = snippets.load(SQLALCHEMY)

        with pytest.raises(ValueError, match="mysql"):
            module.get_engine()

    def test_missing_database_url_named(self, function_database, snippets, monkeypatch):
        monkeypatch.delenv("DATABASE_URL")
        module = snippets.load(SQLALCHEMY)

        with pytest.raises(RuntimeError, match="DATABASE_URL is not set"):
            module.get_engine()
