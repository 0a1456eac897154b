"""A Lambda Runtime API server on 127.0.0.1, for running handlers under AWS's runtime clients.

AWS Lambda hands each invocation to the runtime inside an execution environment over a small
HTTP API, version 2018-06-01, documented at
https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html. The runtime interface clients,
`awslambdaric` for Python and `aws-lambda-ric` for Node.js, are the programs that speak it: they
import the handler, ask `GET /runtime/invocation/next` for an event, call the handler, and post
its result to `/runtime/invocation/{id}/response` or its exception to `.../error`. A failure
while importing the handler goes to `/runtime/init/error`.

`RuntimeApiServer` implements those four paths for one execution environment, so a test can
point a real runtime client at it with AWS_LAMBDA_RUNTIME_API and hand it events. Like the
service, it responds to the next-invocation request only when an event is waiting, and sends the
request id, deadline, function ARN, X-Ray trace header and, when given, the client context and
Cognito identity as response headers.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)

API_VERSION = "2018-06-01"
NEXT_PATH = f"/{API_VERSION}/runtime/invocation/next"
INIT_ERROR_PATH = f"/{API_VERSION}/runtime/init/error"
INVOCATION_PATH = re.compile(
    rf"^/{API_VERSION}/runtime/invocation/(?P<id>[^/]+)/(?P<kind>response|error)$"
)
ERROR_TYPE_HEADER = "Lambda-Runtime-Function-Error-Type"

# The account and region in the function ARN; no request leaves this machine.
ACCOUNT_ID = "123456789012"
REGION = "us-east-1"

# How often a waiting next-invocation request checks whether the server is closing.
POLL_SECONDS = 0.2


@dataclass(frozen=True)
class RuntimeResult:
    """What the runtime posted for one invocation: a response body, or an error document."""

    request_id: str
    succeeded: bool
    body: bytes
    content_type: str | None
    error_type: str | None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class PendingInvocation:
    """An event queued for the runtime, completed when the runtime posts its outcome."""

    request_id: str
    event: bytes
    client_context: str | None
    cognito_identity: str | None
    timeout_seconds: float
    deadline_ms: int | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: RuntimeResult | None = None

    def wait(self, timeout: float) -> RuntimeResult | None:
        """Return the runtime's outcome, or None when it has not posted one in *timeout* s."""
        self.done.wait(timeout)
        return self.result


def trace_header() -> str:
    """Return an X-Ray trace header in the documented Root/Parent/Sampled form."""
    epoch = f"{int(time.time()):08x}"
    return f"Root=1-{epoch}-{secrets.token_hex(12)};Parent={secrets.token_hex(8)};Sampled=0"


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A runtime client that is stopped mid-request resets its connection; that is expected.
        logger.debug(
            "runtime api: connection from %s ended abruptly", client_address, exc_info=True
        )


class RuntimeApiServer:
    """The Runtime API of one execution environment, served on 127.0.0.1 by a thread.

    `submit()` queues an event and returns a PendingInvocation to wait on. `init_error` is
    the document a runtime posted to /runtime/init/error, if any. Use it as a context manager,
    or call `start()` and `close()`.
    """

    def __init__(self, function_name: str, *, timeout_seconds: float) -> None:
        self.function_name = function_name
        self.timeout_seconds = timeout_seconds
        self.init_error: dict[str, Any] | None = None
        self.next_requests = 0
        self._queue: queue.Queue[PendingInvocation] = queue.Queue()
        self._invocations: dict[str, PendingInvocation] = {}
        self._lock = threading.Lock()
        self._runtime_waiting = threading.Condition(self._lock)
        self._waiting_requests = 0
        self._closing = threading.Event()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        """The host:port to put in AWS_LAMBDA_RUNTIME_API."""
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    @property
    def function_arn(self) -> str:
        return f"arn:aws:lambda:{REGION}:{ACCOUNT_ID}:function:{self.function_name}"

    def start(self) -> RuntimeApiServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> RuntimeApiServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def submit(
        self,
        event: Any,
        *,
        request_id: str | None = None,
        client_context: dict[str, Any] | None = None,
        cognito_identity: dict[str, Any] | None = None,
    ) -> PendingInvocation:
        """Queue *event* (JSON-encoded here) for the runtime's next-invocation request."""
        invocation = PendingInvocation(
            request_id=request_id or str(uuid.uuid4()),
            event=json.dumps(event).encode(),
            client_context=json.dumps(client_context) if client_context is not None else None,
            cognito_identity=json.dumps(cognito_identity) if cognito_identity is not None else None,
            timeout_seconds=self.timeout_seconds,
        )
        with self._lock:
            self._invocations[invocation.request_id] = invocation
        self._queue.put(invocation)
        return invocation

    def wait_until_runtime_waits(self, timeout: float) -> bool:
        """Wait until the runtime has a next-invocation request open, as it does when idle."""
        deadline = time.monotonic() + timeout
        with self._runtime_waiting:
            while self._waiting_requests == 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._runtime_waiting.wait(remaining)
        return True

    def _next_invocation(self) -> PendingInvocation | None:
        with self._runtime_waiting:
            self.next_requests += 1
            self._waiting_requests += 1
            self._runtime_waiting.notify_all()
        try:
            while not self._closing.is_set():
                try:
                    invocation = self._queue.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    continue
                # The deadline counts from the moment the runtime receives the event.
                invocation.deadline_ms = int((time.time() + invocation.timeout_seconds) * 1000)
                return invocation
            return None
        finally:
            with self._runtime_waiting:
                self._waiting_requests -= 1

    def _complete(self, request_id: str, result: RuntimeResult) -> bool:
        with self._lock:
            invocation = self._invocations.get(request_id)
            if invocation is None or invocation.result is not None:
                return False
            invocation.result = result
        invocation.done.set()
        return True

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            # The runtime clients keep one connection open across requests.
            protocol_version = "HTTP/1.1"
            # Headers and body leave in two writes. With Nagle's algorithm the second waits
            # for the client's delayed ACK, which delays every invocation.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("runtime api: " + format, *args)

            def _send(
                self, status: HTTPStatus, body: bytes, headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _send_json(self, status: HTTPStatus, document: dict[str, str]) -> None:
                body = json.dumps(document).encode()
                self._send(status, body, {"Content-Type": "application/json"})

            def _read_body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def do_GET(self) -> None:
                if self.path != NEXT_PATH:
                    self._send_json(HTTPStatus.NOT_FOUND, {"errorMessage": "unknown path"})
                    return
                invocation = api._next_invocation()
                if invocation is None:
                    self.close_connection = True
                    return
                headers = {
                    "Content-Type": "application/json",
                    "Lambda-Runtime-Aws-Request-Id": invocation.request_id,
                    "Lambda-Runtime-Deadline-Ms": str(invocation.deadline_ms),
                    "Lambda-Runtime-Invoked-Function-Arn": api.function_arn,
                    "Lambda-Runtime-Trace-Id": trace_header(),
                }
                if invocation.client_context is not None:
                    headers["Lambda-Runtime-Client-Context"] = invocation.client_context
                if invocation.cognito_identity is not None:
                    headers["Lambda-Runtime-Cognito-Identity"] = invocation.cognito_identity
                self._send(HTTPStatus.OK, invocation.event, headers)

            def do_POST(self) -> None:
                body = self._read_body()
                if self.path == INIT_ERROR_PATH:
                    api.init_error = _decode_document(body)
                    self._send_json(HTTPStatus.ACCEPTED, {"status": "OK"})
                    return

                match = INVOCATION_PATH.match(self.path)
                if match is None:
                    self._send_json(HTTPStatus.NOT_FOUND, {"errorMessage": "unknown path"})
                    return
                result = RuntimeResult(
                    request_id=match["id"],
                    succeeded=match["kind"] == "response",
                    body=body,
                    content_type=self.headers.get("Content-Type"),
                    error_type=self.headers.get(ERROR_TYPE_HEADER),
                )
                if not api._complete(match["id"], result):
                    self._send_json(
                        HTTPStatus.BAD_REQUEST,
                        {
                            "errorMessage": f"no open invocation has request id {match['id']}",
                            "errorType": "InvalidRequestID",
                        },
                    )
                    return
                self._send_json(HTTPStatus.ACCEPTED, {"status": "OK"})

        return Handler


def _decode_document(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"errorMessage": body.decode(errors="replace"), "errorType": "Unknown"}
    return document if isinstance(document, dict) else {"errorMessage": str(document)}
