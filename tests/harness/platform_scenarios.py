"""The pool checks every platform test runs, each returning what the server and the function saw.

Each scenario starts its instances through an `InstanceSet`, invokes them in one of the
patterns of `tests.harness.invocations`, and returns a `ScenarioResult`. The platform tests
assert on it, and the tests of broken copies run the same scenario to show the same
assertion would fail.

The functions under test store each request's message as one row of the `events` table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tests.harness.databases import TestDatabase
from tests.harness.invocations import (
    Deployment,
    FunctionInstance,
    HttpRequest,
    InstanceSet,
    Invocation,
    ServerReport,
    concurrent_instances,
    frozen,
    idle_gap,
    set_idle_session_timeout,
    threaded_invocations,
    warm_invocations,
)

WARM_INVOCATIONS = 50
INSTANCES = 4
REQUESTS_PER_INSTANCE = 3
THREADS = 4
REQUESTS_PER_THREAD = 3
# Invocations on each side of an event that ends the function's connection.
INVOCATIONS_AROUND_EVENT = 3
IDLE_SESSION_TIMEOUT_SECONDS = 1.0
STATE_CHECKS = 10


@dataclass(frozen=True)
class ScenarioResult:
    """The invocations of a scenario, the server's report after it, and the rows committed."""

    invocations: tuple[Invocation, ...]
    report: ServerReport
    rows: int

    @property
    def failures(self) -> list[str]:
        """Describe every invocation that did not store its message, for assertion messages."""
        return [
            f"status {invocation.status}, error {invocation.error}, body {invocation.body!r}"
            for invocation in self.invocations
            if invocation.status != 201
        ]

    @property
    def latencies(self) -> list[float]:
        return [invocation.latency_seconds for invocation in self.invocations]


def messages(label: str, count: int) -> list[HttpRequest]:
    return [HttpRequest.message(f"{label} {number}") for number in range(count)]


def finish(database: TestDatabase, invocations: Sequence[Invocation]) -> ScenarioResult:
    return ScenarioResult(
        tuple(invocations), ServerReport.read(database), database.count_rows("events")
    )


def warm(instances: InstanceSet, deployment: Deployment, database: TestDatabase) -> ScenarioResult:
    """Invoke one instance WARM_INVOCATIONS times in a row."""
    instance = instances.start(deployment)
    outcomes = warm_invocations(instance, messages("warm", WARM_INVOCATIONS))
    return finish(database, outcomes)


def concurrent(
    instances: InstanceSet, deployment: Deployment, database: TestDatabase
) -> ScenarioResult:
    """Invoke INSTANCES instances at once, each REQUESTS_PER_INSTANCE times in a row."""
    outcomes = concurrent_instances(
        instances,
        deployment,
        count=INSTANCES,
        requests=lambda index: messages(f"instance {index}", REQUESTS_PER_INSTANCE),
    )
    return finish(database, [outcome for per_instance in outcomes for outcome in per_instance])


def threaded(
    instances: InstanceSet, deployment: Deployment, database: TestDatabase, threads: int = THREADS
) -> ScenarioResult:
    """Invoke one instance from *threads* threads at once, each REQUESTS_PER_THREAD times."""
    instance = instances.start(deployment)
    outcomes = threaded_invocations(
        instance,
        threads=threads,
        requests=lambda index: messages(f"thread {index}", REQUESTS_PER_THREAD),
    )
    return finish(database, [outcome for per_thread in outcomes for outcome in per_thread])


def around(
    instances: InstanceSet,
    deployment: Deployment,
    database: TestDatabase,
    event: Callable[[FunctionInstance], object],
) -> ScenarioResult:
    """Invoke one instance a few times, run *event*, and invoke it a few times more."""
    instance = instances.start(deployment)
    before = warm_invocations(instance, messages("before", INVOCATIONS_AROUND_EVENT))
    event(instance)
    after = warm_invocations(instance, messages("after", INVOCATIONS_AROUND_EVENT))
    return finish(database, [*before, *after])


def after_terminate(
    instances: InstanceSet, deployment: Deployment, database: TestDatabase
) -> ScenarioResult:
    """The server ends the function's sessions between two invocations of a running instance."""
    return around(instances, deployment, database, lambda instance: database.view.terminate())


def after_terminate_while_frozen(
    instances: InstanceSet, deployment: Deployment, database: TestDatabase
) -> ScenarioResult:
    """The server ends the function's sessions while the instance is frozen (SIGSTOP)."""

    def terminate_while_frozen(instance: FunctionInstance) -> None:
        with frozen(instance):
            database.view.terminate()

    return around(instances, deployment, database, terminate_while_frozen)


def after_idle_gap(
    instances: InstanceSet, deployment: Deployment, database: TestDatabase
) -> ScenarioResult:
    """The instance waits longer than the server's idle_session_timeout between invocations."""
    set_idle_session_timeout(database, IDLE_SESSION_TIMEOUT_SECONDS)
    return around(
        instances,
        deployment,
        database,
        lambda instance: idle_gap(database, IDLE_SESSION_TIMEOUT_SECONDS),
    )


def after_restart(
    instances: InstanceSet,
    deployment: Deployment,
    database: TestDatabase,
    restart: Callable[[], None],
) -> ScenarioResult:
    """The database server restarts between two invocations."""
    return around(instances, deployment, database, lambda instance: restart())


@dataclass(frozen=True)
class StatesResult:
    """The sessions the server reported after each of a run of invocations.

    `states` contains the sorted session states after each invocation, and `session_ids` every
    session id seen across the run.
    """

    invocations: tuple[Invocation, ...]
    states: tuple[tuple[str, ...], ...]
    session_ids: frozenset[str]


def states_after_each(
    instances: InstanceSet, deployment: Deployment, database: TestDatabase
) -> StatesResult:
    """Invoke one instance STATE_CHECKS times, reading the server's sessions after each."""
    instance = instances.start(deployment)
    outcomes, states, session_ids = [], [], set()
    for request in messages("state", STATE_CHECKS):
        outcomes.append(instance.invoke(request))
        sessions = database.view.sessions()
        states.append(tuple(sorted(session.state for session in sessions)))
        session_ids.update(session.session_id for session in sessions)
    return StatesResult(tuple(outcomes), tuple(states), frozenset(session_ids))


Sender = Callable[[FunctionInstance], Invocation]


def send(request: HttpRequest) -> Sender:
    """Return a sender that invokes an instance with *request*."""
    return lambda instance: instance.invoke(request)


# Bad requests that the HTTP-triggered functions (Cloud Run functions, Azure Functions) reject
# alike, each with the status it must get.
BAD_HTTP_REQUESTS: dict[str, tuple[Sender, int]] = {
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
}


def rejected(
    instance: FunctionInstance, requests: dict[str, Sender]
) -> dict[str, tuple[int | None, bool]]:
    """Run each named bad request; return its status and whether the body carried a reason."""
    outcomes = {}
    for name, send in requests.items():
        invocation = send(instance)
        has_reason = isinstance(invocation.body, dict) and bool(invocation.body.get("error"))
        outcomes[name] = (invocation.status, has_reason)
    return outcomes
