"""Azure Functions Python apps (v2 programming model) run in a worker process of their own.

The Functions host and its Python language worker cannot run here, because the Azure
Functions Core Tools that bring the host download their binaries at install time from
outside the package registries. This module replaces the worker with what the v2
model itself provides. Each instance is one process that imports
`function_app.py` once, finds the function in its `FunctionApp`, and calls it with real
`azure.functions.HttpRequest` objects, returning its `HttpResponse`.

Azure's Python worker runs a function defined with `def` on a ThreadPoolExecutor whose size
is PYTHON_THREADPOOL_THREAD_COUNT
(https://learn.microsoft.com/en-us/azure/azure-functions/python-scale-performance-reference).
This worker does the same, so several invocations of one instance can run at once.

Run as a program, this module is the worker:

    python -m tests.harness.azure_functions APP_DIRECTORY FUNCTION_NAME

It reads one JSON request per line on stdin and writes one JSON reply per line on stdout.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tests.harness.invocations import (
    REPLY_GRACE_SECONDS,
    START_TIMEOUT_SECONDS,
    STOP_TIMEOUT_SECONDS,
    FunctionInstance,
    HttpRequest,
    Invocation,
    decode_body,
    inherited_environment,
)
from tests.harness.snippets import ROOT

APP_FILE = "function_app.py"
# The requests of a test finish in well under this; a hung worker fails the invocation.
REQUEST_TIMEOUT_SECONDS = 30.0
HOST = "http://127.0.0.1:7071"


@dataclass
class AzureFunctionDeployment:
    """A function app directory holding function_app.py, the function's name, and app settings."""

    name: str
    directory: Path
    function_name: str
    environment: Mapping[str, str]
    started: int = field(default=0, init=False)

    def start(self) -> AzureWorkerInstance:
        self.started += 1
        log_path = self.directory.parent / f"{self.directory.name}-instance-{self.started}.log"
        return AzureWorkerInstance(self, log_path)


class AzureWorkerInstance(FunctionInstance):
    """One worker process; requests and replies travel as JSON lines over its stdin and stdout."""

    def __init__(self, deployment: AzureFunctionDeployment, log_path: Path) -> None:
        super().__init__(f"{deployment.name} (python)", log_path)
        self.deployment = deployment
        self._replies: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._next_id = 0
        self._lock = threading.Lock()
        self._ready: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        environment = inherited_environment(
            {
                "PYTHONPATH": str(ROOT),
                "FUNCTIONS_WORKER_RUNTIME": "python",
                **self.deployment.environment,
            }
        )
        command = [
            sys.executable,
            "-m",
            "tests.harness.azure_functions",
            str(self.deployment.directory),
            self.deployment.function_name,
        ]
        self._popen(
            command,
            cwd=self.deployment.directory,
            env=environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read_replies, daemon=True)
        self._reader.start()
        try:
            reply = self._ready.get(timeout=START_TIMEOUT_SECONDS)
        except queue.Empty:
            raise self.failure(
                f"the worker was not ready within {START_TIMEOUT_SECONDS:.0f} s"
            ) from None
        if "error" in reply:
            raise self.failure(f"the worker could not load the app: {reply['error']}")

    def _read_replies(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            reply = json.loads(line)
            if "id" not in reply:
                self._ready.put(reply)
                continue
            with self._lock:
                waiting = self._replies.pop(reply["id"], None)
            if waiting is not None:
                waiting.put(reply)
        self._ready.put({"error": "the worker closed its output"})

    def invoke(self, request: HttpRequest) -> Invocation:
        process = self.require_running()
        assert process.stdin is not None
        started = time.monotonic()
        replies: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            self._next_id += 1
            request_id = self._next_id
            self._replies[request_id] = replies
            message = {
                "id": request_id,
                "method": request.method,
                "url": f"{HOST}/api{request.path}",
                "headers": request.headers(),
                "body": base64.b64encode(request.body).decode("ascii"),
            }
            process.stdin.write((json.dumps(message) + "\n").encode())
            process.stdin.flush()
        try:
            reply = replies.get(timeout=REQUEST_TIMEOUT_SECONDS + REPLY_GRACE_SECONDS)
        except queue.Empty:
            raise self.failure(f"the worker did not answer request {request_id}") from None
        latency = time.monotonic() - started
        if "error" in reply:
            return Invocation(None, None, reply["error"], latency)
        return Invocation(
            reply["status"], decode_body(base64.b64decode(reply["body"])), None, latency
        )

    def close(self) -> None:
        process = self.process
        if process is not None and process.stdin is not None and not self.frozen:
            # Closing stdin lets the worker finish its invocations and exit on its own.
            with suppress(BrokenPipeError):
                process.stdin.close()
        super().close()
        if self._reader is not None:
            self._reader.join(timeout=STOP_TIMEOUT_SECONDS)
        if process is not None:
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    with suppress(BrokenPipeError):
                        stream.close()


def load_function(directory: Path, function_name: str) -> Any:
    """Import function_app.py from *directory* and return its function *function_name*."""
    import azure.functions as func

    sys.path.insert(0, str(directory))
    spec = importlib.util.spec_from_file_location("function_app", directory / APP_FILE)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {directory / APP_FILE}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["function_app"] = module
    spec.loader.exec_module(module)

    apps = [value for value in vars(module).values() if isinstance(value, func.FunctionApp)]
    if len(apps) != 1:
        raise LookupError(f"{APP_FILE} must define one FunctionApp, found {len(apps)}")
    for function in apps[0].get_functions():
        if function.get_function_name() == function_name:
            return function.get_user_function()
    raise LookupError(f"{APP_FILE} defines no function named {function_name!r}")


def _call(user_function: Any, message: dict[str, Any]) -> dict[str, Any]:
    import azure.functions as func

    request = func.HttpRequest(
        method=message["method"],
        url=message["url"],
        headers=message["headers"],
        params={},
        route_params={},
        body=base64.b64decode(message["body"]),
    )
    try:
        response = user_function(request)
    except Exception as error:
        # The host logs an unhandled exception and returns 500 to the caller.
        logging.exception(
            "Executed 'Functions.%s' (Failed)", getattr(user_function, "__name__", "?")
        )
        return {"id": message["id"], "error": f"{type(error).__name__}: {error}"}
    return {
        "id": message["id"],
        "status": response.status_code,
        "headers": dict(response.headers),
        "body": base64.b64encode(response.get_body()).decode("ascii"),
    }


def _reply(output: IO[str], lock: threading.Lock, reply: dict[str, Any]) -> None:
    with lock:
        output.write(json.dumps(reply) + "\n")
        output.flush()


def main(arguments: list[str]) -> int:
    directory, function_name = Path(arguments[0]), arguments[1]
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    output, lock = sys.stdout, threading.Lock()
    try:
        user_function = load_function(directory, function_name)
    except Exception as error:
        _reply(output, lock, {"error": f"{type(error).__name__}: {error}"})
        return 1

    threads_setting = os.environ.get("PYTHON_THREADPOOL_THREAD_COUNT")
    # NOTE: Azure documents None, the executor's default, as the unset size for Python 3.9
    # only. The tests always set the count, so no newer version's default is relied on.
    threads = int(threads_setting) if threads_setting else None
    _reply(output, lock, {"ready": True})
    with ThreadPoolExecutor(max_workers=threads) as executor:
        for line in sys.stdin:
            message = json.loads(line)
            executor.submit(
                lambda message=message: _reply(output, lock, _call(user_function, message))
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
