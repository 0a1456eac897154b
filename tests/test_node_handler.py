"""The Node.js Lambda handler in snippets/lambda/handler.mjs, run in one long-lived node process.

The handler imports snippets/pool/pool.mjs from the same directory, so each test writes both
files side by side, as one deployment package contains them. Connections are counted at the
database server. The tests named "broken" run a copy of the handler or of the pool module with
one line changed, to show that the same checks catch the mistake.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.harness.databases import TestDatabase
from tests.harness.node import (
    Invocation,
    NodeHandlerProcess,
    NodeProcessError,
    PoolStats,
    prepare_workspace,
    require_node,
)
from tests.harness.server_view import Session
from tests.harness.snippets import SnippetLoader

HANDLER = "lambda/handler.mjs"
POOL = "pool/pool.mjs"
SCHEMA = "lambda/schema.sql"
WARM_INVOCATIONS = 50
CONCURRENT_INVOCATIONS = 4

pytestmark = [
    pytest.mark.snippet(HANDLER),
    pytest.mark.snippet(POOL),
    pytest.mark.snippet(SCHEMA),
]


@pytest.fixture(scope="session")
def node_modules() -> Path:
    return require_node()


def http_event(body: str | None, *, base64_encoded: bool = False) -> dict[str, Any]:
    """Return an API Gateway HTTP API event (payload format 2.0) for POST /events."""
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "POST /events",
        "rawPath": "/events",
        "rawQueryString": "",
        "headers": {"content-type": "application/json"},
        "requestContext": {"http": {"method": "POST", "path": "/events"}},
        "isBase64Encoded": base64_encoded,
    }
    if body is not None:
        event["body"] = body
    return event


def message_event(message: str) -> dict[str, Any]:
    return http_event(json.dumps({"message": message}))


def failures(invocations: list[Invocation]) -> list[str]:
    return [str(invocation.error) for invocation in invocations if not invocation.ok]


@contextmanager
def running_handler(
    directory: Path,
    snippets: SnippetLoader,
    database_url: str | None,
    *,
    handler_source: str | None = None,
    pool_source: str | None = None,
) -> Iterator[NodeHandlerProcess]:
    """Run handler.mjs with pool.mjs beside it, in one long-lived node process.

    *handler_source* or *pool_source*, a broken copy, replaces the snippet's own text.
    """
    if handler_source is None:
        handler_source = snippets.source(HANDLER)
    if pool_source is None:
        pool_source = snippets.source(POOL)

    prepare_workspace(directory, {"handler.mjs": handler_source, "pool.mjs": pool_source})
    environment = {"DATABASE_URL": database_url} if database_url is not None else {}
    with NodeHandlerProcess(directory / "handler.mjs", environment) as handler:
        yield handler


def prepare_schema(database: TestDatabase, snippets: SnippetLoader) -> None:
    database.execute_file(snippets.path(SCHEMA))


def run_warm_invocations(
    handler: NodeHandlerProcess, database: TestDatabase
) -> tuple[list[Invocation], list[PoolStats | None], list[list[Session]]]:
    """Invoke the handler repeatedly, reading the pool and the server after each invocation."""
    invocations, stats, sessions = [], [], []
    for number in range(WARM_INVOCATIONS):
        invocations.append(handler.invoke(message_event(f"warm invocation {number}")))
        stats.append(handler.pool_stats())
        sessions.append(database.view.sessions())
    return invocations, stats, sessions


def test_handler_warm_invocations_reuse_connection(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    prepare_schema(database, snippets)

    with running_handler(tmp_path, snippets, database.url) as handler:
        invocations = [handler.invoke(message_event(f"n{n}")) for n in range(WARM_INVOCATIONS)]

    assert failures(invocations) == []
    assert {invocation.status_code for invocation in invocations} == {201}
    assert database.view.connections_opened() == 1


def test_handler_broken_pool_per_invocation(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    prepare_schema(database, snippets)
    pool_source = snippets.source(POOL, (("pool === undefined", "true"),))

    with running_handler(tmp_path, snippets, database.url, pool_source=pool_source) as handler:
        invocations = [handler.invoke(message_event(f"n{n}")) for n in range(WARM_INVOCATIONS)]

    assert failures(invocations) == []
    assert database.view.connections_opened() == WARM_INVOCATIONS


def test_handler_rows_committed(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    prepare_schema(database, snippets)

    with running_handler(tmp_path, snippets, database.url) as handler:
        invocations, _, sessions = run_warm_invocations(handler, database)

        visible_rows = database.count_rows("events")

    assert failures(invocations) == []
    assert visible_rows == WARM_INVOCATIONS
    assert {session.state for found in sessions for session in found} == {"idle"}


def test_handler_broken_transaction_left_open(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    prepare_schema(database, snippets)
    opened_transaction = 'await client.query("BEGIN");\n    const inserted = await client.query('
    handler_source = snippets.source(
        HANDLER, (("const inserted = await client.query(", opened_transaction),)
    )

    with running_handler(
        tmp_path, snippets, database.url, handler_source=handler_source
    ) as handler:
        invocations, _, sessions = run_warm_invocations(handler, database)

        visible_rows = database.count_rows("events")

    assert failures(invocations) == []
    assert visible_rows == 0
    assert {session.state for found in sessions for session in found} == {"idle in transaction"}


def test_handler_returns_client_each_time(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    prepare_schema(database, snippets)

    with running_handler(tmp_path, snippets, database.url) as handler:
        invocations, stats, sessions = run_warm_invocations(handler, database)

    assert failures(invocations) == []
    assert None not in stats
    assert [pool.checked_out for pool in stats] == [0] * WARM_INVOCATIONS
    assert [pool.waiting for pool in stats] == [0] * WARM_INVOCATIONS
    assert max(pool.total for pool in stats) == 1
    assert max(len(found) for found in sessions) == 1


def test_handler_broken_client_never_released(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    prepare_schema(database, snippets)
    pool_source = snippets.source(POOL, (("release(client, failure);", ""),))

    with running_handler(tmp_path, snippets, database.url, pool_source=pool_source) as handler:
        first = handler.invoke(message_event("first"))
        stats = handler.pool_stats()
        second = handler.invoke(message_event("second"))

    assert first.ok
    assert stats is not None
    assert stats.checked_out == 1
    assert not second.ok


def test_handler_concurrent_invocations_one_connection(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    prepare_schema(database, snippets)
    events = [message_event(f"concurrent {n}") for n in range(CONCURRENT_INVOCATIONS)]

    with running_handler(tmp_path, snippets, database.url) as handler:
        invocations = handler.invoke_concurrently(events)
        stats = handler.pool_stats()

    assert failures(invocations) == []
    assert stats is not None
    assert stats.total == 1
    assert database.view.connections_opened() == 1
    assert database.count_rows("events") == CONCURRENT_INVOCATIONS


def test_handler_broken_pool_max_above_one(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    prepare_schema(database, snippets)
    pool_source = snippets.source(POOL, (("max: 1,", "max: 10,"),))
    events = [message_event(f"concurrent {n}") for n in range(CONCURRENT_INVOCATIONS)]

    with running_handler(tmp_path, snippets, database.url, pool_source=pool_source) as handler:
        invocations = handler.invoke_concurrently(events)

    assert failures(invocations) == []
    assert database.view.connections_opened() > 1


@pytest.mark.parametrize("frozen", [False, True], ids=["running", "frozen"])
def test_handler_reconnects_after_terminate(
    frozen: bool,
    node_modules: Path,
    database: TestDatabase,
    snippets: SnippetLoader,
    tmp_path: Path,
) -> None:
    prepare_schema(database, snippets)

    with running_handler(tmp_path, snippets, database.url) as handler:
        before = handler.invoke(message_event("before"))

        if frozen:
            after = handler.invoke_after_freeze(message_event("after"), database.view.terminate)
        else:
            database.view.terminate()
            handler.wait_until_pool_empty()
            after = handler.invoke(message_event("after"))

    assert before.status_code == 201
    assert after.error is None
    assert after.status_code == 201
    assert database.view.connections_opened() == 2


def test_handler_broken_no_checkout_check(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    prepare_schema(database, snippets)
    pool_source = snippets.source(POOL, (('await client.query("SELECT 1");', ""),))

    with running_handler(tmp_path, snippets, database.url, pool_source=pool_source) as handler:
        before = handler.invoke(message_event("before"))
        after = handler.invoke_after_freeze(message_event("after"), database.view.terminate)

    assert before.status_code == 201
    assert after.error is not None


def test_handler_broken_no_pool_error_listener(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    prepare_schema(database, snippets)
    pool_source = snippets.source(POOL, (('created.on("error", (error) => {', "((error) => {"),))

    with running_handler(tmp_path, snippets, database.url, pool_source=pool_source) as handler:
        before = handler.invoke(message_event("before"))
        database.view.terminate()

        with pytest.raises(NodeProcessError, match="exited with code"):
            handler.wait_until_pool_empty()

    assert before.status_code == 201


@pytest.mark.private_server
@pytest.mark.parametrize("frozen", [False, True], ids=["running", "frozen"])
def test_handler_reconnects_after_restart(
    frozen: bool, node_modules: Path, private_server, snippets: SnippetLoader, tmp_path: Path
) -> None:
    database = private_server.database
    prepare_schema(database, snippets)

    with running_handler(tmp_path, snippets, database.url) as handler:
        before = handler.invoke(message_event("before"))

        if frozen:
            after = handler.invoke_after_freeze(message_event("after"), private_server.restart)
        else:
            private_server.restart()
            handler.wait_until_pool_empty()
            after = handler.invoke(message_event("after"))

    assert before.status_code == 201
    assert after.error is None
    assert after.status_code == 201
    assert database.view.connections_opened() == 2
    assert database.count_rows("events") == 2


def test_handler_retry_inserts_once(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    prepare_schema(database, snippets)
    request_id = str(uuid.uuid4())

    with running_handler(tmp_path, snippets, database.url) as handler:
        first = handler.invoke(message_event("once"), request_id=request_id)
        retry = handler.invoke(message_event("once"), request_id=request_id)

    with database.connect() as connection:
        stored = connection.execute("SELECT id::text, request_id FROM events").fetchall()

    assert first.status_code == 201
    assert retry.status_code == 200
    assert retry.body == first.body
    assert stored == [(first.body["id"], request_id)]


def _base64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


BAD_EVENTS = {
    "no event": None,
    "no body": http_event(None),
    "empty body": http_event(""),
    "body not json": http_event("message=hello"),
    "base64 body not json": http_event(_base64("message=hello"), base64_encoded=True),
    "body json array": http_event(json.dumps(["hello"])),
    "body json null": http_event("null"),
    "message missing": http_event(json.dumps({"text": "hello"})),
    "message number": http_event(json.dumps({"message": 42})),
    "message null": http_event(json.dumps({"message": None})),
    "message empty": message_event(""),
    "message too long": message_event("x" * 1001),
    "message nul character": message_event("before\u0000after"),
}


@pytest.mark.parametrize("event", BAD_EVENTS.values(), ids=BAD_EVENTS.keys())
def test_handler_rejects_bad_event(
    event: dict[str, Any] | None,
    node_modules: Path,
    database: TestDatabase,
    snippets: SnippetLoader,
    tmp_path: Path,
) -> None:
    prepare_schema(database, snippets)

    with running_handler(tmp_path, snippets, database.url) as handler:
        invocation = handler.invoke(event)

    assert invocation.error is None
    assert invocation.status_code == 400
    assert "error" in invocation.body
    assert database.count_rows("events") == 0
    assert database.view.connections_opened() == 0


GOOD_MESSAGES = {
    "one character": ("x", False),
    "1000 characters": ("x" * 1000, False),
    "1000 emoji": ("\N{GRINNING FACE}" * 1000, False),
    "base64 body": ("sent as base64", True),
}


@pytest.mark.parametrize(("message", "encoded"), GOOD_MESSAGES.values(), ids=GOOD_MESSAGES.keys())
def test_handler_stores_valid_message(
    message: str,
    encoded: bool,
    node_modules: Path,
    database: TestDatabase,
    snippets: SnippetLoader,
    tmp_path: Path,
) -> None:
    prepare_schema(database, snippets)
    body = json.dumps({"message": message})
    event = http_event(_base64(body), base64_encoded=True) if encoded else http_event(body)

    with running_handler(tmp_path, snippets, database.url) as handler:
        invocation = handler.invoke(event)

    with database.connect() as connection:
        stored = connection.execute("SELECT message FROM events").fetchall()

    assert invocation.error is None
    assert invocation.status_code == 201
    assert stored == [(message,)]


def test_handler_missing_url_names_variable(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    prepare_schema(database, snippets)

    with running_handler(tmp_path, snippets, None) as handler:
        invocation = handler.invoke(message_event("no database"))

    assert invocation.error is not None
    assert "DATABASE_URL" in invocation.error.message


def test_handler_logs_omit_connection_string(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    prepare_schema(database, snippets)
    password = urlsplit(database.url).password

    with running_handler(tmp_path, snippets, database.url) as handler:
        handler.invoke(message_event("first"))
        database.view.terminate()
        handler.wait_until_pool_empty()
        handler.invoke(message_event("second"))
        handler.invoke_after_freeze(message_event("third"), database.view.terminate)

    assert "idle connection closed" in handler.output
    assert "replacing a broken connection" in handler.output
    assert database.url not in handler.output
    assert password is None or password not in handler.output
