"""A local stand-in for the CockroachDB Cloud API endpoints that creating a cluster uses.

It listens on a free port of 127.0.0.1 in a background thread and implements, as the API
reference describes them for version 2024-09-16:

- POST /api/v1/clusters: create a cluster (serverless spec; BASIC or STANDARD plan)
- GET /api/v1/clusters/{cluster_id}: read a cluster, whose state moves from CREATING to
  CREATED after a set number of reads
- POST /api/v1/clusters/{cluster_id}/sql-users: create a SQL user
- GET /api/v1/clusters/{cluster_id}/connection-string: a connection string without password

It rejects everything else. An unknown path gets 404 and a known path with the wrong
method 405. A missing or wrong bearer token gets 401, and a body or parameter that breaks
the reference gets 400 with the reason. Error bodies have the reference's Status form,
{"code", "message", "details"}. Every request is recorded, so a test can check method,
path, headers and body field by field, and fail_next() makes the next requests fail with
a chosen status, such as 429 with Retry-After.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

HOST = "127.0.0.1"
API_VERSIONS = ("2022-03-31", "2022-09-20", "2023-04-10", "2024-09-16")
PROVIDERS = ("AWS", "GCP", "AZURE")
SERVERLESS_PLANS = ("BASIC", "STANDARD")
CLUSTER_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{4,18}[a-z0-9]$")
CONNECTION_STRING_PARAMETERS = {"database", "sql_user", "os"}
OPERATING_SYSTEMS = ("MAC", "LINUX", "WINDOWS")
STOP_TIMEOUT_SECONDS = 5.0
SHUTDOWN_POLL_SECONDS = 0.05

# gRPC status codes, which the API's error bodies carry in "code".
GRPC_CODES = {
    400: 3,
    401: 16,
    403: 7,
    404: 5,
    405: 12,
    409: 6,
    429: 8,
    500: 13,
    503: 14,
}

CLUSTERS_PATH = re.compile(r"^/api/v1/clusters$")
CLUSTER_PATH = re.compile(r"^/api/v1/clusters/(?P<id>[^/]+)$")
SQL_USERS_PATH = re.compile(r"^/api/v1/clusters/(?P<id>[^/]+)/sql-users$")
CONNECTION_STRING_PATH = re.compile(r"^/api/v1/clusters/(?P<id>[^/]+)/connection-string$")


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the stand-in received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any
    status: int


@dataclass
class InjectedError:
    """An error response that replaces the next request's normal response."""

    status: int
    retry_after: str | None = None
    message: str = ""


@dataclass
class StandInCluster:
    """A cluster the stand-in created."""

    id: str
    name: str
    provider: str
    plan: str
    regions: list[str]
    reads_until_ready: int
    final_state: str = "CREATED"
    sql_users: dict[str, str] = field(default_factory=dict)
    reads: int = 0

    @property
    def state(self) -> str:
        return self.final_state if self.reads >= self.reads_until_ready else "CREATING"

    def to_json(self) -> dict[str, Any]:
        host_region = self.regions[0]
        return {
            "id": self.id,
            "name": self.name,
            "cockroach_version": "v25.4.0",
            "plan": self.plan,
            "cloud_provider": self.provider,
            "state": self.state,
            "creator_id": "stand-in-service-account",
            "operation_status": "CLUSTER_STATUS_UNSPECIFIED",
            "config": {"serverless": {"routing_id": f"{self.name}-1234"}},
            "regions": [
                {
                    "name": region,
                    "sql_dns": f"{self.name}-1234.{self.provider.lower()}-{host_region}.invalid",
                    "ui_dns": "",
                    "node_count": 0,
                }
                for region in self.regions
            ],
        }


class ApiError(Exception):
    """An error response, raised by a handler and written by the request handler."""

    def __init__(self, status: int, message: str, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class CloudApiStandIn:
    """The stand-in server; use it as a context manager, or call start() and stop()."""

    def __init__(self, api_key: str, *, reads_until_ready: int = 2) -> None:
        self.api_key = api_key
        self.reads_until_ready = reads_until_ready
        self.final_state = "CREATED"
        self.requests: list[RecordedRequest] = []
        self.clusters: dict[str, StandInCluster] = {}
        self._injected: deque[InjectedError] = deque()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((HOST, 0), _handler_for(self))
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        # A short poll interval lets stop() return quickly; the default is half a second.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": SHUTDOWN_POLL_SECONDS},
            name="cloud-api-stand-in",
            daemon=True,
        )

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> CloudApiStandIn:
        self.start()
        return self

    def __exit__(
        self,
        error_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=STOP_TIMEOUT_SECONDS)

    def fail_next(
        self, status: int, *, count: int = 1, retry_after: str | None = None, message: str = ""
    ) -> None:
        """Make the next count requests fail with status instead of their normal response."""
        with self._lock:
            for _ in range(count):
                self._injected.append(InjectedError(status, retry_after, message))

    def requests_to(self, method: str, pattern: str) -> list[RecordedRequest]:
        """Return the recorded requests with this method whose path matches the regex."""
        with self._lock:
            return [
                request
                for request in self.requests
                if request.method == method and re.fullmatch(pattern, request.path)
            ]

    # Request handling, called from the server's threads.

    def handle(self, method: str, path: str, query: dict, headers: dict, raw_body: bytes):
        """Return (status, JSON body, extra headers) for one request and record it."""
        body: Any = None
        try:
            status, payload, extra = self._route(method, path, query, headers, raw_body)
            body = self._decoded(raw_body)
        except ApiError as error:
            status = error.status
            payload = {
                "code": GRPC_CODES.get(error.status, 2),
                "message": error.message,
                "details": [],
            }
            extra = {"Retry-After": error.retry_after} if error.retry_after else {}
            if error.status == 405:
                extra["Allow"] = self._allowed_methods(path)
            body = self._decoded(raw_body)

        with self._lock:
            self.requests.append(RecordedRequest(method, path, query, headers, body, status))
        return status, payload, extra

    @staticmethod
    def _decoded(raw_body: bytes) -> Any:
        if not raw_body:
            return None
        try:
            return json.loads(raw_body)
        except ValueError:
            return raw_body.decode("utf-8", "replace")

    def _routes(self) -> list[tuple[re.Pattern[str], dict[str, Any]]]:
        return [
            (CLUSTERS_PATH, {"POST": self._create_cluster}),
            (CLUSTER_PATH, {"GET": self._get_cluster}),
            (SQL_USERS_PATH, {"POST": self._create_sql_user}),
            (CONNECTION_STRING_PATH, {"GET": self._connection_string}),
        ]

    def _allowed_methods(self, path: str) -> str:
        for pattern, handlers in self._routes():
            if pattern.match(path):
                return ", ".join(sorted(handlers))
        return ""

    def _route(self, method: str, path: str, query: dict, headers: dict, raw_body: bytes):
        with self._lock:
            injected = self._injected.popleft() if self._injected else None
        if injected is not None:
            message = injected.message or HTTPStatus(injected.status).phrase
            raise ApiError(injected.status, message, injected.retry_after)

        handlers = None
        match = None
        for pattern, methods in self._routes():
            match = pattern.match(path)
            if match:
                handlers = methods
                break
        if handlers is None:
            raise ApiError(404, f"no endpoint at {path}")
        if method not in handlers:
            raise ApiError(405, f"{method} is not allowed on {path}")

        self._authenticate(headers)
        self._check_version(headers)
        body = self._json_body(method, headers, raw_body)
        cluster_id = match.groupdict().get("id") if match else None
        return handlers[method](cluster_id, query, body)

    def _authenticate(self, headers: dict) -> None:
        authorization = headers.get("authorization")
        if authorization is None:
            raise ApiError(401, "missing Authorization header with a bearer token")
        if authorization != f"Bearer {self.api_key}":
            raise ApiError(401, "invalid bearer token")

    @staticmethod
    def _check_version(headers: dict) -> None:
        version = headers.get("cc-version")
        if version is not None and version not in API_VERSIONS:
            raise ApiError(400, "invalid Cc-Version")

    @staticmethod
    def _json_body(method: str, headers: dict, raw_body: bytes) -> Any:
        if method != "POST":
            if raw_body:
                raise ApiError(400, f"a {method} request takes no body")
            return None
        content_type = headers.get("content-type", "").split(";")[0].strip()
        if content_type != "application/json":
            raise ApiError(400, "the body must be JSON, sent with Content-Type: application/json")
        try:
            body = json.loads(raw_body)
        except ValueError as error:
            raise ApiError(400, f"the body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _cluster(self, cluster_id: str) -> StandInCluster:
        cluster = self.clusters.get(cluster_id)
        if cluster is None:
            raise ApiError(404, f"cluster {cluster_id} not found")
        return cluster

    def _create_cluster(self, cluster_id: None, query: dict, body: dict):
        if query:
            raise ApiError(400, f"unknown query parameters: {', '.join(sorted(query))}")
        unknown = sorted(set(body) - {"name", "provider", "plan", "spec", "parent_id", "labels"})
        if unknown:
            raise ApiError(400, f"unknown fields: {', '.join(unknown)}")

        name = body.get("name")
        if not isinstance(name, str) or not CLUSTER_NAME.match(name):
            raise ApiError(
                400,
                "name must be 6-20 characters of lowercase letters, numbers and dashes, "
                "with no leading or trailing dash",
            )
        provider = body.get("provider")
        if provider not in PROVIDERS:
            raise ApiError(400, f"provider must be one of {', '.join(PROVIDERS)}")
        plan = body.get("plan", "STANDARD")
        if plan not in SERVERLESS_PLANS:
            raise ApiError(400, "the stand-in implements serverless specs only: BASIC or STANDARD")
        if provider == "AZURE":
            raise ApiError(400, f"{plan} clusters cannot be created on AZURE")

        spec = body.get("spec")
        serverless = spec.get("serverless") if isinstance(spec, dict) else None
        if not isinstance(serverless, dict) or set(spec) != {"serverless"}:
            raise ApiError(400, "spec must contain exactly one of serverless or dedicated")
        regions = serverless.get("regions")
        if (
            not isinstance(regions, list)
            or not regions
            or not all(isinstance(region, str) and region for region in regions)
        ):
            raise ApiError(400, "spec.serverless.regions must list at least one region name")
        if plan == "STANDARD" and "provisioned_virtual_cpus" not in serverless.get(
            "usage_limits", {}
        ):
            raise ApiError(400, "a STANDARD cluster needs usage_limits.provisioned_virtual_cpus")

        with self._lock:
            if any(existing.name == name for existing in self.clusters.values()):
                raise ApiError(409, f"a cluster named {name} already exists")
            cluster = StandInCluster(
                id=str(uuid.uuid4()),
                name=name,
                provider=provider,
                plan=plan,
                regions=list(regions),
                reads_until_ready=self.reads_until_ready,
                final_state=self.final_state,
            )
            self.clusters[cluster.id] = cluster
        return 200, cluster.to_json(), {}

    def _get_cluster(self, cluster_id: str, query: dict, body: None):
        if query:
            raise ApiError(400, f"unknown query parameters: {', '.join(sorted(query))}")
        with self._lock:
            cluster = self._cluster(cluster_id)
            cluster.reads += 1
            return 200, cluster.to_json(), {}

    def _create_sql_user(self, cluster_id: str, query: dict, body: dict):
        if query:
            raise ApiError(400, f"unknown query parameters: {', '.join(sorted(query))}")
        unknown = sorted(set(body) - {"name", "password"})
        if unknown:
            raise ApiError(400, f"unknown fields: {', '.join(unknown)}")
        name = body.get("name")
        password = body.get("password")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "name is required")
        if not isinstance(password, str) or not password:
            raise ApiError(400, "password is required")

        with self._lock:
            cluster = self._cluster(cluster_id)
            # NOTE: the reference does not say how the API responds to a SQL user for a
            # cluster that is still being created. The stand-in rejects it, so that a
            # client that does not wait for CREATED fails where a test can see it.
            if cluster.state != "CREATED":
                raise ApiError(400, f"cluster {cluster_id} is {cluster.state}, not CREATED")
            if name in cluster.sql_users:
                raise ApiError(409, f"SQL user {name} already exists")
            cluster.sql_users[name] = password
        return 200, {"name": name}, {}

    def _connection_string(self, cluster_id: str, query: dict, body: None):
        unknown = sorted(set(query) - CONNECTION_STRING_PARAMETERS)
        if unknown:
            raise ApiError(400, f"unknown query parameters: {', '.join(unknown)}")
        if any(len(values) != 1 for values in query.values()):
            raise ApiError(400, "each query parameter may be given once")
        os_name = query.get("os", [None])[0]
        if os_name is not None and os_name not in OPERATING_SYSTEMS:
            raise ApiError(400, f"os must be one of {', '.join(OPERATING_SYSTEMS)}")
        database = query.get("database", ["defaultdb"])[0]
        sql_user = query.get("sql_user", [None])[0]

        with self._lock:
            cluster = self._cluster(cluster_id)
            if sql_user is not None and sql_user not in cluster.sql_users:
                raise ApiError(404, f"SQL user {sql_user} not found")
            host = cluster.to_json()["regions"][0]["sql_dns"]
        user_part = f"{sql_user}@" if sql_user else ""
        params = {"host": host, "port": "26257", "database": database}
        if sql_user:
            params["username"] = sql_user
        return (
            200,
            {
                "connection_string": (
                    f"postgresql://{user_part}{host}:26257/{database}?sslmode=verify-full"
                ),
                "params": params,
            },
            {},
        )


def _handler_for(stand_in: CloudApiStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "CloudApiStandIn"

        def _respond(self) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query, keep_blank_values=True)
            headers = {name.lower(): value for name, value in self.headers.items()}
            length = int(self.headers.get("Content-Length") or 0)
            raw_body = self.rfile.read(length) if length else b""

            status, payload, extra = stand_in.handle(
                self.command, parts.path, query, headers, raw_body
            )
            data = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        do_GET = _respond
        do_POST = _respond
        do_PUT = _respond
        do_PATCH = _respond
        do_DELETE = _respond

        def log_message(self, format: str, *args: object) -> None:
            # The recorded requests replace the access log.
            return

    return Handler
