"""Cloud Run functions served by the real Functions Framework on 127.0.0.1.

Each instance is one framework server process, which imports the function's source once and
serves HTTP requests to it until stopped:

- Python: `python -m functions_framework --target T --source main.py --host 127.0.0.1`, the
  framework's own command. It runs gunicorn with one worker process and THREADS threads, so an
  instance serves up to THREADS requests at once.
- Node.js: the `functions-framework` command of @google-cloud/functions-framework. It has no
  option for the listening address and listens on every interface, so a preload module binds
  its server to 127.0.0.1 instead. Nothing else about the command changes. Node.js serves
  concurrent requests on one event loop.
"""

from __future__ import annotations

import http.client
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.invocations import (
    REPLY_GRACE_SECONDS,
    START_TIMEOUT_SECONDS,
    FunctionInstance,
    HttpRequest,
    Invocation,
    decode_body,
    inherited_environment,
)
from tests.harness.node import node_environment
from tests.harness.processes import free_port

PYTHON = "python"
NODE = "node"
NODE_FRAMEWORK = Path("node_modules/@google-cloud/functions-framework/build/src/main.js")
LOOPBACK_PRELOAD = "bind-loopback.cjs"
# The requests of a test finish in well under this; a hung server fails the invocation.
REQUEST_TIMEOUT_SECONDS = 30.0

LOOPBACK_PRELOAD_SOURCE = """\
// Makes every server in this process listen on 127.0.0.1 when no address is given, because
// the Functions Framework command listens on all interfaces and has no option to change it.
const net = require("node:net");

const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function listenOnLoopback(...args) {
  const [port, host] = args;
  const portOnly = typeof port === "number" || typeof port === "string";
  if (portOnly && typeof host !== "string") {
    args.splice(1, 0, "127.0.0.1");
  }
  return listen.apply(this, args);
};
"""


@dataclass
class CloudRunFunctionDeployment:
    """A function's source directory, entry point and environment.

    *source* is the file the framework imports, inside *directory*. For Node.js the directory
    needs a node_modules with the framework, as `tests.harness.node.prepare_workspace` makes.
    """

    name: str
    language: str
    directory: Path
    source: str
    target: str
    environment: Mapping[str, str]
    started: int = field(default=0, init=False)

    def start(self) -> HttpFunctionInstance:
        self.started += 1
        log_path = self.directory.parent / f"{self.directory.name}-instance-{self.started}.log"
        return HttpFunctionInstance(self, log_path)


class HttpFunctionInstance(FunctionInstance):
    """One Functions Framework server process, reached over HTTP on 127.0.0.1."""

    def __init__(self, deployment: CloudRunFunctionDeployment, log_path: Path) -> None:
        super().__init__(f"{deployment.name} ({deployment.language})", log_path)
        self.deployment = deployment
        self.port = free_port()

    def _command(self) -> tuple[list[str], dict[str, str]]:
        deployment = self.deployment
        variables = {
            "PORT": str(self.port),
            "K_SERVICE": deployment.name,
            "FUNCTION_TARGET": deployment.target,
            **deployment.environment,
        }
        if deployment.language == PYTHON:
            command = [
                sys.executable,
                "-m",
                "functions_framework",
                "--target",
                deployment.target,
                "--source",
                deployment.source,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ]
            return command, inherited_environment(variables)

        (deployment.directory / LOOPBACK_PRELOAD).write_text(LOOPBACK_PRELOAD_SOURCE)
        command = [
            "node",
            "--require",
            f"./{LOOPBACK_PRELOAD}",
            str(deployment.directory / NODE_FRAMEWORK),
            f"--target={deployment.target}",
            f"--source={deployment.source}",
            f"--port={self.port}",
        ]
        return command, node_environment({**variables, "NODE_ENV": "production"})

    def start(self) -> None:
        command, environment = self._command()
        self._popen(command, cwd=self.deployment.directory, env=environment)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self._accepts_connections():
            if self.process is not None and self.process.poll() is not None:
                raise self.failure("the framework server exited during startup")
            if time.monotonic() > deadline:
                raise self.failure(
                    f"the server did not listen within {START_TIMEOUT_SECONDS:.0f} s"
                )
            time.sleep(0.05)

    def _accepts_connections(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.2)
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def invoke(self, request: HttpRequest) -> Invocation:
        self.require_running()
        started = time.monotonic()
        connection = http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_SECONDS + REPLY_GRACE_SECONDS
        )
        try:
            connection.request(request.method, request.path, request.body, request.headers())
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as error:
            return Invocation(
                None, None, f"{type(error).__name__}: {error}", time.monotonic() - started
            )
        finally:
            connection.close()
        return Invocation(response.status, decode_body(body), None, time.monotonic() - started)
