"""The Cloud Run functions served by the real Functions Framework, counted at the database server.

Each instance is one framework server on 127.0.0.1 that the tests send HTTP requests to.
Unless a test sets another concurrency, an instance serves one request at a time (THREADS=1 for
Python) with a pool of one connection. The tests named `broken` run a copy of the function
whose pool is created inside every request, and show that the same check fails.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import ClassVar

import pytest
from packaging.requirements import Requirement

from tests.harness import platform_scenarios as scenarios
from tests.harness.cloud_run_functions import NODE, PYTHON, CloudRunFunctionDeployment
from tests.harness.databases import TestDatabase
from tests.harness.invocations import HttpRequest, InstanceSet
from tests.harness.node import prepare_workspace, require_node
from tests.harness.platform_checks import (
    BrokenPoolChecks,
    BrokenThreadedChecks,
    PlatformChecks,
    ThreadedChecks,
    assert_no_secret_logged,
)
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


class TestCloudRunFunctions(PlatformChecks, ThreadedChecks):
    """The function with its pool at module level, served by the Functions Framework."""

    BAD_REQUESTS: ClassVar[dict[str, tuple[scenarios.Sender, int]]] = {
        **scenarios.BAD_HTTP_REQUESTS,
        "body not utf-8": (
            scenarios.send(HttpRequest(b'{"message": "caf\xe9"}', content_type="text/plain")),
            400,
        ),
        "method get": (scenarios.send(HttpRequest(b"", method="GET")), 405),
    }

    def test_malformed_json_rejected_without_writes(
        self, language: str, deploy: Deploy, database: TestDatabase, instances: InstanceSet
    ) -> None:
        instance = instances.start(deploy(database))

        invocation = instance.invoke(HttpRequest(b'{"message": '))

        assert invocation.status == 400
        if language == NODE:
            # The Node.js framework itself rejects the body, with an HTML page, before the
            # function runs.
            assert "Bad Request" in invocation.body
        else:
            assert invocation.body == {"error": "the body is not JSON, or repeats a key"}
        assert database.count_rows("events") == 0
        assert_no_secret_logged(database, instances.outputs)


class TestBrokenPoolPerRequest(BrokenPoolChecks, BrokenThreadedChecks):
    """The function with its pool created inside every request fails each check above."""


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
