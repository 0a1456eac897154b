"""AWS Lambda handler that stores one event per invocation through a pool kept across calls."""

from __future__ import annotations

import base64
import binascii
import json
import os
import threading
from typing import Any

from psycopg_pool import ConnectionPool

MAX_MESSAGE_LENGTH = 1000
# Room for the largest valid body, 1000 characters outside the Basic Multilingual Plane
# escaped as JSON and base64-encoded, and no more.
MAX_BODY_CHARACTERS = 32_768

# Module scope lives as long as the execution environment, so every warm invocation
# reuses this pool and its one connection. It is created by the first invocation.
pool: ConnectionPool | None = None
# Threads of one instance may race to create it; the lock lets one win.
pool_lock = threading.Lock()


class BadRequest(ValueError):
    """The event cannot be stored; the message is safe to return to the caller."""


def database_url() -> str:
    if url := os.environ.get("DATABASE_URL"):
        return url
    raise RuntimeError(
        "DATABASE_URL is not set: add the connection string to the function's environment"
    )


def get_pool() -> ConnectionPool:
    global pool
    with pool_lock:
        if pool is None:
            pool = ConnectionPool(
                database_url(),
                min_size=0,  # open nothing before an invocation needs a connection
                max_size=1,  # an instance serves one request at a time
                max_lifetime=30 * 60,  # seconds; replaced when returned after that
                check=ConnectionPool.check_connection,  # a round trip at checkout
                # Seconds to wait for a connection; the function timeout must be longer.
                timeout=5.0,
                open=True,
            )
    return pool


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key is repeated")
    return dict(pairs)


def reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_message(event: Any) -> str:
    body = event.get("body") if isinstance(event, dict) else None
    if not isinstance(body, str) or not body:
        raise BadRequest("the request has no body")
    if len(body) > MAX_BODY_CHARACTERS:
        raise BadRequest(f"the body is longer than {MAX_BODY_CHARACTERS} characters")

    if event.get("isBase64Encoded") is True:
        try:
            body = base64.b64decode(body, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise BadRequest("the body is not valid base64-encoded UTF-8") from None

    try:
        payload = json.loads(body, object_pairs_hook=unique_keys, parse_constant=reject_constant)
    except (ValueError, RecursionError):
        # ValueError covers invalid JSON and Python's limit on the digits of an integer.
        raise BadRequest("the body is not JSON, or repeats a key") from None

    message = payload.get("message") if isinstance(payload, dict) else None
    if not isinstance(message, str) or not message.strip():
        raise BadRequest('"message" must be a non-empty string')
    if len(message) > MAX_MESSAGE_LENGTH:
        raise BadRequest(f'"message" is longer than {MAX_MESSAGE_LENGTH} characters')
    if "\x00" in message:
        # PostgreSQL text cannot hold NUL, so the insert would fail as a server error.
        raise BadRequest('"message" must not contain NUL characters')
    try:
        message.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest('"message" must not contain lone surrogates') from None
    return message


def response(status: int, payload: dict[str, str]) -> dict[str, Any]:
    return {
        "statusCode": status,
        "headers": {"content-type": "application/json"},
        "body": json.dumps(payload),
    }


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    try:
        message = parse_message(event)
    except BadRequest as error:
        return response(400, {"error": str(error)})

    # The block commits when it ends normally and rolls back when it raises; either
    # way the connection goes back to the pool.
    with get_pool().connection() as connection:
        row = connection.execute(
            "INSERT INTO events (request_id, message) VALUES (%s, %s) "
            "ON CONFLICT (request_id) DO NOTHING RETURNING id",
            (context.aws_request_id, message),
        ).fetchone()
        status = 201
        if row is None:
            # Lambda can deliver the same request twice; the first delivery stored it.
            row = connection.execute(
                "SELECT id FROM events WHERE request_id = %s", (context.aws_request_id,)
            ).fetchone()
            status = 200

    return response(status, {"id": str(row[0])})
