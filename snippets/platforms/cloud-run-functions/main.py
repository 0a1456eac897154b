"""Cloud Run function (Python) that stores one event per request, with a pool kept across requests.

Deploy with the entry point `store_event`. The pool opens at most DATABASE_POOL_SIZE
connections: set it, and THREADS, to the function's concurrency.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from typing import Any

import flask
import functions_framework
from psycopg_pool import ConnectionPool

MAX_BODY_BYTES = 16 * 1024
MAX_MESSAGE_LENGTH = 1000
MAX_POOL_SIZE = 100

# Module scope lives as long as the instance, so every request it serves reuses this pool.
# The first request creates it, which keeps connection errors out of the instance's startup.
pool: ConnectionPool | None = None
# Requests served at once by one instance run on threads that may race to create the pool.
pool_lock = threading.Lock()


class BadRequest(ValueError):
    """The request cannot be stored; the message is safe to return to the caller."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def database_url() -> str:
    if url := os.environ.get("DATABASE_URL"):
        return url
    raise RuntimeError(
        "DATABASE_URL is not set: add the connection string to the function's environment"
    )


def pool_size() -> int:
    text = os.environ.get("DATABASE_POOL_SIZE", "1")
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_POOL_SIZE:
        raise RuntimeError(
            f"DATABASE_POOL_SIZE is {text!r}: set it to the function's concurrency, "
            f"a whole number from 1 to {MAX_POOL_SIZE}"
        )
    return int(text)


def get_pool() -> ConnectionPool:
    global pool
    with pool_lock:
        if pool is None:
            pool = ConnectionPool(
                database_url(),
                min_size=0,  # open nothing before a request needs a connection
                max_size=pool_size(),  # one connection per request the instance runs at once
                max_lifetime=30 * 60,  # seconds; replaced when returned after that
                check=ConnectionPool.check_connection,  # a round trip at checkout
                timeout=5.0,  # seconds to wait for a connection
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


def parse_message(request: flask.Request) -> str:
    # Reading one byte past the limit detects an oversized body without buffering all of it.
    body = request.stream.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"the body is larger than {MAX_BODY_BYTES} bytes", status=413)
    if not body:
        raise BadRequest("the request has no body")

    try:
        payload = json.loads(body, object_pairs_hook=unique_keys, parse_constant=reject_constant)
    except (ValueError, RecursionError):
        # ValueError covers invalid JSON or UTF-8 and Python's limit on an integer's digits.
        raise BadRequest("the body is not JSON, or repeats a key") from None

    message = payload.get("message") if isinstance(payload, dict) else None
    if not isinstance(message, str) or not message.strip():
        raise BadRequest('"message" must be a non-empty string')
    if "\x00" in message:
        # PostgreSQL text cannot hold NUL, so the insert would fail as a server error.
        raise BadRequest('"message" must not contain NUL characters')
    if len(message) > MAX_MESSAGE_LENGTH:
        raise BadRequest(f'"message" is longer than {MAX_MESSAGE_LENGTH} characters')
    try:
        message.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest('"message" must not contain lone surrogates') from None
    return message


def respond(status: int, payload: dict[str, str]) -> tuple[str, int, dict[str, str]]:
    return json.dumps(payload), status, {"content-type": "application/json"}


@functions_framework.http
def store_event(request: flask.Request) -> tuple[str, int, dict[str, str]]:
    if request.method != "POST":
        body, status, headers = respond(405, {"error": "use POST"})
        return body, status, {**headers, "allow": "POST"}
    try:
        message = parse_message(request)
    except BadRequest as error:
        return respond(error.status, {"error": str(error)})

    # The block commits when it ends normally and rolls back when it raises; either way
    # the connection goes back to the pool.
    with get_pool().connection() as connection:
        row = connection.execute(
            "INSERT INTO events (request_id, message) VALUES (%s, %s) RETURNING id",
            (str(uuid.uuid4()), message),
        ).fetchone()

    return respond(201, {"id": str(row[0])})
