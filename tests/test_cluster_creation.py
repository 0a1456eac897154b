"""The cluster page's Cloud API script, run against a local stand-in of the Cloud API.

The stand-in (tests/harness/cloud_api_server.py) records every request, so the tests check
what the script sends field by field. It also responds with chosen errors, so the tests
can check how the script handles each one. Whole runs start the script in a new process, as a
reader would; the retry and polling tests drive its client with a fake clock instead, so
that they check the delays without waiting for them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType

import pytest

from tests.harness.cloud_api_server import CloudApiStandIn
from tests.harness.facts import load_facts
from tests.harness.snippets import SnippetLoader

CREATE_CLUSTER = "cluster/create_cluster.py"
uses_script = pytest.mark.snippet(CREATE_CLUSTER)

API_KEY = "CCDB1_test_0a1b2c3d4e5f6a7b8c9d"
PASSWORD = "Tr0ub4dor-and-3-horses"
CLUSTER = "functions-prod"
SQL_USER = "app_user"
CLUSTERS = r"/api/v1/clusters"
ONE_CLUSTER = r"/api/v1/clusters/[^/]+"
SQL_USERS = r"/api/v1/clusters/[^/]+/sql-users"
CONNECTION_STRING = r"/api/v1/clusters/[^/]+/connection-string"
MAX_ATTEMPTS = 5

# Broken copies of the script, each removing one protection the page describes.
RETRY_AFTER_IGNORED = (("        if requested is not None:\n            return requested\n", ""),)
UNBOUNDED_RETRIES = (("MAX_ATTEMPTS = 5\n", "MAX_ATTEMPTS = 1000\n"),)
RETRIES_401 = (
    (
        "retryable = status == 0 or status == 429 or status >= 500",
        "retryable = status in (0, 401, 429) or status >= 500",
    ),
)
READY_NOT_AWAITED = (("            if state == READY_STATE:\n", "            if True:\n"),)
NO_DEADLINE = (("            if remaining <= 0:\n", "            if False:\n"),)
PASSWORD_KEPT = (("    if parts.password is not None:\n", "    if False:\n"),)
KEY_NOT_REDACTED = (
    (
        'return text.replace(self._api_key, "[API key]") if self._api_key else text',
        "return text",
    ),
)


class FakeClock:
    """A monotonic clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def stand_in() -> CloudApiStandIn:
    with CloudApiStandIn(API_KEY, reads_until_ready=2) as server:
        yield server


def script_environment(stand_in: CloudApiStandIn, **overrides: str) -> dict[str, str]:
    # Only what the script needs: no proxy variables, which would route loopback requests
    # elsewhere, and no credentials of the machine running the tests.
    environment = {
        "PATH": os.environ.get("PATH", ""),
        "COCKROACH_API_KEY": API_KEY,
        "COCKROACH_API_URL": stand_in.url,
        "CLUSTER_NAME": CLUSTER,
        "CLUSTER_PROVIDER": "AWS",
        "CLUSTER_REGION": "us-east-1",
        "SQL_USER_NAME": SQL_USER,
        "SQL_USER_PASSWORD": PASSWORD,
        "CLUSTER_POLL_INTERVAL_SECONDS": "0.01",
    }
    environment.update(overrides)
    return {name: value for name, value in environment.items() if value is not None}


def run_script(
    snippets: SnippetLoader,
    tmp_path: Path,
    environment: dict[str, str],
    replacements: tuple[tuple[str, str], ...] = (),
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "create_cluster.py"
    script.write_text(snippets.source(CREATE_CLUSTER, replacements), "utf-8")
    return subprocess.run(
        [sys.executable, str(script)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def load_client(
    snippets: SnippetLoader,
    stand_in: CloudApiStandIn,
    clock: FakeClock,
    replacements: tuple[tuple[str, str], ...] = (),
    api_key: str = API_KEY,
) -> tuple[ModuleType, object]:
    module = snippets.load(CREATE_CLUSTER, replacements)
    client = module.CloudApi(stand_in.url, api_key, sleep=clock.sleep, clock=clock.monotonic)
    return module, client


def ready_cluster(client, stand_in: CloudApiStandIn) -> dict:
    cluster = client.create_cluster(CLUSTER, "AWS", "us-east-1")
    stand_in.clusters[cluster["id"]].reads = stand_in.reads_until_ready
    return cluster


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@uses_script
class TestScriptRun:
    """Whole runs of the script, in a new process, against the stand-in."""

    def test_prints_connection_string(self, snippets, tmp_path, stand_in):
        result = run_script(snippets, tmp_path, script_environment(stand_in))

        cluster = next(iter(stand_in.clusters.values()))
        host = cluster.to_json()["regions"][0]["sql_dns"]
        assert result.returncode == 0, result.stderr
        assert result.stdout == (
            f"postgresql://{SQL_USER}@{host}:26257/defaultdb?sslmode=verify-full\n"
        )

    def test_requests_in_documented_order(self, snippets, tmp_path, stand_in):
        run_script(snippets, tmp_path, script_environment(stand_in))

        calls = [(request.method, request.path.count("/")) for request in stand_in.requests]
        assert [request.status for request in stand_in.requests] == [200] * 5
        assert calls == [("POST", 3), ("GET", 4), ("GET", 4), ("POST", 5), ("GET", 5)]
        assert stand_in.requests[3].path.endswith("/sql-users")
        assert stand_in.requests[4].path.endswith("/connection-string")

    def test_create_request_fields(self, snippets, tmp_path, stand_in):
        run_script(snippets, tmp_path, script_environment(stand_in, CLUSTER_PROVIDER="gcp"))

        [request] = stand_in.requests_to("POST", CLUSTERS)
        assert request.headers["authorization"] == f"Bearer {API_KEY}"
        assert request.headers["cc-version"] == load_facts()["cockroachdb.cloud-api.version"].value
        assert request.headers["content-type"] == "application/json"
        assert request.body == {
            "name": CLUSTER,
            "provider": "GCP",
            "plan": "BASIC",
            "spec": {"serverless": {"regions": ["us-east-1"]}},
        }

    def test_every_request_authenticated(self, snippets, tmp_path, stand_in):
        run_script(snippets, tmp_path, script_environment(stand_in))

        headers = [request.headers for request in stand_in.requests]
        assert {header["authorization"] for header in headers} == {f"Bearer {API_KEY}"}
        assert all("cc-version" in header for header in headers)

    def test_sql_user_request_fields(self, snippets, tmp_path, stand_in):
        run_script(snippets, tmp_path, script_environment(stand_in))

        [request] = stand_in.requests_to("POST", SQL_USERS)
        assert request.body == {"name": SQL_USER, "password": PASSWORD}
        assert request.headers["content-type"] == "application/json"

    def test_sql_user_after_cluster_ready(self, snippets, tmp_path, stand_in):
        run_script(snippets, tmp_path, script_environment(stand_in))

        reads = stand_in.requests_to("GET", ONE_CLUSTER)
        assert len(reads) == stand_in.reads_until_ready
        assert stand_in.requests.index(reads[-1]) < stand_in.requests.index(
            stand_in.requests_to("POST", SQL_USERS)[0]
        )

    def test_connection_string_query(self, snippets, tmp_path, stand_in):
        environment = script_environment(stand_in, DATABASE_NAME="orders")

        result = run_script(snippets, tmp_path, environment)

        [request] = stand_in.requests_to("GET", CONNECTION_STRING)
        assert request.query == {"database": ["orders"], "sql_user": [SQL_USER]}
        assert "/orders?sslmode=verify-full" in result.stdout

    def test_secrets_never_printed(self, snippets, tmp_path, stand_in):
        result = run_script(snippets, tmp_path, script_environment(stand_in))

        assert PASSWORD not in result.stdout + result.stderr
        assert API_KEY not in result.stdout + result.stderr

    def test_ready_deadline_bounds_polling(self, snippets, tmp_path, stand_in):
        stand_in.reads_until_ready = 10_000
        environment = script_environment(
            stand_in,
            CLUSTER_READY_TIMEOUT_SECONDS="0.3",
            CLUSTER_POLL_INTERVAL_SECONDS="0.05",
        )

        result = run_script(snippets, tmp_path, environment)

        assert result.returncode == 1
        assert "was still CREATING after 0.3 seconds" in result.stderr
        assert len(stand_in.requests_to("GET", ONE_CLUSTER)) <= 10
        assert stand_in.requests_to("POST", SQL_USERS) == []

    def test_failed_creation_reported(self, snippets, tmp_path, stand_in):
        stand_in.final_state = "CREATION_FAILED"

        result = run_script(snippets, tmp_path, script_environment(stand_in))

        assert result.returncode == 1
        assert f"cluster '{CLUSTER}'" in result.stderr
        assert "is CREATION_FAILED" in result.stderr
        assert stand_in.requests_to("POST", SQL_USERS) == []

    def test_wrong_key_not_retried(self, snippets, tmp_path, stand_in):
        environment = script_environment(stand_in, COCKROACH_API_KEY="CCDB1_revoked_key_123")

        result = run_script(snippets, tmp_path, environment)

        assert result.returncode == 1
        assert "did not accept the API key (401)" in result.stderr
        assert "COCKROACH_API_KEY" in result.stderr
        assert "CCDB1_revoked_key_123" not in result.stderr
        assert len(stand_in.requests) == 1

    def test_forbidden_names_role(self, snippets, tmp_path, stand_in):
        stand_in.fail_next(403, message="permission denied")

        result = run_script(snippets, tmp_path, script_environment(stand_in))

        assert result.returncode == 1
        assert "not allowed to create cluster 'functions-prod' (403)" in result.stderr
        assert "Cluster Admin or Cluster Creator role" in result.stderr
        assert len(stand_in.requests) == 1

    def test_taken_name_not_retried(self, snippets, tmp_path, stand_in):
        run_script(snippets, tmp_path, script_environment(stand_in))
        before = len(stand_in.requests)

        result = run_script(snippets, tmp_path, script_environment(stand_in))

        assert result.returncode == 1
        assert f"a cluster named '{CLUSTER}' already exists" in result.stderr
        assert "choose another CLUSTER_NAME" in result.stderr
        assert len(stand_in.requests) == before + 1


@uses_script
class TestSettings:
    """Bad settings fail before any request, with the variable and the fix in the message."""

    @pytest.mark.parametrize(
        ("overrides", "message"),
        [
            ({"COCKROACH_API_KEY": None}, "COCKROACH_API_KEY is not set"),
            ({"CLUSTER_NAME": "Bad_Name"}, "invalid CLUSTER_NAME 'Bad_Name'; use 6-20"),
            ({"CLUSTER_NAME": "-prod-db"}, "no dash at the start or end"),
            ({"CLUSTER_PROVIDER": "azure"}, "CockroachDB Basic runs on AWS or GCP"),
            ({"CLUSTER_REGION": "US East"}, "invalid CLUSTER_REGION 'US East'"),
            ({"SQL_USER_NAME": "pg_app"}, "invalid SQL_USER_NAME 'pg_app'"),
            ({"SQL_USER_NAME": "app-user"}, "use only letters, digits, periods and underscores"),
            ({"SQL_USER_PASSWORD": "short-secret"}, "shorter than 16 characters"),
            ({"COCKROACH_API_URL": "http://api.invalid"}, "plain http is accepted only for"),
            ({"COCKROACH_API_URL": "https://cockroachlabs.cloud/api/v1"}, "base address"),
            ({"CLUSTER_READY_TIMEOUT_SECONDS": "soon"}, "invalid CLUSTER_READY_TIMEOUT_SECONDS"),
        ],
        ids=[
            "no-key",
            "name-characters",
            "name-dash",
            "provider",
            "region",
            "user-reserved",
            "user-dash",
            "password-short",
            "url-plain-http",
            "url-with-path",
            "timeout",
        ],
    )
    def test_bad_setting_rejected(self, snippets, tmp_path, stand_in, overrides, message):
        result = run_script(snippets, tmp_path, script_environment(stand_in, **overrides))

        assert result.returncode == 1
        assert message in result.stderr
        assert stand_in.requests == []

    def test_short_password_not_echoed(self, snippets, tmp_path, stand_in):
        environment = script_environment(stand_in, SQL_USER_PASSWORD="short-secret")

        result = run_script(snippets, tmp_path, environment)

        assert "short-secret" not in result.stderr


@uses_script
class TestClient:
    """How the client handles each error, driven with a fake clock."""

    def test_retry_after_honoured(self, snippets, stand_in):
        clock = FakeClock()
        _, client = load_client(snippets, stand_in, clock)
        stand_in.fail_next(429, retry_after="7")

        cluster = client.create_cluster(CLUSTER, "AWS", "us-east-1")

        assert cluster["name"] == CLUSTER
        assert clock.sleeps == [7.0]
        assert [request.status for request in stand_in.requests] == [429, 200]

    def test_rate_limit_retries_bounded(self, snippets, stand_in):
        clock = FakeClock()
        module, client = load_client(snippets, stand_in, clock)
        stand_in.fail_next(429, count=20, retry_after="1")

        with pytest.raises(module.CloudApiError) as raised:
            client.create_cluster(CLUSTER, "AWS", "us-east-1")

        assert "rate-limited the request to create cluster" in str(raised.value)
        assert len(stand_in.requests) == MAX_ATTEMPTS
        assert clock.sleeps == [1.0] * (MAX_ATTEMPTS - 1)

    def test_long_retry_after_fails_fast(self, snippets, stand_in):
        clock = FakeClock()
        module, client = load_client(snippets, stand_in, clock)
        stand_in.fail_next(429, retry_after="3600")

        with pytest.raises(module.CloudApiError, match="requested a wait of 3600 seconds"):
            client.create_cluster(CLUSTER, "AWS", "us-east-1")

        assert clock.sleeps == []
        assert len(stand_in.requests) == 1

    def test_server_errors_retried_with_backoff(self, snippets, stand_in):
        clock = FakeClock()
        _, client = load_client(snippets, stand_in, clock)
        stand_in.fail_next(503, count=2)

        client.create_cluster(CLUSTER, "AWS", "us-east-1")

        assert [request.status for request in stand_in.requests] == [503, 503, 200]
        assert len(clock.sleeps) == 2
        assert 0.5 <= clock.sleeps[0] <= 1.0
        assert 1.0 <= clock.sleeps[1] <= 2.0

    def test_server_error_retries_bounded(self, snippets, stand_in):
        clock = FakeClock()
        module, client = load_client(snippets, stand_in, clock)
        stand_in.fail_next(500, count=20, message="internal error")

        with pytest.raises(module.CloudApiError) as raised:
            client.create_cluster(CLUSTER, "AWS", "us-east-1")

        assert "failed to create cluster 'functions-prod' (500) 5 times" in str(raised.value)
        assert len(stand_in.requests) == MAX_ATTEMPTS

    @pytest.mark.parametrize("status", [400, 401, 403, 404, 409])
    def test_client_errors_not_retried(self, snippets, stand_in, status):
        clock = FakeClock()
        module, client = load_client(snippets, stand_in, clock)
        stand_in.fail_next(status, count=3)

        with pytest.raises(module.CloudApiError, match=f"\\({status}\\)"):
            client.create_cluster(CLUSTER, "AWS", "us-east-1")

        assert len(stand_in.requests) == 1
        assert clock.sleeps == []

    def test_invalid_request_reason_shown(self, snippets, stand_in):
        clock = FakeClock()
        module, client = load_client(snippets, stand_in, clock)

        with pytest.raises(module.CloudApiError) as raised:
            client.create_cluster(CLUSTER, "AZURE", "eastus")

        assert "as invalid (400): BASIC clusters cannot be created on AZURE" in str(raised.value)

    def test_taken_sql_user_explained(self, snippets, stand_in):
        clock = FakeClock()
        module, client = load_client(snippets, stand_in, clock)
        cluster = ready_cluster(client, stand_in)
        client.create_sql_user(cluster["id"], SQL_USER, PASSWORD)

        with pytest.raises(module.CloudApiError) as raised:
            client.create_sql_user(cluster["id"], SQL_USER, PASSWORD)

        assert f"SQL user '{SQL_USER}' already exists on the cluster" in str(raised.value)
        assert "choose another SQL_USER_NAME" in str(raised.value)
        assert PASSWORD not in str(raised.value)

    def test_echoed_key_redacted(self, snippets, stand_in):
        clock = FakeClock()
        module, client = load_client(snippets, stand_in, clock)
        stand_in.fail_next(400, message=f"token {API_KEY} has a bad format")

        with pytest.raises(module.CloudApiError) as raised:
            client.create_cluster(CLUSTER, "AWS", "us-east-1")

        assert API_KEY not in str(raised.value)
        assert "token [API key] has a bad format" in str(raised.value)

    def test_polling_stops_at_deadline(self, snippets, stand_in):
        clock = FakeClock()
        module, client = load_client(snippets, stand_in, clock)
        stand_in.reads_until_ready = 50
        cluster = client.create_cluster(CLUSTER, "AWS", "us-east-1")

        with pytest.raises(module.CloudApiError, match="still CREATING after 1 seconds"):
            client.wait_until_ready(cluster, timeout=1.0, interval=0.25)

        assert len(stand_in.requests_to("GET", ONE_CLUSTER)) == 4
        assert clock.sleeps == [0.25] * 4

    def test_unreachable_post_not_retried(self, snippets):
        clock = FakeClock()
        module = snippets.load(CREATE_CLUSTER)
        client = module.CloudApi(
            f"http://127.0.0.1:{unused_port()}", API_KEY, sleep=clock.sleep, clock=clock.monotonic
        )

        with pytest.raises(module.CloudApiError, match="failed to reach the Cloud API"):
            client.create_cluster(CLUSTER, "AWS", "us-east-1")

        assert clock.sleeps == []

    def test_unreachable_get_retried_bounded(self, snippets):
        clock = FakeClock()
        module = snippets.load(CREATE_CLUSTER)
        client = module.CloudApi(
            f"http://127.0.0.1:{unused_port()}", API_KEY, sleep=clock.sleep, clock=clock.monotonic
        )

        with pytest.raises(module.CloudApiError, match="failed to reach the Cloud API"):
            client.get_cluster("any-id")

        assert len(clock.sleeps) == MAX_ATTEMPTS - 1

    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            (
                "postgresql://app:s3cret@host.invalid:26257/defaultdb?sslmode=verify-full",
                "postgresql://app@host.invalid:26257/defaultdb?sslmode=verify-full",
            ),
            (
                "postgresql://app@host.invalid:26257/db?password=s3cret&sslmode=verify-full",
                "postgresql://app@host.invalid:26257/db?sslmode=verify-full",
            ),
            (
                "postgresql://app@host.invalid:26257/db?sslmode=verify-full",
                "postgresql://app@host.invalid:26257/db?sslmode=verify-full",
            ),
        ],
        ids=["in-user-info", "in-query", "none"],
    )
    def test_password_removed_from_url(self, snippets, url, expected):
        module = snippets.load(CREATE_CLUSTER)

        assert module.without_password(url) == expected

    @pytest.mark.parametrize(
        ("header", "seconds"),
        [
            ("7", 7.0),
            ("Thu, 01 Jan 2026 00:00:30 GMT", 30.0),
            ("soon", None),
            (None, None),
        ],
        ids=["seconds", "http-date", "invalid", "absent"],
    )
    def test_retry_after_parsed(self, snippets, header, seconds):
        module = snippets.load(CREATE_CLUSTER)
        now = 1767225600.0  # 2026-01-01 00:00:00 UTC

        assert module.retry_after_seconds(header, now) == seconds


class TestStandIn:
    """The stand-in rejects what the API reference does not allow."""

    def send(
        self,
        stand_in: CloudApiStandIn,
        method: str,
        path: str,
        body: object = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict, dict]:
        data = None if body is None else json.dumps(body).encode()
        sent = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        sent.update(headers or {})
        request = urllib.request.Request(
            stand_in.url + path,
            data=data,
            headers={name: value for name, value in sent.items() if value},
            method=method,
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read()), dict(response.headers)
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.loads(error.read()), dict(error.headers)

    def test_unknown_path_404(self, stand_in):
        status, body, _ = self.send(stand_in, "GET", "/api/v1/nothing")

        assert status == 404
        assert body["code"] == 5

    def test_wrong_method_405(self, stand_in):
        status, _, headers = self.send(stand_in, "DELETE", "/api/v1/clusters")

        assert status == 405
        assert headers["Allow"] == "POST"

    def test_missing_token_401(self, stand_in):
        status, body, _ = self.send(stand_in, "POST", "/api/v1/clusters", {}, {"Authorization": ""})

        assert status == 401
        assert "missing Authorization" in body["message"]

    def test_wrong_token_401(self, stand_in):
        status, _, _ = self.send(
            stand_in, "POST", "/api/v1/clusters", {}, {"Authorization": "Bearer other"}
        )

        assert status == 401

    def test_invalid_version_400(self, stand_in):
        status, body, _ = self.send(
            stand_in, "POST", "/api/v1/clusters", {}, {"Cc-Version": "2021-01-01"}
        )

        assert status == 400
        assert body["message"] == "invalid Cc-Version"

    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            ({"name": "x", "provider": "AWS", "plan": "BASIC"}, "name must be 6-20"),
            ({"name": CLUSTER, "provider": "IBM", "plan": "BASIC"}, "provider must be one of"),
            (
                {"name": CLUSTER, "provider": "AWS", "plan": "BASIC", "spec": {"serverless": {}}},
                "spec.serverless.regions",
            ),
            ({"name": CLUSTER, "provider": "AWS", "region": "us-east-1"}, "unknown fields"),
        ],
        ids=["name", "provider", "regions", "unknown-field"],
    )
    def test_invalid_body_400_with_reason(self, stand_in, body, reason):
        status, answer, _ = self.send(stand_in, "POST", "/api/v1/clusters", body)

        assert status == 400
        assert reason in answer["message"]

    def test_injected_error_has_retry_after(self, stand_in):
        stand_in.fail_next(429, retry_after="3")

        status, _, headers = self.send(stand_in, "GET", "/api/v1/clusters/any")

        assert status == 429
        assert headers["Retry-After"] == "3"


@uses_script
class TestBrokenCopiesFail:
    """Each check above goes red when the script loses a protection the page describes."""

    def test_retry_after_ignored_changes_delay(self, snippets, stand_in):
        clock = FakeClock()
        _, client = load_client(snippets, stand_in, clock, RETRY_AFTER_IGNORED)
        stand_in.fail_next(429, retry_after="7")

        client.create_cluster(CLUSTER, "AWS", "us-east-1")

        assert clock.sleeps != [7.0]

    def test_unbounded_retries_keep_going(self, snippets, stand_in):
        clock = FakeClock()
        _, client = load_client(snippets, stand_in, clock, UNBOUNDED_RETRIES)
        stand_in.fail_next(429, count=20, retry_after="1")

        client.create_cluster(CLUSTER, "AWS", "us-east-1")

        assert len(stand_in.requests) > MAX_ATTEMPTS

    def test_retried_401_sends_again(self, snippets, stand_in):
        clock = FakeClock()
        _, client = load_client(snippets, stand_in, clock, RETRIES_401)
        stand_in.fail_next(401, count=3)

        client.create_cluster(CLUSTER, "AWS", "us-east-1")

        assert len(stand_in.requests) > 1

    def test_unawaited_cluster_fails_user(self, snippets, tmp_path, stand_in):
        result = run_script(snippets, tmp_path, script_environment(stand_in), READY_NOT_AWAITED)

        assert result.returncode == 1
        assert stand_in.requests_to("GET", ONE_CLUSTER) == []

    def test_no_deadline_polls_past_it(self, snippets, stand_in):
        clock = FakeClock()
        _, client = load_client(snippets, stand_in, clock, NO_DEADLINE)
        stand_in.reads_until_ready = 50
        cluster = client.create_cluster(CLUSTER, "AWS", "us-east-1")

        client.wait_until_ready(cluster, timeout=1.0, interval=0.25)

        assert len(stand_in.requests_to("GET", ONE_CLUSTER)) > 4

    def test_kept_password_printed(self, snippets):
        module = snippets.load(CREATE_CLUSTER, PASSWORD_KEPT)

        url = module.without_password("postgresql://app:s3cret@host.invalid:26257/defaultdb")

        assert "s3cret" in url

    def test_unredacted_key_shown(self, snippets, stand_in):
        clock = FakeClock()
        module, client = load_client(snippets, stand_in, clock, KEY_NOT_REDACTED)
        stand_in.fail_next(400, message=f"token {API_KEY} has a bad format")

        with pytest.raises(module.CloudApiError) as raised:
            client.create_cluster(CLUSTER, "AWS", "us-east-1")

        assert API_KEY in str(raised.value)
