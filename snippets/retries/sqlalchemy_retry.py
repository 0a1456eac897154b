"""Run a SQLAlchemy transaction again when CockroachDB aborts it with a retry error."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

# Errors are recognised by SQLSTATE, because message texts differ between servers and releases.
SERIALIZATION_FAILURE = "40001"
STATEMENT_COMPLETION_UNKNOWN = "40003"  # CockroachDB's "result is ambiguous"

MAX_ATTEMPTS = 5
BASE_BACKOFF_SECONDS = 0.05
MAX_BACKOFF_SECONDS = 1.0
# A retry starts only if its sleep ends at least this long before the deadline, which leaves
# time for the attempt itself and for the handler's response.
DEADLINE_MARGIN_SECONDS = 0.5

# Kinds of attempt failure, as the retry decision and the log messages name them.
SERIALIZATION_CONFLICT = "serialization failure"
CONNECTION_LOST = "connection lost"
COMMIT_UNKNOWN = "commit outcome unknown"
NOT_RETRYABLE = "not retryable"

logger = logging.getLogger(__name__)

T = TypeVar("T")


class InvocationContext(Protocol):
    """The part of the AWS Lambda context object that the helper reads."""

    def get_remaining_time_in_millis(self) -> int: ...


class RetriesExhausted(Exception):
    """The transaction still failed with a retryable error when attempts or time ran out."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class AmbiguousCommitError(Exception):
    """The connection failed while COMMIT was in flight, so the transaction may have committed."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


def run_transaction(
    engine: Engine,
    body: Callable[[Connection], T],
    *,
    idempotent: bool = False,
    context: InvocationContext | None = None,
    deadline: float | None = None,
    max_attempts: int | None = None,
) -> T:
    """Run ``body(connection)`` in a SERIALIZABLE transaction and return what it returns.

    Each attempt takes a connection from the pool of *engine*, runs the whole body in a new
    transaction and commits it, so the body must not commit or roll back itself. SQLSTATE
    40001 is retried. A lost connection is retried only when *idempotent* is true, meaning that
    running the body twice has the same effect as running it once. Retries stop after
    *max_attempts* attempts (MAX_ATTEMPTS when None), and before a sleep would end within
    DEADLINE_MARGIN_SECONDS of *deadline* (a time.monotonic() value) or of the end of the
    Lambda invocation that *context* describes.

    Raises RetriesExhausted or AmbiguousCommitError, each with the database error as
    __cause__. Any other error reaches the caller unchanged.
    """
    attempt_limit = MAX_ATTEMPTS if max_attempts is None else max_attempts
    check_arguments(body, context, deadline, attempt_limit)

    attempt = 0
    while True:
        attempt += 1
        committing = False
        with engine.connect() as connection:
            # PostgreSQL starts transactions at READ COMMITTED by default and CockroachDB at
            # SERIALIZABLE, so asking for SERIALIZABLE makes both behave alike. SQLAlchemy
            # restores the connection's level when it goes back to the pool.
            connection.execution_options(isolation_level="SERIALIZABLE")
            try:
                with connection.begin():
                    result = body(connection)
                    committing = True
                return result
            except DBAPIError as error:
                failure = error
                kind = classify(sqlstate_of(error), error.connection_invalidated, committing)

        code = sqlstate_of(failure) or "none"

        if kind == NOT_RETRYABLE or (kind == CONNECTION_LOST and not idempotent):
            raise failure
        if kind == COMMIT_UNKNOWN and not idempotent:
            raise AmbiguousCommitError(
                f"the connection failed during COMMIT on attempt {attempt} (SQLSTATE {code}), "
                "so the transaction may have committed. It was not retried because the body "
                "is not declared idempotent. Check the database before repeating the work, or "
                "make the body idempotent, for example with a unique request id, and pass "
                "idempotent=True",
                attempt,
            ) from failure
        if attempt >= attempt_limit:
            raise RetriesExhausted(
                f"the transaction failed on all {attempt} attempts, the last one with {kind} "
                f"(SQLSTATE {code}). Reduce contention on the rows it reads and writes, or "
                "raise max_attempts",
                attempt,
            ) from failure

        delay = backoff_delay(attempt)
        remaining = remaining_seconds(context, deadline)
        if remaining is not None and delay + DEADLINE_MARGIN_SECONDS > remaining:
            raise RetriesExhausted(
                f"gave up after {attempt} attempts, the last one failed with {kind} "
                f"(SQLSTATE {code}): a retry after {delay:.3f} s would end within "
                f"{DEADLINE_MARGIN_SECONDS} s of the deadline, which is {remaining:.3f} s away. "
                "Raise the function timeout or reduce contention",
                attempt,
            ) from failure

        logger.warning(
            "transaction attempt %d of %d failed with %s (SQLSTATE %s), retrying in %.3f s",
            attempt,
            attempt_limit,
            kind,
            code,
            delay,
        )
        time.sleep(delay)


def sqlstate_of(error: DBAPIError) -> str | None:
    # psycopg 3 calls the code sqlstate and psycopg2 calls it pgcode.
    return getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)


def classify(sqlstate: str | None, connection_lost: bool, committing: bool) -> str:
    if sqlstate == SERIALIZATION_FAILURE:
        return SERIALIZATION_CONFLICT
    if committing and (connection_lost or sqlstate == STATEMENT_COMPLETION_UNKNOWN):
        return COMMIT_UNKNOWN
    if connection_lost:
        return CONNECTION_LOST
    return NOT_RETRYABLE


def backoff_delay(attempt: int) -> float:
    """Return seconds to sleep after failed *attempt*: exponential growth with full jitter.

    The random part spreads out clients that failed together, so that they are less likely
    to collide again.
    """
    ceiling = min(MAX_BACKOFF_SECONDS, BASE_BACKOFF_SECONDS * 2 ** (attempt - 1))
    return random.uniform(0, ceiling)


def remaining_seconds(context: InvocationContext | None, deadline: float | None) -> float | None:
    limits = []
    if context is not None:
        limits.append(context.get_remaining_time_in_millis() / 1000)
    if deadline is not None:
        limits.append(deadline - time.monotonic())
    return min(limits) if limits else None


def check_arguments(body: object, context: object, deadline: object, max_attempts: object) -> None:
    if not callable(body):
        raise TypeError(f"body must be a callable that takes the connection, got {body!r}")
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"max_attempts must be an integer of at least 1, got {max_attempts!r}")
    if context is not None and not callable(getattr(context, "get_remaining_time_in_millis", None)):
        raise TypeError(
            "context must be the Lambda context object with get_remaining_time_in_millis(), "
            f"got {type(context).__name__}"
        )
    if deadline is not None and not isinstance(deadline, int | float):
        raise TypeError(f"deadline must be a time.monotonic() value in seconds, got {deadline!r}")


def transfer(
    engine: Engine,
    request_id: str,
    source: int,
    target: int,
    amount: int,
    *,
    context: InvocationContext | None = None,
) -> bool:
    """Move *amount* from account *source* to account *target*, once per *request_id*.

    Returns True when this call moved the money, and False when the request was applied
    before: by an earlier delivery of the same event, or by an attempt whose COMMIT reached
    the database although its reply was lost. That makes the body idempotent.
    """
    check_transfer(request_id, source, target, amount)

    def body(connection: Connection) -> bool:
        recorded = connection.execute(
            text(
                "INSERT INTO transfers (request_id, source, target, amount) "
                "VALUES (:request_id, :source, :target, :amount) "
                "ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
            ),
            {"request_id": request_id, "source": source, "target": target, "amount": amount},
        ).first()
        if recorded is None:
            return False

        rows = connection.execute(
            text("SELECT id, balance FROM accounts WHERE id IN (:source, :target)"),
            {"source": source, "target": target},
        ).all()
        balances = {account: balance for account, balance in rows}
        check_balance(balances, source, amount)

        # Writing rows in id order keeps two opposite transfers from deadlocking.
        for account, change in sorted({source: -amount, target: amount}.items()):
            connection.execute(
                text("UPDATE accounts SET balance = :balance WHERE id = :id"),
                {"balance": balances[account] + change, "id": account},
            )
        return True

    return run_transaction(engine, body, idempotent=True, context=context)


def check_transfer(request_id: object, source: object, target: object, amount: object) -> None:
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
    for name, account in (("source", source), ("target", target)):
        if isinstance(account, bool) or not isinstance(account, int):
            raise ValueError(f"{name} must be an integer account id, got {account!r}")
    if source == target:
        raise ValueError(f"source and target must be different accounts, got {source} for both")
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise ValueError(f"amount must be a positive integer, got {amount!r}")


def check_balance(balances: dict[int, int], source: int, amount: int) -> None:
    # Both accounts exist: the foreign keys of the transfers row checked that.
    if balances[source] < amount:
        raise ValueError(
            f"insufficient funds: account {source} has a balance of {balances[source]}, "
            f"less than the {amount} to transfer"
        )
