"""Run functions for the tutorial notebooks and count their connections at the database server.

A notebook gets nothing but DATABASE_URL, so the server's side is read through connections of
the notebook's own, marked with OBSERVER_APPLICATION:

- `ServerCounts` counts the sessions a function has open, and the connections the server
  accepted while a block ran;
- `SessionSampler` reads the sessions open at a fixed interval from a background thread;
- `run_storm` starts instances one after another, invokes each from several threads until
  a deadline, and returns every request with the sampled sessions;
- `function_role` and `database_connection_limit` set up PostgreSQL's connection limit for
  a role that it applies to.

Every function connects with an application_name of its own (`with_application_name`), which
distinguishes its sessions from the observers'.
"""

from __future__ import annotations

import difflib
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from tests.harness.cloud_run_functions import CloudRunFunctionDeployment
from tests.harness.invocations import (
    Deployment,
    FunctionInstance,
    HttpRequest,
    InstanceSet,
    Invocation,
)
from tests.harness.lambda_functions import PYTHON, LambdaDeployment
from tests.harness.snippets import replace_once, snippet_path
from tests.harness.urls import set_query_parameter

OBSERVER_APPLICATION = "tutorial-observer"
SETTLE_INTERVAL_SECONDS = 0.25
SETTLE_TIMEOUT_SECONDS = 10.0
SAMPLE_INTERVAL_SECONDS = 0.05
# How long the sampler keeps reading after the instances stopped, to show their sessions end.
STORM_TAIL_SECONDS = 0.5
THREAD_JOIN_TIMEOUT_SECONDS = 60.0


def with_application_name(url: str, name: str) -> str:
    """Return *url* with application_name set, which marks the sessions it opens."""
    return set_query_parameter(url, "application_name", name)


def with_login(url: str, user: str, password: str) -> str:
    """Return *url* logging in as *user* with *password*, on the same server and database."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    login = f"{quote(user, safe='')}:{quote(password, safe='')}"
    return urlunsplit(parts._replace(netloc=f"{login}@{host}"))


# --- Copies of snippets --------------------------------------------------------------------


def snippet_copy(relative: str, replacements: Sequence[tuple[str, str]]) -> str:
    """Return the text of snippets/*relative* with each (old, new) pair replaced.

    Raises MutationNotApplied when an *old* text does not occur exactly once, so a copy
    cannot silently stay equal to the snippet after the snippet changes.
    """
    text = snippet_path(relative).read_text()
    for old, new in replacements:
        text = replace_once(text, old, new, name=relative)
    return text


def print_changes(relative: str, copy: str) -> None:
    """Print how *copy* differs from snippets/*relative*, as a unified diff."""
    original = snippet_path(relative).read_text()
    diff = difflib.unified_diff(
        original.splitlines(keepends=True),
        copy.splitlines(keepends=True),
        fromfile=f"snippets/{relative}",
        tofile="copy",
        n=1,
    )
    print("".join(diff), end="")


def lambda_deployment(name: str, handler_source: str, url: str, directory: Path) -> Deployment:
    """Write *handler_source* as handler.py into a task root and return the Lambda function."""
    task_root = directory / name
    task_root.mkdir(parents=True)
    (task_root / "handler.py").write_text(handler_source)
    environment = {"DATABASE_URL": with_application_name(url, name)}
    return LambdaDeployment(name, PYTHON, task_root, "handler.handler", environment)


def cloud_run_deployment(
    name: str, source: str, url: str, directory: Path, *, concurrency: int, pool_max: int
) -> Deployment:
    """Write *source* as main.py and return the Cloud Run function (Python) serving it.

    *concurrency* sets THREADS, the requests one instance serves at once, and *pool_max*
    sets DATABASE_POOL_SIZE.
    """
    function_directory = directory / name
    function_directory.mkdir(parents=True)
    (function_directory / "main.py").write_text(source)
    environment = {
        "DATABASE_URL": with_application_name(url, name),
        "THREADS": str(concurrency),
        "DATABASE_POOL_SIZE": str(pool_max),
    }
    return CloudRunFunctionDeployment(
        name, PYTHON, function_directory, "main.py", "store_event", environment
    )


# --- The server's count --------------------------------------------------------------------


def _is_cockroachdb(connection: psycopg.Connection) -> bool:
    # NOTE: the CockroachDB branches of this module have never run, because this machine has
    # only the PostgreSQL stand-in; they follow tests/harness/server_view.py.
    return connection.execute("SELECT version()").fetchone()[0].startswith("CockroachDB")


def _count_sessions(connection: psycopg.Connection, cockroachdb: bool, application: str) -> int:
    if cockroachdb:
        query = (
            "SELECT count(*) FROM crdb_internal.cluster_sessions "
            "WHERE application_name = %s AND status = 'ACTIVE'"
        )
    else:
        query = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = %s AND backend_type = 'client backend'"
        )
    return connection.execute(query, (application,)).fetchone()[0]


@dataclass
class ConnectionCount:
    """The connections the server accepted while a `ServerCounts.counting` block ran."""

    opened: int | None = None


class ServerCounts:
    """The sessions and the connection count of one database, read through a connection of
    its own.

    On PostgreSQL, `counting` reads the database's session counter, the `sessions` column of
    pg_stat_database, which counts every connection to the database, so it is exact only
    while nothing but the function connects there. On CockroachDB it counts the sessions,
    closed ones included, that carry the function's application_name.
    """

    def __init__(self, url: str) -> None:
        self.url = with_application_name(url, OBSERVER_APPLICATION)
        self.connection = psycopg.connect(self.url, autocommit=True)
        self.is_cockroachdb = _is_cockroachdb(self.connection)

    def __enter__(self) -> ServerCounts:
        return self

    def __exit__(self, *exception: object) -> None:
        self.close()

    def close(self) -> None:
        self.connection.close()

    @property
    def database(self) -> str:
        return self.connection.info.dbname

    def sessions(self, application: str) -> int:
        """Return how many sessions with *application* as their application_name are open."""
        return _count_sessions(self.connection, self.is_cockroachdb, application)

    def database_sessions(self) -> int:
        """Return every client session open in this database now, this one included."""
        if self.is_cockroachdb:
            raise NotImplementedError("database_sessions reads pg_stat_activity, a PostgreSQL view")
        return self.connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend'"
        ).fetchone()[0]

    def terminate(self, application: str) -> int:
        """End the sessions of *application* from the server side, and return how many ended."""
        if self.is_cockroachdb:
            rows = self.connection.execute(
                "SELECT session_id::STRING FROM crdb_internal.cluster_sessions "
                "WHERE application_name = %s AND status = 'ACTIVE'",
                (application,),
            ).fetchall()
            for (session_id,) in rows:
                self.connection.execute("CANCEL SESSION %s", (session_id,))
        else:
            rows = self.connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = %s "
                "AND backend_type = 'client backend'",
                (application,),
            ).fetchall()
        self._wait_for_no_sessions(application)
        return len(rows)

    def _wait_for_no_sessions(self, application: str) -> None:
        deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
        while self.sessions(application):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"sessions of {application} were still open {SETTLE_TIMEOUT_SECONDS} s "
                    "after they were terminated"
                )
            time.sleep(SETTLE_INTERVAL_SECONDS / 5)

    def _connections_so_far(self, application: str) -> int:
        if self.is_cockroachdb:
            # Closed sessions stay in cluster_sessions (its closed-session cache, v23.1 and
            # newer), so this counts every session of the application.
            return self.connection.execute(
                "SELECT count(DISTINCT session_id) FROM crdb_internal.cluster_sessions "
                "WHERE application_name = %s",
                (application,),
            ).fetchone()[0]
        self.connection.execute("SELECT pg_stat_clear_snapshot()")
        return self.connection.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()[0]

    def _settled_connections(self, application: str) -> int:
        # A backend reports its connection to the statistics shortly after it starts, so a
        # reading taken right after a burst can trail. Two readings that agree are settled.
        previous = self._connections_so_far(application)
        deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
        while True:
            time.sleep(SETTLE_INTERVAL_SECONDS)
            current = self._connections_so_far(application)
            if current == previous:
                return current
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the server's connection count was still changing after "
                    f"{SETTLE_TIMEOUT_SECONDS} s: is something else connecting to "
                    f"{self.database}?"
                )
            previous = current

    @contextmanager
    def counting(self, application: str) -> Iterator[ConnectionCount]:
        """Count the connections that the server accepts while the block runs.

        On PostgreSQL these are all connections to the database, and on CockroachDB those
        with *application* as their application_name.
        """
        count = ConnectionCount()
        before = self._settled_connections(application)
        yield count
        count.opened = self._settled_connections(application) - before


class SessionSampler:
    """A background thread that reads the sessions of one application every *interval* seconds.

    It reads through the connection of *server*, so it opens no session of its own.
    `samples` contains (seconds since the origin passed to `start`, sessions open) pairs.
    """

    def __init__(
        self, server: ServerCounts, application: str, interval: float = SAMPLE_INTERVAL_SECONDS
    ) -> None:
        self.server = server
        self.application = application
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.origin = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="session-sampler", daemon=True)
        self._error: BaseException | None = None

    def start(self, origin: float) -> None:
        self.origin = origin
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling, and raise what the sampling thread raised."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(THREAD_JOIN_TIMEOUT_SECONDS)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                count = self.server.sessions(self.application)
                self.samples.append((time.monotonic() - self.origin, count))
                self._stop.wait(self.interval)
        except BaseException as error:  # re-raised by stop(), in the notebook's thread
            self._error = error


# --- A storm of instances ------------------------------------------------------------------


@dataclass(frozen=True)
class StormRequest:
    """One request of a storm: which instance served it, when it started, and its outcome."""

    instance: int
    started_seconds: float  # since the storm began
    invocation: Invocation

    @property
    def succeeded(self) -> bool:
        return self.invocation.status == 201


@dataclass
class Storm:
    """What a storm did: when each instance was ready, every request, the sessions sampled.

    Times are in seconds since the storm began, shortly before the first instance started.
    """

    application: str
    instances: int
    concurrency: int
    ready_seconds: list[float] = field(default_factory=list)
    clients_stopped_seconds: float = 0.0  # when the clients stopped sending requests
    stopped_seconds: float = 0.0  # when every instance had stopped
    requests: list[StormRequest] = field(default_factory=list)
    samples: list[tuple[float, int]] = field(default_factory=list)
    output: str = ""

    @property
    def peak_sessions(self) -> int:
        return max((count for _, count in self.samples), default=0)

    @property
    def failed(self) -> list[StormRequest]:
        return [request for request in self.requests if not request.succeeded]

    def failed_instances(self) -> list[int]:
        """Return the instances that failed every request they served."""
        served: dict[int, list[bool]] = {}
        for request in self.requests:
            served.setdefault(request.instance, []).append(request.succeeded)
        return sorted(index for index, outcomes in served.items() if not any(outcomes))


def run_storm(
    deployment: Deployment,
    server: ServerCounts,
    *,
    instances: int,
    concurrency: int,
    ramp_seconds: float,
    hold_seconds: float,
    pause_seconds: float,
) -> Storm:
    """Start *instances* instances one after another over *ramp_seconds*, and invoke each
    from *concurrency* threads until *hold_seconds* after the last one was ready.

    Each thread waits *pause_seconds* between its requests. The sessions of the deployment's
    application_name are sampled from before the first start until STORM_TAIL_SECONDS after
    the instances stopped. Every instance is stopped when this returns, also when it raises.
    """
    application = deployment.name
    storm = Storm(application, instances, concurrency)
    sampler = SessionSampler(server, application)
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []
    threads: list[threading.Thread] = []
    running: list[FunctionInstance] = []
    origin = time.monotonic()

    def invoke_until_stopped(number: int, instance: FunctionInstance) -> None:
        try:
            sent = 0
            while not stop.is_set():
                started = time.monotonic() - origin
                invocation = instance.invoke(HttpRequest.message(f"storm {number}-{sent}"))
                with lock:
                    storm.requests.append(StormRequest(number, started, invocation))
                sent += 1
                stop.wait(pause_seconds)
        except BaseException as error:  # re-raised after every thread ended
            with lock:
                errors.append(error)

    sampler.start(origin)
    try:
        with InstanceSet() as started:
            for number in range(instances):
                start_at = origin + ramp_seconds * number / max(instances - 1, 1)
                time.sleep(max(0.0, start_at - time.monotonic()))
                instance = started.start(deployment)
                running.append(instance)
                storm.ready_seconds.append(time.monotonic() - origin)
                # The threads of an instance start together, as a burst of requests reaches it.
                for _ in range(concurrency):
                    thread = threading.Thread(
                        target=invoke_until_stopped, args=(number, instance), daemon=True
                    )
                    thread.start()
                    threads.append(thread)
            stop.wait(hold_seconds)
            stop.set()
            storm.clients_stopped_seconds = time.monotonic() - origin
            for thread in threads:
                thread.join(THREAD_JOIN_TIMEOUT_SECONDS)
            storm.output = started.outputs
            # A platform removes idle instances independently of each other, so they stop
            # together here, and the InstanceSet then finds them stopped.
            with ThreadPoolExecutor(max_workers=instances) as stopping:
                list(stopping.map(FunctionInstance.close, running))
        storm.stopped_seconds = time.monotonic() - origin
        time.sleep(STORM_TAIL_SECONDS)
    finally:
        stop.set()
        sampler.stop()
    if errors:
        raise errors[0]
    storm.samples = sampler.samples
    storm.requests.sort(key=lambda request: request.started_seconds)
    return storm


# --- PostgreSQL's connection limit --------------------------------------------------------


@dataclass(frozen=True)
class FunctionRole:
    """A login role for the functions: PostgreSQL applies connection limits to it."""

    name: str
    url: str


@contextmanager
def function_role(server: ServerCounts, tables: Sequence[str]) -> Iterator[FunctionRole]:
    """Create a login role that may read and insert into *tables*, and drop it afterwards.

    The role is no superuser, so PostgreSQL enforces a database's CONNECTION LIMIT on it.
    Creating it needs the CREATEROLE privilege.
    """
    name = f"tutorial_function_{secrets.token_hex(6)}"
    password = secrets.token_hex(16)
    role = sql.Identifier(name)
    connection = server.connection
    connection.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal(password))
    )
    try:
        for table in tables:
            connection.execute(
                sql.SQL("GRANT SELECT, INSERT ON {} TO {}").format(sql.Identifier(table), role)
            )
        yield FunctionRole(name, with_login(server.url, name, password))
    finally:
        connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,)
        )
        # A role that still has privileges cannot be dropped.
        for table in tables:
            connection.execute(
                sql.SQL("REVOKE ALL ON {} FROM {}").format(sql.Identifier(table), role)
            )
        connection.execute(sql.SQL("DROP ROLE {}").format(role))


@contextmanager
def database_connection_limit(server: ServerCounts, function_connections: int) -> Iterator[int]:
    """Limit the database to *function_connections* plus the sessions open in it now.

    The limit counts every session of the database, the notebook's own included, although
    superusers may connect beyond it. Yields the limit set, and removes it afterwards.
    """
    limit = function_connections + server.database_sessions()
    database = sql.Identifier(server.database)
    statement = sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}")
    server.connection.execute(statement.format(database, sql.Literal(limit)))
    try:
        yield limit
    finally:
        server.connection.execute(statement.format(database, sql.Literal(-1)))


def connection_limit_problem(server: ServerCounts) -> str | None:
    """Return why the connection limit cannot be set up here, or None when it can."""
    if server.is_cockroachdb:
        return (
            "CONNECTION LIMIT on a database is PostgreSQL's; CockroachDB limits the "
            "connections per node with server.max_connections_per_gateway instead"
        )
    may_create_role, may_alter_database = server.connection.execute(
        "SELECT r.rolcreaterole OR r.rolsuper, d.datdba = r.oid OR r.rolsuper "
        "FROM pg_roles AS r, pg_database AS d "
        "WHERE r.rolname = current_user AND d.datname = current_database()"
    ).fetchone()
    if not may_create_role:
        return "the user of DATABASE_URL may not create roles: grant it CREATEROLE"
    if not may_alter_database:
        return "only the database's owner or a superuser may set its connection limit"
    return None
