"""AWS Lambda handler that reaches CockroachDB only over TLS verified with the cluster's CA."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

logger = logging.getLogger(__name__)

# The CA certificate ships inside the deployment package, which Lambda unpacks into
# LAMBDA_TASK_ROOT. Outside Lambda the directory of this file is used instead. The path is
# absolute, so libpq never looks for ~/.postgresql/root.crt in a home directory the
# function does not control.
PACKAGE_ROOT = Path(os.environ.get("LAMBDA_TASK_ROOT") or Path(__file__).resolve().parent)
CA_CERTIFICATE = PACKAGE_ROOT / "certs" / "root.crt"

URL_EXAMPLE = "postgresql://USER:PASSWORD@HOST:26257/DATABASE"


def libpq_version() -> str:
    """Return the version of the libpq that psycopg loaded, such as "17.2"."""
    number = psycopg.pq.version()
    return f"{number // 10000}.{number % 10000}"


# Module code runs once per execution environment, at its cold start, so this line appears
# once per instance and not once per invocation.
logger.info(
    "libpq %s (psycopg %s, %s implementation)",
    libpq_version(),
    psycopg.__version__,
    psycopg.pq.__impl__,
)

pool: ConnectionPool | None = None
pool_lock = threading.Lock()


def database_url() -> str:
    """Return DATABASE_URL after checking that libpq can parse it.

    Raises RuntimeError naming the variable. The message never includes the URL or
    libpq's parse error, because both can contain the password.
    """
    url = os.environ.get("DATABASE_URL", "").strip()
    if not url:
        raise RuntimeError(
            f"DATABASE_URL is not set: add the cluster's connection string ({URL_EXAMPLE}) "
            "to the function's environment"
        )

    try:
        parameters = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        # libpq quotes the part it could not parse, which may be the password.
        raise RuntimeError(
            f"DATABASE_URL is not a valid connection string: expected {URL_EXAMPLE} with "
            "special characters in the user name and password percent-encoded"
        ) from None

    if not parameters.get("host"):
        raise RuntimeError(f"DATABASE_URL names no host: expected {URL_EXAMPLE}")
    return url


def tls_settings() -> dict[str, str]:
    """Return the connection parameters that make libpq verify the server's certificate."""
    if not CA_CERTIFICATE.is_file():
        raise RuntimeError(
            f"the cluster's CA certificate {CA_CERTIFICATE} is missing: download it from "
            "the cluster's connection dialog and add it to the deployment package as "
            "certs/root.crt"
        )
    # Keyword parameters override the same parameters in the URL, so a URL that sets
    # sslmode=disable or points sslrootcert at a home directory still gets these.
    settings = {"sslmode": "verify-full", "sslrootcert": str(CA_CERTIFICATE)}

    # The function logs in with a password. Without sslcertmode=disable, libpq also looks
    # for a client certificate in ~/.postgresql/postgresql.crt, and the connection fails
    # when that directory cannot be read. sslcertmode exists from libpq 16 on.
    # NOTE: with an older libpq, a home directory the process cannot read still fails.
    if psycopg.pq.version() >= 160000:
        settings["sslcertmode"] = "disable"
    return settings


def get_pool() -> ConnectionPool:
    global pool
    with pool_lock:
        if pool is None:
            pool = ConnectionPool(
                database_url(),
                kwargs=tls_settings(),
                min_size=0,
                max_size=1,
                max_lifetime=30 * 60,  # seconds
                check=ConnectionPool.check_connection,
                timeout=5.0,  # seconds to wait for a connection, within the function timeout
                open=True,
            )
    return pool


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Return the database's clock as a health check, read over a verified TLS connection."""
    with get_pool().connection() as connection:
        server_time = connection.execute("SELECT now()").fetchone()[0]

    return {
        "statusCode": 200,
        "headers": {"content-type": "application/json"},
        "body": json.dumps({"database_time": server_time.isoformat()}),
    }
