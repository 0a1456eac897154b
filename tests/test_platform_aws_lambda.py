"""The Lambda handlers run under AWS's runtime interface clients, counted at the database server.

Each instance is an execution environment: `awslambdaric` (Python) or `aws-lambda-ric`
(Node.js) started against a Runtime API served on 127.0.0.1. The tests named `broken` run a
copy of the handler whose pool is created inside every invocation, and show that the same
check fails.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.harness import platform_scenarios as scenarios
from tests.harness.databases import TestDatabase
from tests.harness.invocations import FunctionInstance, HttpRequest, InstanceSet
from tests.harness.lambda_functions import (
    NODE,
    PYTHON,
    LambdaDeployment,
    LambdaInstance,
    api_gateway_event,
    runtime_client_problem,
)
from tests.harness.node import prepare_workspace, require_node
from tests.harness.snippets import SnippetLoader

HANDLER_PY = "lambda/handler.py"
HANDLER_MJS = "lambda/handler.mjs"
POOL_MJS = "pool/pool.mjs"
SCHEMA = "lambda/schema.sql"

pytestmark = pytest.mark.snippet(SCHEMA)

LANGUAGES = [
    pytest.param(PYTHON, marks=pytest.mark.snippet(HANDLER_PY), id="python"),
    pytest.param(
        NODE, marks=[pytest.mark.snippet(HANDLER_MJS), pytest.mark.snippet(POOL_MJS)], id="node"
    ),
]

# Broken copies that create the pool inside every invocation and never close the old one.
POOL_PER_INVOCATION_PY = (("        if pool is None:\n", "        if True:\n"),)
POOL_PER_INVOCATION_MJS = (("pool === undefined", "true"),)

Deploy = Callable[..., LambdaDeployment]


@pytest.fixture(params=LANGUAGES)
def language(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def instances() -> Iterator[InstanceSet]:
    with InstanceSet() as started:
        yield started


@pytest.fixture
def deploy(language: str, snippets: SnippetLoader, tmp_path: Path) -> Deploy:
    """Return a function that writes the handler's deployment package and configures it.

    Called with `broken=True`, it deploys the copy whose pool is created in every invocation.
    """
    if language == NODE:
        require_node()

    def build(database: TestDatabase, *, broken: bool = False) -> LambdaDeployment:
        database.execute_file(snippets.path(SCHEMA))
        task_root = tmp_path / f"task-{uuid.uuid4().hex[:8]}"
        if language == PYTHON:
            replacements = POOL_PER_INVOCATION_PY if broken else ()
            task_root.mkdir()
            (task_root / "handler.py").write_text(snippets.source(HANDLER_PY, replacements))
        else:
            replacements = POOL_PER_INVOCATION_MJS if broken else ()
            files = {
                "handler.mjs": snippets.source(HANDLER_MJS),
                "pool.mjs": snippets.source(POOL_MJS, replacements),
            }
            prepare_workspace(task_root, files)
        problem = runtime_client_problem(language, task_root)
        if problem is not None:
            pytest.skip(problem)
        return LambdaDeployment(
            name="record-event",
            runtime=language,
            task_root=task_root,
            handler="handler.handler",
            environment={"DATABASE_URL": database.url},
        )

    return build


def assert_no_secret_logged(database: TestDatabase, output: str) -> None:
    password = urlsplit(database.url).password
    assert database.url not in output
    assert password is None or password not in output


def test_warm_invocations_one_connection(
    deploy: Deploy, database: TestDatabase, instances: InstanceSet
) -> None:
    result = scenarios.warm(instances, deploy(database), database)

    assert result.failures == []
    assert result.report.connections_opened == 1
    assert result.rows == scenarios.WARM_INVOCATIONS


def test_concurrent_instances_one_connection_each(
    deploy: Deploy, database: TestDatabase, instances: InstanceSet
) -> None:
    result = scenarios.concurrent(instances, deploy(database), database)

    assert result.failures == []
    assert result.report.connections_opened == scenarios.INSTANCES
    assert result.report.sessions_open == scenarios.INSTANCES
    assert result.rows == scenarios.INSTANCES * scenarios.REQUESTS_PER_INSTANCE


def test_sessions_idle_after_each_invocation(
    deploy: Deploy, database: TestDatabase, instances: InstanceSet
) -> None:
    result = scenarios.states_after_each(instances, deploy(database), database)

    assert [invocation.status for invocation in result.invocations] == [
        201
    ] * scenarios.STATE_CHECKS
    assert set(result.states) == {("idle",)}
    assert len(result.session_ids) == 1


def test_recovers_after_idle_timeout(
    deploy: Deploy, database: TestDatabase, instances: InstanceSet
) -> None:
    result = scenarios.after_idle_gap(instances, deploy(database), database)

    assert result.failures == []
    assert result.report.connections_opened == 2


def test_recovers_after_terminate(
    deploy: Deploy, database: TestDatabase, instances: InstanceSet
) -> None:
    result = scenarios.after_terminate(instances, deploy(database), database)

    assert result.failures == []
    assert result.report.connections_opened == 2
    assert_no_secret_logged(database, instances.outputs)


def test_recovers_after_terminate_while_frozen(
    deploy: Deploy, database: TestDatabase, instances: InstanceSet
) -> None:
    result = scenarios.after_terminate_while_frozen(instances, deploy(database), database)

    assert result.failures == []
    assert result.report.connections_opened == 2


@pytest.mark.private_server
def test_recovers_after_server_restart(
    deploy: Deploy, private_server: Any, instances: InstanceSet
) -> None:
    database = private_server.database

    result = scenarios.after_restart(instances, deploy(database), database, private_server.restart)

    assert result.failures == []
    assert result.report.connections_opened == 2
    assert result.rows == 2 * scenarios.INVOCATIONS_AROUND_EVENT


def test_request_id_reaches_handler(
    deploy: Deploy, database: TestDatabase, instances: InstanceSet
) -> None:
    instance = instances.start(deploy(database))
    assert isinstance(instance, LambdaInstance)
    request_id = str(uuid.uuid4())
    event = api_gateway_event(HttpRequest.message("delivered twice"))

    first = instance.invoke_event(event, request_id=request_id)
    second = instance.invoke_event(event, request_id=request_id)

    with database.connect() as connection:
        stored = connection.execute("SELECT request_id FROM events").fetchall()
    assert first.status == 201
    assert second.status == 200
    assert second.body == first.body
    assert stored == [(request_id,)]


def send_event(event: Any) -> Callable[[FunctionInstance], Any]:
    def send(instance: FunctionInstance) -> Any:
        assert isinstance(instance, LambdaInstance)
        return instance.invoke_event(event)

    return send


def send_request(request: HttpRequest) -> Callable[[FunctionInstance], Any]:
    return lambda instance: instance.invoke(request)


BAD_REQUESTS = {
    "event not an object": send_event(["not", "an", "object"]),
    "no body": send_request(HttpRequest(b"")),
    "body a number": send_event({"version": "2.0", "body": 42, "isBase64Encoded": False}),
    "body not json": send_request(HttpRequest(b"message=hello", content_type="text/plain")),
    "body json array": send_request(HttpRequest.json(["hello"])),
    "message missing": send_request(HttpRequest.json({"text": "hello"})),
    "message a number": send_request(HttpRequest.json({"message": 42})),
    "message too long": send_request(HttpRequest.message("x" * 1001)),
    "body of 256 KiB": send_request(HttpRequest.message("x" * 256 * 1024)),
    "body not utf-8": send_request(HttpRequest(b"\xff\xfe{}")),
}


def test_bad_requests_rejected_without_writes(
    deploy: Deploy, database: TestDatabase, instances: InstanceSet
) -> None:
    instance = instances.start(deploy(database))

    outcomes = scenarios.rejected(instance, BAD_REQUESTS)

    assert outcomes == dict.fromkeys(BAD_REQUESTS, (400, True))
    assert database.count_rows("events") == 0
    assert database.view.connections_opened() == 0
    assert_no_secret_logged(database, instances.outputs)


class TestBrokenPoolPerInvocation:
    """The handler with its pool created inside every invocation fails each check above."""

    def test_warm_invocations_open_many(
        self, deploy: Deploy, database: TestDatabase, instances: InstanceSet
    ) -> None:
        result = scenarios.warm(instances, deploy(database, broken=True), database)

        assert result.failures == []
        assert result.report.connections_opened == scenarios.WARM_INVOCATIONS

    def test_concurrent_instances_open_more(
        self, deploy: Deploy, database: TestDatabase, instances: InstanceSet
    ) -> None:
        result = scenarios.concurrent(instances, deploy(database, broken=True), database)

        assert result.report.connections_opened > scenarios.INSTANCES

    def test_sessions_change_or_pile_up(
        self, deploy: Deploy, database: TestDatabase, instances: InstanceSet
    ) -> None:
        result = scenarios.states_after_each(instances, deploy(database, broken=True), database)

        assert len(result.session_ids) > 1

    def test_idle_timeout_opens_more(
        self, deploy: Deploy, database: TestDatabase, instances: InstanceSet
    ) -> None:
        result = scenarios.after_idle_gap(instances, deploy(database, broken=True), database)

        assert result.report.connections_opened > 2

    def test_terminate_opens_more(
        self, deploy: Deploy, database: TestDatabase, instances: InstanceSet
    ) -> None:
        result = scenarios.after_terminate(instances, deploy(database, broken=True), database)

        assert result.report.connections_opened > 2

    def test_frozen_terminate_opens_more(
        self, deploy: Deploy, database: TestDatabase, instances: InstanceSet
    ) -> None:
        result = scenarios.after_terminate_while_frozen(
            instances, deploy(database, broken=True), database
        )

        assert result.report.connections_opened > 2

    @pytest.mark.private_server
    def test_restart_opens_more(
        self, deploy: Deploy, private_server: Any, instances: InstanceSet
    ) -> None:
        database = private_server.database

        result = scenarios.after_restart(
            instances, deploy(database, broken=True), database, private_server.restart
        )

        assert result.report.connections_opened > 2
