"""The pool sizing page: the connection budget, its calculator, and the sums at the server.

Connections are counted by the database server. Instances of a function run as separate
processes, each with a pool of its own. The tests named "broken" run a copy of a snippet
with one protection removed, and require that the same check catches it.
"""

from __future__ import annotations

import dataclasses
import doctest
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest

from tests.harness.databases import TestDatabase
from tests.harness.function_instances import FunctionInstances, running_instances
from tests.harness.node import prepare_workspace, require_node, run_javascript
from tests.harness.roles import LoginRole, login_role, run_as_admin, with_user
from tests.harness.snippets import ROOT

BUDGET = "sizing/connection_budget.py"
PARALLEL = "sizing/parallel_queries.py"
LIMIT_CHECK = "sizing/connection_limit.mjs"
CALCULATOR = ROOT / "docs" / "javascripts" / "connection-budget.js"

# The measured setup the page describes: 4 instances, each calling fetch() from 3 threads
# at once, every call holding its connection for a 0.5-second pg_sleep.
INSTANCES = 4
THREADS_PER_INSTANCE = 3
SLEEP_SECONDS = 0.5
SAMPLE_INTERVAL_SECONDS = 0.05
WATCH_TIMEOUT_SECONDS = 60.0
# At the limit each instance calls from 2 threads, so a call waits at most one 0.5-second
# sleep for the instance's one connection. That is well inside the pool timeout, shortened
# to 2 s so that an instance the server refuses gives up soon.
THREADS_AT_LIMIT = 2
REFUSED_POOL_TIMEOUT = (("timeout=5.0,", "timeout=2.0,"),)

TOO_MANY_CONNECTIONS = "53300"
NODE_TIMEOUT_SECONDS = 60.0


def pool_max(size: int) -> tuple[tuple[str, str], ...]:
    return (("PARALLEL_QUERIES = 2", f"PARALLEL_QUERIES = {size}"),)


# --- The budget function ---------------------------------------------------------------


def plan(module: ModuleType, case: dict[str, Any]) -> Any:
    reserved = {"reserved": case["reserved"]} if "reserved" in case else {}
    return module.plan_connections(case["functions"], case["connection_limit"], **reserved)


def function(name: str, max_concurrency: object, pool_max: object) -> dict[str, object]:
    return {"name": name, "max_concurrency": max_concurrency, "pool_max": pool_max}


@pytest.mark.snippet(BUDGET)
class TestConnectionBudget:
    def test_budget_within_limit_reports_headroom(self, snippets):
        module = snippets.load(BUDGET)

        budget = module.plan_connections([function("api", 50, 1)], 100, reserved=10)

        assert budget.total == 60
        assert budget.headroom == 40
        assert budget.overflow == 0
        assert budget.fits
        assert budget.cap is None

    def test_budget_exact_fit_has_no_headroom(self, snippets):
        module = snippets.load(BUDGET)

        budget = module.plan_connections([function("api", 45, 2)], 100, reserved=10)

        assert budget.total == 100
        assert budget.headroom == 0
        assert budget.fits

    def test_budget_overflow_caps_largest_function(self, snippets):
        module = snippets.load(BUDGET)

        budget = module.plan_connections(
            [function("checkout", 100, 1), function("reports", 20, 3)], 150, reserved=10
        )

        assert budget.total == 170
        assert budget.overflow == 20
        assert budget.cap == module.ConcurrencyCap("checkout", 80)

    def test_budget_cap_skips_function_too_coarse(self, snippets):
        module = snippets.load(BUDGET)

        # Both need 10 connections and 9 must go: "a" would keep 1 connection, less than
        # one instance with a pool of 2, so the cap falls on "b".
        budget = module.plan_connections([function("a", 5, 2), function("b", 10, 1)], 11)

        assert budget.cap == module.ConcurrencyCap("b", 1)

    def test_budget_reserved_over_limit_has_no_cap(self, snippets):
        module = snippets.load(BUDGET)

        budget = module.plan_connections([function("api", 1, 1)], 5, reserved=10)

        assert budget.overflow == 6
        assert budget.cap is None
        assert "cannot make them fit" in budget.summary()

    def test_budget_reserved_defaults_to_zero(self, snippets):
        module = snippets.load(BUDGET)

        budget = module.plan_connections([function("api", 3, 2)], 10)

        assert budget.reserved == 0
        assert budget.total == 6

    def test_budget_docstring_example_holds(self, snippets):
        module = snippets.load(BUDGET)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)

        for test in doctest.DocTestFinder().find(module, module.__name__, globs=vars(module)):
            runner.run(test, out=lambda text: None)

        assert runner.tries > 0
        assert runner.failures == 0

    @pytest.mark.parametrize(
        ("arguments", "field", "shown"),
        [
            (([function("api", True, 1)], 10), "functions[0].max_concurrency", "true"),
            (([function("api", 2, 2.5)], 10), "functions[0].pool_max", "2.5"),
            (([function("api", -3, 1)], 10), "functions[0].max_concurrency", "-3"),
            (([function("api", 0, 1)], 10), "functions[0].max_concurrency", "0"),
            (([function("api", 1, "2")], 10), "functions[0].pool_max", '"2"'),
            (([function("api", 1_000_001, 1)], 10), "functions[0].max_concurrency", "1000001"),
            (([{"name": "api", "max_concurrency": 1}], 10), "functions[0].pool_max", "missing"),
            (([{**function("api", 1, 1), "pool_size": 2}], 10), "functions[0].pool_size", "2"),
            (([function("api", 1, 1), function("api", 2, 1)], 10), "functions[1].name", '"api"'),
            (([function(" ", 1, 1)], 10), "functions[0].name", '" "'),
            (([5], 10), "functions[0]", "5"),
            (([], 10), "functions", "empty"),
            (({"api": 1}, 10), "functions", '{"api":1}'),
            (([function("api", 1, 1)], 0), "connection_limit", "0"),
            (([function("api", 1, 1)], True), "connection_limit", "true"),
            (([function("api", 1, 1)], 10, -1), "reserved", "-1"),
            (([function("api", 1, 1)], 10, None), "reserved", "null"),
        ],
        ids=[
            "bool-concurrency",
            "fractional-pool-max",
            "negative-concurrency",
            "zero-concurrency",
            "string-pool-max",
            "huge-concurrency",
            "missing-field",
            "unknown-field",
            "duplicate-name",
            "blank-name",
            "entry-not-object",
            "empty-list",
            "functions-not-list",
            "zero-limit",
            "bool-limit",
            "negative-reserved",
            "null-reserved",
        ],
    )
    def test_budget_rejects_invalid_input(self, snippets, arguments, field, shown):
        module = snippets.load(BUDGET)

        with pytest.raises(module.ConnectionBudgetError) as raised:
            module.plan_connections(*arguments)

        assert raised.value.field == field
        assert field in str(raised.value)
        assert shown in str(raised.value)

    def test_broken_budget_accepts_bool(self, snippets):
        module = snippets.load(BUDGET, (("if isinstance(value, bool) or not", "if not"),))

        budget = module.plan_connections([function("api", True, 1)], 10)

        assert budget.total == 1

    def test_broken_budget_accepts_duplicate_names(self, snippets):
        module = snippets.load(BUDGET, (("if function.name in first_position:", "if False:"),))

        budget = module.plan_connections([function("api", 1, 1), function("api", 2, 1)], 10)

        assert budget.total == 3

    def test_broken_budget_accepts_unknown_field(self, snippets):
        module = snippets.load(BUDGET, (("if key not in FIELDS:", "if False:"),))

        budget = module.plan_connections([{**function("api", 1, 1), "pool_size": 9}], 10)

        assert budget.total == 1


# --- The page's calculator agrees with the Python function -----------------------------

AGREEMENT_CASES: list[dict[str, Any]] = [
    {"functions": [function("api", 50, 1)], "connection_limit": 100, "reserved": 10},
    {
        "functions": [function("checkout", 100, 1), function("reports", 20, 3)],
        "connection_limit": 150,
        "reserved": 10,
    },
    {"functions": [function("api", 45, 2)], "connection_limit": 100, "reserved": 10},
    {"functions": [function("a", 5, 2), function("b", 10, 1)], "connection_limit": 11},
    {"functions": [function("b", 10, 1), function("a", 5, 2)], "connection_limit": 12},
    {"functions": [function("api", 1, 1)], "connection_limit": 5, "reserved": 10},
    {
        "functions": [function("a", 300, 2), function("b", 300, 2), function("c", 50, 4)],
        "connection_limit": 1000,
        "reserved": 25,
    },
    {"functions": [function("api", True, 1)], "connection_limit": 10},
    {"functions": [function("api", 2, 2.5)], "connection_limit": 10},
    {"functions": [function("api", -3, 1)], "connection_limit": 10},
    {"functions": [function("api", 1, "2")], "connection_limit": 10},
    {"functions": [function("api", 1_000_001, 1)], "connection_limit": 10},
    {"functions": [{"name": "api", "max_concurrency": 1}], "connection_limit": 10},
    {"functions": [{**function("api", 1, 1), "pool_size": 2}], "connection_limit": 10},
    {"functions": [function("api", 1, 1), function("api", 2, 1)], "connection_limit": 10},
    {"functions": [function("", 1, 1)], "connection_limit": 10},
    {"functions": [5], "connection_limit": 10},
    {"functions": [], "connection_limit": 10},
    {"functions": {"api": 1}, "connection_limit": 10},
    {"functions": [function("api", 1, 1)], "connection_limit": 0},
    {"functions": [function("api", 1, 1)], "connection_limit": True},
    {"functions": [function("api", 1, 1)], "connection_limit": 10, "reserved": -1},
    {"functions": [function("api", 1, 1)], "connection_limit": 10, "reserved": None},
]

# Runs each case through planConnections() and prints the outcomes in the form that
# python_outcome() builds. The file to load comes as the first argument.
AGREEMENT_DRIVER = """\
const { planConnections, ConnectionBudgetError } = require(process.argv[2]);

const cases = JSON.parse(require("node:fs").readFileSync(0, "utf8"));
const outcomes = cases.map((item) => {
  try {
    const budget = "reserved" in item
      ? planConnections(item.functions, item.connection_limit, item.reserved)
      : planConnections(item.functions, item.connection_limit);
    return {
      total: budget.total,
      headroom: budget.headroom,
      overflow: budget.overflow,
      fits: budget.fits,
      cap: budget.cap,
      summary: budget.summary,
      functions: budget.functions,
    };
  } catch (error) {
    if (!(error instanceof ConnectionBudgetError)) {
      throw error;
    }
    return { error: { name: error.name, field: error.field, message: error.message } };
  }
});
console.log(JSON.stringify(outcomes));
"""


def python_outcome(module: ModuleType, case: dict[str, Any]) -> dict[str, Any]:
    try:
        budget = plan(module, case)
    except module.ConnectionBudgetError as error:
        return {
            "error": {"name": type(error).__name__, "field": error.field, "message": str(error)}
        }
    return {
        "total": budget.total,
        "headroom": budget.headroom,
        "overflow": budget.overflow,
        "fits": budget.fits,
        "cap": dataclasses.asdict(budget.cap) if budget.cap else None,
        "summary": budget.summary(),
        "functions": [
            {**dataclasses.asdict(entry), "connections": entry.connections}
            for entry in budget.functions
        ],
    }


def javascript_outcomes(calculator: Path, cases: list[dict[str, Any]], directory: Path) -> list:
    node = shutil.which("node")
    if node is None:
        pytest.skip(
            "Node.js is not installed: no `node` on PATH, so the page's calculator "
            "cannot be compared with the Python function"
        )
    driver = directory / "agreement.cjs"
    driver.write_text(AGREEMENT_DRIVER)

    result = subprocess.run(
        [node, str(driver), str(calculator)],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_SECONDS,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.snippet(BUDGET)
class TestCalculatorAgreement:
    def test_calculator_matches_python_function(self, snippets, tmp_path):
        module = snippets.load(BUDGET)

        expected = [python_outcome(module, case) for case in AGREEMENT_CASES]
        actual = javascript_outcomes(CALCULATOR, AGREEMENT_CASES, tmp_path)

        for case, python_result, javascript_result in zip(
            AGREEMENT_CASES, expected, actual, strict=True
        ):
            assert javascript_result == python_result, json.dumps(case)

    def test_broken_calculator_detected(self, snippets, tmp_path):
        module = snippets.load(BUDGET)
        source = CALCULATOR.read_text()
        # Cap the function that needs the fewest connections instead of the most.
        broken_source = source.replace(
            "b.connections - a.connections", "a.connections - b.connections"
        )
        broken = tmp_path / "broken-connection-budget.js"
        broken.write_text(broken_source)

        expected = [python_outcome(module, case) for case in AGREEMENT_CASES]
        actual = javascript_outcomes(broken, AGREEMENT_CASES, tmp_path)

        assert broken_source != source
        assert actual != expected


# --- Concurrent queries inside one instance ---------------------------------------------


@pytest.fixture
def function_database(database: TestDatabase, monkeypatch) -> TestDatabase:
    monkeypatch.setenv("DATABASE_URL", database.url)
    return database


@pytest.mark.snippet(PARALLEL)
class TestParallelQueries:
    def test_concurrent_fetch_keeps_query_order(self, function_database, snippets):
        module = snippets.load(PARALLEL)

        rows = module.fetch_concurrently([("SELECT %s::int", (number,)) for number in range(5)])

        assert rows == [[(number,)] for number in range(5)]

    def test_concurrent_fetch_opens_pool_max(self, function_database, snippets):
        module = snippets.load(PARALLEL)

        module.fetch_concurrently([("SELECT pg_sleep(0.2)", ())] * 4)

        assert function_database.view.connections_opened() == module.PARALLEL_QUERIES

    def test_empty_queries_rejected(self, function_database, snippets):
        module = snippets.load(PARALLEL)

        with pytest.raises(ValueError, match="queries is empty"):
            module.fetch_concurrently([])

    def test_missing_database_url_named(self, function_database, snippets, monkeypatch):
        monkeypatch.delenv("DATABASE_URL")
        module = snippets.load(PARALLEL)

        with pytest.raises(RuntimeError, match="DATABASE_URL is not set"):
            module.fetch("SELECT 1")


# --- Instances times pool maximum, counted at the server --------------------------------


def watch_peak_sessions(database: TestDatabase, instances: FunctionInstances) -> int:
    """Sample the test database's sessions until every instance reported; return the peak."""
    peak = 0
    deadline = time.monotonic() + WATCH_TIMEOUT_SECONDS
    while not instances.all_reported() and time.monotonic() < deadline:
        peak = max(peak, len(database.view.sessions()))
        time.sleep(SAMPLE_INTERVAL_SECONDS)
    return peak


@pytest.mark.snippet(PARALLEL)
class TestInstancesTimesPoolMax:
    @pytest.mark.parametrize("size", [1, 2])
    def test_server_sees_instances_times_pool_max(self, database, snippets, tmp_path, size):
        source = snippets.source(PARALLEL, pool_max(size))

        with running_instances(
            PARALLEL,
            source,
            count=INSTANCES,
            threads=THREADS_PER_INSTANCE,
            sleep_seconds=SLEEP_SECONDS,
            database_url=database.url,
            directory=tmp_path,
        ) as instances:
            peak = watch_peak_sessions(database, instances)
            reports = instances.reports()
            open_at_end = len(database.view.sessions())

        assert [report.succeeded for report in reports] == [True] * INSTANCES
        assert peak <= INSTANCES * size
        assert open_at_end == INSTANCES * size
        assert database.view.connections_opened() == INSTANCES * size

    def test_broken_unbounded_pool_exceeds_budget(self, database, snippets, tmp_path):
        source = snippets.source(
            PARALLEL, (*pool_max(1), ("max_size=PARALLEL_QUERIES,", "max_size=10,"))
        )

        with running_instances(
            PARALLEL,
            source,
            count=INSTANCES,
            threads=THREADS_PER_INSTANCE,
            sleep_seconds=SLEEP_SECONDS,
            database_url=database.url,
            directory=tmp_path,
        ) as instances:
            instances.reports()
            open_at_end = len(database.view.sessions())

        assert open_at_end == INSTANCES * THREADS_PER_INSTANCE
        assert open_at_end > INSTANCES


# --- At the connection limit ---------------------------------------------------------------


@pytest.fixture
def function_role(database: TestDatabase) -> Iterator[LoginRole]:
    if database.backend.is_cockroachdb:
        pytest.skip(
            "CONNECTION LIMIT on a database or role is PostgreSQL's; CockroachDB limits "
            "connections per node with server.max_connections_per_gateway instead"
        )
    with login_role(database) as role:
        yield role


def set_database_limit(database: TestDatabase, limit: int) -> None:
    run_as_admin(database, f"ALTER DATABASE {database.name} CONNECTION LIMIT {limit}")


def hold_connections(url: str, count: int) -> list[psycopg.Connection]:
    return [psycopg.connect(url, autocommit=True) for _ in range(count)]


class TestPostgresConnectionLimit:
    def test_superuser_ignores_database_limit(self, database):
        set_database_limit(database, 1)

        held = hold_connections(database.url, 2)
        for connection in held:
            connection.close()

        assert len(held) == 2

    def test_superuser_sessions_count_toward_limit(self, database, function_role):
        set_database_limit(database, 1)
        held = hold_connections(database.url, 1)

        with pytest.raises(psycopg.OperationalError) as raised:
            psycopg.connect(function_role.url)
        held[0].close()

        assert "too many connections for database" in str(raised.value)

    @pytest.mark.parametrize(
        ("scope", "message"),
        [
            ("DATABASE", "too many connections for database"),
            ("ROLE", "too many connections for role"),
        ],
    )
    def test_refused_connection_lacks_sqlstate_in_psycopg(
        self, database, function_role, scope, message
    ):
        target = database.name if scope == "DATABASE" else f'"{function_role.name}"'
        run_as_admin(database, f"ALTER {scope} {target} CONNECTION LIMIT 1")
        held = hold_connections(function_role.url, 1)

        with pytest.raises(psycopg.OperationalError) as raised:
            psycopg.connect(function_role.url)
        held[0].close()

        assert message in str(raised.value)
        # NOTE: psycopg 3.3 reports no SQLSTATE for a refused connection, although the
        # server sends 53300 (the Node.js tests below read it), so Python cannot match it.
        assert raised.value.sqlstate is None


@pytest.mark.snippet(PARALLEL)
class TestInstancesAtDatabaseLimit:
    def test_instances_within_limit_all_succeed(self, database, function_role, snippets, tmp_path):
        set_database_limit(database, INSTANCES)

        with running_instances(
            PARALLEL,
            snippets.source(PARALLEL, pool_max(1)),
            count=INSTANCES,
            threads=THREADS_AT_LIMIT,
            sleep_seconds=SLEEP_SECONDS,
            database_url=function_role.url,
            directory=tmp_path,
        ) as instances:
            reports = instances.reports()
            open_at_end = len(database.view.sessions())

        assert [report.succeeded for report in reports] == [True] * INSTANCES
        assert open_at_end == INSTANCES

    def test_instances_over_limit_refused(self, database, function_role, snippets, tmp_path):
        limit = INSTANCES - 1
        set_database_limit(database, limit)

        with running_instances(
            PARALLEL,
            snippets.source(PARALLEL, (*pool_max(1), *REFUSED_POOL_TIMEOUT)),
            count=INSTANCES,
            threads=THREADS_AT_LIMIT,
            sleep_seconds=SLEEP_SECONDS,
            database_url=function_role.url,
            directory=tmp_path,
        ) as instances:
            reports = instances.reports()
            open_at_end = len(database.view.sessions())

        refused = [report for report in reports if not report.succeeded]
        errors = {call.error_type for report in refused for call in report.calls if call.error_type}
        assert len(refused) >= INSTANCES - limit
        assert open_at_end <= limit
        assert errors == {"psycopg_pool.PoolTimeout"}
        assert all("too many connections for database" in report.stderr for report in refused)


# --- Recognising the refusal by its SQLSTATE, in Node.js ----------------------------------

# Prints the outcome of one query through the snippet's query() as JSON.
LIMIT_DRIVER = """\
import pg from "pg";
import { query } from "./connection_limit.mjs";

const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL, max: 1 });
try {
  const result = await query(pool, "SELECT $1::int AS answer", [42]);
  console.log(JSON.stringify({ rows: result.rows }));
} catch (error) {
  console.log(
    JSON.stringify({
      name: error.name,
      message: error.message,
      code: error.code ?? null,
      causeCode: error.cause?.code ?? null,
    }),
  );
} finally {
  await pool.end();
}
"""


def run_limit_driver(source: str, url: str, directory: Path) -> dict[str, Any]:
    prepare_workspace(directory, {"connection_limit.mjs": source})
    result = run_javascript(directory, LIMIT_DRIVER, env={"DATABASE_URL": url})

    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def node_modules() -> Path:
    return require_node()


@pytest.mark.snippet(LIMIT_CHECK)
class TestRefusalBySqlstate:
    def test_query_within_limit_returns_rows(
        self, node_modules, database, function_role, snippets, tmp_path
    ):
        set_database_limit(database, 1)

        outcome = run_limit_driver(snippets.source(LIMIT_CHECK), function_role.url, tmp_path)

        assert outcome == {"rows": [{"answer": 42}]}

    @pytest.mark.parametrize("scope", ["DATABASE", "ROLE"])
    def test_refusal_recognised_by_sqlstate(
        self, node_modules, database, function_role, snippets, tmp_path, scope
    ):
        target = database.name if scope == "DATABASE" else f'"{function_role.name}"'
        run_as_admin(database, f"ALTER {scope} {target} CONNECTION LIMIT 1")
        held = hold_connections(function_role.url, 1)

        outcome = run_limit_driver(snippets.source(LIMIT_CHECK), function_role.url, tmp_path)
        held[0].close()

        assert outcome["name"] == "ConnectionLimitReached"
        assert outcome["causeCode"] == TOO_MANY_CONNECTIONS
        assert "reserved concurrency" in outcome["message"]

    def test_broken_check_misses_refusal(
        self, node_modules, database, function_role, snippets, tmp_path
    ):
        set_database_limit(database, 1)
        held = hold_connections(function_role.url, 1)
        source = snippets.source(
            LIMIT_CHECK, (("if (error.code === TOO_MANY_CONNECTIONS)", "if (false)"),)
        )

        outcome = run_limit_driver(source, function_role.url, tmp_path)
        held[0].close()

        assert outcome["name"] != "ConnectionLimitReached"
        assert outcome["code"] == TOO_MANY_CONNECTIONS


@pytest.mark.cockroachdb_only
@pytest.mark.private_server
@pytest.mark.snippet(LIMIT_CHECK)
def test_cockroachdb_gateway_limit_refuses(node_modules, private_server, snippets, tmp_path):
    # A server of the test's own, because the cluster setting applies to every database.
    database = private_server.database
    user = f"fn_{database.name}"
    run_as_admin(database, f"CREATE USER {user}")
    run_as_admin(database, f"GRANT CONNECT ON DATABASE {database.name} TO {user}")
    run_as_admin(database, "SET CLUSTER SETTING server.max_connections_per_gateway = 1")
    wait_for_gateway_limit(database, 1)
    url = with_user(database.url, user)
    held = hold_connections(url, 1)

    # NOTE: written from CockroachDB's documentation and not yet run against CockroachDB,
    # because the PostgreSQL stand-in skips it.
    outcome = run_limit_driver(snippets.source(LIMIT_CHECK), url, tmp_path)
    held[0].close()

    assert outcome["name"] == "ConnectionLimitReached"
    assert outcome["causeCode"] == TOO_MANY_CONNECTIONS
    assert "sorry, too many clients already" in outcome["message"]


def wait_for_gateway_limit(database: TestDatabase, limit: int, timeout: float = 10.0) -> None:
    """Wait until the node reports the new setting, because settings apply asynchronously."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(database.backend.admin_url, autocommit=True) as connection:
        while True:
            shown = connection.execute(
                "SHOW CLUSTER SETTING server.max_connections_per_gateway"
            ).fetchone()[0]
            if int(shown) == limit or time.monotonic() > deadline:
                return
            time.sleep(0.1)
