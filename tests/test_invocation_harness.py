"""The invocation harness itself: the Runtime API, the runtime clients, freezing and cleanup.

Most tests here run small handlers written for the test, not the guide's snippets, so that
they can report what the platform handed them.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.harness.cloud_run_functions import PYTHON as CLOUD_RUN_PYTHON
from tests.harness.cloud_run_functions import CloudRunFunctionDeployment
from tests.harness.databases import TestDatabase
from tests.harness.invocations import (
    FunctionInstance,
    HttpRequest,
    InstanceError,
    InstanceSet,
    cold_starts,
    concurrent_instances,
    frozen,
    idle_gap,
    process_group,
    process_stopped,
    set_idle_session_timeout,
    threaded_invocations,
)
from tests.harness.lambda_functions import (
    NODE,
    PYTHON,
    LambdaDeployment,
    LambdaInstance,
    runtime_client_problem,
)
from tests.harness.lambda_runtime_api import API_VERSION, RuntimeApiServer
from tests.harness.node import prepare_workspace, require_node
from tests.harness.snippets import SnippetLoader

HANDLER_PY = "lambda/handler.py"
SCHEMA = "lambda/schema.sql"
FUNCTION_TIMEOUT_SECONDS = 2.0
SLEEP_SECONDS = 0.5

CONTEXT_HANDLER_PY = """\
import json
import time


def handler(event, context):
    started_at = time.time()
    payload = json.loads(event["body"]) if isinstance(event.get("body"), str) else event
    if payload.get("fail"):
        raise ValueError("the event asked for a failure")
    time.sleep(payload.get("sleep", 0))
    identity = context.identity
    body = {
        "request_id": context.aws_request_id,
        "function_arn": context.invoked_function_arn,
        "function_name": context.function_name,
        "memory_mb": str(context.memory_limit_in_mb),
        "log_group": context.log_group_name,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "client_custom": context.client_context.custom if context.client_context else None,
        "identity_id": identity.cognito_identity_id if identity else None,
        "started_at": started_at,
        "finished_at": time.time(),
    }
    return {"statusCode": 200, "body": json.dumps(body)}
"""

CONTEXT_HANDLER_MJS = """\
const sleep = (seconds) => new Promise((settle) => setTimeout(settle, seconds * 1000));

export const handler = async (event, context) => {
  const startedAt = Date.now() / 1000;
  const payload = typeof event.body === "string" ? JSON.parse(event.body) : event;
  if (payload.fail) {
    throw new Error("the event asked for a failure");
  }
  await sleep(payload.sleep ?? 0);
  const body = {
    request_id: context.awsRequestId,
    function_arn: context.invokedFunctionArn,
    function_name: context.functionName,
    memory_mb: String(context.memoryLimitInMB),
    log_group: context.logGroupName,
    remaining_ms: context.getRemainingTimeInMillis(),
    client_custom: context.clientContext?.custom ?? context.clientContext?.Custom ?? null,
    identity_id: context.identity?.cognitoIdentityId ?? null,
    started_at: startedAt,
    finished_at: Date.now() / 1000,
  };
  return { statusCode: 200, body: JSON.stringify(body) };
};
"""

SLEEPING_FUNCTION_PY = """\
import json
import time

import functions_framework


@functions_framework.http
def sleep(request):
    started = time.time()
    time.sleep(float(request.args.get("seconds", "0")))
    return json.dumps({"started": started, "finished": time.time()}), 200
"""


@pytest.fixture
def instances() -> Iterator[InstanceSet]:
    with InstanceSet() as started:
        yield started


def context_deployment(tmp_path: Path, runtime: str, source: str | None = None) -> LambdaDeployment:
    task_root = tmp_path / f"task-{runtime}"
    if runtime == PYTHON:
        task_root.mkdir()
        (task_root / "handler.py").write_text(source or CONTEXT_HANDLER_PY)
    else:
        require_node()
        prepare_workspace(task_root, {"handler.mjs": source or CONTEXT_HANDLER_MJS})
    problem = runtime_client_problem(runtime, task_root)
    if problem is not None:
        pytest.skip(problem)
    return LambdaDeployment(
        name="context-probe",
        runtime=runtime,
        task_root=task_root,
        handler="handler.handler",
        environment={},
        timeout_seconds=FUNCTION_TIMEOUT_SECONDS,
    )


class TestRuntimeApiServer:
    """The Runtime API as the Lambda documentation describes it, spoken to with http.client."""

    def request(
        self, api: RuntimeApiServer, method: str, path: str, body: bytes = b"", **headers: str
    ) -> tuple[int, dict[str, str], bytes]:
        host, port = api.address.split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            connection.request(method, f"/{API_VERSION}/runtime/{path}", body, headers)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def test_next_sends_invocation_headers(self) -> None:
        with RuntimeApiServer("probe", timeout_seconds=3.0) as api:
            pending = api.submit(
                {"key": "value"},
                client_context={"custom": {"tenant": "a"}},
                cognito_identity={"cognitoIdentityId": "id-1"},
            )
            before_ms = time.time() * 1000

            status, headers, body = self.request(api, "GET", "invocation/next")

        assert status == 200
        assert json.loads(body) == {"key": "value"}
        assert headers["Lambda-Runtime-Aws-Request-Id"] == pending.request_id
        assert before_ms + 2900 <= int(headers["Lambda-Runtime-Deadline-Ms"]) <= before_ms + 3100
        assert headers["Lambda-Runtime-Invoked-Function-Arn"].endswith(":function:probe")
        assert re.fullmatch(
            r"Root=1-[0-9a-f]{8}-[0-9a-f]{24};Parent=[0-9a-f]{16};Sampled=0",
            headers["Lambda-Runtime-Trace-Id"],
        )
        assert json.loads(headers["Lambda-Runtime-Client-Context"]) == {"custom": {"tenant": "a"}}
        assert json.loads(headers["Lambda-Runtime-Cognito-Identity"]) == {
            "cognitoIdentityId": "id-1"
        }

    def test_optional_headers_left_out(self) -> None:
        with RuntimeApiServer("probe", timeout_seconds=3.0) as api:
            api.submit({})

            _, headers, _ = self.request(api, "GET", "invocation/next")

        assert "Lambda-Runtime-Client-Context" not in headers
        assert "Lambda-Runtime-Cognito-Identity" not in headers

    def test_response_completes_invocation(self) -> None:
        with RuntimeApiServer("probe", timeout_seconds=3.0) as api:
            pending = api.submit({})
            self.request(api, "GET", "invocation/next")

            status, _, _ = self.request(
                api, "POST", f"invocation/{pending.request_id}/response", b'{"ok": true}'
            )
            result = pending.wait(timeout=1)

        assert status == 202
        assert result is not None
        assert result.succeeded
        assert result.json() == {"ok": True}

    def test_error_completes_invocation(self) -> None:
        document = b'{"errorMessage": "bad event", "errorType": "ValueError"}'
        with RuntimeApiServer("probe", timeout_seconds=3.0) as api:
            pending = api.submit({})
            self.request(api, "GET", "invocation/next")

            status, _, _ = self.request(
                api,
                "POST",
                f"invocation/{pending.request_id}/error",
                document,
                **{"Lambda-Runtime-Function-Error-Type": "ValueError"},
            )
            result = pending.wait(timeout=1)

        assert status == 202
        assert result is not None
        assert not result.succeeded
        assert result.error_type == "ValueError"

    def test_unknown_request_id_rejected(self) -> None:
        with RuntimeApiServer("probe", timeout_seconds=3.0) as api:
            status, _, body = self.request(api, "POST", "invocation/no-such-id/response", b"{}")

        assert status == 400
        assert json.loads(body)["errorType"] == "InvalidRequestID"

    def test_second_response_rejected(self) -> None:
        with RuntimeApiServer("probe", timeout_seconds=3.0) as api:
            pending = api.submit({})
            self.request(api, "GET", "invocation/next")
            self.request(api, "POST", f"invocation/{pending.request_id}/response", b"1")

            status, _, _ = self.request(
                api, "POST", f"invocation/{pending.request_id}/response", b"2"
            )

        assert status == 400

    def test_init_error_recorded(self) -> None:
        document = b'{"errorMessage": "cannot import", "errorType": "Runtime.ImportModuleError"}'
        with RuntimeApiServer("probe", timeout_seconds=3.0) as api:
            status, _, _ = self.request(api, "POST", "init/error", document)

        assert status == 202
        assert api.init_error == {
            "errorMessage": "cannot import",
            "errorType": "Runtime.ImportModuleError",
        }

    def test_unknown_path_not_found(self) -> None:
        with RuntimeApiServer("probe", timeout_seconds=3.0) as api:
            status, _, _ = self.request(api, "GET", "invocation/previous")

        assert status == 404


@pytest.mark.parametrize("runtime", [PYTHON, NODE])
class TestRuntimeClients:
    """AWS's runtime interface clients, run against the harness's Runtime API."""

    def test_context_carries_invocation(
        self, runtime: str, tmp_path: Path, instances: InstanceSet
    ) -> None:
        instance = instances.start(context_deployment(tmp_path, runtime))
        assert isinstance(instance, LambdaInstance)
        request_id = str(uuid.uuid4())

        invocation = instance.invoke_event(
            {},
            request_id=request_id,
            client_context={"custom": {"tenant": "a"}, "client": {}, "env": {}},
            cognito_identity={"cognitoIdentityId": "id-1", "cognitoIdentityPoolId": "pool-1"},
        )

        context = invocation.body
        assert invocation.status == 200
        assert context["request_id"] == request_id
        assert context["function_arn"] == instance.api.function_arn
        assert context["function_name"] == "context-probe"
        assert context["memory_mb"] == "128"
        assert context["log_group"] == "/aws/lambda/context-probe"
        assert 0 < context["remaining_ms"] <= FUNCTION_TIMEOUT_SECONDS * 1000
        assert context["client_custom"] == {"tenant": "a"}
        assert context["identity_id"] == "id-1"

    def test_timeout_ends_invocation_and_instance(
        self, runtime: str, tmp_path: Path, instances: InstanceSet
    ) -> None:
        instance = instances.start(context_deployment(tmp_path, runtime))
        assert isinstance(instance, LambdaInstance)

        invocation = instance.invoke_event({"sleep": FUNCTION_TIMEOUT_SECONDS + 1})

        assert invocation.error is not None
        assert invocation.error.startswith("Task timed out")
        assert instance.process is not None
        assert instance.process.poll() is not None

    def test_handler_error_reported(
        self, runtime: str, tmp_path: Path, instances: InstanceSet
    ) -> None:
        instance = instances.start(context_deployment(tmp_path, runtime))
        assert isinstance(instance, LambdaInstance)

        invocation = instance.invoke_event({"fail": True})

        assert invocation.status is None
        assert invocation.error is not None
        assert "the event asked for a failure" in invocation.error

    def test_import_failure_reported(
        self, runtime: str, tmp_path: Path, instances: InstanceSet
    ) -> None:
        broken = "raise RuntimeError('missing setting')\n"
        if runtime == NODE:
            broken = "throw new Error('missing setting');\n"
        deployment = context_deployment(tmp_path, runtime, broken)

        with pytest.raises(InstanceError, match="missing setting"):
            instances.start(deployment)

    def test_freeze_stops_every_process(
        self, runtime: str, tmp_path: Path, instances: InstanceSet
    ) -> None:
        instance = instances.start(context_deployment(tmp_path, runtime))
        assert instance.process is not None
        members = process_group(instance.process.pid)

        with frozen(instance):
            while_frozen = [process_stopped(pid) for pid in members]
        after = [process_stopped(pid) for pid in members]

        assert while_frozen == [True] * len(members)
        assert after == [False] * len(members)


def test_instance_set_stops_instances_on_failure(tmp_path: Path) -> None:
    started: list[FunctionInstance] = []

    with pytest.raises(RuntimeError, match="test failed"), InstanceSet() as instances:
        started.append(instances.start(context_deployment(tmp_path, PYTHON)))
        raise RuntimeError("test failed")

    assert started[0].process is not None
    assert started[0].process.poll() is not None


def test_instance_set_stops_frozen_instance(tmp_path: Path) -> None:
    with InstanceSet() as instances:
        instance = instances.start(context_deployment(tmp_path, PYTHON))
        instance.wait_until_idle()
        instance.freeze()

    assert instance.process is not None
    assert instance.process.poll() is not None


def test_concurrent_instances_overlap(tmp_path: Path, instances: InstanceSet) -> None:
    deployment = context_deployment(tmp_path, PYTHON)
    request = HttpRequest.json({"sleep": SLEEP_SECONDS})

    outcomes = concurrent_instances(
        instances, deployment, count=4, requests=lambda index: [request]
    )
    windows = [(outcome.body["started_at"], outcome.body["finished_at"]) for [outcome] in outcomes]

    assert len(windows) == 4
    assert max(start for start, _ in windows) < min(finish for _, finish in windows)


def test_threaded_invocations_overlap(tmp_path: Path, instances: InstanceSet) -> None:
    directory = tmp_path / "sleeper"
    directory.mkdir()
    (directory / "main.py").write_text(SLEEPING_FUNCTION_PY)
    deployment = CloudRunFunctionDeployment(
        "sleeper", CLOUD_RUN_PYTHON, directory, "main.py", "sleep", {"THREADS": "4"}
    )
    instance = instances.start(deployment)
    request = HttpRequest(method="GET", path=f"/?seconds={SLEEP_SECONDS}")

    outcomes = threaded_invocations(instance, threads=4, requests=lambda index: [request])
    windows = [(outcome.body["started"], outcome.body["finished"]) for [outcome] in outcomes]

    assert max(start for start, _ in windows) < min(finish for _, finish in windows)
    assert min(outcome.latency_seconds for [outcome] in outcomes) >= SLEEP_SECONDS


@pytest.mark.snippet(HANDLER_PY)
@pytest.mark.snippet(SCHEMA)
def test_cold_starts_open_one_connection_each(
    database: TestDatabase, snippets: SnippetLoader, tmp_path: Path, instances: InstanceSet
) -> None:
    database.execute_file(snippets.path(SCHEMA))
    task_root = tmp_path / "task"
    task_root.mkdir()
    (task_root / "handler.py").write_text(snippets.source(HANDLER_PY))
    deployment = LambdaDeployment(
        "record-event", PYTHON, task_root, "handler.handler", {"DATABASE_URL": database.url}
    )

    outcomes = cold_starts(instances, deployment, [HttpRequest.message("cold")] * 3)

    assert [outcome.status for outcome in outcomes] == [201] * 3
    assert database.view.connections_opened() == 3
    assert database.view.sessions() == []


def test_idle_gap_waits_for_server(database: TestDatabase) -> None:
    set_idle_session_timeout(database, 1.0)
    connection = psycopg.connect(database.url, autocommit=True)

    waited = idle_gap(database, 1.0)

    with pytest.raises(psycopg.OperationalError):
        connection.execute("SELECT 1")
    connection.close()
    assert waited >= 1.0
    assert database.view.sessions() == []
