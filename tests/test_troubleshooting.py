"""Cause each error the troubleshooting page quotes, compare it with the page, then fix it.

Each test makes its error happen on purpose and then shows the fix the page gives making it
go away. The page keeps every message in a ```text fence whose title names the library and
the error. The tests read those fences, so a message that changes with a new library release
fails here instead of drifting on the page. HOST, PORT, DATABASE and HOME on the page stand
for values that differ between runs, and the tests put the same words in their place.
"""

from __future__ import annotations

import json
import re
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import psycopg2
import psycopg2.pool
import pytest
import sqlalchemy.exc
from psycopg_pool import ConnectionPool, PoolTimeout

from tests.harness.databases import TestDatabase
from tests.harness.node import (
    NodeHandlerProcess,
    NodeProcessError,
    prepare_workspace,
    require_node,
    run_javascript,
)
from tests.harness.roles import login_role, run_as_admin
from tests.harness.silent_server import SilentServer
from tests.harness.snippets import ROOT, SnippetLoader
from tests.harness.tls_server import (
    FUNCTION_ROLE,
    LOOPBACK_HOST_NAME,
    CertificateAuthority,
    TlsPostgres,
    running_tls_server,
)

PAGE = ROOT / "docs" / "troubleshooting.md"
MESSAGE_FENCE = re.compile(
    r'^(?P<indent>[ ]*)```text title="(?P<title>[^"]+)"\n(?P<body>.*?)\n(?P=indent)```[ ]*$',
    re.M | re.S,
)

SCHEMA = "lambda/schema.sql"
PSYCOPG2_POOL = "pool/psycopg2_pool.py"
PSYCOPG_POOL = "pool/psycopg_pool_example.py"
SQLALCHEMY_POOL = "pool/sqlalchemy_pool.py"
NODE_POOL = "pool/pool.mjs"
PSYCOPG_RETRY = "retries/psycopg_retry.py"
TLS_HANDLER = "tls/handler.py"
NODE_TLS_HANDLER = "tls/handler.mjs"

# Titles of the page's message fences, one per error the tests cause.
PSYCOPG2_EXHAUSTED = "psycopg2: psycopg2.pool.PoolError"
PSYCOPG_POOL_TIMEOUT = "psycopg_pool: psycopg_pool.PoolTimeout"
SQLALCHEMY_POOL_TIMEOUT = "SQLAlchemy: sqlalchemy.exc.TimeoutError"
NODE_POOL_TIMEOUT = "node-postgres: error from pool.connect()"
PSYCOPG_ADMIN_SHUTDOWN = "psycopg: psycopg.errors.AdminShutdown"
PSYCOPG2_SERVER_CLOSED = "psycopg2: psycopg2.OperationalError"
NODE_NOT_QUERYABLE = "node-postgres: error from client.query()"
NODE_TERMINATED = "node-postgres: error event on the client"
PSYCOPG_TOO_MANY = "psycopg: psycopg.OperationalError at the connection limit"
NODE_TOO_MANY = "node-postgres: error at the connection limit"
PSYCOPG_SERIALIZATION = "psycopg: psycopg.errors.SerializationFailure"
PSYCOPG_NO_ROOT_CERTIFICATE = "psycopg: no root certificate"
PSYCOPG_HOST_MISMATCH = "psycopg: host name mismatch"
NODE_NO_CA = "node-postgres: no CA certificate"
NODE_HOST_MISMATCH = "node-postgres: host name mismatch"
PSYCOPG_CONNECT_TIMEOUT = "psycopg: psycopg.errors.ConnectionTimeout"
PSYCOPG2_CONNECT_TIMEOUT = "psycopg2: psycopg2.OperationalError on connect"
NODE_CONNECT_TIMEOUT = "node-postgres: error from pool.query() on connect"
PSYCOPG_STATEMENT_TIMEOUT = "psycopg: psycopg.errors.QueryCanceled"
NODE_STATEMENT_TIMEOUT = "node-postgres: error from pool.query(), code 57014"

TESTED_MESSAGES = {
    PSYCOPG2_EXHAUSTED,
    PSYCOPG_POOL_TIMEOUT,
    SQLALCHEMY_POOL_TIMEOUT,
    NODE_POOL_TIMEOUT,
    PSYCOPG_ADMIN_SHUTDOWN,
    PSYCOPG2_SERVER_CLOSED,
    NODE_NOT_QUERYABLE,
    NODE_TERMINATED,
    PSYCOPG_TOO_MANY,
    NODE_TOO_MANY,
    PSYCOPG_SERIALIZATION,
    PSYCOPG_NO_ROOT_CERTIFICATE,
    PSYCOPG_HOST_MISMATCH,
    NODE_NO_CA,
    NODE_HOST_MISMATCH,
    PSYCOPG_CONNECT_TIMEOUT,
    PSYCOPG2_CONNECT_TIMEOUT,
    NODE_CONNECT_TIMEOUT,
    PSYCOPG_STATEMENT_TIMEOUT,
    NODE_STATEMENT_TIMEOUT,
}
# Messages that only CockroachDB sends. The page quotes them from CockroachDB's source and
# documentation, and the PostgreSQL stand-in cannot produce them.
COCKROACHDB_MESSAGES = {
    "CockroachDB Cloud: missing cluster identifier",
    "CockroachDB: restart transaction",
}

# Short waits keep the tests fast, and the page names the values that the messages contain.
POOL_WAIT_SECONDS = 1
CONNECT_TIMEOUT_SECONDS = 2  # libpq raises anything lower to 2 seconds
NODE_CONNECT_TIMEOUT_MILLIS = 1000
SHORT_STATEMENT_TIMEOUT_MS = 100
LONG_STATEMENT_TIMEOUT_MS = 5000
SLEEP_SECONDS = 0.5
CONNECTION_LIMIT = 2
CALLS = 3
TLS_PASSWORD = "troubleshooting-password"

PSYCOPG_POOL_SHORT_WAIT = (("timeout=5.0,", f"timeout={POOL_WAIT_SECONDS}.0,"),)
SQLALCHEMY_SHORT_WAIT = (("pool_timeout=5,", f"pool_timeout={POOL_WAIT_SECONDS},"),)
NODE_POOL_SHORT_WAIT = (
    ("connectionTimeoutMillis: 5000,", f"connectionTimeoutMillis: {POOL_WAIT_SECONDS * 1000},"),
)
PSYCOPG_POOL_NO_CHECK = (("                check=ConnectionPool.check_connection,\n", ""),)
PSYCOPG2_POOL_NO_CHECK = (("    if not is_usable(conn):\n", "    if False:\n"),)
NODE_POOL_NO_CLIENT_LISTENER = (('  client.on("error", logClientError);\n', ""),)
# The start of the line that pool.mjs logs for an error event on a checked-out client.
CLIENT_ERROR_LOG = "database connection failed while checked out: "

# A handler around pool.mjs for the node-postgres cases. The "leak" action checks a client
# out and keeps it until "return-leaked". The "end-session" action has the server end the
# checked-out client's session before the handler's query runs, as a restart would.
NODE_CALLER = """\
import pg from "pg";
import { getPool, withClient } from "./pool.mjs";

export { getPool };

async function endOwnSession(client) {
  const { rows } = await client.query("SELECT pg_backend_pid() AS pid");
  const admin = new pg.Client({ connectionString: process.env.DATABASE_URL });
  await admin.connect();
  try {
    await admin.query("SELECT pg_terminate_backend($1)", [rows[0].pid]);
  } finally {
    await admin.end();
  }
  // Gives the client's socket time to report the end before the next query.
  await new Promise((resolve) => setTimeout(resolve, 200));
}

// Clients the "leak" action checked out, kept so that the test can hand them back at the end.
const leaked = [];

export const handler = async (event) => {
  if (event.action === "leak") {
    leaked.push(await getPool().connect());
    return "leaked";
  }
  if (event.action === "return-leaked") {
    for (const client of leaked.splice(0)) {
      client.release();
    }
    return "returned";
  }
  return withClient(async (client) => {
    if (event.action === "end-session") {
      await endOwnSession(client);
    }
    const result = await client.query("SELECT 1 AS one");
    return result.rows;
  });
};
"""


# --- The page's messages --------------------------------------------------------------------


def page_messages() -> dict[str, str]:
    """Return the page's quoted messages by fence title, each line stripped."""
    text = PAGE.read_text("utf-8")
    messages: dict[str, str] = {}
    for match in MESSAGE_FENCE.finditer(text):
        title = match.group("title")
        if title in messages:
            raise AssertionError(f"docs/troubleshooting.md has two message fences titled {title!r}")
        messages[title] = normalized(textwrap.dedent(match.group("body")))
    return messages


def quoted(title: str) -> str:
    messages = page_messages()
    if title not in messages:
        raise AssertionError(
            f'docs/troubleshooting.md has no fence ```text title="{title}"```; '
            "add it with the message this test observes"
        )
    return messages[title]


def normalized(message: str) -> str:
    """Return *message* with its lines stripped and blank lines dropped, as the page shows it."""
    lines = [line.strip() for line in message.strip().splitlines()]
    return "\n".join(line for line in lines if line)


def generalized(message: str, placeholders: dict[str, str]) -> str:
    """Return *message* with each value of this run replaced by the page's placeholder."""
    for value, placeholder in placeholders.items():
        message = message.replace(value, placeholder)
    return normalized(message)


def server_address(url: str) -> dict[str, str]:
    """Map the host and port of *url*, as libpq prints them, to the page's placeholders."""
    parts = urlsplit(url)
    return {f'"{parts.hostname}", port {parts.port}': '"HOST", port PORT'}


def test_every_quoted_message_tested():
    titles = set(page_messages())

    assert titles - COCKROACHDB_MESSAGES == TESTED_MESSAGES
    assert titles >= COCKROACHDB_MESSAGES


# --- Shared setup ---------------------------------------------------------------------------


@pytest.fixture
def events_database(
    database: TestDatabase, snippets: SnippetLoader, monkeypatch: pytest.MonkeyPatch
) -> TestDatabase:
    """The test database with the events table, set as the function's DATABASE_URL."""
    database.execute_file(snippets.path(SCHEMA))
    monkeypatch.setenv("DATABASE_URL", database.url)
    return database


@pytest.fixture(scope="module")
def node_modules() -> Path:
    return require_node()


@pytest.fixture
def node_caller(
    node_modules: Path, snippets: SnippetLoader, tmp_path: Path
) -> Iterator[Callable[..., NodeHandlerProcess]]:
    """Start node processes that import NODE_CALLER beside pool.mjs or a changed copy of it."""
    processes: list[NodeHandlerProcess] = []

    def start(url: str, replacements: tuple[tuple[str, str], ...] = ()) -> NodeHandlerProcess:
        directory = tmp_path / f"caller-{len(processes)}"
        prepare_workspace(
            directory,
            {"pool.mjs": snippets.source(NODE_POOL, replacements), "caller.mjs": NODE_CALLER},
        )
        process = NodeHandlerProcess(directory / "caller.mjs", {"DATABASE_URL": url})
        processes.append(process)
        process.start()
        return process

    yield start
    for process in processes:
        process.close()


def run_node_script(directory: Path, source: str, environment: dict[str, str]) -> dict:
    """Run a script that prints one JSON object, and return that object."""
    result = run_javascript(directory, source, env=environment)

    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- Connection pool exhausted --------------------------------------------------------------


@pytest.mark.snippet(SCHEMA)
@pytest.mark.snippet(PSYCOPG2_POOL)
def test_psycopg2_pool_exhausted(events_database, snippets):
    leaky = snippets.load(PSYCOPG2_POOL)
    leaky.get_pool().getconn()

    with pytest.raises(psycopg2.pool.PoolError) as raised:
        leaky.record_event("after-leak", "message")

    fixed = snippets.load(PSYCOPG2_POOL)
    for number in range(CALLS):
        fixed.record_event(f"request-{number}", "message")

    assert normalized(str(raised.value)) == quoted(PSYCOPG2_EXHAUSTED)
    assert events_database.count_rows("events") == CALLS


@pytest.mark.snippet(SCHEMA)
@pytest.mark.snippet(PSYCOPG_POOL)
def test_psycopg_pool_timeout(events_database, snippets):
    leaky = snippets.load(PSYCOPG_POOL, PSYCOPG_POOL_SHORT_WAIT)
    leaky.get_pool().getconn()

    with pytest.raises(PoolTimeout) as raised:
        leaky.record_event("after-leak", "message")

    fixed = snippets.load(PSYCOPG_POOL, PSYCOPG_POOL_SHORT_WAIT)
    for number in range(CALLS):
        fixed.record_event(f"request-{number}", "message")

    assert normalized(str(raised.value)) == quoted(PSYCOPG_POOL_TIMEOUT)
    assert events_database.count_rows("events") == CALLS


@pytest.mark.snippet(SCHEMA)
@pytest.mark.snippet(SQLALCHEMY_POOL)
def test_sqlalchemy_pool_timeout(events_database, snippets):
    leaky = snippets.load(SQLALCHEMY_POOL, SQLALCHEMY_SHORT_WAIT)
    leaked = leaky.get_engine().connect()

    with pytest.raises(sqlalchemy.exc.TimeoutError) as raised:
        leaky.record_event("after-leak", "message")
    leaked.close()

    fixed = snippets.load(SQLALCHEMY_POOL, SQLALCHEMY_SHORT_WAIT)
    for number in range(CALLS):
        fixed.record_event(f"request-{number}", "message")

    assert normalized(str(raised.value)) == quoted(SQLALCHEMY_POOL_TIMEOUT)
    assert events_database.count_rows("events") == CALLS


@pytest.mark.snippet(NODE_POOL)
def test_node_pool_timeout(node_caller, database):
    leaky = node_caller(database.url, NODE_POOL_SHORT_WAIT)
    leaky.invoke({"action": "leak"})
    exhausted = leaky.invoke({"action": "query"})
    # Otherwise the process waits for the leaked client when it ends its pool.
    leaky.invoke({"action": "return-leaked"})

    fixed = node_caller(database.url, NODE_POOL_SHORT_WAIT)
    calls = [fixed.invoke({"action": "query"}) for _ in range(CALLS)]

    assert exhausted.error is not None
    assert normalized(exhausted.error.message) == quoted(NODE_POOL_TIMEOUT)
    assert [call.error for call in calls] == [None] * CALLS


# --- Connection ended by the server ---------------------------------------------------------


@pytest.mark.snippet(SCHEMA)
@pytest.mark.snippet(PSYCOPG_POOL)
def test_psycopg_admin_shutdown(events_database, snippets):
    unchecked = snippets.load(PSYCOPG_POOL, PSYCOPG_POOL_NO_CHECK)
    unchecked.record_event("before-unchecked", "message")
    events_database.view.terminate()

    with pytest.raises(psycopg.errors.AdminShutdown) as raised:
        unchecked.record_event("after-unchecked", "message")

    checked = snippets.load(PSYCOPG_POOL)
    checked.record_event("before-checked", "message")
    events_database.view.terminate()
    checked.record_event("after-checked", "message")

    assert normalized(str(raised.value)) == quoted(PSYCOPG_ADMIN_SHUTDOWN)
    assert raised.value.sqlstate == "57P01"
    assert events_database.count_rows("events") == 3


@pytest.mark.snippet(SCHEMA)
@pytest.mark.snippet(PSYCOPG2_POOL)
def test_psycopg2_server_closed(events_database, snippets):
    unchecked = snippets.load(PSYCOPG2_POOL, PSYCOPG2_POOL_NO_CHECK)
    unchecked.record_event("before-unchecked", "message")
    events_database.view.terminate()

    with pytest.raises(psycopg2.OperationalError) as raised:
        unchecked.record_event("after-unchecked", "message")

    checked = snippets.load(PSYCOPG2_POOL)
    checked.record_event("before-checked", "message")
    events_database.view.terminate()
    checked.record_event("after-checked", "message")

    assert normalized(str(raised.value)) == quoted(PSYCOPG2_SERVER_CLOSED)
    assert raised.value.pgcode is None
    assert events_database.count_rows("events") == 3


@pytest.mark.snippet(NODE_POOL)
def test_node_session_ended_while_checked_out(node_caller, database):
    function = node_caller(database.url)

    ended = function.invoke({"action": "end-session"})
    after = function.invoke({"action": "query"})
    logged = function.output.splitlines()

    assert ended.error is not None
    assert normalized(ended.error.message) == quoted(NODE_NOT_QUERYABLE)
    # The first event carries the server's message, which the psycopg entry quotes.
    assert f"{CLIENT_ERROR_LOG}{quoted(PSYCOPG_ADMIN_SHUTDOWN)}" in logged
    assert f"{CLIENT_ERROR_LOG}{quoted(NODE_TERMINATED)}" in logged
    assert after.error is None
    assert after.result == [{"one": 1}]


@pytest.mark.snippet(NODE_POOL)
def test_node_client_without_listener_crashes(node_caller, database):
    function = node_caller(database.url, NODE_POOL_NO_CLIENT_LISTENER)

    with pytest.raises(NodeProcessError) as raised:
        function.invoke({"action": "end-session"})

    assert "exited with code 1" in str(raised.value)
    assert "Unhandled 'error' event" in function.output


# --- Too many connections (SQLSTATE 53300) --------------------------------------------------


@pytest.fixture
def limited_url(database: TestDatabase) -> Iterator[str]:
    """A URL for a role of the test's own, on a database that accepts CONNECTION_LIMIT sessions.

    Superusers ignore a database's connection limit, so the test connects as another role.
    """
    if database.backend.is_cockroachdb:
        pytest.skip(
            "CONNECTION LIMIT is PostgreSQL's; CockroachDB limits connections per node with "
            "server.max_connections_per_gateway"
        )
    with login_role(database) as role:
        run_as_admin(
            database, f"ALTER DATABASE {database.name} CONNECTION LIMIT {CONNECTION_LIMIT}"
        )
        yield role.url


def test_psycopg_too_many_connections(database, limited_url):
    # One connection per function instance, as with a pool maximum of 1.
    within_limit = [psycopg.connect(limited_url) for _ in range(CONNECTION_LIMIT)]

    with pytest.raises(psycopg.OperationalError) as raised:
        psycopg.connect(limited_url)
    answers = [connection.execute("SELECT 1").fetchone()[0] for connection in within_limit]
    for connection in within_limit:
        connection.close()

    placeholders = {**server_address(limited_url), database.name: "DATABASE"}
    assert generalized(str(raised.value), placeholders) == quoted(PSYCOPG_TOO_MANY)
    assert answers == [1] * CONNECTION_LIMIT


# Opens one client per instance within the limit, then one more, and reports what each got.
NODE_LIMIT_SCRIPT = """\
import pg from "pg";

const url = process.env.DATABASE_URL;
const withinLimit = Number(process.env.CONNECTION_LIMIT);
const clients = [];
const answers = [];
for (let number = 0; number < withinLimit; number += 1) {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  clients.push(client);
  answers.push((await client.query("SELECT 1 AS one")).rows[0].one);
}

let refused = null;
const extra = new pg.Client({ connectionString: url });
try {
  await extra.connect();
  await extra.end();
} catch (error) {
  refused = { message: error.message, code: error.code ?? null };
}
await Promise.all(clients.map((client) => client.end()));
console.log(JSON.stringify({ answers, refused }));
"""


def test_node_too_many_connections(node_modules, database, limited_url, tmp_path):
    outcome = run_node_script(
        tmp_path,
        NODE_LIMIT_SCRIPT,
        {"DATABASE_URL": limited_url, "CONNECTION_LIMIT": str(CONNECTION_LIMIT)},
    )

    refused = outcome["refused"]
    assert refused is not None
    assert generalized(refused["message"], {database.name: "DATABASE"}) == quoted(NODE_TOO_MANY)
    assert refused["code"] == "53300"
    assert outcome["answers"] == [1] * CONNECTION_LIMIT


# --- Restart transaction (SQLSTATE 40001) ---------------------------------------------------


class ConflictingBooking:
    """A transaction body that another session overtakes on its first run only."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.runs = 0

    def __call__(self, connection: psycopg.Connection) -> None:
        self.runs += 1
        connection.execute("SELECT holder FROM seats WHERE id = 1").fetchone()
        if self.runs == 1:
            with psycopg.connect(self.url, autocommit=True) as other:
                other.execute("UPDATE seats SET holder = 'other' WHERE id = 1")
        connection.execute("UPDATE seats SET holder = 'function' WHERE id = 1")


@pytest.fixture
def seats(database: TestDatabase) -> TestDatabase:
    with database.connect() as connection:
        connection.execute("CREATE TABLE seats (id INT PRIMARY KEY, holder TEXT)")
        connection.execute("INSERT INTO seats (id) VALUES (1)")
    return database


def seat_holder(database: TestDatabase) -> str:
    with database.connect() as connection:
        return connection.execute("SELECT holder FROM seats WHERE id = 1").fetchone()[0]


@pytest.mark.snippet(PSYCOPG_RETRY)
def test_psycopg_serialization_failure(seats, snippets):
    unretried = ConflictingBooking(seats.url)
    with psycopg.connect(seats.url) as connection:
        connection.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
        with pytest.raises(psycopg.errors.SerializationFailure) as raised:
            unretried(connection)

    retry = snippets.load(PSYCOPG_RETRY)
    retried = ConflictingBooking(seats.url)
    with ConnectionPool(seats.url, min_size=0, max_size=1, open=True) as pool:
        retry.run_transaction(pool, retried)

    assert normalized(str(raised.value)) == quoted(PSYCOPG_SERIALIZATION)
    assert raised.value.sqlstate == "40001"
    assert retried.runs == 2
    assert seat_holder(seats) == "function"


# --- TLS certificate errors -----------------------------------------------------------------


@pytest.fixture(scope="module")
def authority() -> CertificateAuthority:
    return CertificateAuthority("Troubleshooting test cluster CA")


@pytest.fixture(scope="module")
def tls_server(authority: CertificateAuthority) -> Iterator[TlsPostgres]:
    with running_tls_server(authority, FUNCTION_ROLE, TLS_PASSWORD) as server:
        yield server


@pytest.fixture
def empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # libpq looks for ~/.postgresql/root.crt in HOME, which a function does not control.
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def package(tmp_path: Path, authority: CertificateAuthority) -> Path:
    """A deployment package with the cluster's CA certificate as certs/root.crt."""
    directory = tmp_path / "task"
    authority.write_certificate(directory / "certs" / "root.crt")
    return directory


def invoke_python_tls_handler(
    snippets: SnippetLoader, package: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> dict:
    monkeypatch.setenv("LAMBDA_TASK_ROOT", str(package))
    monkeypatch.setenv("DATABASE_URL", url)
    return snippets.load(TLS_HANDLER).handler({}, None)


@pytest.mark.snippet(TLS_HANDLER)
def test_psycopg_no_root_certificate(tls_server, empty_home, package, snippets, monkeypatch):
    url = tls_server.role_url(FUNCTION_ROLE, TLS_PASSWORD)

    with pytest.raises(psycopg.OperationalError) as raised:
        psycopg.connect(url, sslmode="verify-full")
    fixed = invoke_python_tls_handler(snippets, package, url, monkeypatch)

    placeholders = {
        str(empty_home): "HOME",
        **server_address(f"postgresql://127.0.0.1:{tls_server.port}"),
    }
    assert generalized(str(raised.value), placeholders) == quoted(PSYCOPG_NO_ROOT_CERTIFICATE)
    assert fixed["statusCode"] == 200


@pytest.mark.snippet(TLS_HANDLER)
def test_psycopg_host_name_mismatch(tls_server, empty_home, package, snippets, monkeypatch):
    other_name_url = tls_server.role_url(FUNCTION_ROLE, TLS_PASSWORD, host_name="other.guide.test")
    certificate_name_url = tls_server.role_url(FUNCTION_ROLE, TLS_PASSWORD)
    ca_file = str(package / "certs" / "root.crt")

    with pytest.raises(psycopg.OperationalError) as raised:
        psycopg.connect(other_name_url, sslmode="verify-full", sslrootcert=ca_file)
    fixed = invoke_python_tls_handler(snippets, package, certificate_name_url, monkeypatch)

    placeholders = server_address(f"postgresql://127.0.0.1:{tls_server.port}")
    assert generalized(str(raised.value), placeholders) == quoted(PSYCOPG_HOST_MISMATCH)
    assert fixed["statusCode"] == 200


# Connects once with TLS verification on and reports the error, if any.
NODE_TLS_SCRIPT = """\
import { readFileSync } from "node:fs";
import pg from "pg";

const ssl = { rejectUnauthorized: true };
if (process.env.CA_FILE) {
  ssl.ca = readFileSync(process.env.CA_FILE, "utf8");
}
const client = new pg.Client({ connectionString: process.env.DATABASE_URL, ssl });
let failure = null;
try {
  await client.connect();
  await client.end();
} catch (error) {
  failure = { message: error.message, code: error.code ?? null };
}
console.log(JSON.stringify({ failure }));
"""


def node_tls_url(server: TlsPostgres, host: str) -> str:
    return f"postgresql://{FUNCTION_ROLE}:{TLS_PASSWORD}@{host}:{server.port}/postgres"


def invoke_node_tls_handler(snippets: SnippetLoader, package: Path, url: str):
    prepare_workspace(package, {"handler.mjs": snippets.source(NODE_TLS_HANDLER)})
    environment = {"DATABASE_URL": url, "LAMBDA_TASK_ROOT": str(package)}
    with NodeHandlerProcess(package / "handler.mjs", environment) as function:
        return function.invoke({})


@pytest.mark.snippet(NODE_TLS_HANDLER)
def test_node_no_ca_certificate(node_modules, tls_server, package, snippets, tmp_path):
    url = node_tls_url(tls_server, LOOPBACK_HOST_NAME)

    outcome = run_node_script(tmp_path / "script", NODE_TLS_SCRIPT, {"DATABASE_URL": url})
    fixed = invoke_node_tls_handler(snippets, package, url)

    failure = outcome["failure"]
    assert failure is not None
    assert normalized(failure["message"]) == quoted(NODE_NO_CA)
    assert failure["code"] == "UNABLE_TO_VERIFY_LEAF_SIGNATURE"
    assert fixed.status_code == 200


@pytest.mark.snippet(NODE_TLS_HANDLER)
def test_node_host_name_mismatch(node_modules, tls_server, package, snippets, tmp_path):
    address_url = node_tls_url(tls_server, "127.0.0.1")
    environment = {"DATABASE_URL": address_url, "CA_FILE": str(package / "certs" / "root.crt")}

    outcome = run_node_script(tmp_path / "script", NODE_TLS_SCRIPT, environment)
    fixed = invoke_node_tls_handler(snippets, package, node_tls_url(tls_server, LOOPBACK_HOST_NAME))

    failure = outcome["failure"]
    assert failure is not None
    assert normalized(failure["message"]) == quoted(NODE_HOST_MISMATCH)
    assert failure["code"] == "ERR_TLS_CERT_ALTNAME_INVALID"
    assert fixed.status_code == 200


# --- Connect and statement timeouts ---------------------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    with SilentServer() as server:
        yield server


def test_psycopg_connect_timeout(silent_server, database):
    with pytest.raises(psycopg.errors.ConnectionTimeout) as raised:
        psycopg.connect(silent_server.url(), connect_timeout=CONNECT_TIMEOUT_SECONDS)

    with psycopg.connect(database.url, connect_timeout=CONNECT_TIMEOUT_SECONDS) as connection:
        answer = connection.execute("SELECT 1").fetchone()[0]

    assert normalized(str(raised.value)) == quoted(PSYCOPG_CONNECT_TIMEOUT)
    assert answer == 1


def test_psycopg2_connect_timeout(silent_server, database):
    with pytest.raises(psycopg2.OperationalError) as raised:
        psycopg2.connect(silent_server.url(), connect_timeout=CONNECT_TIMEOUT_SECONDS)

    connection = psycopg2.connect(database.url, connect_timeout=CONNECT_TIMEOUT_SECONDS)
    connection.close()

    placeholders = server_address(silent_server.url())
    assert generalized(str(raised.value), placeholders) == quoted(PSYCOPG2_CONNECT_TIMEOUT)
    assert connection.closed == 1


# Runs one query through a pool with the given connect timeout and reports the outcome.
NODE_QUERY_SCRIPT = """\
import pg from "pg";

const pool = new pg.Pool({
  connectionString: process.env.DATABASE_URL,
  max: 1,
  connectionTimeoutMillis: Number(process.env.CONNECT_TIMEOUT_MILLIS),
  statement_timeout: Number(process.env.STATEMENT_TIMEOUT_MILLIS),
});
let outcome;
try {
  const result = await pool.query(process.env.QUERY);
  outcome = { rows: result.rows.length };
} catch (error) {
  outcome = { failure: { message: error.message, code: error.code ?? null } };
}
await pool.end();
console.log(JSON.stringify(outcome));
"""


def run_node_query(
    directory: Path, url: str, query: str, statement_timeout_ms: int = LONG_STATEMENT_TIMEOUT_MS
) -> dict:
    environment = {
        "DATABASE_URL": url,
        "QUERY": query,
        "CONNECT_TIMEOUT_MILLIS": str(NODE_CONNECT_TIMEOUT_MILLIS),
        "STATEMENT_TIMEOUT_MILLIS": str(statement_timeout_ms),
    }
    return run_node_script(directory, NODE_QUERY_SCRIPT, environment)


def test_node_connect_timeout(node_modules, silent_server, database, tmp_path):
    silent = run_node_query(tmp_path / "silent", silent_server.url(), "SELECT 1")
    answering = run_node_query(tmp_path / "answering", database.url, "SELECT 1")

    assert normalized(silent["failure"]["message"]) == quoted(NODE_CONNECT_TIMEOUT)
    assert answering == {"rows": 1}


def statement_timeout_url(url: str, milliseconds: int) -> str:
    return f"{url}&options=-c%20statement_timeout%3D{milliseconds}"


def test_psycopg_statement_timeout(database):
    short_url = statement_timeout_url(database.url, SHORT_STATEMENT_TIMEOUT_MS)
    long_url = statement_timeout_url(database.url, LONG_STATEMENT_TIMEOUT_MS)

    with psycopg.connect(short_url) as connection:
        with pytest.raises(psycopg.errors.QueryCanceled) as raised:
            connection.execute("SELECT pg_sleep(%s)", (SLEEP_SECONDS,))
        connection.rollback()
        still_usable = connection.execute("SELECT 1").fetchone()[0]
    with psycopg.connect(long_url) as connection:
        started = time.monotonic()
        connection.execute("SELECT pg_sleep(%s)", (SLEEP_SECONDS,))
        elapsed = time.monotonic() - started

    assert normalized(str(raised.value)) == quoted(PSYCOPG_STATEMENT_TIMEOUT)
    assert raised.value.sqlstate == "57014"
    assert still_usable == 1
    assert elapsed >= SLEEP_SECONDS


def test_node_statement_timeout(node_modules, database, tmp_path):
    query = f"SELECT pg_sleep({SLEEP_SECONDS})"

    cancelled = run_node_query(tmp_path / "short", database.url, query, SHORT_STATEMENT_TIMEOUT_MS)
    completed = run_node_query(tmp_path / "long", database.url, query)

    assert normalized(cancelled["failure"]["message"]) == quoted(NODE_STATEMENT_TIMEOUT)
    assert cancelled["failure"]["code"] == "57014"
    assert completed == {"rows": 1}
