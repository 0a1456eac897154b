"""The node-postgres pool in snippets/pool/pool.mjs, driven through a small handler.

Connections are counted at the database server. The tests named "broken" run a copy of the
pool module with one line changed, to show that the same checks catch the mistake.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.harness.databases import TestDatabase
from tests.harness.node import NodeHandlerProcess, NodeProcessError, prepare_workspace, require_node
from tests.harness.snippets import SnippetLoader

POOL = "pool/pool.mjs"
CONCURRENT_CALLS = 4
# Longer than the 1-second lifetime of the changed copy, with room for timer delays.
LIFETIME_WAIT_SECONDS = 2.5

# Each call keeps its connection for event.holdSeconds, so that concurrent calls overlap.
CALLER = """\
import { getPool, withClient } from "./pool.mjs";

export { getPool };

export const handler = async (event) =>
  withClient(async (client) => {
    if (event.fail) {
      throw new Error("the work failed on purpose");
    }
    await client.query("SELECT pg_sleep($1)", [event.holdSeconds ?? 0]);
    return "done";
  });
"""

pytestmark = pytest.mark.snippet(POOL)


@pytest.fixture(scope="session")
def node_modules() -> Path:
    return require_node()


@contextmanager
def running_pool(
    directory: Path, pool_source: str, database_url: str | None
) -> Iterator[NodeHandlerProcess]:
    prepare_workspace(directory, {"pool.mjs": pool_source, "caller.mjs": CALLER})
    environment = {"DATABASE_URL": database_url} if database_url is not None else {}
    with NodeHandlerProcess(directory / "caller.mjs", environment) as caller:
        yield caller


def test_pool_concurrent_calls_share_connection(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    events = [{"holdSeconds": 0.05}] * CONCURRENT_CALLS

    with running_pool(tmp_path, snippets.source(POOL), database.url) as caller:
        calls = caller.invoke_concurrently(events)

    assert [call.error for call in calls] == [None] * CONCURRENT_CALLS
    assert database.view.connections_opened() == 1


def test_pool_broken_max_above_one(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    source = snippets.source(POOL, (("max: 1,", "max: 10,"),))
    events = [{"holdSeconds": 0.05}] * CONCURRENT_CALLS

    with running_pool(tmp_path, source, database.url) as caller:
        calls = caller.invoke_concurrently(events)

    assert [call.error for call in calls] == [None] * CONCURRENT_CALLS
    assert database.view.connections_opened() > 1


def test_pool_checkout_replaces_terminated_connection(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    with running_pool(tmp_path, snippets.source(POOL), database.url) as caller:
        before = caller.invoke({})
        after = caller.invoke_after_freeze({}, database.view.terminate)

    assert before.error is None
    assert after.error is None
    assert database.view.connections_opened() == 2


def test_pool_broken_no_checkout_check(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    # Without the module's test query, pg-pool hands out the dead client as it is.
    source = snippets.source(POOL, (('await client.query("SELECT 1");', ""),))

    with running_pool(tmp_path, source, database.url) as caller:
        before = caller.invoke({})
        after = caller.invoke_after_freeze({}, database.view.terminate)

    assert before.error is None
    assert after.error is not None


def test_pool_idle_connection_loss_logged(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    with running_pool(tmp_path, snippets.source(POOL), database.url) as caller:
        before = caller.invoke({})
        database.view.terminate()
        caller.wait_until_pool_empty()
        after = caller.invoke({})

    assert before.error is None
    assert after.error is None
    assert "idle connection closed" in caller.output
    assert database.view.connections_opened() == 2


def test_pool_broken_no_error_listener(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    source = snippets.source(POOL, (('created.on("error", (error) => {', "((error) => {"),))

    with running_pool(tmp_path, source, database.url) as caller:
        before = caller.invoke({})
        database.view.terminate()

        with pytest.raises(NodeProcessError, match="exited with code"):
            caller.wait_until_pool_empty()

    assert before.error is None


def test_pool_lifetime_replaces_connection(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    source = snippets.source(POOL, (("maxLifetimeSeconds: 1800,", "maxLifetimeSeconds: 1,"),))

    with running_pool(tmp_path, source, database.url) as caller:
        before = caller.invoke({})
        time.sleep(LIFETIME_WAIT_SECONDS)
        after = caller.invoke({})

    assert before.error is None
    assert after.error is None
    assert database.view.connections_opened() == 2


def test_pool_lifetime_keeps_young_connection(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    with running_pool(tmp_path, snippets.source(POOL), database.url) as caller:
        before = caller.invoke({})
        time.sleep(LIFETIME_WAIT_SECONDS)
        after = caller.invoke({})

    assert before.error is None
    assert after.error is None
    assert database.view.connections_opened() == 1


def test_pool_failed_work_replaces_connection(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    with running_pool(tmp_path, snippets.source(POOL), database.url) as caller:
        failed = caller.invoke({"fail": True})
        after = caller.invoke({})
        stats = caller.pool_stats()

    assert failed.error is not None
    assert after.error is None
    assert stats is not None
    assert stats.checked_out == 0
    assert database.view.connections_opened() == 2


def test_pool_broken_failed_work_reused(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    source = snippets.source(POOL, (("release(client, failure);", "release(client);"),))

    with running_pool(tmp_path, source, database.url) as caller:
        failed = caller.invoke({"fail": True})
        after = caller.invoke({})

    assert failed.error is not None
    assert after.error is None
    assert database.view.connections_opened() == 1


def test_pool_missing_url_names_variable(
    node_modules: Path, database: TestDatabase, snippets: SnippetLoader, tmp_path: Path
) -> None:
    with running_pool(tmp_path, snippets.source(POOL), None) as caller:
        call = caller.invoke({})

    assert call.error is not None
    assert "DATABASE_URL" in call.error.message
