"""The persistence page's Python Lambda handler, checked at the database server."""

from __future__ import annotations

import base64
import json
import threading
from types import ModuleType

import psycopg
import pytest

from tests.harness.databases import TestDatabase
from tests.harness.lambda_context import LambdaContext
from tests.harness.snippets import SnippetLoader

HANDLER = "lambda/handler.py"
SCHEMA = "lambda/schema.sql"
INVOCATIONS = 50

pytestmark = [pytest.mark.snippet(HANDLER), pytest.mark.snippet(SCHEMA)]

# Broken copies of the handler, each removing one thing the page states it needs.
POOL_PER_INVOCATION = (
    (
        "        if pool is None:\n",
        "        if pool is not None:\n            pool.close()\n        if True:\n",
    ),
)
NO_CREATION_LOCK = (("    with pool_lock:\n", "    if True:\n"),)
NO_CHECKOUT_CHECK = (("            check=ConnectionPool.check_connection,", ""),)
NEVER_RETURNED = (
    ("with get_pool().connection() as connection:", "with get_pool().getconn() as connection:"),
)
NEVER_COMMITTED = (
    (
        "with get_pool().connection() as connection:",
        "with get_pool().connection() as connection, connection.transaction(force_rollback=True):",
    ),
)


def http_event(message: object) -> dict:
    return {"body": json.dumps({"message": message}), "isBase64Encoded": False}


def invoke(handler: ModuleType, message: str = "hello") -> dict:
    return handler.handler(http_event(message), LambdaContext())


def checked_out(handler: ModuleType) -> int:
    stats = handler.pool.get_stats()
    return stats["pool_size"] - stats["pool_available"]


@pytest.fixture
def function_database(database: TestDatabase, snippets: SnippetLoader, monkeypatch) -> TestDatabase:
    """The test database with the page's schema, set as the function's DATABASE_URL."""
    database.execute_file(snippets.path(SCHEMA))
    monkeypatch.setenv("DATABASE_URL", database.url)
    return database


def test_warm_invocations_open_one_connection(function_database, snippets):
    handler = snippets.load(HANDLER)

    statuses = [invoke(handler, f"event {number}")["statusCode"] for number in range(INVOCATIONS)]

    assert statuses == [201] * INVOCATIONS
    assert function_database.view.connections_opened() == 1


def test_every_row_committed(function_database, snippets):
    handler = snippets.load(HANDLER)

    for number in range(INVOCATIONS):
        invoke(handler, f"event {number}")

    assert function_database.count_rows("events") == INVOCATIONS


def test_no_connection_left_checked_out(function_database, snippets):
    handler = snippets.load(HANDLER)

    for number in range(10):
        invoke(handler, f"event {number}")

        assert checked_out(handler) == 0
        states = [session.state for session in function_database.view.sessions()]
        assert states == ["idle"]


def test_pool_never_exceeds_one_connection(function_database, snippets):
    handler = snippets.load(HANDLER)
    failures: list[BaseException] = []

    def invoke_many() -> None:
        try:
            for number in range(10):
                assert invoke(handler, f"event {number}")["statusCode"] == 201
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=invoke_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []
    assert handler.pool.get_stats()["pool_size"] <= 1
    assert len(function_database.view.sessions()) <= 1
    assert function_database.view.connections_opened() == 1


def test_recovers_after_terminate(function_database, snippets):
    handler = snippets.load(HANDLER)
    invoke(handler, "before")

    ended = function_database.view.terminate()
    after = invoke(handler, "after")

    assert ended == 1
    assert after["statusCode"] == 201
    assert function_database.view.connections_opened() == 2
    assert function_database.count_rows("events") == 2


@pytest.mark.private_server
def test_recovers_after_server_restart(private_server, snippets, monkeypatch):
    database = private_server.database
    database.execute_file(snippets.path(SCHEMA))
    monkeypatch.setenv("DATABASE_URL", database.url)
    handler = snippets.load(HANDLER)
    invoke(handler, "before")

    private_server.restart()
    after = invoke(handler, "after")

    assert after["statusCode"] == 201
    assert database.count_rows("events") == 2


@pytest.mark.parametrize(
    "event",
    [
        {},
        {"body": None},
        {"body": "not json"},
        {"body": json.dumps(["a list"])},
        {"body": json.dumps({})},
        {"body": json.dumps({"message": 42})},
        {"body": json.dumps({"message": "   "})},
        {"body": json.dumps({"message": "x" * 1001})},
        {"body": "%%%", "isBase64Encoded": True},
        {"body": "//79", "isBase64Encoded": True},
        {"body": json.dumps({"message": "a\u0000b"})},
    ],
    ids=[
        "no-body",
        "null-body",
        "not-json",
        "list-body",
        "no-message",
        "number-message",
        "blank-message",
        "long-message",
        "bad-base64",
        "not-utf8",
        "nul-character",
    ],
)
def test_bad_event_rejected_without_write(function_database, snippets, event):
    handler = snippets.load(HANDLER)

    result = handler.handler(event, LambdaContext())

    assert result["statusCode"] == 400
    assert json.loads(result["body"])["error"]
    assert function_database.count_rows("events") == 0
    assert function_database.view.connections_opened() == 0


def test_base64_body_accepted(function_database, snippets):
    handler = snippets.load(HANDLER)
    body = json.dumps({"message": "encoded"}).encode()

    result = handler.handler(
        {"body": base64.b64encode(body).decode(), "isBase64Encoded": True}, LambdaContext()
    )

    assert result["statusCode"] == 201


def test_repeated_request_stored_once(function_database, snippets):
    handler = snippets.load(HANDLER)
    context = LambdaContext()

    first = handler.handler(http_event("once"), context)
    second = handler.handler(http_event("once"), context)

    assert first["statusCode"] == 201
    assert second["statusCode"] == 200
    assert json.loads(first["body"]) == json.loads(second["body"])
    assert function_database.count_rows("events") == 1


def test_missing_database_url_named(function_database, snippets, monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    handler = snippets.load(HANDLER)

    with pytest.raises(RuntimeError, match="DATABASE_URL is not set"):
        invoke(handler)


class TestBrokenCopiesFail:
    """Each check above goes red when the handler loses what the page states it needs."""

    def test_pool_per_invocation_opens_one_each(self, function_database, snippets):
        handler = snippets.load(HANDLER, POOL_PER_INVOCATION)

        for number in range(INVOCATIONS):
            invoke(handler, f"event {number}")

        assert function_database.view.connections_opened() == INVOCATIONS

    def test_unlocked_creation_opens_several(self, function_database, snippets):
        handler = snippets.load(HANDLER, NO_CREATION_LOCK)
        barrier = threading.Barrier(4)

        def invoke_together() -> None:
            barrier.wait()
            invoke(handler, "together")

        threads = [threading.Thread(target=invoke_together) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert function_database.view.connections_opened() > 1

    def test_no_check_fails_after_terminate(self, function_database, snippets):
        handler = snippets.load(HANDLER, NO_CHECKOUT_CHECK)
        invoke(handler, "before")

        function_database.view.terminate()

        with pytest.raises(psycopg.OperationalError):
            invoke(handler, "after")

    def test_unreturned_connection_stays_checked_out(self, function_database, snippets):
        handler = snippets.load(HANDLER, NEVER_RETURNED)

        invoke(handler, "first")

        assert checked_out(handler) == 1

    def test_uncommitted_rows_invisible(self, function_database, snippets):
        handler = snippets.load(HANDLER, NEVER_COMMITTED)

        for number in range(5):
            invoke(handler, f"event {number}")

        assert function_database.count_rows("events") == 0
