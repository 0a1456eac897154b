"""The Azure Functions app called with real `func.HttpRequest` objects, counted at the server.

Each instance is one worker process that imports function_app.py once and runs invocations
on a thread pool of PYTHON_THREADPOOL_THREAD_COUNT threads, as Azure's Python worker does.
Unless a test sets another concurrency, that count and the pool size are 1. The tests named `broken`
run a copy of the app whose pool is created inside every invocation, and show that the same
check fails.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest

from tests.harness import platform_scenarios as scenarios
from tests.harness.azure_functions import AzureFunctionDeployment
from tests.harness.databases import TestDatabase
from tests.harness.invocations import HttpRequest
from tests.harness.platform_checks import (
    BrokenPoolChecks,
    BrokenThreadedChecks,
    PlatformChecks,
    ThreadedChecks,
)
from tests.harness.snippets import SnippetLoader

FUNCTION_APP = "platforms/azure-functions/function_app.py"
SCHEMA = "lambda/schema.sql"

# Python is the only language the guide shows for Azure Functions; the parameter keeps test
# ids in the same form as on the other platforms.
pytestmark = [
    pytest.mark.snippet(SCHEMA),
    pytest.mark.snippet(FUNCTION_APP),
    pytest.mark.parametrize("language", ["python"]),
]

# A broken copy that creates the pool inside every invocation and never closes the old one.
POOL_PER_INVOCATION = (("        if pool is None:\n", "        if True:\n"),)

Deploy = Callable[..., AzureFunctionDeployment]


@pytest.fixture
def deploy(language: str, snippets: SnippetLoader, tmp_path: Path) -> Deploy:
    """Return a function that writes function_app.py and configures its concurrency.

    *concurrency* sets PYTHON_THREADPOOL_THREAD_COUNT and DATABASE_POOL_SIZE alike. With
    `broken=True` it deploys the copy whose pool is created in every invocation.
    """

    def build(
        database: TestDatabase, *, concurrency: int = 1, broken: bool = False
    ) -> AzureFunctionDeployment:
        database.execute_file(snippets.path(SCHEMA))
        directory = tmp_path / f"app-{uuid.uuid4().hex[:8]}"
        directory.mkdir()
        source = snippets.source(FUNCTION_APP, POOL_PER_INVOCATION if broken else ())
        (directory / "function_app.py").write_text(source)
        environment = {
            "DATABASE_URL": database.url,
            "DATABASE_POOL_SIZE": str(concurrency),
            "PYTHON_THREADPOOL_THREAD_COUNT": str(concurrency),
        }
        return AzureFunctionDeployment("store-event", directory, "store_event", environment)

    return build


class TestAzureFunctions(PlatformChecks, ThreadedChecks):
    """The app with its pool at module level, run by the worker's thread pool."""

    BAD_REQUESTS: ClassVar[dict[str, tuple[scenarios.Sender, int]]] = {
        **scenarios.BAD_HTTP_REQUESTS,
        "body not utf-8": (scenarios.send(HttpRequest(b"\xff\xfe{}")), 400),
    }


class TestBrokenPoolPerInvocation(BrokenPoolChecks, BrokenThreadedChecks):
    """The app with its pool created inside every invocation fails each check above."""
