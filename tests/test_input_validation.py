"""Hostile and malformed events against the Lambda handlers, in Python and Node.js.

Every bad event must get a 400 with a short reason that does not repeat the marker value
the events carry, raise nothing, and leave the events table as it was. Every valid event
must be stored exactly as sent. Messages written as SQL injection are stored verbatim, and a
copy of each handler that formats the message into the SQL text fails the same check.
"""

from __future__ import annotations

import base64
import copy
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness.databases import TestDatabase
from tests.harness.lambda_context import LambdaContext
from tests.harness.node import NodeHandlerProcess, prepare_workspace, require_node
from tests.harness.snippets import SnippetLoader

HANDLER = "lambda/handler.py"
NODE_HANDLER = "lambda/handler.mjs"
NODE_POOL = "pool/pool.mjs"
SCHEMA = "lambda/schema.sql"

MAX_MESSAGE_CHARACTERS = 1000
# A reason is for the client to act on, so it stays one short sentence.
MAX_REASON_CHARACTERS = 100
# Bad events carry this text where a handler might echo it back, as a secret would be.
SECRET = "hunter2-secret-value"
TEN_MEGABYTES = 10 * 1024 * 1024
NESTING_DEPTH = 100_000

PYTHON_EXAMPLES = 200
NODE_EXAMPLES = 60

# Each property runs its examples against one warm handler and one database, as invocations
# of one function instance do, and checks the table once all examples have run.
PROPERTY_SETTINGS = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- Events ---------------------------------------------------------------------------------


def http_event(body: Any, *, base64_encoded: bool = False) -> dict[str, Any]:
    """Return an API Gateway HTTP API event (payload format 2.0) for POST /events."""
    return {
        "version": "2.0",
        "routeKey": "POST /events",
        "rawPath": "/events",
        "headers": {"content-type": "application/json"},
        "requestContext": {"http": {"method": "POST", "path": "/events"}},
        "isBase64Encoded": base64_encoded,
        "body": body,
    }


def json_event(payload: Any) -> dict[str, Any]:
    return http_event(json.dumps(payload))


def base64_event(data: bytes) -> dict[str, Any]:
    return http_event(base64.b64encode(data).decode("ascii"), base64_encoded=True)


def without_body() -> dict[str, Any]:
    event = http_event(None)
    del event["body"]
    return event


VALID_BODY = json.dumps({"message": "hello"})

BAD_EVENTS: dict[str, Any] = {
    "no event": None,
    "event is a list": ["body", VALID_BODY],
    "event is a string": VALID_BODY,
    "no body": without_body(),
    "body null": http_event(None),
    "body is a number": http_event(42),
    "body is an object": http_event({"message": "hello"}),
    "body empty": http_event(""),
    "body not json": http_event(f"message=hello&password={SECRET}"),
    "body json null": http_event("null"),
    "body json boolean": http_event("true"),
    "body json string": json_event("hello"),
    "body json array": json_event(["hello"]),
    "body deeply nested arrays": http_event("[" * NESTING_DEPTH + "]" * NESTING_DEPTH),
    "body with NaN": http_event('{"message": "hello", "count": NaN}'),
    "body with duplicate keys": http_event('{"message": "first", "message": "second"}'),
    "body of 10 MB": json_event({"message": "hello", "padding": "x" * TEN_MEGABYTES}),
    "message missing": json_event({"text": "hello", "password": SECRET}),
    "message null": json_event({"message": None}),
    "message boolean": json_event({"message": True}),
    "message number": json_event({"message": 42}),
    "message number of 5000 digits": http_event('{"message": ' + "9" * 5000 + "}"),
    "message object": json_event({"message": {"$gt": "", "password": SECRET}}),
    "message nested arrays": json_event({"message": [["a"], [["b", [SECRET]]]]}),
    "message empty": json_event({"message": ""}),
    "message only spaces": json_event({"message": "   "}),
    "message of 1001 characters": json_event({"message": SECRET + "x" * 1001}),
    "message of 10 MB": json_event({"message": SECRET + "x" * TEN_MEGABYTES}),
    "message with NUL": json_event({"message": f"{SECRET}\u0000after"}),
    "message with lone surrogate": http_event('{"message": "before \\ud800 after"}'),
    "base64 not base64": http_event("%%% not base64 %%%", base64_encoded=True),
    "base64 with stray characters": http_event(
        "!!" + base64.b64encode(VALID_BODY.encode()).decode("ascii"), base64_encoded=True
    ),
    "base64 of non-UTF-8 bytes": base64_event(b'{"message": "caf\xe9 \xff"}'),
}

# Events a handler is known not to reject, each with what it does instead. A fixed handler
# turns its strict xfail (Python) or its entry in the expected set (Node.js) into a failure.
PYTHON_DEFECTS: dict[str, str] = {}
NODE_DEFECTS: dict[str, str] = {}


def bad_event_params(defects: dict[str, str]) -> list[Any]:
    return [
        pytest.param(
            event,
            id=name,
            marks=[pytest.mark.xfail(reason=defects[name])] if name in defects else [],
        )
        for name, event in BAD_EVENTS.items()
    ]


# --- Checks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one invocation returned, or raised, and how many rows it added."""

    status: int | None
    reason: str | None
    raised: str | None
    rows_added: int

    @property
    def rejected_cleanly(self) -> bool:
        return (
            self.raised is None
            and self.status == 400
            and bool(self.reason)
            and len(self.reason) <= MAX_REASON_CHARACTERS
            and SECRET not in self.reason
            and self.rows_added == 0
        )


def reason_of(result: Any) -> str | None:
    if not isinstance(result, dict) or not isinstance(result.get("body"), str):
        return None
    payload = json.loads(result["body"])
    return payload.get("error") if isinstance(payload, dict) else None


def stored_message(database: TestDatabase, request_id: str) -> str | None:
    with database.connect() as connection:
        return fetch_message(connection, request_id)


def fetch_message(connection: psycopg.Connection, request_id: str) -> str | None:
    row = connection.execute(
        "SELECT message FROM events WHERE request_id = %s", (request_id,)
    ).fetchone()
    return row[0] if row else None


def events_table_exists(database: TestDatabase) -> bool:
    with database.connect() as connection:
        return connection.execute("SELECT to_regclass('events') IS NOT NULL").fetchone()[0]


# --- Python handler -------------------------------------------------------------------------


@pytest.fixture
def function_database(
    database: TestDatabase, snippets: SnippetLoader, monkeypatch: pytest.MonkeyPatch
) -> TestDatabase:
    """The test database with the events table, set as the function's DATABASE_URL."""
    database.execute_file(snippets.path(SCHEMA))
    monkeypatch.setenv("DATABASE_URL", database.url)
    return database


@pytest.fixture
def python_handler(function_database: TestDatabase, snippets: SnippetLoader) -> ModuleType:
    """The Python handler, loaded once as a cold start does, then kept warm."""
    return snippets.load(HANDLER)


def invoke_python(handler: ModuleType, event: Any, request_id: str | None = None) -> dict:
    # A deep copy, so that a handler that changes its event cannot change the test's table.
    context = LambdaContext(aws_request_id=request_id or str(uuid.uuid4()))
    return handler.handler(copy.deepcopy(event), context)


def python_outcome(handler: ModuleType, database: TestDatabase, event: Any) -> Outcome:
    before = database.count_rows("events")
    try:
        result = invoke_python(handler, event)
    except Exception as error:
        # Lambda reports an exception that escapes the handler as a function error.
        raised = f"{type(error).__name__}: {error}"
        return Outcome(None, None, raised, database.count_rows("events") - before)
    added = database.count_rows("events") - before
    return Outcome(result.get("statusCode"), reason_of(result), None, added)


@pytest.mark.snippet(HANDLER)
@pytest.mark.snippet(SCHEMA)
@pytest.mark.parametrize("event", bad_event_params(PYTHON_DEFECTS))
def test_python_rejects_bad_event(event, python_handler, function_database):
    result = invoke_python(python_handler, event)
    reason = reason_of(result)

    assert result["statusCode"] == 400
    assert reason
    assert len(reason) <= MAX_REASON_CHARACTERS
    assert SECRET not in result["body"]
    assert function_database.count_rows("events") == 0
    assert function_database.view.connections_opened() == 0


# --- Node.js handler ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node_modules() -> Path:
    return require_node()


@pytest.fixture
def node_function(
    node_modules: Path, function_database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> Iterator[NodeHandlerProcess]:
    """One warm Node.js instance of the handler, with pool.mjs beside it."""
    with node_handler_process(tmp_path, snippets, function_database) as process:
        yield process


def node_handler_process(
    directory: Path,
    snippets: SnippetLoader,
    database: TestDatabase,
    handler_source: str | None = None,
) -> NodeHandlerProcess:
    """Return a node process, not yet started, for handler.mjs (or *handler_source*)."""
    source = handler_source if handler_source is not None else snippets.source(NODE_HANDLER)
    prepare_workspace(directory, {"handler.mjs": source, "pool.mjs": snippets.source(NODE_POOL)})
    return NodeHandlerProcess(directory / "handler.mjs", {"DATABASE_URL": database.url})


def node_outcome(process: NodeHandlerProcess, database: TestDatabase, event: Any) -> Outcome:
    before = database.count_rows("events")
    invocation = process.invoke(event)
    added = database.count_rows("events") - before
    return Outcome(
        status=invocation.status_code,
        reason=reason_of(invocation.result),
        raised=str(invocation.error) if invocation.error else None,
        rows_added=added,
    )


@pytest.mark.snippet(NODE_HANDLER)
@pytest.mark.snippet(NODE_POOL)
@pytest.mark.snippet(SCHEMA)
def test_node_rejects_bad_events(node_function, function_database):
    outcomes = {
        name: node_outcome(node_function, function_database, event)
        for name, event in BAD_EVENTS.items()
    }
    misbehaving = {
        name: outcome for name, outcome in outcomes.items() if not outcome.rejected_cleanly
    }

    unexpected = {
        name: outcome for name, outcome in misbehaving.items() if name not in NODE_DEFECTS
    }
    fixed = set(NODE_DEFECTS) - set(misbehaving)
    assert unexpected == {}
    assert fixed == set(), "these events are rejected now, so remove them from NODE_DEFECTS"


# --- Properties -----------------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**12), max_value=10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Characters that UTF-8 can encode and PostgreSQL's text can store, so no surrogates or NUL.
STORABLE_CHARACTERS = st.characters(codec="utf-8", exclude_characters="\x00")


def not_strict_json(text: str) -> bool:
    def reject_constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        json.loads(text, parse_constant=reject_constant)
    except (ValueError, RecursionError):
        return True
    return False


def not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def with_message(payload: Any) -> dict[str, Any]:
    return json_event({"message": payload})


def inserted_nul(text: str, position: int) -> str:
    index = position % (len(text) + 1)
    return f"{text[:index]}\x00{text[index:]}"


VALID_MESSAGES = st.text(STORABLE_CHARACTERS, min_size=1, max_size=MAX_MESSAGE_CHARACTERS).filter(
    str.strip
)

# Each strategy breaks one rule. Events the handlers are known to mishandle are left to the
# table above, so that these properties hold for the handlers as they are.
MALFORMED_EVENTS = st.one_of(
    JSON_VALUES.filter(lambda value: not isinstance(value, dict)),
    st.dictionaries(st.text(max_size=8).filter(lambda key: key != "body"), JSON_VALUES, max_size=4),
    JSON_VALUES.filter(lambda value: not isinstance(value, str)).map(http_event),
    st.text(max_size=200).filter(not_strict_json).map(http_event),
    JSON_VALUES.filter(lambda value: not isinstance(value, dict)).map(json_event),
    st.dictionaries(
        st.text(max_size=8).filter(lambda key: key != "message"), JSON_VALUES, max_size=4
    ).map(json_event),
    JSON_VALUES.filter(lambda value: not isinstance(value, str)).map(with_message),
    st.just(with_message("")),
    st.text(
        STORABLE_CHARACTERS,
        min_size=MAX_MESSAGE_CHARACTERS + 1,
        max_size=MAX_MESSAGE_CHARACTERS + 200,
    ).map(with_message),
    st.builds(inserted_nul, VALID_MESSAGES, st.integers(min_value=0)).map(with_message),
    st.binary(max_size=64).filter(not_utf8).map(base64_event),
)


@st.composite
def valid_events(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """Return a valid event, sent as plain or base64-encoded JSON, and its message."""
    message = draw(VALID_MESSAGES)
    body = json.dumps({"message": message}, ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()):
        return base64_event(body.encode("utf-8")), message
    return http_event(body), message


def check_python_rejects_malformed(handler: ModuleType) -> None:
    """Check that a Python handler returns a short 400 for every event of MALFORMED_EVENTS."""

    @settings(PROPERTY_SETTINGS, max_examples=PYTHON_EXAMPLES)
    @given(event=MALFORMED_EVENTS)
    def rejected(event: Any) -> None:
        result = invoke_python(handler, event)
        reason = reason_of(result)

        assert result["statusCode"] == 400
        assert reason
        assert len(reason) <= MAX_REASON_CHARACTERS

    rejected()


@pytest.mark.snippet(HANDLER)
@pytest.mark.snippet(SCHEMA)
def test_python_malformed_event_property(python_handler, function_database):
    check_python_rejects_malformed(python_handler)

    assert function_database.count_rows("events") == 0
    assert function_database.view.connections_opened() == 0


@pytest.mark.snippet(HANDLER)
@pytest.mark.snippet(SCHEMA)
def test_python_valid_event_property(python_handler, function_database):
    stored_events = 0

    @settings(PROPERTY_SETTINGS, max_examples=PYTHON_EXAMPLES)
    @given(valid=valid_events())
    def stored_once(valid: tuple[dict[str, Any], str]) -> None:
        nonlocal stored_events
        event, message = valid
        request_id = str(uuid.uuid4())

        first = invoke_python(python_handler, event, request_id)
        repeated = invoke_python(python_handler, event, request_id)
        stored = fetch_message(reader, request_id)

        assert first["statusCode"] == 201
        assert repeated["statusCode"] == 200
        assert json.loads(repeated["body"]) == json.loads(first["body"])
        assert stored == message
        stored_events += 1

    with function_database.connect() as reader:
        stored_once()

    assert function_database.count_rows("events") == stored_events


@pytest.mark.snippet(NODE_HANDLER)
@pytest.mark.snippet(NODE_POOL)
@pytest.mark.snippet(SCHEMA)
def test_node_malformed_event_property(node_function, function_database):
    @settings(PROPERTY_SETTINGS, max_examples=NODE_EXAMPLES)
    @given(event=MALFORMED_EVENTS)
    def rejected(event: Any) -> None:
        invocation = node_function.invoke(event)
        reason = reason_of(invocation.result)

        assert invocation.error is None
        assert invocation.status_code == 400
        assert reason
        assert len(reason) <= MAX_REASON_CHARACTERS

    rejected()

    assert function_database.count_rows("events") == 0
    assert function_database.view.connections_opened() == 0


@pytest.mark.snippet(NODE_HANDLER)
@pytest.mark.snippet(NODE_POOL)
@pytest.mark.snippet(SCHEMA)
def test_node_valid_event_property(node_function, function_database):
    stored_events = 0

    @settings(PROPERTY_SETTINGS, max_examples=NODE_EXAMPLES)
    @given(valid=valid_events())
    def stored_once(valid: tuple[dict[str, Any], str]) -> None:
        nonlocal stored_events
        event, message = valid
        request_id = str(uuid.uuid4())

        first = node_function.invoke(event, request_id=request_id)
        repeated = node_function.invoke(event, request_id=request_id)
        stored = fetch_message(reader, request_id)

        assert first.error is None
        assert first.status_code == 201
        assert repeated.status_code == 200
        assert repeated.body == first.body
        assert stored == message
        stored_events += 1

    with function_database.connect() as reader:
        stored_once()

    assert function_database.count_rows("events") == stored_events


# --- SQL injection --------------------------------------------------------------------------

INJECTION_MESSAGES = {
    "quote and drop": "'; DROP TABLE events; --",
    "close the values and drop": "x'); DROP TABLE events; --",
    "always true": "' OR '1'='1",
    "second row": "x'), ('smuggled-request', 'smuggled message",
    "dollar quotes": "$$; DROP TABLE events; $$",
    "placeholders": "$1 $2 %s %(message)s :message ? {message}",
    "backslashes": "\\'; \\\\ \\x27 \\",
    "escape string": "E'\\x27' || chr(39) || '",
    "comment": "/* never closed -- ",
    "double quotes": '"; DROP TABLE "events',
    "lookalike quotes": "\u02bc; \uff07; \u2019; DROP TABLE events; --",
    "line separators": "first\u2028second\u2029third\r\n",
}

PYTHON_FORMATTED_INSERT = (
    (
        '"INSERT INTO events (request_id, message) VALUES (%s, %s) "',
        "f\"INSERT INTO events (request_id, message) VALUES ('{context.aws_request_id}', "
        "'{message}') \"",
    ),
    ("            (context.aws_request_id, message),\n", ""),
)
NODE_FORMATTED_INSERT = (
    (
        "client.query(INSERT_EVENT, [context.awsRequestId, message])",
        "client.query(`INSERT INTO events (request_id, message) VALUES "
        "('${context.awsRequestId}', '${message}') "
        "ON CONFLICT (request_id) DO NOTHING RETURNING id`)",
    ),
)


@dataclass(frozen=True)
class InjectionReport:
    """The table's contents after each injection message was sent once, and what failed."""

    stored: dict[str, str | None]
    table_exists: bool
    row_count: int | None
    failures: dict[str, str]


def injection_report(
    database: TestDatabase, request_ids: dict[str, str], failures: dict[str, str]
) -> InjectionReport:
    if not events_table_exists(database):
        return InjectionReport({}, table_exists=False, row_count=None, failures=failures)
    stored = {
        name: stored_message(database, request_id) for name, request_id in request_ids.items()
    }
    row_count = database.count_rows("events")
    return InjectionReport(stored, table_exists=True, row_count=row_count, failures=failures)


def send_injections_python(handler: ModuleType, database: TestDatabase) -> InjectionReport:
    request_ids: dict[str, str] = {}
    failures: dict[str, str] = {}
    for name, message in INJECTION_MESSAGES.items():
        request_ids[name] = str(uuid.uuid4())
        try:
            invoke_python(handler, json_event({"message": message}), request_ids[name])
        except Exception as error:
            # A copy that formats the SQL can break the statement, so the report keeps going.
            failures[name] = f"{type(error).__name__}: {error}"
    return injection_report(database, request_ids, failures)


def send_injections_node(process: NodeHandlerProcess, database: TestDatabase) -> InjectionReport:
    request_ids: dict[str, str] = {}
    failures: dict[str, str] = {}
    for name, message in INJECTION_MESSAGES.items():
        request_ids[name] = str(uuid.uuid4())
        invocation = process.invoke(json_event({"message": message}), request_id=request_ids[name])
        if invocation.error is not None:
            failures[name] = str(invocation.error)
    return injection_report(database, request_ids, failures)


@pytest.mark.snippet(HANDLER)
@pytest.mark.snippet(SCHEMA)
def test_python_injection_stored_verbatim(python_handler, function_database):
    report = send_injections_python(python_handler, function_database)

    assert report.failures == {}
    assert report.table_exists
    assert report.stored == INJECTION_MESSAGES
    assert report.row_count == len(INJECTION_MESSAGES)


@pytest.mark.snippet(NODE_HANDLER)
@pytest.mark.snippet(NODE_POOL)
@pytest.mark.snippet(SCHEMA)
def test_node_injection_stored_verbatim(node_function, function_database):
    report = send_injections_node(node_function, function_database)

    assert report.failures == {}
    assert report.table_exists
    assert report.stored == INJECTION_MESSAGES
    assert report.row_count == len(INJECTION_MESSAGES)


# Broken copies of the handlers, each without one check the page calls for.
PYTHON_NO_LENGTH_CHECK = (("    if len(message) > MAX_MESSAGE_LENGTH:\n", "    if False:\n"),)
PYTHON_NO_NUL_CHECK = (('    if "\\x00" in message:\n', "    if False:\n"),)
NODE_NO_NUL_CHECK = (('  if (message.includes("\\u0000")) {\n', "  if (false) {\n"),)


def smuggled_rows(database: TestDatabase) -> int:
    with database.connect() as connection:
        return connection.execute(
            "SELECT count(*) FROM events WHERE request_id = 'smuggled-request'"
        ).fetchone()[0]


class TestBrokenCopiesFail:
    """Each check above goes red when a handler loses the protection the page calls for."""

    @pytest.mark.snippet(HANDLER)
    @pytest.mark.snippet(SCHEMA)
    def test_python_formatted_sql_injected(self, function_database, snippets):
        handler = snippets.load(HANDLER, PYTHON_FORMATTED_INSERT)

        report = send_injections_python(handler, function_database)

        assert report.stored != INJECTION_MESSAGES
        assert smuggled_rows(function_database) == 1

    @pytest.mark.snippet(NODE_HANDLER)
    @pytest.mark.snippet(NODE_POOL)
    @pytest.mark.snippet(SCHEMA)
    def test_node_formatted_sql_injected(self, node_modules, function_database, snippets, tmp_path):
        source = snippets.source(NODE_HANDLER, NODE_FORMATTED_INSERT)

        with node_handler_process(tmp_path, snippets, function_database, source) as process:
            report = send_injections_node(process, function_database)

        assert report.stored != INJECTION_MESSAGES
        assert not report.table_exists

    @pytest.mark.snippet(HANDLER)
    @pytest.mark.snippet(SCHEMA)
    def test_python_no_length_check_stores(self, function_database, snippets):
        handler = snippets.load(HANDLER, PYTHON_NO_LENGTH_CHECK)
        event = BAD_EVENTS["message of 1001 characters"]

        outcome = python_outcome(handler, function_database, event)

        assert not outcome.rejected_cleanly
        assert outcome.rows_added == 1

    @pytest.mark.snippet(HANDLER)
    @pytest.mark.snippet(SCHEMA)
    def test_python_no_nul_check_raises(self, function_database, snippets):
        handler = snippets.load(HANDLER, PYTHON_NO_NUL_CHECK)
        event = BAD_EVENTS["message with NUL"]

        outcome = python_outcome(handler, function_database, event)

        assert not outcome.rejected_cleanly
        assert outcome.raised is not None

    @pytest.mark.snippet(NODE_HANDLER)
    @pytest.mark.snippet(NODE_POOL)
    @pytest.mark.snippet(SCHEMA)
    def test_node_no_nul_check_fails(self, node_modules, function_database, snippets, tmp_path):
        source = snippets.source(NODE_HANDLER, NODE_NO_NUL_CHECK)

        with node_handler_process(tmp_path, snippets, function_database, source) as process:
            outcome = node_outcome(process, function_database, BAD_EVENTS["message with NUL"])

        assert not outcome.rejected_cleanly
        assert outcome.raised is not None

    @pytest.mark.snippet(HANDLER)
    @pytest.mark.snippet(SCHEMA)
    def test_python_property_finds_missing_check(self, function_database, snippets):
        handler = snippets.load(HANDLER, PYTHON_NO_LENGTH_CHECK)

        with pytest.raises(AssertionError):
            check_python_rejects_malformed(handler)
