"""The Lambda handlers run under AWS's runtime interface clients, counted at the database server.

Each instance is an execution environment: `awslambdaric` (Python) or `aws-lambda-ric`
(Node.js) started against a Runtime API served on 127.0.0.1. The tests named `broken` run a
copy of the handler whose pool is created inside every invocation, and show that the same
check fails.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests.harness import platform_scenarios as scenarios
from tests.harness.databases import TestDatabase
from tests.harness.invocations import FunctionInstance, HttpRequest, InstanceSet, Invocation
from tests.harness.lambda_functions import (
    NODE,
    PYTHON,
    LambdaDeployment,
    LambdaInstance,
    api_gateway_event,
    runtime_client_problem,
)
from tests.harness.node import prepare_workspace, require_node
from tests.harness.platform_checks import BrokenPoolChecks, PlatformChecks
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


def send_event(event: Any) -> scenarios.Sender:
    def send(instance: FunctionInstance) -> Invocation:
        assert isinstance(instance, LambdaInstance)
        return instance.invoke_event(event)

    return send


class TestAwsLambda(PlatformChecks):
    """The handler with its pool at module level, run by the runtime interface client."""

    BAD_REQUESTS: ClassVar[dict[str, tuple[scenarios.Sender, int]]] = {
        "event not an object": (send_event(["not", "an", "object"]), 400),
        "no body": (scenarios.send(HttpRequest(b"")), 400),
        "body a number": (
            send_event({"version": "2.0", "body": 42, "isBase64Encoded": False}),
            400,
        ),
        "body not json": (
            scenarios.send(HttpRequest(b"message=hello", content_type="text/plain")),
            400,
        ),
        "body json array": (scenarios.send(HttpRequest.json(["hello"])), 400),
        "message missing": (scenarios.send(HttpRequest.json({"text": "hello"})), 400),
        "message a number": (scenarios.send(HttpRequest.json({"message": 42})), 400),
        "message too long": (scenarios.send(HttpRequest.message("x" * 1001)), 400),
        "body of 256 KiB": (scenarios.send(HttpRequest.message("x" * 256 * 1024)), 400),
        "body not utf-8": (scenarios.send(HttpRequest(b"\xff\xfe{}")), 400),
    }

    def test_request_id_reaches_handler(
        self, deploy: Deploy, database: TestDatabase, instances: InstanceSet
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


class TestBrokenPoolPerInvocation(BrokenPoolChecks):
    """The handler with its pool created inside every invocation fails each check above."""
