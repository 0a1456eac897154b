"""The retry page's node-postgres helper, driven by node and checked at the server.

Each test runs one scenario of a small script that imports the helper (or a broken copy of
it) and prints what happened as JSON. The tests read the database state from Python.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.backends import BackendInfo
from tests.harness.databases import TestDatabase
from tests.harness.node import prepare_workspace, require_node, run_javascript
from tests.harness.snippets import SnippetLoader
from tests.harness.urls import parse_endpoint
from tests.test_retries import (
    ACCOUNTS,
    OPENING_BALANCE,
    SERIALIZATION_FAILURE,
    UNIQUE_VIOLATION,
    ConnectionLossProxy,
    balances,
    counter_value,
)

SCHEMA = "retries/schema.sql"
RETRY = "retries/node_postgres_retry.mjs"

pytestmark = [pytest.mark.snippet(SCHEMA), pytest.mark.snippet(RETRY)]

WORKERS = 6
INCREMENTS_PER_WORKER = 10

# Broken copies of the module, each removing one protection.
NO_RETRY = (("if (sqlstate === SERIALIZATION_FAILURE) {", "if (false) {"),)
RETRY_EVERYTHING = (("  return NOT_RETRYABLE;", "  return SERIALIZATION_CONFLICT;"),)
NO_SERIALIZABLE = (('"BEGIN ISOLATION LEVEL SERIALIZABLE"', '"BEGIN"'),)
NO_ATTEMPT_LIMIT = (("if (attempt >= maxAttempts) {", "if (false) {"),)
NO_DEADLINE = (
    (
        "if (remaining !== undefined && delay + retrySettings.deadlineMarginMillis > remaining) {",
        "if (false) {",
    ),
)
BLIND_COMMIT_RETRY = (("if (kind === COMMIT_UNKNOWN && !idempotent) {", "if (false) {"),)
BLIND_CONNECTION_RETRY = (("(kind === CONNECTION_LOST && !idempotent)", "false"),)
NO_TRANSFER_GUARD = (("if (recorded.rowCount === 0) {", "if (false) {"),)

# Runs the scenario in the SCENARIO variable and prints its outcome as one line of JSON.
SCENARIO_SCRIPT = r"""
import pg from "pg";
import * as retry from "./node_postgres_retry.mjs";

const scenario = JSON.parse(process.env.SCENARIO);
Object.assign(retry.retrySettings, scenario.settings ?? {});
if (scenario.fixedBackoff) {
  // Full jitter draws from [0, ceiling); this makes every sleep the whole ceiling.
  Math.random = () => 1;
}

const pools = [];
function openPool() {
  const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL, max: 1 });
  // An idle client whose connection the test ended must not crash the script.
  pool.on("error", () => {});
  pools.push(pool);
  return pool;
}

let calls = 0;
const sleep = (millis) => new Promise((resolve) => setTimeout(resolve, millis));

async function incrementCounter(client) {
  const { rows } = await client.query("SELECT value FROM counters WHERE id = 1");
  await sleep(2);
  await client.query("UPDATE counters SET value = $1 WHERE id = 1", [Number(rows[0].value) + 1]);
}

async function forceSerializationFailure(client) {
  if (scenario.cockroachdb) {
    await client.query("SELECT now()");
    await client.query("SELECT crdb_internal.force_retry('1h'::INTERVAL)");
  } else {
    await client.query(
      "DO $$ BEGIN RAISE EXCEPTION 'forced by the test' " +
        "USING ERRCODE = 'serialization_failure'; END $$",
    );
  }
}

const bodies = {
  async increment(client) {
    await incrementCounter(client);
  },
  async serializationFailure(client) {
    if (calls <= (scenario.failingCalls ?? Infinity)) {
      await forceSerializationFailure(client);
    }
  },
  async duplicate(client) {
    await client.query("INSERT INTO counters (id, value) VALUES (1, 0)");
  },
};

function describe(error) {
  return {
    name: error.name,
    message: error.message,
    code: typeof error.code === "string" ? error.code : null,
    attempts: error.attempts ?? null,
    causeCode: typeof error.cause?.code === "string" ? error.cause.code : null,
  };
}

const deadlineAt = Date.now() + (scenario.timeoutMillis ?? 0);
const context = { getRemainingTimeInMillis: () => Math.max(0, deadlineAt - Date.now()) };
const options = {
  idempotent: scenario.idempotent ?? false,
  maxAttempts: scenario.maxAttempts,
  context: scenario.timeoutMillis === undefined || scenario.useDeadline ? undefined : context,
  deadline: scenario.useDeadline ? deadlineAt : undefined,
};

async function runOnce(pool) {
  const body = async (client) => {
    calls += 1;
    return bodies[scenario.body](client);
  };
  if (scenario.body === "transfer") {
    calls += 1;
    return retry.transfer(pool, "request-1", 1, 2, 30, { context: options.context });
  }
  return retry.runTransaction(pool, body, options);
}

const outcome = { failures: [] };
try {
  await Promise.all(
    Array.from({ length: scenario.workers ?? 1 }, async () => {
      const pool = openPool();
      try {
        for (let round = 0; round < (scenario.rounds ?? 1); round += 1) {
          outcome.result = await runOnce(pool);
        }
      } catch (error) {
        outcome.failures.push(describe(error));
      }
    }),
  );
} finally {
  outcome.calls = calls;
  outcome.remainingMillis = context.getRemainingTimeInMillis();
  await Promise.all(pools.map((pool) => pool.end()));
}
console.log(JSON.stringify(outcome));
"""


@pytest.fixture(scope="session")
def node_modules() -> Path:
    return require_node()


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
def run_scenario(
    node_modules: Path, bank: TestDatabase, snippets: SnippetLoader, backend: BackendInfo, tmp_path
):
    """Run one scenario against the bank (or *url*) with the module or a broken copy of it."""

    def run(
        scenario: dict[str, Any], replacements: tuple = (), url: str | None = None
    ) -> tuple[dict[str, Any], list[str]]:
        module = snippets.source(RETRY, replacements)
        prepare_workspace(tmp_path, {"node_postgres_retry.mjs": module})
        # Sleeps stay short unless a scenario sets its own.
        settings = {"baseBackoffMillis": 1, "maxBackoffMillis": 20, **scenario.pop("settings", {})}
        scenario = {**scenario, "settings": settings, "cockroachdb": backend.is_cockroachdb}
        process = run_javascript(
            tmp_path,
            SCENARIO_SCRIPT,
            env={"DATABASE_URL": url or bank.url, "SCENARIO": json.dumps(scenario)},
            filename="scenario.mjs",
        )
        assert process.returncode == 0, process.stderr
        retries = [line for line in process.stderr.splitlines() if "transaction attempt" in line]
        return json.loads(process.stdout.strip().splitlines()[-1]), retries

    return run


def test_node_increments_exact_under_contention(run_scenario, bank):
    scenario = {
        "body": "increment",
        "workers": WORKERS,
        "rounds": INCREMENTS_PER_WORKER,
        "maxAttempts": 40,
    }

    outcome, retries = run_scenario(scenario)

    assert outcome["failures"] == []
    assert counter_value(bank) == WORKERS * INCREMENTS_PER_WORKER
    assert outcome["calls"] > WORKERS * INCREMENTS_PER_WORKER
    assert len(retries) == outcome["calls"] - WORKERS * INCREMENTS_PER_WORKER


def test_node_retries_logged_with_sqlstate(run_scenario, bank):
    scenario = {"body": "serializationFailure", "failingCalls": 2}

    outcome, retries = run_scenario(scenario)

    assert outcome["failures"] == []
    assert outcome["calls"] == 3
    assert len(retries) == 2
    assert retries[0].startswith("transaction attempt 1 of 5 failed")
    assert retries[1].startswith("transaction attempt 2 of 5 failed")
    assert all(f"SQLSTATE {SERIALIZATION_FAILURE}" in line for line in retries)
    assert all(bank.name not in line for line in retries)


def test_node_always_failing_body_stops_at_limit(run_scenario):
    outcome, _ = run_scenario({"body": "serializationFailure", "maxAttempts": 3})

    (failure,) = outcome["failures"]
    assert failure["name"] == "RetriesExhaustedError"
    assert failure["attempts"] == 3
    assert failure["causeCode"] == SERIALIZATION_FAILURE
    assert outcome["calls"] == 3


def test_node_unique_violation_not_retried(run_scenario):
    outcome, retries = run_scenario({"body": "duplicate", "maxAttempts": 3})

    (failure,) = outcome["failures"]
    assert failure["code"] == UNIQUE_VIOLATION
    assert outcome["calls"] == 1
    assert retries == []


@pytest.mark.parametrize("limit", ["context", "deadline"])
def test_node_deadline_stops_retries_early(run_scenario, limit):
    scenario = {
        "body": "serializationFailure",
        "maxAttempts": 8,
        "timeoutMillis": 1000,
        "useDeadline": limit == "deadline",
        "fixedBackoff": True,
        "settings": {"baseBackoffMillis": 200, "maxBackoffMillis": 200},
    }

    outcome, _ = run_scenario(scenario)

    (failure,) = outcome["failures"]
    assert failure["name"] == "RetriesExhaustedError"
    assert "of the deadline" in failure["message"]
    assert outcome["remainingMillis"] > 0
    assert outcome["calls"] < 8


@pytest.mark.parametrize("committed", [True, False], ids=["reply-lost", "commit-lost"])
def test_node_ambiguous_commit_not_retried(run_scenario, bank, proxy, committed):
    if committed:
        proxy.lose_commit_reply()
    else:
        proxy.lose_commit()

    outcome, _ = run_scenario({"body": "increment"}, url=proxy.url(bank.url))

    (failure,) = outcome["failures"]
    assert failure["name"] == "AmbiguousCommitError"
    assert proxy.losses == 1
    assert outcome["calls"] == 1
    assert counter_value(bank) == (1 if committed else 0)


def test_node_idempotent_body_retried_after_lost_commit(run_scenario, bank, proxy):
    proxy.lose_commit()

    outcome, _ = run_scenario({"body": "increment", "idempotent": True}, url=proxy.url(bank.url))

    assert outcome["failures"] == []
    assert outcome["calls"] == 2
    assert counter_value(bank) == 1


@pytest.mark.parametrize("idempotent", [False, True], ids=["not-idempotent", "idempotent"])
def test_node_connection_lost_in_body(run_scenario, bank, proxy, idempotent):
    proxy.lose_statement("UPDATE counters")

    outcome, _ = run_scenario(
        {"body": "increment", "idempotent": idempotent}, url=proxy.url(bank.url)
    )

    if not idempotent:
        (failure,) = outcome["failures"]
        assert failure["name"] != "AmbiguousCommitError"
    assert outcome["calls"] == (2 if idempotent else 1)
    assert counter_value(bank) == (1 if idempotent else 0)


def test_node_transfer_applied_once_after_lost_reply(run_scenario, bank, proxy):
    proxy.lose_commit_reply()

    outcome, retries = run_scenario({"body": "transfer"}, url=proxy.url(bank.url))

    assert outcome["failures"] == []
    assert outcome["result"] is False
    assert bank.count_rows("transfers") == 1
    assert balances(bank)[1] == OPENING_BALANCE - 30
    assert "commit outcome unknown" in retries[0]


BAD_ARGUMENTS_SCRIPT = r"""
import { runTransaction, transfer } from "./node_postgres_retry.mjs";

// The arguments are checked before the pool is used, so no pool is needed.
const pool = {};
const calls = [
  () => runTransaction(pool, async () => {}, { maxAttempts: 0 }),
  () => runTransaction(pool, async () => {}, { context: {} }),
  () => runTransaction(pool, async () => {}, { deadline: "soon" }),
  () => runTransaction(pool, "UPDATE counters SET value = 1"),
  () => transfer(pool, "", 1, 2, 10),
  () => transfer(pool, "request-1", 1, 1, 10),
  () => transfer(pool, "request-1", 1, 2, 0),
];
const messages = [];
for (const call of calls) {
  try {
    await call();
    messages.push(null);
  } catch (error) {
    messages.push(`${error.name}: ${error.message}`);
  }
}
console.log(JSON.stringify(messages));
"""


def test_node_bad_arguments_rejected(node_modules, bank, snippets, tmp_path):
    prepare_workspace(tmp_path, {"node_postgres_retry.mjs": snippets.source(RETRY)})

    process = run_javascript(tmp_path, BAD_ARGUMENTS_SCRIPT, env={}, filename="arguments.mjs")

    messages = json.loads(process.stdout)
    assert messages[0].startswith("RangeError: maxAttempts must be an integer of at least 1")
    assert "getRemainingTimeInMillis()" in messages[1]
    assert "deadline must be a Date.now() value" in messages[2]
    assert messages[3].startswith("TypeError: body must be a function")
    assert messages[4].startswith("TypeError: requestId must be a non-empty string")
    assert messages[5].startswith("RangeError: source and target must be different accounts")
    assert messages[6].startswith("RangeError: amount must be a positive integer")


class TestNodeBrokenCopiesFail:
    """Each check above goes red when the module loses the protection it proves."""

    def test_no_retry_loses_increments(self, run_scenario, bank):
        scenario = {"body": "increment", "workers": WORKERS, "rounds": INCREMENTS_PER_WORKER}

        outcome, _ = run_scenario(scenario, NO_RETRY)

        assert outcome["failures"] != []
        assert {failure["code"] for failure in outcome["failures"]} == {SERIALIZATION_FAILURE}
        assert counter_value(bank) < WORKERS * INCREMENTS_PER_WORKER

    def test_read_committed_loses_updates(self, run_scenario, bank, backend):
        if backend.is_cockroachdb:
            pytest.skip("CockroachDB runs transactions SERIALIZABLE unless told otherwise")
        scenario = {"body": "increment", "workers": WORKERS, "rounds": INCREMENTS_PER_WORKER}

        outcome, _ = run_scenario(scenario, NO_SERIALIZABLE)

        assert outcome["failures"] == []
        assert counter_value(bank) < WORKERS * INCREMENTS_PER_WORKER

    def test_retry_everything_repeats_unique_violation(self, run_scenario):
        outcome, _ = run_scenario({"body": "duplicate", "maxAttempts": 3}, RETRY_EVERYTHING)

        assert outcome["calls"] == 3

    def test_no_attempt_limit_keeps_going(self, run_scenario):
        scenario = {"body": "serializationFailure", "failingCalls": 6, "maxAttempts": 3}

        outcome, _ = run_scenario(scenario, NO_ATTEMPT_LIMIT)

        assert outcome["failures"] == []
        assert outcome["calls"] == 7

    def test_no_deadline_runs_past_it(self, run_scenario):
        scenario = {
            "body": "serializationFailure",
            "maxAttempts": 8,
            "timeoutMillis": 1000,
            "fixedBackoff": True,
            "settings": {"baseBackoffMillis": 200, "maxBackoffMillis": 200},
        }

        outcome, _ = run_scenario(scenario, NO_DEADLINE)

        assert outcome["remainingMillis"] == 0
        assert outcome["calls"] == 8

    def test_blind_commit_retry_applies_twice(self, run_scenario, bank, proxy):
        proxy.lose_commit_reply()

        outcome, _ = run_scenario(
            {"body": "increment"}, BLIND_COMMIT_RETRY, url=proxy.url(bank.url)
        )

        assert outcome["calls"] == 2
        assert counter_value(bank) == 2

    def test_blind_connection_retry_repeats_body(self, run_scenario, bank, proxy):
        proxy.lose_statement("UPDATE counters")

        outcome, _ = run_scenario(
            {"body": "increment"}, BLIND_CONNECTION_RETRY, url=proxy.url(bank.url)
        )

        assert outcome["calls"] == 2

    def test_unguarded_transfer_moves_twice(self, run_scenario, bank, proxy):
        proxy.lose_commit_reply()

        run_scenario({"body": "transfer"}, NO_TRANSFER_GUARD, url=proxy.url(bank.url))

        assert balances(bank)[1] == OPENING_BALANCE - 60
