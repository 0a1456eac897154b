"""Create a CockroachDB Basic cluster and a SQL user through the CockroachDB Cloud API.

Run it with the settings in environment variables:

    COCKROACH_API_KEY   secret key of a service account with the Cluster Admin or
                        Cluster Creator role
    CLUSTER_NAME        6-20 lowercase letters, digits and dashes, not at either end
    CLUSTER_PROVIDER    AWS or GCP (CockroachDB Basic does not run on Azure)
    CLUSTER_REGION      a region the plan offers, such as us-east-1 or us-central1
    SQL_USER_NAME       the SQL user the function connects as
    SQL_USER_PASSWORD   that user's password, at least 16 characters, read from your
                        secret manager; the script never prints it
    DATABASE_NAME       optional, default defaultdb

and optionally COCKROACH_API_URL (default https://cockroachlabs.cloud),
CLUSTER_READY_TIMEOUT_SECONDS (default 600) and CLUSTER_POLL_INTERVAL_SECONDS (default 5).

It prints the cluster's connection string without a password. A request that was
rate-limited (429) or failed on the server (5xx) is sent again, up to 5 attempts in all,
after the delay its Retry-After header requests or after a backoff. Responses 400, 401,
403, 404 and 409 are not retried.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass

logger = logging.getLogger("create_cluster")

DEFAULT_API_URL = "https://cockroachlabs.cloud"
# Pinning the version keeps the request and response formats fixed when the API's
# default version moves on.
API_VERSION = "2024-09-16"
PLAN = "BASIC"
PROVIDERS = ("AWS", "GCP")
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")

CLUSTER_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{4,18}[a-z0-9]$")
REGION_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*[a-z0-9]$")
SQL_USER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,62}$")
RESERVED_USER_PREFIXES = ("pg_", "crdb_internal")
MIN_PASSWORD_LENGTH = 16

REQUEST_TIMEOUT_SECONDS = 30.0
MAX_ATTEMPTS = 5
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 30.0
# A Retry-After longer than this fails the run instead of blocking it.
MAX_RETRY_AFTER_SECONDS = 120.0
READY_STATE = "CREATED"
FAILED_STATES = ("CREATION_FAILED", "DELETED")


class ConfigurationError(ValueError):
    """An environment variable is missing or invalid; the message names it and the fix."""


class CloudApiError(RuntimeError):
    """The Cloud API rejected a request or never completed it; the message gives the fix."""


@dataclass(frozen=True)
class Settings:
    """Settings of the cluster and SQL user to create, read from the environment."""

    api_url: str
    api_key: str
    cluster_name: str
    provider: str
    region: str
    sql_user: str
    sql_password: str
    database: str
    ready_timeout_seconds: float
    poll_interval_seconds: float


def _required(environ: Mapping[str, str], name: str, hint: str) -> str:
    value = environ.get(name, "").strip()
    if not value:
        raise ConfigurationError(f"{name} is not set; set it to {hint}")
    return value


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ConfigurationError(f"invalid {name} {text!r}; give a positive number of seconds")
    return seconds


def _api_url(environ: Mapping[str, str]) -> str:
    url = environ.get("COCKROACH_API_URL", "").strip() or DEFAULT_API_URL
    parts = urllib.parse.urlsplit(url)
    secure = parts.scheme == "https" and bool(parts.hostname)
    # The stand-in server of the tests listens on loopback without TLS.
    local = parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS
    if not (secure or local) or parts.path not in ("", "/") or parts.query or parts.username:
        raise ConfigurationError(
            f"invalid COCKROACH_API_URL {url!r}; give the API's base address, such as "
            f"{DEFAULT_API_URL} (plain http is accepted only for 127.0.0.1, ::1 or localhost)"
        )
    return url.rstrip("/")


def read_settings(environ: Mapping[str, str]) -> Settings:
    """Read and check the settings, so that bad input fails before any request is sent."""
    api_key = _required(environ, "COCKROACH_API_KEY", "the secret key of a service account")

    name = _required(environ, "CLUSTER_NAME", "a cluster name such as functions-prod")
    if not CLUSTER_NAME.match(name):
        raise ConfigurationError(
            f"invalid CLUSTER_NAME {name!r}; use 6-20 lowercase letters, digits and dashes, "
            "with no dash at the start or end"
        )

    provider = _required(environ, "CLUSTER_PROVIDER", " or ".join(PROVIDERS)).upper()
    if provider not in PROVIDERS:
        raise ConfigurationError(
            f"invalid CLUSTER_PROVIDER {environ['CLUSTER_PROVIDER']!r}; CockroachDB Basic runs "
            f"on {' or '.join(PROVIDERS)}"
        )

    region = _required(environ, "CLUSTER_REGION", "a region such as us-east-1 or us-central1")
    if not REGION_NAME.match(region):
        raise ConfigurationError(
            f"invalid CLUSTER_REGION {region!r}; give the provider's region name, such as "
            "us-east-1 on AWS or us-central1 on GCP"
        )

    sql_user = _required(environ, "SQL_USER_NAME", "the SQL user name the function uses")
    reserved = sql_user.lower() == "none" or sql_user.lower().startswith(RESERVED_USER_PREFIXES)
    if not SQL_USER_NAME.match(sql_user) or reserved:
        raise ConfigurationError(
            f"invalid SQL_USER_NAME {sql_user!r}; start with a letter or underscore, use only "
            "letters, digits, periods and underscores, at most 63 characters, and avoid "
            "'none' and the prefixes pg_ and crdb_internal"
        )

    password = environ.get("SQL_USER_PASSWORD", "")
    if len(password) < MIN_PASSWORD_LENGTH or "\x00" in password:
        # The message describes the password without repeating any of it.
        raise ConfigurationError(
            f"SQL_USER_PASSWORD is missing or shorter than {MIN_PASSWORD_LENGTH} characters; "
            "generate a random password in your secret manager and export it"
        )

    return Settings(
        api_url=_api_url(environ),
        api_key=api_key,
        cluster_name=name,
        provider=provider,
        region=region,
        sql_user=sql_user,
        sql_password=password,
        database=environ.get("DATABASE_NAME", "").strip() or "defaultdb",
        ready_timeout_seconds=_seconds(environ, "CLUSTER_READY_TIMEOUT_SECONDS", 600.0),
        poll_interval_seconds=_seconds(environ, "CLUSTER_POLL_INTERVAL_SECONDS", 5.0),
    )


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Return the delay a Retry-After header requests, or None when it is absent or invalid.

    The header contains either a number of seconds or an HTTP date.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, moment.timestamp() - current)


def without_password(url: str) -> str:
    """Return a connection URL with any password removed from it."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user = urllib.parse.quote(parts.username or "", safe="")
        host = netloc.rpartition("@")[2]
        netloc = f"{user}@{host}"
    query = urllib.parse.urlencode(
        [
            (key, value)
            for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
            if key.lower() != "password"
        ]
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class CloudApi:
    """A client for the few Cloud API endpoints that creating a cluster needs."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = base_url
        self._api_key = api_key
        self._sleep = sleep
        self._clock = clock

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "[API key]") if self._api_key else text

    def _send(
        self, method: str, path: str, body: dict | None, query: dict[str, str] | None
    ) -> tuple[int, Mapping[str, str], bytes]:
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {
            "Authorization": f"Bearer {self._api_key}",
            "Cc-Version": API_VERSION,
            "Accept": "application/json",
            "User-Agent": "serverless-cockroachdb-guide-create-cluster",
        }
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"

        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SECONDS) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, error.headers, error.read()

    def _api_message(self, payload: bytes) -> str:
        try:
            message = json.loads(payload).get("message", "")
        except (ValueError, AttributeError):
            message = payload.decode("utf-8", "replace")
        return self._redact(str(message).strip()[:300]) or "no message"

    def _delay(self, headers: Mapping[str, str], attempt: int) -> float:
        requested = retry_after_seconds(headers.get("Retry-After"))
        if requested is not None:
            return requested
        ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def request(
        self,
        method: str,
        path: str,
        *,
        action: str,
        body: dict | None = None,
        query: dict[str, str] | None = None,
        conflict: str = "the resource already exists",
    ) -> dict:
        """Send one API request, retrying 429 and 5xx responses; return the JSON response."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                status, headers, payload = self._send(method, path, body, query)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                reason = getattr(error, "reason", error)
                if method != "GET" or attempt == MAX_ATTEMPTS:
                    raise CloudApiError(
                        f"failed to reach the Cloud API at {self.base_url} to {action}: "
                        f"{reason}. Check the network and COCKROACH_API_URL; a request that "
                        "timed out may still have been carried out"
                    ) from None
                status, headers, payload = 0, {}, b""
                logger.warning("request to %s failed (%s); retrying", action, reason)

            if 200 <= status < 300:
                return json.loads(payload) if payload.strip() else {}

            retryable = status == 0 or status == 429 or status >= 500
            if retryable and attempt < MAX_ATTEMPTS:
                delay = self._delay(headers, attempt)
                if delay > MAX_RETRY_AFTER_SECONDS:
                    raise CloudApiError(
                        f"the Cloud API requested a wait of {delay:.0f} seconds before "
                        f"retrying the request to {action} ({status}); run the script again later"
                    )
                logger.warning(
                    "Cloud API returned %s for the request to %s; retry %d of %d in %.1f s",
                    status or "nothing",
                    action,
                    attempt,
                    MAX_ATTEMPTS - 1,
                    delay,
                )
                self._sleep(delay)
                continue

            raise CloudApiError(
                self._explain(status, action, self._api_message(payload), attempt, conflict)
            )
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _explain(self, status: int, action: str, message: str, attempts: int, conflict: str) -> str:
        if status == 400:
            return (
                f"the Cloud API rejected the request to {action} as invalid (400): {message}. "
                "Check the values of CLUSTER_NAME, CLUSTER_PROVIDER, CLUSTER_REGION and "
                "SQL_USER_NAME"
            )
        if status == 401:
            return (
                f"the Cloud API did not accept the API key (401) when asked to {action}. "
                "COCKROACH_API_KEY is wrong, expired or revoked: create an API key for a "
                "service account in the CockroachDB Cloud Console and export it"
            )
        if status == 403:
            return (
                f"the service account of the API key is not allowed to {action} (403): "
                f"{message}. Give it the Cluster Admin or Cluster Creator role"
            )
        if status == 409:
            return f"{conflict} (409): {message}"
        if status == 429:
            return (
                f"the Cloud API rate-limited the request to {action} (429) {attempts} times "
                "in a row; wait a minute and run the script again"
            )
        if status >= 500:
            return (
                f"the Cloud API failed to {action} ({status}) {attempts} times in a row: "
                f"{message}. Run the script again later"
            )
        return f"the Cloud API rejected the request to {action} ({status}): {message}"

    def create_cluster(self, name: str, provider: str, region: str) -> dict:
        body = {
            "name": name,
            "provider": provider,
            "plan": PLAN,
            "spec": {"serverless": {"regions": [region]}},
        }
        return self.request(
            "POST",
            "/api/v1/clusters",
            action=f"create cluster {name!r}",
            body=body,
            conflict=(
                f"a cluster named {name!r} already exists in the organization, perhaps from "
                "an earlier run; choose another CLUSTER_NAME or delete that cluster"
            ),
        )

    def get_cluster(self, cluster_id: str) -> dict:
        path = f"/api/v1/clusters/{urllib.parse.quote(cluster_id, safe='')}"
        return self.request("GET", path, action=f"read cluster {cluster_id}")

    def wait_until_ready(self, cluster: dict, timeout: float, interval: float) -> dict:
        """Poll the cluster until its state is CREATED, for at most timeout seconds."""
        deadline = self._clock() + timeout
        while True:
            state = cluster.get("state")
            if state == READY_STATE:
                return cluster
            if state in FAILED_STATES:
                raise CloudApiError(
                    f"cluster {cluster.get('name')!r} ({cluster.get('id')}) is {state}; "
                    "check its page in the Cloud Console, delete it and create it again"
                )

            remaining = deadline - self._clock()
            if remaining <= 0:
                raise CloudApiError(
                    f"cluster {cluster.get('name')!r} ({cluster.get('id')}) was still {state} "
                    f"after {timeout:g} seconds. It may still become ready: watch it in the "
                    "Cloud Console, then create the SQL user there, or raise "
                    "CLUSTER_READY_TIMEOUT_SECONDS for the next cluster"
                )
            logger.info("cluster is %s; checking again in %.1f s", state, min(interval, remaining))
            self._sleep(min(interval, remaining))
            cluster = self.get_cluster(cluster["id"])

    def create_sql_user(self, cluster_id: str, name: str, password: str) -> None:
        path = f"/api/v1/clusters/{urllib.parse.quote(cluster_id, safe='')}/sql-users"
        self.request(
            "POST",
            path,
            action=f"create SQL user {name!r}",
            body={"name": name, "password": password},
            conflict=(
                f"SQL user {name!r} already exists on the cluster; choose another "
                "SQL_USER_NAME, or change that user's password in the Cloud Console"
            ),
        )

    def connection_string(self, cluster_id: str, sql_user: str, database: str) -> str:
        path = f"/api/v1/clusters/{urllib.parse.quote(cluster_id, safe='')}/connection-string"
        response = self.request(
            "GET",
            path,
            action="get the connection string",
            query={"database": database, "sql_user": sql_user},
        )
        url = response.get("connection_string")
        if not isinstance(url, str) or not url:
            raise CloudApiError("the Cloud API returned no connection_string for the cluster")
        return without_password(url)


def create(settings: Settings, api: CloudApi) -> str:
    """Create the cluster and the SQL user; return the connection string without password."""
    logger.info(
        "creating CockroachDB Basic cluster %r on %s in %s",
        settings.cluster_name,
        settings.provider,
        settings.region,
    )
    cluster = api.create_cluster(settings.cluster_name, settings.provider, settings.region)
    logger.info("cluster id %s; waiting until it is ready", cluster.get("id"))

    cluster = api.wait_until_ready(
        cluster, settings.ready_timeout_seconds, settings.poll_interval_seconds
    )
    api.create_sql_user(cluster["id"], settings.sql_user, settings.sql_password)
    logger.info("created SQL user %r", settings.sql_user)

    return api.connection_string(cluster["id"], settings.sql_user, settings.database)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        settings = read_settings(os.environ)
        api = CloudApi(settings.api_url, settings.api_key)
        url = create(settings, api)
    except (ConfigurationError, CloudApiError) as error:
        logger.error("error: %s", error)
        return 1

    print(url)
    logger.info(
        "Add the password from your secret manager after the user name to make the "
        "function's DATABASE_URL, and store it there, not in code"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
