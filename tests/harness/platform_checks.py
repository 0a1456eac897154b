"""The pool checks every platform module runs, as test methods its test classes inherit.

A platform module subclasses these classes and provides a `deploy` fixture:
`deploy(database)` writes the function for that database and returns its deployment, and
`deploy(database, broken=True)` deploys the copy whose pool is created inside every
invocation. On platforms where one instance serves several invocations at once, `deploy`
also takes `concurrency=`, which sets the instance's concurrency and the pool size alike.
The subclass of `PlatformChecks` sets `BAD_REQUESTS`, which maps each bad request's name to
its sender and the status it must get.

The class names do not start with `Test`, so pytest collects these methods only through the
platform modules' subclasses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar
from urllib.parse import urlsplit

import pytest

from tests.harness import platform_scenarios as scenarios
from tests.harness.databases import TestDatabase
from tests.harness.invocations import Deployment, InstanceSet

Deploy = Callable[..., Deployment]


def assert_no_secret_logged(database: TestDatabase, output: str) -> None:
    password = urlsplit(database.url).password
    assert database.url not in output
    assert password is None or password not in output


class InstanceChecks:
    """Base of the check classes, with an `instances` fixture that stops what a test started."""

    @pytest.fixture
    def instances(self) -> Iterator[InstanceSet]:
        with InstanceSet() as started:
            yield started


class PlatformChecks(InstanceChecks):
    """Checks that a function keeping its pool at module level passes."""

    BAD_REQUESTS: ClassVar[dict[str, tuple[scenarios.Sender, int]]]

    def test_warm_invocations_one_connection(
        self, deploy: Deploy, database: TestDatabase, instances: InstanceSet
    ) -> None:
        result = scenarios.warm(instances, deploy(database), database)

        assert result.failures == []
        assert result.report.connections_opened == 1
        assert result.rows == scenarios.WARM_INVOCATIONS

    def test_concurrent_instances_one_connection_each(
        self, deploy: Deploy, database: TestDatabase, instances: InstanceSet
    ) -> None:
        result = scenarios.concurrent(instances, deploy(database), database)

        assert result.failures == []
        assert result.report.connections_opened == scenarios.INSTANCES
        assert result.report.sessions_open == scenarios.INSTANCES
        assert result.rows == scenarios.INSTANCES * scenarios.REQUESTS_PER_INSTANCE

    def test_sessions_idle_after_each_invocation(
        self, deploy: Deploy, database: TestDatabase, instances: InstanceSet
    ) -> None:
        result = scenarios.states_after_each(instances, deploy(database), database)

        assert [invocation.status for invocation in result.invocations] == [
            201
        ] * scenarios.STATE_CHECKS
        assert set(result.states) == {("idle",)}
        assert len(result.session_ids) == 1

    def test_recovers_after_idle_timeout(
        self, deploy: Deploy, database: TestDatabase, instances: InstanceSet
    ) -> None:
        result = scenarios.after_idle_gap(instances, deploy(database), database)

        assert result.failures == []
        assert result.report.connections_opened == 2

    def test_recovers_after_terminate(
        self, deploy: Deploy, database: TestDatabase, instances: InstanceSet
    ) -> None:
        result = scenarios.after_terminate(instances, deploy(database), database)

        assert result.failures == []
        assert result.report.connections_opened == 2
        assert_no_secret_logged(database, instances.outputs)

    def test_recovers_after_terminate_while_frozen(
        self, deploy: Deploy, database: TestDatabase, instances: InstanceSet
    ) -> None:
        result = scenarios.after_terminate_while_frozen(instances, deploy(database), database)

        assert result.failures == []
        assert result.report.connections_opened == 2

    @pytest.mark.private_server
    def test_recovers_after_server_restart(
        self, deploy: Deploy, private_server: Any, instances: InstanceSet
    ) -> None:
        database = private_server.database

        result = scenarios.after_restart(
            instances, deploy(database), database, private_server.restart
        )

        assert result.failures == []
        assert result.report.connections_opened == 2
        assert result.rows == 2 * scenarios.INVOCATIONS_AROUND_EVENT

    def test_bad_requests_rejected_without_writes(
        self, deploy: Deploy, database: TestDatabase, instances: InstanceSet
    ) -> None:
        instance = instances.start(deploy(database))
        requests = {name: sender for name, (sender, _) in self.BAD_REQUESTS.items()}

        outcomes = scenarios.rejected(instance, requests)

        expected = {name: (status, True) for name, (_, status) in self.BAD_REQUESTS.items()}
        assert outcomes == expected
        assert database.count_rows("events") == 0
        assert database.view.connections_opened() == 0
        assert_no_secret_logged(database, instances.outputs)


class ThreadedChecks(InstanceChecks):
    """Checks for platforms where one instance serves several invocations at once."""

    def test_concurrency_one_shares_one_connection(
        self, deploy: Deploy, database: TestDatabase, instances: InstanceSet
    ) -> None:
        result = scenarios.threaded(instances, deploy(database, concurrency=1), database)

        assert result.failures == []
        assert result.report.connections_opened == 1
        assert result.rows == scenarios.THREADS * scenarios.REQUESTS_PER_THREAD

    def test_concurrency_four_pool_of_four(
        self, deploy: Deploy, database: TestDatabase, instances: InstanceSet
    ) -> None:
        deployment = deploy(database, concurrency=scenarios.THREADS)

        result = scenarios.threaded(instances, deployment, database)

        assert result.failures == []
        assert 1 <= result.report.connections_opened <= scenarios.THREADS
        assert result.report.sessions_open <= scenarios.THREADS
        assert set(result.report.session_states) == {"idle"}
        assert result.rows == scenarios.THREADS * scenarios.REQUESTS_PER_THREAD


class BrokenPoolChecks(InstanceChecks):
    """Twins of `PlatformChecks` that show the copy with a pool per invocation fails them."""

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


class BrokenThreadedChecks(InstanceChecks):
    """The twin of `ThreadedChecks` that shows the copy with a pool per invocation fails it."""

    def test_concurrency_four_opens_more(
        self, deploy: Deploy, database: TestDatabase, instances: InstanceSet
    ) -> None:
        deployment = deploy(database, concurrency=scenarios.THREADS, broken=True)

        result = scenarios.threaded(instances, deployment, database)

        assert result.report.connections_opened > scenarios.THREADS
