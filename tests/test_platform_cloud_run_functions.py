"""The Cloud Run functions served by the real Functions Framework, counted at the database server.

Each instance is one framework server on 127.0.0.1 that the tests send HTTP requests to.
Unless a test sets another concurrency, an instance serves one request at a time (THREADS=1 for
Python) with a pool of one connection. The tests named `broken` run a copy of the function
whose pool is created inside every request, and show that the same check fails.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from packaging.requirements import Requirement

from tests.harness import platform_scenarios as scenarios
from tests.harness.cloud_run_functions import NODE, PYTHON, CloudRunFunctionDeployment
from tests.harness.databases import TestDatabase
from tests.harness.invocations import FunctionInstance, HttpRequest, InstanceSet
from tests.harness.node import prepare_workspace, require_node
from tests.harness.snippets import SnippetLoader

MAIN_PY = "platforms/cloud-run-functions/main.py"
INDEX_MJS = "platforms/cloud-run-functions/index.mjs"
PACKAGE_JSON = "platforms/cloud-run-functions/package.json"
REQUIREMENTS = "platforms/cloud-run-functions/requirements.txt"
SCHEMA = "lambda/schema.sql"

LANGUAGES = [
    pytest.param(
        PYTHON, marks=[pytest.mark.snippet(SCHEMA), pytest.mark.snippet(MAIN_PY)], id="python"
    ),
    pytest.param(
        NODE,
        marks=[
            pytest.mark.snippet(SCHEMA),
            pytest.mark.snippet(INDEX_MJS),
            pytest.mark.snippet(PACKAGE_JSON),
        ],
        id="node",
    ),
]

# Broken copies that create the pool inside every request and never close the old one.
POOL_PER_REQUEST_PY = (("        if pool is None:\n", "        if True:\n"),)
POOL_PER_REQUEST_MJS = (("pool === undefined", "true"),)

Deploy = Callable[..., CloudRunFunctionDeployment]


@pytest.fixture(params=LANGUAGES)
def language(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def instances() -> Iterator[InstanceSet]:
    with InstanceSet() as started:
        yield started


@pytest.fixture
def deploy(language: str, snippets: SnippetLoader, tmp_path: Path) -> Deploy:
    """Return a function that writes the function's source and configures its concurrency.

    *concurrency* sets THREADS (Python) and DATABASE_POOL_SIZE alike. With `broken=True` it
    deploys the copy whose pool is created in every request.
    """
    if language == NODE:
        require_node()

    def build(
        database: TestDatabase, *, concurrency: int = 1, broken: bool = False
    ) -> CloudRunFunctionDeployment:
        database.execute_file(snippets.path(SCHEMA))
        directory = tmp_path / f"function-{uuid.uuid4().hex[:8]}"
        environment = {
            "DATABASE_URL": database.url,
            "DATABASE_POOL_SIZE": str(concurrency),
            "THREADS": str(concurrency),
        }
        if language == PYTHON:
            directory.mkdir()
            source = snippets.source(MAIN_PY, POOL_PER_REQUEST_PY if broken else ())
            (directory / "main.py").write_text(source)
            return CloudRunFunctionDeployment(
                "store-event", PYTHON, directory, "main.py", "store_event", environment
            )
        source = snippets.source(INDEX_MJS, POOL_PER_REQUEST_MJS if broken else ())
        files = {"index.mjs": source, "package.json": snippets.source(PACKAGE_JSON)}
        prepare_workspace(directory, files)
        # The framework reads package.json in the source directory to find the main module.
        return CloudRunFunctionDeployment(
            "store-event", NODE, directory, ".", "storeEvent", environment
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


def test_concurrency_one_shares_one_connection(
    deploy: Deploy, database: TestDatabase, instances: InstanceSet
) -> None:
    result = scenarios.threaded(instances, deploy(database, concurrency=1), database)

    assert result.failures == []
    assert result.report.connections_opened == 1
    assert result.rows == scenarios.THREADS * scenarios.REQUESTS_PER_THREAD


def test_concurrency_four_pool_of_four(
    deploy: Deploy, database: TestDatabase, instances: InstanceSet
) -> None:
    deployment = deploy(database, concurrency=scenarios.THREADS)

    result = scenarios.threaded(instances, deployment, database)

    assert result.failures == []
    assert 1 <= result.report.connections_opened <= scenarios.THREADS
    assert result.report.sessions_open <= scenarios.THREADS
    assert set(result.report.session_states) == {"idle"}
    assert result.rows == scenarios.THREADS * scenarios.REQUESTS_PER_THREAD


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


def send(request: HttpRequest) -> Callable[[FunctionInstance], Any]:
    return lambda instance: instance.invoke(request)


# Each bad request, with the status it must get and whether the function's own JSON reason
# comes with it.
BAD_REQUESTS = {
    "no body": (send(HttpRequest(b"")), 400),
    "body not json": (send(HttpRequest(b"message=hello", content_type="text/plain")), 400),
    "body json array": (send(HttpRequest.json(["hello"])), 400),
    "message missing": (send(HttpRequest.json({"text": "hello"})), 400),
    "message a number": (send(HttpRequest.json({"message": 42})), 400),
    "message blank": (send(HttpRequest.message("   ")), 400),
    "message too long": (send(HttpRequest.message("x" * 1001)), 400),
    "message with nul": (send(HttpRequest.message("a\u0000b")), 400),
    "body over 16 KiB": (send(HttpRequest.message("x" * 20_000)), 413),
    "body deeply nested": (
        send(HttpRequest(b"[" * 5000 + b"]" * 5000, content_type="text/plain")),
        400,
    ),
    "body with nan": (
        send(HttpRequest(b'{"message": "hi", "n": NaN}', content_type="text/plain")),
        400,
    ),
    "body repeats a key": (
        send(HttpRequest(b'{"message": "a", "message": "b"}', content_type="text/plain")),
        400,
    ),
    "message of 5000 digits": (
        send(HttpRequest(b'{"message": ' + b"9" * 5000 + b"}", content_type="text/plain")),
        400,
    ),
    "message lone surrogate": (
        send(HttpRequest(b'{"message": "a\\ud800b"}', content_type="text/plain")),
        400,
    ),
    "body not utf-8": (
        send(HttpRequest(b'{"message": "caf\xe9"}', content_type="text/plain")),
        400,
    ),
    "method get": (send(HttpRequest(b"", method="GET")), 405),
}


def test_bad_requests_rejected_without_writes(
    deploy: Deploy, database: TestDatabase, instances: InstanceSet
) -> None:
    instance = instances.start(deploy(database))
    requests = {name: sender for name, (sender, _) in BAD_REQUESTS.items()}

    outcomes = scenarios.rejected(instance, requests)

    assert outcomes == {name: (status, True) for name, (_, status) in BAD_REQUESTS.items()}
    assert database.count_rows("events") == 0
    assert database.view.connections_opened() == 0
    assert_no_secret_logged(database, instances.outputs)


def test_malformed_json_rejected_without_writes(
    language: str, deploy: Deploy, database: TestDatabase, instances: InstanceSet
) -> None:
    instance = instances.start(deploy(database))

    invocation = instance.invoke(HttpRequest(b'{"message": '))

    assert invocation.status == 400
    if language == NODE:
        # The Node.js framework rejects the body itself, with an HTML page, before the function.
        assert "Bad Request" in invocation.body
    else:
        assert invocation.body == {"error": "the body is not JSON, or repeats a key"}
    assert database.count_rows("events") == 0
    assert_no_secret_logged(database, instances.outputs)


class TestBrokenPoolPerRequest:
    """The function with its pool created inside every request fails each check above."""

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

    def test_concurrency_four_opens_more(
        self, deploy: Deploy, database: TestDatabase, instances: InstanceSet
    ) -> None:
        deployment = deploy(database, concurrency=scenarios.THREADS, broken=True)

        result = scenarios.threaded(instances, deployment, database)

        assert result.report.connections_opened > scenarios.THREADS

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


@pytest.mark.snippet(REQUIREMENTS)
def test_requirements_match_installed_versions(snippets: SnippetLoader) -> None:
    lines = snippets.source(REQUIREMENTS).splitlines()
    requirements = [Requirement(line) for line in lines if line.strip()]

    unmet = {
        str(requirement): version(requirement.name)
        for requirement in requirements
        if not requirement.specifier.contains(version(requirement.name), prereleases=True)
    }

    assert unmet == {}
