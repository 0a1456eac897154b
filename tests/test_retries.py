"""The retry page's helpers for psycopg 3, psycopg2 and SQLAlchemy, checked at the server.

Every test runs once per library. Tests in TestBrokenCopiesFail load a copy of the helper
with one protection removed and require that the check proving that protection fails.
"""

from __future__ import annotations

import inspect
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg2
import psycopg2.pool
import pytest
import sqlalchemy
import sqlalchemy_cockroachdb
from psycopg_pool import ConnectionPool
from sqlalchemy.engine import make_url

from tests.harness.backends import BackendInfo
from tests.harness.databases import TestDatabase
from tests.harness.lambda_context import LambdaContext
from tests.harness.snippets import SnippetLoader
from tests.harness.urls import parse_endpoint, set_query_parameter

SCHEMA = "retries/schema.sql"
PSYCOPG3 = "retries/psycopg_retry.py"
PSYCOPG2 = "retries/psycopg2_retry.py"
SQLALCHEMY = "retries/sqlalchemy_retry.py"

pytestmark = pytest.mark.snippet(SCHEMA)

SERIALIZATION_FAILURE = "40001"
UNIQUE_VIOLATION = "23505"
FOREIGN_KEY_VIOLATION = "23503"

WORKERS = 6
INCREMENTS_PER_WORKER = 10
TRANSFERS_PER_WORKER = 10
ACCOUNTS = 4
OPENING_BALANCE = 1000
# Under contention some transactions lose many times in a row. The tests allow for that and
# keep sleeps short, so that they prove correctness without taking long.
CONTENTION_ATTEMPTS = 40
CONTENTION_MAX_BACKOFF_SECONDS = 0.05
# A pause between the read and the write keeps the transactions of different workers
# overlapping, so that conflicts, and therefore retries, happen in every run.
CONFLICT_WINDOW_SECONDS = 0.002
FAST_BACKOFF_SECONDS = 0.001


# Broken copies, each removing one protection. The three modules share these lines.
NO_RETRY = (("if sqlstate == SERIALIZATION_FAILURE:", "if False:"),)
RETRY_EVERYTHING = (("return NOT_RETRYABLE", "return SERIALIZATION_CONFLICT"),)
NO_ATTEMPT_LIMIT = (("if attempt >= attempt_limit:", "if False:"),)
NO_DEADLINE = (
    ("if remaining is not None and delay + DEADLINE_MARGIN_SECONDS > remaining:", "if False:"),
)
BLIND_COMMIT_RETRY = (("if kind == COMMIT_UNKNOWN and not idempotent:", "if False:"),)
BLIND_CONNECTION_RETRY = (("(kind == CONNECTION_LOST and not idempotent)", "False"),)
NO_JITTER = (("random.uniform(0, ceiling)", "ceiling"),)
NO_TRANSFER_GUARD = (("if recorded is None:", "if False:"),)


class ConnectionClosed(Exception):
    """The peer closed its side of a proxied connection."""


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionClosed
        data += chunk
    return bytes(data)


def close_quietly(*sockets: socket.socket) -> None:
    for sock in sockets:
        # shutdown() wakes the relay thread that is blocked reading from the socket.
        with suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def statement_text(kind: bytes, payload: bytes) -> bytes | None:
    """Return the SQL of a simple Query ('Q') or Parse ('P') message, or None for others."""
    if kind == b"Q":
        return payload.split(b"\0", 1)[0]
    if kind == b"P":
        return payload.split(b"\0", 2)[1]
    return None


@dataclass(frozen=True)
class Loss:
    """Which statement a ConnectionLossProxy loses, and whether the server still gets it."""

    statement: bytes
    reaches_server: bool


class ConnectionLossProxy:
    """A TCP proxy on 127.0.0.1 in front of the test database that can lose one statement.

    It reads the PostgreSQL wire protocol, so clients must connect without TLS. Each lose_*
    call plans one loss, for the next statement that starts with the given text. The proxy
    then closes both connections, either before the statement reaches the server or after
    the server received it but before its reply reaches the client. The second case is a
    COMMIT that the server applied while the client saw only a broken connection.
    """

    # Untyped requests a client may send before its startup message.
    SSL_REQUEST = 80877103
    GSSENC_REQUEST = 80877104

    def __init__(self, server_host: str, server_port: int) -> None:
        self.server = (server_host, server_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.losses = 0
        self._plan: Loss | None = None
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def lose_commit_reply(self) -> None:
        self._plan = Loss(b"COMMIT", reaches_server=True)

    def lose_commit(self) -> None:
        self._plan = Loss(b"COMMIT", reaches_server=False)

    def lose_statement(self, prefix: str) -> None:
        self._plan = Loss(prefix.upper().encode(), reaches_server=False)

    def url(self, database_url: str) -> str:
        """Return *database_url* pointing at the proxy, without TLS."""
        parts = urlsplit(database_url)
        credentials = parts.netloc.rpartition("@")[0]
        address = f"127.0.0.1:{self.port}"
        netloc = f"{credentials}@{address}" if credentials else address
        url = urlunsplit(parts._replace(netloc=netloc))
        return set_query_parameter(url, "sslmode", "disable")

    def close(self) -> None:
        close_quietly(self.listener, *self._sockets)

    def _take_plan(self, text: bytes | None) -> Loss | None:
        with self._lock:
            plan = self._plan
            if plan is None or text is None or not text.strip().upper().startswith(plan.statement):
                return None
            self._plan = None
            self.losses += 1
            return plan

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.server)
            self._sockets += [client, server]
            reply_lost = threading.Event()
            threading.Thread(
                target=self._relay_replies, args=(server, client, reply_lost), daemon=True
            ).start()
            threading.Thread(
                target=self._relay_requests, args=(client, server, reply_lost), daemon=True
            ).start()

    def _relay_requests(
        self, client: socket.socket, server: socket.socket, reply_lost: threading.Event
    ) -> None:
        try:
            while True:
                header = receive_exactly(client, 4)
                rest = receive_exactly(client, int.from_bytes(header, "big") - 4)
                server.sendall(header + rest)
                if int.from_bytes(rest[:4], "big") not in (self.SSL_REQUEST, self.GSSENC_REQUEST):
                    break

            while True:
                kind = receive_exactly(client, 1)
                header = receive_exactly(client, 4)
                payload = receive_exactly(client, int.from_bytes(header, "big") - 4)
                plan = self._take_plan(statement_text(kind, payload))
                if plan is not None and not plan.reaches_server:
                    break
                if plan is not None:
                    reply_lost.set()
                server.sendall(kind + header + payload)
        except (ConnectionClosed, OSError):
            pass
        close_quietly(client, server)

    def _relay_replies(
        self, server: socket.socket, client: socket.socket, reply_lost: threading.Event
    ) -> None:
        try:
            while data := server.recv(65536):
                if reply_lost.is_set():
                    break
                client.sendall(data)
        except OSError:
            pass
        close_quietly(client, server)


@dataclass(frozen=True)
class Driver:
    """How the tests open a pool, run SQL and read a SQLSTATE with one library."""

    name: str
    snippet: str
    open_pool: Callable[[str, BackendInfo], Any]
    close_pool: Callable[[Any], None]
    query: Callable[..., list[tuple]]
    sqlstate: Callable[[BaseException], str | None]
    # Broken copies: without the request for SERIALIZABLE, and without giving the
    # connection its isolation level back (None where the library restores it by itself).
    no_serializable: tuple[tuple[str, str], ...]
    no_isolation_restore: tuple[tuple[str, str], ...] | None


def psycopg3_pool(url: str, backend: BackendInfo) -> ConnectionPool:
    return ConnectionPool(
        url, min_size=0, max_size=1, check=ConnectionPool.check_connection, open=True
    )


def psycopg3_query(connection: psycopg.Connection, sql: str, params: tuple | None = None) -> list:
    cursor = connection.execute(sql, params)
    return cursor.fetchall() if cursor.description else []


def psycopg2_pool(url: str, backend: BackendInfo) -> psycopg2.pool.SimpleConnectionPool:
    return psycopg2.pool.SimpleConnectionPool(1, 1, url)


def psycopg2_query(connection: Any, sql: str, params: tuple | None = None) -> list:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def sqlalchemy_engine(url: str, backend: BackendInfo) -> sqlalchemy.Engine:
    driver = "cockroachdb+psycopg" if backend.is_cockroachdb else "postgresql+psycopg"
    return sqlalchemy.create_engine(
        make_url(url).set(drivername=driver), pool_size=1, max_overflow=0, pool_pre_ping=True
    )


def sqlalchemy_query(
    connection: sqlalchemy.Connection, sql: str, params: tuple | None = None
) -> list:
    result = connection.exec_driver_sql(sql, params or ())
    return [tuple(row) for row in result] if result.returns_rows else []


def sqlalchemy_sqlstate(error: BaseException) -> str | None:
    original = getattr(error, "orig", error)
    return getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)


DRIVERS = [
    pytest.param(
        Driver(
            "psycopg 3",
            PSYCOPG3,
            psycopg3_pool,
            ConnectionPool.close,
            psycopg3_query,
            lambda error: getattr(error, "sqlstate", None),
            (("    connection.isolation_level = IsolationLevel.SERIALIZABLE\n", ""),),
            (("            connection.isolation_level = previous\n", "            pass\n"),),
        ),
        id="psycopg3",
        marks=pytest.mark.snippet(PSYCOPG3),
    ),
    pytest.param(
        Driver(
            "psycopg2",
            PSYCOPG2,
            psycopg2_pool,
            psycopg2.pool.SimpleConnectionPool.closeall,
            psycopg2_query,
            lambda error: getattr(error, "pgcode", None),
            (("    connection.isolation_level = ISOLATION_LEVEL_SERIALIZABLE\n", ""),),
            (("            connection.isolation_level = previous_level\n", "            pass\n"),),
        ),
        id="psycopg2",
        marks=pytest.mark.snippet(PSYCOPG2),
    ),
    pytest.param(
        Driver(
            "SQLAlchemy",
            SQLALCHEMY,
            sqlalchemy_engine,
            sqlalchemy.Engine.dispose,
            sqlalchemy_query,
            sqlalchemy_sqlstate,
            (('.execution_options(isolation_level="SERIALIZABLE")', ""),),
            None,
        ),
        id="sqlalchemy",
        marks=pytest.mark.snippet(SQLALCHEMY),
    ),
]


# The libraries whose module, not the library itself, gives the isolation level back.
RESTORING_DRIVERS = [param for param in DRIVERS if param.values[0].no_isolation_restore]


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> Driver:
    return request.param


@dataclass
class Pools:
    """Pools that a test opens, one per worker, closed when the test ends."""

    driver: Driver
    backend: BackendInfo
    opened: list[Any] = field(default_factory=list)

    def open(self, url: str) -> Any:
        pool = self.driver.open_pool(url, self.backend)
        self.opened.append(pool)
        return pool

    def close(self) -> None:
        for pool in self.opened:
            self.driver.close_pool(pool)


@pytest.fixture
def pools(driver: Driver, backend: BackendInfo) -> Iterator[Pools]:
    opened = Pools(driver, backend)
    yield opened
    opened.close()


@pytest.fixture
def bank(database: TestDatabase, snippets: SnippetLoader) -> TestDatabase:
    """The test database with the page's schema, funded accounts and one counter at 0."""
    database.execute_file(snippets.path(SCHEMA))
    with database.connect() as connection:
        connection.execute("CREATE TABLE counters (id INT PRIMARY KEY, value INT NOT NULL)")
        connection.execute("INSERT INTO counters (id, value) VALUES (1, 0)")
        for account in range(1, ACCOUNTS + 1):
            connection.execute(
                "INSERT INTO accounts (id, balance) VALUES (%s, %s)", (account, OPENING_BALANCE)
            )
    return database


@pytest.fixture
def proxy(database: TestDatabase) -> Iterator[ConnectionLossProxy]:
    endpoint = parse_endpoint(database.url)
    started = ConnectionLossProxy(endpoint.host, endpoint.port)
    yield started
    started.close()


@pytest.fixture
def helper(driver: Driver, snippets: SnippetLoader, bank: TestDatabase) -> ModuleType:
    """The page's module for this test's library, with sleeps short enough for tests."""
    module = snippets.load(driver.snippet)
    module.BASE_BACKOFF_SECONDS = FAST_BACKOFF_SECONDS
    return module


class CallCounter:
    """Counts calls of a transaction body, from any number of threads."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def add(self) -> int:
        with self._lock:
            self.count += 1
            return self.count


def counter_value(database: TestDatabase) -> int:
    with database.connect() as connection:
        return connection.execute("SELECT value FROM counters WHERE id = 1").fetchone()[0]


def default_isolation(database: TestDatabase) -> str:
    with database.connect() as connection:
        return connection.execute("SHOW default_transaction_isolation").fetchone()[0]


def balances(database: TestDatabase) -> dict[int, int]:
    with database.connect() as connection:
        return dict(connection.execute("SELECT id, balance FROM accounts").fetchall())


def increment_counter(driver: Driver, connection: Any) -> int:
    """Read the counter, then write it back one higher: correct only if serializable."""
    (value,) = driver.query(connection, "SELECT value FROM counters WHERE id = 1")[0]
    time.sleep(CONFLICT_WINDOW_SECONDS)
    driver.query(connection, "UPDATE counters SET value = %s WHERE id = 1", (value + 1,))
    return value + 1


def force_serialization_failure(
    query: Callable[..., list[tuple]], connection: Any, backend: BackendInfo
) -> None:
    """Make the server fail the current statement with SQLSTATE 40001."""
    if backend.is_cockroachdb:
        # CockroachDB retries a transaction's first statement by itself, so an earlier
        # statement is needed for the forced error to reach the client.
        query(connection, "SELECT now()")
        query(connection, "SELECT crdb_internal.force_retry('1h'::INTERVAL)")
    else:
        query(
            connection,
            "DO $$ BEGIN RAISE EXCEPTION 'forced by the test' "
            "USING ERRCODE = 'serialization_failure'; END $$",
        )


def run_concurrently(work: Callable[[int], None], workers: int) -> list[BaseException]:
    """Start *workers* threads together, each running work(index); return what they raised."""
    barrier = threading.Barrier(workers)
    failures: list[BaseException] = []
    lock = threading.Lock()

    def guarded(index: int) -> None:
        barrier.wait()
        try:
            work(index)
        except BaseException as error:
            with lock:
                failures.append(error)

    threads = [threading.Thread(target=guarded, args=(index,)) for index in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures


def retry_messages(caplog: pytest.LogCaptureFixture, module: ModuleType) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == module.logger.name]


def increment_concurrently(
    module: ModuleType, driver: Driver, pools: Pools, url: str, attempts: CallCounter
) -> list[BaseException]:
    module.MAX_ATTEMPTS = CONTENTION_ATTEMPTS
    module.MAX_BACKOFF_SECONDS = CONTENTION_MAX_BACKOFF_SECONDS

    def body(connection: Any) -> int:
        attempts.add()
        return increment_counter(driver, connection)

    def increment_many(worker: int) -> None:
        pool = pools.open(url)
        for _ in range(INCREMENTS_PER_WORKER):
            module.run_transaction(pool, body)

    return run_concurrently(increment_many, WORKERS)


def test_increments_exact_under_contention(driver, bank, helper, pools):
    attempts = CallCounter()

    failures = increment_concurrently(helper, driver, pools, bank.url, attempts)

    assert failures == []
    assert counter_value(bank) == WORKERS * INCREMENTS_PER_WORKER
    assert attempts.count > WORKERS * INCREMENTS_PER_WORKER


def test_transfers_keep_total_under_contention(driver, bank, helper, pools, caplog):
    helper.MAX_ATTEMPTS = CONTENTION_ATTEMPTS
    helper.MAX_BACKOFF_SECONDS = CONTENTION_MAX_BACKOFF_SECONDS

    def transfer_many(worker: int) -> None:
        pool = pools.open(bank.url)
        for number in range(TRANSFERS_PER_WORKER):
            source = (worker + number) % ACCOUNTS + 1
            target = (worker + number + 1) % ACCOUNTS + 1
            assert helper.transfer(pool, f"w{worker}-t{number}", source, target, worker + 1)

    failures = run_concurrently(transfer_many, WORKERS)

    with bank.connect() as connection:
        moved = connection.execute(
            "SELECT a.id, coalesce(sum(t.amount) FILTER (WHERE t.target = a.id), 0) "
            "- coalesce(sum(t.amount) FILTER (WHERE t.source = a.id), 0) "
            "FROM accounts a LEFT JOIN transfers t ON a.id IN (t.source, t.target) GROUP BY a.id"
        ).fetchall()
    assert failures == []
    assert bank.count_rows("transfers") == WORKERS * TRANSFERS_PER_WORKER
    assert sum(balances(bank).values()) == ACCOUNTS * OPENING_BALANCE
    assert balances(bank) == {account: OPENING_BALANCE + change for account, change in moved}
    assert len(retry_messages(caplog, helper)) > 0


def test_retries_logged_with_attempt_and_sqlstate(driver, bank, helper, pools, backend, caplog):
    pool = pools.open(bank.url)
    calls = CallCounter()

    def body(connection: Any) -> None:
        if calls.add() < 3:
            force_serialization_failure(driver.query, connection, backend)
        increment_counter(driver, connection)

    helper.run_transaction(pool, body)

    messages = retry_messages(caplog, helper)
    assert calls.count == 3
    assert counter_value(bank) == 1
    assert len(messages) == 2
    assert messages[0].startswith("transaction attempt 1 of 5 failed")
    assert messages[1].startswith("transaction attempt 2 of 5 failed")
    assert all(f"SQLSTATE {SERIALIZATION_FAILURE}" in message for message in messages)
    assert all(bank.name not in message for message in messages)


def test_always_failing_body_stops_at_limit(driver, bank, helper, pools, backend):
    pool = pools.open(bank.url)
    calls = CallCounter()

    def body(connection: Any) -> None:
        calls.add()
        force_serialization_failure(driver.query, connection, backend)

    with pytest.raises(helper.RetriesExhausted, match="failed on all 3 attempts") as raised:
        helper.run_transaction(pool, body, max_attempts=3)

    assert calls.count == 3
    assert raised.value.attempts == 3
    assert driver.sqlstate(raised.value.__cause__) == SERIALIZATION_FAILURE


def test_unique_violation_not_retried(driver, bank, helper, pools, caplog):
    pool = pools.open(bank.url)
    calls = CallCounter()

    def body(connection: Any) -> None:
        calls.add()
        driver.query(connection, "INSERT INTO counters (id, value) VALUES (1, 0)")

    with pytest.raises(Exception) as raised:
        helper.run_transaction(pool, body, max_attempts=3)

    assert driver.sqlstate(raised.value) == UNIQUE_VIOLATION
    assert calls.count == 1
    assert retry_messages(caplog, helper) == []


def test_application_error_not_retried(driver, bank, helper, pools):
    pool = pools.open(bank.url)
    calls = CallCounter()

    def body(connection: Any) -> None:
        calls.add()
        increment_counter(driver, connection)
        raise ZeroDivisionError("the body failed on purpose")

    with pytest.raises(ZeroDivisionError):
        helper.run_transaction(pool, body)

    assert calls.count == 1
    assert counter_value(bank) == 0


@pytest.mark.parametrize("limit", ["context", "deadline"])
def test_deadline_stops_retries_early(driver, bank, helper, pools, backend, limit):
    pool = pools.open(bank.url)
    ends_at = time.monotonic() + 1.0
    context = LambdaContext(timeout_seconds=1.0)
    limits = {"context": context} if limit == "context" else {"deadline": ends_at}
    # Sleeps of a fixed length make the point at which the helper gives up predictable.
    helper.backoff_delay = lambda attempt: 0.2
    calls = CallCounter()

    def body(connection: Any) -> None:
        calls.add()
        force_serialization_failure(driver.query, connection, backend)

    with pytest.raises(helper.RetriesExhausted, match="of the deadline") as raised:
        helper.run_transaction(pool, body, max_attempts=8, **limits)

    assert time.monotonic() < ends_at
    assert calls.count < 8
    assert driver.sqlstate(raised.value.__cause__) == SERIALIZATION_FAILURE


def test_backoff_grows_with_jitter(driver, helper):
    for attempt in range(1, 9):
        ceiling = min(helper.MAX_BACKOFF_SECONDS, helper.BASE_BACKOFF_SECONDS * 2 ** (attempt - 1))
        delays = [helper.backoff_delay(attempt) for _ in range(200)]

        assert min(delays) >= 0
        assert max(delays) <= ceiling
        assert len(set(delays)) > 1


@pytest.mark.parametrize("committed", [True, False], ids=["reply-lost", "commit-lost"])
def test_ambiguous_commit_not_retried(driver, bank, helper, pools, proxy, committed):
    pool = pools.open(proxy.url(bank.url))
    calls = CallCounter()

    def body(connection: Any) -> None:
        calls.add()
        increment_counter(driver, connection)
        if committed:
            proxy.lose_commit_reply()
        else:
            proxy.lose_commit()

    with pytest.raises(helper.AmbiguousCommitError, match="may have committed") as raised:
        helper.run_transaction(pool, body)

    assert proxy.losses == 1
    assert calls.count == 1
    assert raised.value.attempts == 1
    assert counter_value(bank) == (1 if committed else 0)


def test_idempotent_body_retried_after_lost_commit(driver, bank, helper, pools, proxy):
    pool = pools.open(proxy.url(bank.url))
    calls = CallCounter()

    def body(connection: Any) -> None:
        if calls.add() == 1:
            proxy.lose_commit()
        increment_counter(driver, connection)

    helper.run_transaction(pool, body, idempotent=True)

    assert proxy.losses == 1
    assert calls.count == 2
    assert counter_value(bank) == 1


def test_transfer_applied_once_after_lost_reply(driver, bank, helper, pools, proxy, caplog):
    pool = pools.open(proxy.url(bank.url))
    proxy.lose_commit_reply()

    applied_now = helper.transfer(pool, "request-1", 1, 2, 30)

    assert proxy.losses == 1
    assert applied_now is False
    assert bank.count_rows("transfers") == 1
    assert balances(bank) == {1: OPENING_BALANCE - 30, 2: OPENING_BALANCE + 30, 3: 1000, 4: 1000}
    assert "commit outcome unknown" in retry_messages(caplog, helper)[0]


def test_repeated_transfer_moves_money_once(driver, bank, helper, pools):
    pool = pools.open(bank.url)

    first = helper.transfer(pool, "request-1", 1, 2, 30)
    second = helper.transfer(pool, "request-1", 1, 2, 30)

    assert first is True
    assert second is False
    assert balances(bank)[1] == OPENING_BALANCE - 30


def test_bad_transfer_rejected(driver, bank, helper, pools):
    pool = pools.open(bank.url)
    cases = [
        (("", 1, 2, 10), "request_id must be a non-empty string"),
        (("request-1", 1, "2", 10), "target must be an integer account id"),
        (("request-1", 1, 1, 10), "must be different accounts"),
        (("request-1", 1, 2, 0), "amount must be a positive integer"),
        (
            ("request-1", 1, 2, OPENING_BALANCE + 1),
            "balance of 1000, less than the 1001 to transfer",
        ),
    ]

    for arguments, message in cases:
        with pytest.raises(ValueError, match=message):
            helper.transfer(pool, *arguments)

    assert bank.count_rows("transfers") == 0
    assert sum(balances(bank).values()) == ACCOUNTS * OPENING_BALANCE


def test_transfer_to_unknown_account_rejected(driver, bank, helper, pools, caplog):
    pool = pools.open(bank.url)

    with pytest.raises(Exception) as raised:
        helper.transfer(pool, "request-1", 1, ACCOUNTS + 1, 10)

    assert driver.sqlstate(raised.value) == FOREIGN_KEY_VIOLATION
    assert bank.count_rows("transfers") == 0
    assert retry_messages(caplog, helper) == []


@pytest.mark.parametrize("idempotent", [False, True], ids=["not-idempotent", "idempotent"])
def test_connection_lost_in_body(driver, bank, helper, pools, idempotent):
    pool = pools.open(bank.url)
    calls = CallCounter()

    def body(connection: Any) -> None:
        if calls.add() == 1:
            bank.view.terminate()
        increment_counter(driver, connection)

    if idempotent:
        helper.run_transaction(pool, body, idempotent=True)
    else:
        with pytest.raises(Exception) as raised:
            helper.run_transaction(pool, body)
        assert not isinstance(raised.value, helper.AmbiguousCommitError)

    assert calls.count == (2 if idempotent else 1)
    assert counter_value(bank) == (1 if idempotent else 0)


def test_bad_arguments_rejected(driver, bank, helper, pools):
    pool = pools.open(bank.url)
    cases = [
        ({"max_attempts": 0}, ValueError, "max_attempts must be an integer of at least 1"),
        ({"context": object()}, TypeError, "get_remaining_time_in_millis"),
        ({"deadline": "soon"}, TypeError, "time.monotonic"),
    ]

    for arguments, error, message in cases:
        with pytest.raises(error, match=message):
            helper.run_transaction(pool, lambda connection: None, **arguments)

    with pytest.raises(TypeError, match="body must be a callable"):
        helper.run_transaction(pool, "UPDATE counters SET value = 1")


def test_connection_isolation_restored(driver, bank, helper, pools):
    pool = pools.open(bank.url)

    helper.run_transaction(pool, lambda connection: increment_counter(driver, connection))

    isolation = on_pool_connection(driver, pool, "SHOW transaction_isolation")
    assert isolation == [(default_isolation(bank),)]


@pytest.mark.cockroachdb_only
def test_injected_retry_errors_retried(driver, bank, helper, pools):
    pool = pools.open(bank.url)
    on_pool_connection(driver, pool, "SET inject_retry_errors_enabled = true")
    calls = CallCounter()

    def body(connection: Any) -> None:
        # SET statements are exempt from injection, so the third attempt can switch it off.
        if calls.add() == 3:
            driver.query(connection, "SET inject_retry_errors_enabled = false")
        increment_counter(driver, connection)

    helper.run_transaction(pool, body)

    assert calls.count == 3
    assert counter_value(bank) == 1


@pytest.mark.cockroachdb_only
def test_injected_retry_errors_exhaust_attempts(driver, bank, helper, pools):
    pool = pools.open(bank.url)
    on_pool_connection(driver, pool, "SET inject_retry_errors_enabled = true")

    with pytest.raises(helper.RetriesExhausted) as raised:
        helper.run_transaction(pool, lambda connection: increment_counter(driver, connection))

    assert raised.value.attempts == helper.MAX_ATTEMPTS
    assert driver.sqlstate(raised.value.__cause__) == SERIALIZATION_FAILURE
    assert counter_value(bank) == 0


def on_pool_connection(driver: Driver, pool: Any, statement: str) -> list[tuple]:
    """Run *statement* on the connection of *pool* and commit, outside any retry loop."""
    if driver.name == "SQLAlchemy":
        with pool.connect() as connection:
            rows = sqlalchemy_query(connection, statement)
            connection.commit()
        return rows
    if driver.name == "psycopg2":
        connection = pool.getconn()
        rows = psycopg2_query(connection, statement)
        connection.commit()
        pool.putconn(connection)
        return rows
    with pool.connection() as connection:
        return psycopg3_query(connection, statement)


@pytest.mark.snippet(SQLALCHEMY)
def test_sqlalchemy_with_psycopg2_driver(bank, snippets, backend):
    module = snippets.load(SQLALCHEMY)
    module.BASE_BACKOFF_SECONDS = FAST_BACKOFF_SECONDS
    driver = "cockroachdb+psycopg2" if backend.is_cockroachdb else "postgresql+psycopg2"
    engine = sqlalchemy.create_engine(make_url(bank.url).set(drivername=driver))
    calls = CallCounter()

    def body(connection: sqlalchemy.Connection) -> None:
        # The first attempt fails with 40001, the second with a unique violation.
        if calls.add() == 1:
            force_serialization_failure(sqlalchemy_query, connection, backend)
        sqlalchemy_query(connection, "INSERT INTO counters (id, value) VALUES (1, 0)")

    try:
        with pytest.raises(sqlalchemy.exc.IntegrityError) as raised:
            module.run_transaction(engine, body)
    finally:
        engine.dispose()

    assert calls.count == 2
    assert raised.value.orig.pgcode == UNIQUE_VIOLATION


def test_dialect_run_transaction_defaults_unbounded():
    parameters = inspect.signature(sqlalchemy_cockroachdb.run_transaction).parameters

    assert parameters["max_retries"].default is None
    assert parameters["max_backoff"].default == 0


class TestBrokenCopiesFail:
    """Each check above goes red when the helper loses the protection it proves."""

    def test_no_retry_loses_increments(self, driver, bank, snippets, pools):
        module = snippets.load(driver.snippet, NO_RETRY)

        failures = increment_concurrently(module, driver, pools, bank.url, CallCounter())

        assert failures != []
        assert {driver.sqlstate(failure) for failure in failures} == {SERIALIZATION_FAILURE}
        assert counter_value(bank) < WORKERS * INCREMENTS_PER_WORKER

    def test_read_committed_loses_updates(self, driver, bank, snippets, pools, backend):
        if backend.is_cockroachdb:
            pytest.skip("CockroachDB runs transactions SERIALIZABLE unless told otherwise")
        module = snippets.load(driver.snippet, driver.no_serializable)

        failures = increment_concurrently(module, driver, pools, bank.url, CallCounter())

        assert default_isolation(bank) == "read committed"
        assert failures == []
        assert counter_value(bank) < WORKERS * INCREMENTS_PER_WORKER

    @pytest.mark.parametrize("restoring", RESTORING_DRIVERS)
    def test_no_restore_leaves_serializable(self, restoring, bank, snippets, backend):
        module = snippets.load(restoring.snippet, restoring.no_isolation_restore)
        pool = restoring.open_pool(bank.url, backend)

        try:
            module.run_transaction(
                pool, lambda connection: increment_counter(restoring, connection)
            )
            isolation = on_pool_connection(restoring, pool, "SHOW transaction_isolation")
        finally:
            restoring.close_pool(pool)

        assert isolation == [("serializable",)]

    def test_retry_everything_repeats_unique_violation(self, driver, bank, snippets, pools):
        module = snippets.load(driver.snippet, RETRY_EVERYTHING)
        module.BASE_BACKOFF_SECONDS = FAST_BACKOFF_SECONDS
        pool = pools.open(bank.url)
        calls = CallCounter()

        def body(connection: Any) -> None:
            calls.add()
            driver.query(connection, "INSERT INTO counters (id, value) VALUES (1, 0)")

        with pytest.raises(module.RetriesExhausted):
            module.run_transaction(pool, body, max_attempts=3)

        assert calls.count == 3

    def test_no_attempt_limit_keeps_going(self, driver, bank, snippets, pools, backend):
        module = snippets.load(driver.snippet, NO_ATTEMPT_LIMIT)
        module.BASE_BACKOFF_SECONDS = FAST_BACKOFF_SECONDS
        pool = pools.open(bank.url)
        calls = CallCounter()

        def body(connection: Any) -> None:
            # Fails more often than the limit allows, then succeeds, so the loop ends.
            if calls.add() <= 6:
                force_serialization_failure(driver.query, connection, backend)

        module.run_transaction(pool, body, max_attempts=3)

        assert calls.count == 7

    def test_no_deadline_runs_past_it(self, driver, bank, snippets, pools, backend):
        module = snippets.load(driver.snippet, NO_DEADLINE)
        module.backoff_delay = lambda attempt: 0.2
        pool = pools.open(bank.url)
        context = LambdaContext(timeout_seconds=1.0)
        calls = CallCounter()

        def body(connection: Any) -> None:
            calls.add()
            force_serialization_failure(driver.query, connection, backend)

        with pytest.raises(module.RetriesExhausted):
            module.run_transaction(pool, body, max_attempts=8, context=context)

        assert context.get_remaining_time_in_millis() == 0
        assert calls.count == 8

    def test_no_jitter_gives_equal_delays(self, driver, bank, snippets):
        module = snippets.load(driver.snippet, NO_JITTER)

        delays = [module.backoff_delay(3) for _ in range(200)]

        assert len(set(delays)) == 1

    def test_blind_commit_retry_applies_twice(self, driver, bank, snippets, pools, proxy):
        module = snippets.load(driver.snippet, BLIND_COMMIT_RETRY)
        pool = pools.open(proxy.url(bank.url))
        calls = CallCounter()

        def body(connection: Any) -> None:
            if calls.add() == 1:
                proxy.lose_commit_reply()
            increment_counter(driver, connection)

        module.run_transaction(pool, body)

        assert calls.count == 2
        assert counter_value(bank) == 2

    def test_blind_connection_retry_repeats_body(self, driver, bank, snippets, pools):
        module = snippets.load(driver.snippet, BLIND_CONNECTION_RETRY)
        pool = pools.open(bank.url)
        calls = CallCounter()

        def body(connection: Any) -> None:
            if calls.add() == 1:
                bank.view.terminate()
            increment_counter(driver, connection)

        module.run_transaction(pool, body)

        assert calls.count == 2

    def test_unguarded_transfer_moves_twice(self, driver, bank, snippets, pools, proxy):
        module = snippets.load(driver.snippet, NO_TRANSFER_GUARD)
        pool = pools.open(proxy.url(bank.url))
        proxy.lose_commit_reply()

        module.transfer(pool, "request-1", 1, 2, 30)

        assert balances(bank)[1] == OPENING_BALANCE - 60
