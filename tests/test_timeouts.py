"""The timeouts page: each wait on the database ends in a clear error inside the function limit.

A server that accepts connections and never replies takes the place of a database that
stopped responding. Each protection has a twin test that runs a broken copy of the module
without it and requires the same check to fail.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import psycopg2
import psycopg2.errors
import pytest
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import PoolTimeout

from tests.harness.databases import TestDatabase
from tests.harness.lambda_context import LambdaContext
from tests.harness.node import (
    Invocation,
    NodeHandlerProcess,
    prepare_workspace,
    require_node,
    run_javascript,
)
from tests.harness.silent_server import SilentServer
from tests.harness.snippets import SnippetLoader

PSYCOPG = "timeouts/psycopg_timeouts.py"
PSYCOPG2 = "timeouts/psycopg2_timeouts.py"
NODE = "timeouts/node_postgres_timeouts.mjs"

# The function timeout the page sizes its limits for.
FUNCTION_TIMEOUT_SECONDS = 10.0
# Room on top of a configured timeout for thread and process scheduling on a busy machine.
MARGIN_SECONDS = 1.5
# How much earlier than configured a timeout may fire and still count as that timeout.
EARLY_SECONDS = 0.2
# Statement tests run a copy with a 1 s statement timeout, so that they take seconds.
SHORT_STATEMENT_TIMEOUT_MS = 1000
LONG_SLEEP_SECONDS = 2.5
# psycopg_pool retries a failed connection attempt about a second later.
RETRY_WAIT_SECONDS = 2.0
STOP_WAIT_SECONDS = 5.0
POOL_TIMEOUT_MESSAGE = "couldn't get a connection after 4.00 sec"

SHORT_STATEMENT_TIMEOUT = (
    ("STATEMENT_TIMEOUT_MS = 3000", f"STATEMENT_TIMEOUT_MS = {SHORT_STATEMENT_TIMEOUT_MS}"),
)
NO_STATEMENT_TIMEOUT = (
    ('    if "statement_timeout" not in options:\n', "    if False:\n"),
    *SHORT_STATEMENT_TIMEOUT,
)
NO_KEEPALIVES = (("for name, value in KEEPALIVES.items():", "for name, value in {}.items():"),)
PSYCOPG_NO_CONNECT_TIMEOUT = (
    ('    settings.setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)\n', ""),
)
PSYCOPG2_NO_CONNECT_TIMEOUT = (
    ('    settings.setdefault("connect_timeout", str(CONNECT_TIMEOUT_SECONDS))\n', ""),
)
PSYCOPG2_CLOSED_FLAG_CHECK = (
    (
        "if connection is not None and responds(connection):",
        "if connection is not None and not connection.closed:",
    ),
)
NO_POOL_TIMEOUT = (
    (
        "                timeout=POOL_TIMEOUT_SECONDS,  "
        "# seconds a checkout may wait, connecting included\n",
        "",
    ),
)

NODE_NO_CONNECTION_TIMEOUT = (("    connectionTimeoutMillis: connectionTimeoutMillis(url),\n", ""),)
NODE_SHORT_STATEMENT_TIMEOUT = (
    (
        "export const STATEMENT_TIMEOUT_MILLIS = 3000;",
        f"export const STATEMENT_TIMEOUT_MILLIS = {SHORT_STATEMENT_TIMEOUT_MS};",
    ),
)
NODE_NO_STATEMENT_TIMEOUT = (
    (
        "    ...(statementTimeoutInOptions(url) ? {} : "
        "{ statement_timeout: STATEMENT_TIMEOUT_MILLIS }),\n",
        "",
    ),
)
NODE_NO_KEEPALIVE = (("    keepAlive: true,\n", ""),)

# A handler around the module, as a function would call it. The "localPort" event returns
# the client port of the pooled connection, so that a test can find its socket.
NODE_CALLER = """\
import { getPool, query } from "./node_postgres_timeouts.mjs";

export { getPool };

export const handler = async (event) => {
  if (event.localPort) {
    const client = await getPool().connect();
    const port = client.connection.stream.localPort;
    client.release();
    return port;
  }
  return query(event.text, event.values ?? []);
};
"""

# Plain node-postgres with connect_timeout in the URL, to show what the library does with it.
NODE_URL_CONNECT_TIMEOUT = """\
import pg from "pg";

const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL });
const outcome = await Promise.race([
  pool.query("SELECT 1").then(() => "answered", (error) => `failed: ${error.message}`),
  new Promise((settle) => setTimeout(() => settle("still waiting"), WAIT_MILLIS)),
]);
console.log(outcome);
process.exit(0);
"""

# /proc/net/tcp: state 01 is ESTABLISHED, and on such a socket timer 02 is the keepalive
# timer, counted in 1/100 s (get_tcp4_sock() in the kernel's net/ipv4/tcp_ipv4.c).
ESTABLISHED = "01"
KEEPALIVE_TIMER = "02"
CLOCK_TICKS_PER_SECOND = 100


@dataclass(frozen=True)
class PythonModule:
    """One of the page's Python modules and the errors its library raises."""

    path: str
    query_canceled: type[Exception]


PYTHON_MODULES = [
    pytest.param(
        PythonModule(PSYCOPG, psycopg.errors.QueryCanceled),
        marks=pytest.mark.snippet(PSYCOPG),
        id="psycopg",
    ),
    pytest.param(
        PythonModule(PSYCOPG2, psycopg2.errors.QueryCanceled),
        marks=pytest.mark.snippet(PSYCOPG2),
        id="psycopg2",
    ),
]


class Waiter:
    """Runs a call in a thread, so that a test can see it is still waiting."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as error:
            self.errors.append(error)

    def waiting_after(self, seconds: float) -> bool:
        self._thread.join(seconds)
        return self._thread.is_alive()

    def finish(self) -> None:
        """Wait for the call to end once the test has taken away what it waited for."""
        self._thread.join(STOP_WAIT_SECONDS)
        if self._thread.is_alive():
            raise AssertionError(f"the call was still waiting {STOP_WAIT_SECONDS} s after cleanup")


def sqlstate(error: BaseException) -> str | None:
    """Return the SQLSTATE of a psycopg or psycopg2 error."""
    return getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)


def server_format(database: TestDatabase, setting: str, value: str) -> str:
    """Return how the server shows *setting* once set to *value*, which differs by product."""
    with database.connect() as connection:
        connection.execute(f"SET {setting} = {value}")
        return connection.execute(f"SHOW {setting}").fetchone()[0]


def socket_options(fd: int) -> dict[str, int]:
    """Read the keepalive options of a connected TCP socket without taking it over."""
    with socket.socket(fileno=socket.dup(fd)) as sock:
        return {
            "SO_KEEPALIVE": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "TCP_KEEPIDLE": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "TCP_KEEPINTVL": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "TCP_KEEPCNT": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        }


def python_connection_fd(module: ModuleType) -> int:
    if hasattr(module, "get_pool"):
        with module.get_pool().connection() as connection:
            return connection.fileno()
    return module.connection.fileno()


def tcp_timer(local_port: int) -> tuple[str, float]:
    """Return the timer kind and seconds left on the established socket bound to *local_port*."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        port = int(fields[1].split(":")[1], 16)
        if port == local_port and fields[3] == ESTABLISHED:
            kind, ticks = fields[5].split(":")
            return kind, int(ticks, 16) / CLOCK_TICKS_PER_SECOND
    raise AssertionError(f"no established socket on local port {local_port} in /proc/net/tcp")


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    """A server that never replies. Request it after `snippets`, so that it stops first."""
    with SilentServer() as server:
        yield server


@pytest.fixture
def function_database(database: TestDatabase, monkeypatch: pytest.MonkeyPatch) -> TestDatabase:
    monkeypatch.setenv("DATABASE_URL", database.url)
    return database


@pytest.fixture
def loaded(snippets: SnippetLoader) -> Iterator[Callable[..., ModuleType]]:
    """Load a snippet like `snippets.load`, and close a psycopg2 connection it keeps."""
    modules: list[ModuleType] = []

    def load(path: str, replacements: tuple[tuple[str, str], ...] = ()) -> ModuleType:
        module = snippets.load(path, replacements)
        modules.append(module)
        return module

    yield load
    for module in modules:
        connection = getattr(module, "connection", None)
        if connection is not None:
            connection.close()


class TestConnectionSettings:
    """The modules add their settings to DATABASE_URL without overriding what it sets."""

    @pytest.mark.parametrize("python", PYTHON_MODULES)
    def test_adds_timeouts_and_keepalives(self, python, loaded):
        module = loaded(python.path)

        settings = conninfo_to_dict(module.connection_settings("postgresql://app@db.example/app"))

        assert settings["connect_timeout"] == "3"
        assert settings["options"] == "-c statement_timeout=3000"
        assert settings["keepalives_idle"] == "2"
        assert settings["keepalives_interval"] == "1"
        assert settings["keepalives_count"] == "3"

    @pytest.mark.parametrize("python", PYTHON_MODULES)
    def test_url_values_kept(self, python, loaded):
        module = loaded(python.path)
        url = (
            "postgresql://app@db.example/app?connect_timeout=7&keepalives_idle=30"
            "&options=-c%20statement_timeout%3D5000"
        )

        settings = conninfo_to_dict(module.connection_settings(url))

        assert settings["connect_timeout"] == "7"
        assert settings["keepalives_idle"] == "30"
        assert settings["options"] == "-c statement_timeout=5000"

    @pytest.mark.parametrize("python", PYTHON_MODULES)
    def test_url_options_extended(self, python, loaded):
        module = loaded(python.path)
        url = "postgresql://app@db.example/app?options=--cluster%3Drouting-id"

        settings = conninfo_to_dict(module.connection_settings(url))

        assert settings["options"] == "--cluster=routing-id -c statement_timeout=3000"

    @pytest.mark.parametrize("python", PYTHON_MODULES)
    def test_invalid_url_named_not_echoed(self, python, loaded):
        module = loaded(python.path)

        with pytest.raises(ValueError, match="DATABASE_URL is not a valid") as raised:
            module.connection_settings("postgresql://app:s3cret@db.example/app?no_such=1")

        assert "s3cret" not in str(raised.value)

    @pytest.mark.parametrize("python", PYTHON_MODULES)
    def test_missing_database_url_named(self, python, loaded, monkeypatch):
        monkeypatch.delenv("DATABASE_URL", raising=False)
        module = loaded(python.path)

        with pytest.raises(RuntimeError, match="DATABASE_URL is not set"):
            module.fetch_all("SELECT 1")

    @pytest.mark.parametrize("python", PYTHON_MODULES)
    def test_session_gets_url_and_own_settings(self, python, loaded, database, monkeypatch):
        monkeypatch.setenv("DATABASE_URL", f"{database.url}&options=-c%20search_path%3Dapp")
        module = loaded(python.path)
        expected_timeout = server_format(database, "statement_timeout", "3000")

        search_path = module.fetch_all("SHOW search_path")
        statement_timeout = module.fetch_all("SHOW statement_timeout")

        assert search_path == [("app",)]
        assert statement_timeout == [(expected_timeout,)]

    @pytest.mark.snippet(PSYCOPG)
    def test_worst_case_fits_function_timeout(self, loaded):
        module = loaded(PSYCOPG)

        worst_case = module.POOL_TIMEOUT_SECONDS + module.STATEMENT_TIMEOUT_MS / 1000

        assert worst_case < FUNCTION_TIMEOUT_SECONDS
        assert module.POOL_TIMEOUT_SECONDS > module.CONNECT_TIMEOUT_SECONDS


@pytest.mark.snippet(PSYCOPG)
class TestPsycopgConnectTimeout:
    def test_connect_fails_within_timeout(self, loaded, silent_server):
        module = loaded(PSYCOPG)
        settings = module.connection_settings(silent_server.url())

        started = time.monotonic()
        with pytest.raises(psycopg.errors.ConnectionTimeout):
            psycopg.connect(settings)
        elapsed = time.monotonic() - started

        assert silent_server.bytes_received > 0
        assert elapsed >= module.CONNECT_TIMEOUT_SECONDS - EARLY_SECONDS
        assert elapsed < module.CONNECT_TIMEOUT_SECONDS + MARGIN_SECONDS

    def test_checkout_fails_within_pool_timeout(self, loaded, silent_server, monkeypatch, caplog):
        monkeypatch.setenv("DATABASE_URL", silent_server.url())
        module = loaded(PSYCOPG)
        context = LambdaContext(timeout_seconds=FUNCTION_TIMEOUT_SECONDS)

        started = time.monotonic()
        with (
            caplog.at_level(logging.WARNING, logger="psycopg.pool"),
            pytest.raises(PoolTimeout, match=re.escape(POOL_TIMEOUT_MESSAGE)),
        ):
            module.fetch_all("SELECT 1")
        elapsed = time.monotonic() - started
        pool_warnings = [record.getMessage() for record in caplog.records]

        assert elapsed >= module.POOL_TIMEOUT_SECONDS - EARLY_SECONDS
        assert elapsed < module.POOL_TIMEOUT_SECONDS + MARGIN_SECONDS
        assert context.get_remaining_time_in_millis() > 0
        # The caller sees only the pool's error; the cause goes to the pool's log.
        assert any("connection timeout expired" in message for message in pool_warnings)

    def test_pool_retries_after_connect_timeout(self, loaded, silent_server, monkeypatch):
        monkeypatch.setenv("DATABASE_URL", silent_server.url())
        module = loaded(PSYCOPG)

        with pytest.raises(PoolTimeout):
            module.fetch_all("SELECT 1")
        deadline = time.monotonic() + RETRY_WAIT_SECONDS
        while silent_server.accepted < 2 and time.monotonic() < deadline:
            time.sleep(0.05)

        # The pool's worker gave up on its first attempt and opened a second connection.
        assert silent_server.accepted >= 2


@pytest.mark.parametrize("python", PYTHON_MODULES)
class TestStatementTimeout:
    def test_long_query_cancelled(self, python, loaded, function_database):
        module = loaded(python.path, SHORT_STATEMENT_TIMEOUT)

        started = time.monotonic()
        with pytest.raises(python.query_canceled) as raised:
            module.fetch_all("SELECT pg_sleep(%s)", (LONG_SLEEP_SECONDS,))
        elapsed = time.monotonic() - started

        assert sqlstate(raised.value) == "57014"
        assert elapsed < SHORT_STATEMENT_TIMEOUT_MS / 1000 + MARGIN_SECONDS

    def test_connection_reused_after_cancel(self, python, loaded, function_database):
        module = loaded(python.path, SHORT_STATEMENT_TIMEOUT)
        with pytest.raises(python.query_canceled):
            module.fetch_all("SELECT pg_sleep(%s)", (LONG_SLEEP_SECONDS,))

        rows = module.fetch_all("SELECT 1")

        assert rows == [(1,)]
        assert function_database.view.connections_opened() == 1


@pytest.mark.snippet(PSYCOPG2)
def test_psycopg2_replaces_terminated_connection(loaded, function_database):
    module = loaded(PSYCOPG2)
    module.fetch_all("SELECT 1")

    function_database.view.terminate()
    rows = module.fetch_all("SELECT 1")

    assert rows == [(1,)]
    assert function_database.view.connections_opened() == 2


class TestPsycopg2ConnectTimeout:
    @pytest.mark.snippet(PSYCOPG2)
    def test_call_fails_within_timeout(self, loaded, silent_server, monkeypatch):
        monkeypatch.setenv("DATABASE_URL", silent_server.url())
        module = loaded(PSYCOPG2)
        context = LambdaContext(timeout_seconds=FUNCTION_TIMEOUT_SECONDS)

        started = time.monotonic()
        with pytest.raises(psycopg2.OperationalError, match="timeout expired"):
            module.fetch_all("SELECT 1")
        elapsed = time.monotonic() - started

        assert elapsed >= module.CONNECT_TIMEOUT_SECONDS - EARLY_SECONDS
        assert elapsed < module.CONNECT_TIMEOUT_SECONDS + MARGIN_SECONDS
        assert context.get_remaining_time_in_millis() > 0


@pytest.mark.parametrize("python", PYTHON_MODULES)
def test_keepalives_reach_socket(python, loaded, function_database):
    module = loaded(python.path)
    module.fetch_all("SELECT 1")

    options = socket_options(python_connection_fd(module))

    assert options["SO_KEEPALIVE"] == 1
    assert options["TCP_KEEPIDLE"] == module.KEEPALIVES["keepalives_idle"]
    assert options["TCP_KEEPINTVL"] == module.KEEPALIVES["keepalives_interval"]
    assert options["TCP_KEEPCNT"] == module.KEEPALIVES["keepalives_count"]


@pytest.fixture(scope="module")
def node_modules() -> Path:
    return require_node()


@pytest.fixture
def node_caller(
    node_modules: Path, snippets: SnippetLoader, tmp_path: Path
) -> Callable[..., NodeHandlerProcess]:
    """Start a node process that imports the module (or a changed copy) behind NODE_CALLER."""
    processes: list[NodeHandlerProcess] = []

    def start(
        database_url: str, replacements: tuple[tuple[str, str], ...] = ()
    ) -> NodeHandlerProcess:
        directory = tmp_path / f"caller-{len(processes)}"
        prepare_workspace(
            directory,
            {
                "node_postgres_timeouts.mjs": snippets.source(NODE, replacements),
                "caller.mjs": NODE_CALLER,
            },
        )
        process = NodeHandlerProcess(directory / "caller.mjs", {"DATABASE_URL": database_url})
        processes.append(process)
        process.start()
        return process

    yield start
    for process in processes:
        process.close()


def timed_invoke(
    caller: NodeHandlerProcess, event: dict[str, Any], timeout_ms: int
) -> tuple[Invocation, float]:
    started = time.monotonic()
    invocation = caller.invoke(event, timeout_ms=timeout_ms)
    return invocation, time.monotonic() - started


SELECT_ONE = {"text": "SELECT 1 AS one"}
LONG_SLEEP = {"text": "SELECT pg_sleep($1)", "values": [LONG_SLEEP_SECONDS]}
FUNCTION_TIMEOUT_MS = int(FUNCTION_TIMEOUT_SECONDS * 1000)
# The module's CONNECTION_TIMEOUT_MILLIS and KEEPALIVE_INITIAL_DELAY_MILLIS, in seconds.
NODE_CONNECTION_TIMEOUT_SECONDS = 3.0
NODE_KEEPALIVE_INITIAL_DELAY_SECONDS = 2.0


@pytest.mark.snippet(NODE)
class TestNodePostgres:
    def test_connect_fails_within_timeout(self, node_caller, silent_server):
        caller = node_caller(silent_server.url())

        invocation, elapsed = timed_invoke(caller, SELECT_ONE, FUNCTION_TIMEOUT_MS)

        assert invocation.error is not None
        assert "connection timeout" in invocation.error.message
        assert elapsed >= NODE_CONNECTION_TIMEOUT_SECONDS - EARLY_SECONDS
        assert elapsed < NODE_CONNECTION_TIMEOUT_SECONDS + MARGIN_SECONDS

    def test_url_connect_timeout_applied(self, node_caller, silent_server):
        caller = node_caller(f"{silent_server.url()}?connect_timeout=1")

        invocation, elapsed = timed_invoke(caller, SELECT_ONE, FUNCTION_TIMEOUT_MS)

        assert invocation.error is not None
        assert elapsed < NODE_CONNECTION_TIMEOUT_SECONDS

    def test_invalid_url_connect_timeout_named(self, node_caller, database):
        caller = node_caller(f"{database.url}&connect_timeout=soon")

        invocation = caller.invoke(SELECT_ONE)

        assert invocation.error is not None
        assert "connect_timeout=soon" in invocation.error.message

    def test_invalid_url_named_not_echoed(self, node_caller):
        caller = node_caller("postgresql://app:s3cret@[db.example/app")

        invocation = caller.invoke(SELECT_ONE)

        assert invocation.error is not None
        assert "DATABASE_URL is not a valid URL" in invocation.error.message
        assert "s3cret" not in invocation.error.message
        assert "s3cret" not in invocation.error.stack

    def test_missing_database_url_named(self, node_caller):
        caller = node_caller("")

        invocation = caller.invoke(SELECT_ONE)

        assert invocation.error is not None
        assert "DATABASE_URL is not set" in invocation.error.message

    def test_long_query_cancelled(self, node_caller, database):
        caller = node_caller(database.url, NODE_SHORT_STATEMENT_TIMEOUT)

        cancelled, elapsed = timed_invoke(caller, LONG_SLEEP, FUNCTION_TIMEOUT_MS)
        after = caller.invoke(SELECT_ONE)

        assert cancelled.error is not None
        assert cancelled.error.code == "57014"
        assert elapsed < SHORT_STATEMENT_TIMEOUT_MS / 1000 + MARGIN_SECONDS
        assert after.result == [{"one": 1}]
        # The pool destroys a client whose query failed, so the next call reconnects.
        assert database.view.connections_opened() == 2

    def test_url_statement_timeout_kept(self, node_caller, database):
        options = f"-c%20statement_timeout%3D{SHORT_STATEMENT_TIMEOUT_MS}"
        caller = node_caller(f"{database.url}&options={options}")

        cancelled, elapsed = timed_invoke(caller, LONG_SLEEP, FUNCTION_TIMEOUT_MS)

        assert cancelled.error is not None
        assert cancelled.error.code == "57014"
        assert elapsed < SHORT_STATEMENT_TIMEOUT_MS / 1000 + MARGIN_SECONDS

    def test_keepalive_timer_armed(self, node_caller, database):
        caller = node_caller(database.url)

        port = caller.invoke({"localPort": True}).result
        kind, seconds_left = tcp_timer(port)

        assert kind == KEEPALIVE_TIMER
        assert seconds_left <= NODE_KEEPALIVE_INITIAL_DELAY_SECONDS


def test_idle_transaction_session_ended(database, backend):
    options = "options=-c%20idle_in_transaction_session_timeout%3D200"
    connection = psycopg.connect(f"{database.url}&{options}")
    connection.execute("SELECT 1")
    time.sleep(0.6)

    with connection, pytest.raises(psycopg.Error) as raised:
        connection.execute("SELECT 1")

    if backend.is_cockroachdb:
        pytest.skip("the page cites no SQLSTATE for this timeout on CockroachDB")
    assert raised.value.sqlstate == "25P03"


def test_pg_ignores_url_connect_timeout(node_modules, silent_server, tmp_path):
    # The library behaviour that makes the module read connect_timeout from the URL itself.
    wait_millis = int((1 + MARGIN_SECONDS + 1) * 1000)
    source = NODE_URL_CONNECT_TIMEOUT.replace("WAIT_MILLIS", str(wait_millis))

    result = run_javascript(
        tmp_path, source, env={"DATABASE_URL": f"{silent_server.url()}?connect_timeout=1"}
    )

    assert result.stdout.strip() == "still waiting"


class TestBrokenCopiesFail:
    """Each check above goes red when the module loses the setting the page calls for."""

    @pytest.mark.snippet(PSYCOPG)
    def test_psycopg_no_connect_timeout_waits(self, loaded, silent_server):
        module = loaded(PSYCOPG, PSYCOPG_NO_CONNECT_TIMEOUT)
        settings = module.connection_settings(silent_server.url())

        waiter = Waiter(lambda: psycopg.connect(settings))
        still_waiting = waiter.waiting_after(module.CONNECT_TIMEOUT_SECONDS + MARGIN_SECONDS)
        silent_server.stop()
        waiter.finish()

        assert still_waiting

    @pytest.mark.snippet(PSYCOPG)
    def test_pool_no_connect_timeout_never_retries(self, loaded, silent_server, monkeypatch):
        monkeypatch.setenv("DATABASE_URL", silent_server.url())
        module = loaded(PSYCOPG, PSYCOPG_NO_CONNECT_TIMEOUT)

        with pytest.raises(PoolTimeout):
            module.fetch_all("SELECT 1")
        time.sleep(RETRY_WAIT_SECONDS)

        # The worker is still inside its first attempt, so the pool cannot try again.
        assert silent_server.accepted == 1

    @pytest.mark.snippet(PSYCOPG)
    def test_no_pool_timeout_waits(self, loaded, silent_server, monkeypatch):
        monkeypatch.setenv("DATABASE_URL", silent_server.url())
        module = loaded(PSYCOPG, NO_POOL_TIMEOUT)

        waiter = Waiter(lambda: module.fetch_all("SELECT 1"))
        still_waiting = waiter.waiting_after(module.POOL_TIMEOUT_SECONDS + MARGIN_SECONDS)
        # Closing the pool fails the waiting checkout with PoolClosed.
        silent_server.stop()
        module.pool.close(timeout=1.0)
        waiter.finish()

        assert still_waiting

    @pytest.mark.snippet(PSYCOPG2)
    def test_psycopg2_no_connect_timeout_waits(self, loaded, silent_server, monkeypatch):
        monkeypatch.setenv("DATABASE_URL", silent_server.url())
        module = loaded(PSYCOPG2, PSYCOPG2_NO_CONNECT_TIMEOUT)

        waiter = Waiter(lambda: module.fetch_all("SELECT 1"))
        still_waiting = waiter.waiting_after(module.CONNECT_TIMEOUT_SECONDS + MARGIN_SECONDS)
        silent_server.stop()
        waiter.finish()

        assert still_waiting

    @pytest.mark.snippet(PSYCOPG2)
    def test_psycopg2_closed_flag_misses_termination(self, loaded, function_database):
        module = loaded(PSYCOPG2, PSYCOPG2_CLOSED_FLAG_CHECK)
        module.fetch_all("SELECT 1")

        function_database.view.terminate()

        with pytest.raises(psycopg2.OperationalError):
            module.fetch_all("SELECT 1")

    @pytest.mark.parametrize("python", PYTHON_MODULES)
    def test_no_statement_timeout_runs_on(self, python, loaded, function_database):
        module = loaded(python.path, NO_STATEMENT_TIMEOUT)

        started = time.monotonic()
        module.fetch_all("SELECT pg_sleep(%s)", (LONG_SLEEP_SECONDS,))
        elapsed = time.monotonic() - started

        assert elapsed >= LONG_SLEEP_SECONDS

    @pytest.mark.parametrize("python", PYTHON_MODULES)
    def test_no_keepalives_system_default(self, python, loaded, function_database):
        module = loaded(python.path, NO_KEEPALIVES)
        module.fetch_all("SELECT 1")

        options = socket_options(python_connection_fd(module))

        assert options["TCP_KEEPIDLE"] != module.KEEPALIVES["keepalives_idle"]

    @pytest.mark.snippet(NODE)
    def test_node_no_connection_timeout_outlives_limit(self, node_caller, silent_server):
        caller = node_caller(silent_server.url(), NODE_NO_CONNECTION_TIMEOUT)
        limit_ms = int((NODE_CONNECTION_TIMEOUT_SECONDS + MARGIN_SECONDS) * 1000)

        invocation, _ = timed_invoke(caller, SELECT_ONE, limit_ms)
        silent_server.stop()

        # The driver ends the invocation at its deadline, as Lambda would.
        assert invocation.error is not None
        assert invocation.error.name == "TimeoutError"

    @pytest.mark.snippet(NODE)
    def test_node_no_statement_timeout_runs_on(self, node_caller, database):
        caller = node_caller(database.url, NODE_NO_STATEMENT_TIMEOUT)

        invocation, elapsed = timed_invoke(caller, LONG_SLEEP, FUNCTION_TIMEOUT_MS)

        assert invocation.error is None
        assert elapsed >= LONG_SLEEP_SECONDS

    @pytest.mark.snippet(NODE)
    def test_node_no_keepalive_no_timer(self, node_caller, database):
        caller = node_caller(database.url, NODE_NO_KEEPALIVE)

        port = caller.invoke({"localPort": True}).result
        kind, _ = tcp_timer(port)

        assert kind != KEEPALIVE_TIMER
