"""AWS Lambda functions run by AWS's own runtime interface clients against a local Runtime API.

Each instance is one execution environment: a `RuntimeApiServer` on 127.0.0.1 and one
runtime client process pointed at it with AWS_LAMBDA_RUNTIME_API. Python handlers run under
`python -m awslambdaric` (PyPI package awslambdaric), Node.js handlers under
`aws-lambda-ric` (npm), which both load the handler named by their argument from the task
root, the working directory, as Lambda's managed runtimes do.

The environment variables are the ones Lambda's documentation lists for the execution
environment (https://docs.aws.amazon.com/lambda/latest/dg/current-supported-versions.html),
with values for a function named by the deployment.
"""

from __future__ import annotations

import base64
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.invocations import (
    REPLY_GRACE_SECONDS,
    START_TIMEOUT_SECONDS,
    FunctionInstance,
    HttpRequest,
    InstanceError,
    Invocation,
    decode_body,
    inherited_environment,
)
from tests.harness.lambda_runtime_api import REGION, RuntimeApiServer, RuntimeResult
from tests.harness.node import node_environment

PYTHON = "python"
NODE = "node"
NODE_RUNTIME_CLIENT = Path("node_modules/aws-lambda-ric/bin/index.mjs")
NODE_RUNTIME_CLIENT_ADDON = Path("node_modules/aws-lambda-ric/dist/rapid-client.node")

# Lambda's default function timeout and memory size.
DEFAULT_TIMEOUT_SECONDS = 3.0
DEFAULT_MEMORY_MB = 128
# Lambda stops an invocation at its deadline; the harness allows this much for its own polling.
DEADLINE_SLACK_MS = 100


def runtime_client_problem(runtime: str, task_root: Path) -> str | None:
    """Return why the runtime client for *runtime* cannot run here, or None when it can."""
    if runtime == PYTHON:
        try:
            import awslambdaric  # noqa: F401
            import runtime_client  # noqa: F401  # awslambdaric's native part
        except ImportError as error:
            return f"awslambdaric is not installed ({error}); install it with pip"
        return None
    if not (task_root / NODE_RUNTIME_CLIENT_ADDON).is_file():
        return (
            "aws-lambda-ric is not installed: its native addon is missing, which happens when "
            "npm could not build it (it needs cmake, make, a C++ compiler, autoconf, automake "
            "and libtool); install those and run `python -m tests.harness.node install` again"
        )
    return None


def api_gateway_event(request: HttpRequest) -> dict[str, Any]:
    """Return the API Gateway HTTP API event (payload format 2.0) that carries *request*."""
    body, encoded = request.body_for_event()
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": f"{request.method} {request.path}",
        "rawPath": request.path,
        "rawQueryString": "",
        "headers": request.headers(),
        "requestContext": {"http": {"method": request.method, "path": request.path}},
        "isBase64Encoded": encoded,
    }
    if request.body:
        event["body"] = body
    return event


def invocation_from_result(result: RuntimeResult, latency: float) -> Invocation:
    """Turn what the runtime posted into an Invocation, reading an HTTP-style result."""
    if not result.succeeded:
        document = decode_body(result.body)
        error_type, message = result.error_type, document
        if isinstance(document, dict):
            error_type = error_type or document.get("errorType")
            message = document.get("errorMessage")
        return Invocation(None, document, f"{error_type}: {message}", latency)

    payload = decode_body(result.body)
    if not isinstance(payload, dict) or "statusCode" not in payload:
        return Invocation(None, payload, "the handler returned no statusCode", latency)
    body = payload.get("body", "")
    if payload.get("isBase64Encoded"):
        body = base64.b64decode(body)
    return Invocation(payload["statusCode"], decode_body(body), None, latency)


@dataclass
class LambdaDeployment:
    """A function's task root (its deployment package) and configuration.

    *handler* is the module and function, such as "handler.handler". *environment* contains the
    function's own variables, such as DATABASE_URL.
    """

    name: str
    runtime: str
    task_root: Path
    handler: str
    environment: Mapping[str, str]
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    memory_mb: int = DEFAULT_MEMORY_MB
    started: int = field(default=0, init=False)

    def start(self) -> LambdaInstance:
        self.started += 1
        log_path = self.task_root.parent / f"{self.task_root.name}-instance-{self.started}.log"
        return LambdaInstance(self, log_path)

    def runtime_environment(self, api_address: str) -> dict[str, str]:
        stream = f"{time.strftime('%Y/%m/%d')}/[$LATEST]{secrets.token_hex(16)}"
        execution_env = (
            "AWS_Lambda_python3.11" if self.runtime == PYTHON else "AWS_Lambda_nodejs20.x"
        )
        variables = {
            "AWS_LAMBDA_RUNTIME_API": api_address,
            "_HANDLER": self.handler,
            "LAMBDA_TASK_ROOT": str(self.task_root),
            "AWS_EXECUTION_ENV": execution_env,
            "AWS_LAMBDA_FUNCTION_NAME": self.name,
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(self.memory_mb),
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{self.name}",
            "AWS_LAMBDA_LOG_STREAM_NAME": stream,
            "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "TZ": ":UTC",
            **self.environment,
        }
        if self.runtime == PYTHON:
            # Lambda's Python runtimes put the task root on the module search path.
            return inherited_environment({**variables, "PYTHONPATH": str(self.task_root)})
        return node_environment(variables)


class LambdaInstance(FunctionInstance):
    """One execution environment: a Runtime API server and the runtime client process."""

    def __init__(self, deployment: LambdaDeployment, log_path: Path) -> None:
        super().__init__(f"{deployment.name} ({deployment.runtime})", log_path)
        self.deployment = deployment
        self.api = RuntimeApiServer(deployment.name, timeout_seconds=deployment.timeout_seconds)

    def _command(self) -> list[str]:
        if self.deployment.runtime == PYTHON:
            return [sys.executable, "-m", "awslambdaric", self.deployment.handler]
        return [
            "node",
            str(self.deployment.task_root / NODE_RUNTIME_CLIENT),
            self.deployment.handler,
        ]

    def start(self) -> None:
        self.api.start()
        self._popen(
            self._command(),
            cwd=self.deployment.task_root,
            env=self.deployment.runtime_environment(self.api.address),
            stdin=subprocess.DEVNULL,
        )
        # A runtime is ready once it requests its first event, where Lambda's Init phase ends.
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self.api.wait_until_runtime_waits(timeout=0.1):
            if self.api.init_error is not None:
                raise self.failure(f"the runtime reported an init error: {self.api.init_error}")
            if self.process is not None and self.process.poll() is not None:
                raise self.failure("the runtime client exited during init")
            if time.monotonic() > deadline:
                raise self.failure(
                    "the runtime client did not ask for an event within "
                    f"{START_TIMEOUT_SECONDS:.0f} s"
                )

    def wait_until_idle(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Wait until the runtime requests its next event, the point where Lambda freezes it."""
        if not self.api.wait_until_runtime_waits(timeout):
            raise self.failure(f"the runtime did not ask for its next event within {timeout:.0f} s")

    def invoke(self, request: HttpRequest) -> Invocation:
        return self.invoke_event(api_gateway_event(request))

    def invoke_event(
        self,
        event: Any,
        *,
        request_id: str | None = None,
        client_context: dict[str, Any] | None = None,
        cognito_identity: dict[str, Any] | None = None,
    ) -> Invocation:
        """Hand *event* to the runtime and wait for what it posts back.

        A handler that runs past the function timeout ends the invocation with an error and
        the instance with it, as Lambda stops the execution environment of a timed-out
        invocation.
        """
        self.require_running()
        started = time.monotonic()
        pending = self.api.submit(
            event,
            request_id=request_id,
            client_context=client_context,
            cognito_identity=cognito_identity,
        )
        pickup_deadline = started + REPLY_GRACE_SECONDS
        while (result := pending.wait(timeout=0.02)) is None:
            if self.process is not None and self.process.poll() is not None:
                raise self.failure(f"the runtime exited during invocation {pending.request_id}")
            if pending.deadline_ms is None:
                if time.monotonic() > pickup_deadline and not self.frozen:
                    raise self.failure(f"the runtime did not take event {pending.request_id}")
            elif time.time() * 1000 > pending.deadline_ms + DEADLINE_SLACK_MS:
                self.close()
                message = f"Task timed out after {self.deployment.timeout_seconds:.2f} seconds"
                return Invocation(None, None, message, time.monotonic() - started)
        return invocation_from_result(result, time.monotonic() - started)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.api.close()


def require_runtime_client(runtime: str, task_root: Path) -> None:
    """Raise InstanceError when the runtime client for *runtime* cannot run here."""
    problem = runtime_client_problem(runtime, task_root)
    if problem is not None:
        raise InstanceError(problem)
