// Run a node-postgres transaction again when CockroachDB aborts it with a retry error.
import pg from "pg";

// Errors are recognised by SQLSTATE, because message texts differ between servers and releases.
const SERIALIZATION_FAILURE = "40001";
const STATEMENT_COMPLETION_UNKNOWN = "40003"; // CockroachDB's "result is ambiguous"

// Defaults of runTransaction(). A retry starts only if its sleep ends at least
// deadlineMarginMillis before the deadline, which leaves time for the attempt itself and
// for the handler's response.
export const retrySettings = {
  maxAttempts: 5,
  baseBackoffMillis: 50,
  maxBackoffMillis: 1000,
  deadlineMarginMillis: 500,
};

// Kinds of attempt failure, as the retry decision and the log messages name them.
const SERIALIZATION_CONFLICT = "serialization failure";
const CONNECTION_LOST = "connection lost";
const COMMIT_UNKNOWN = "commit outcome unknown";
const NOT_RETRYABLE = "not retryable";

// The transaction still failed with a retryable error when attempts or time ran out.
export class RetriesExhaustedError extends Error {
  constructor(message, attempts, cause) {
    super(message, { cause });
    this.name = "RetriesExhaustedError";
    this.attempts = attempts;
  }
}

// The connection failed while COMMIT was in flight, so the transaction may have committed.
export class AmbiguousCommitError extends Error {
  constructor(message, attempts, cause) {
    super(message, { cause });
    this.name = "AmbiguousCommitError";
    this.attempts = attempts;
  }
}

// Runs `await body(client)` in a SERIALIZABLE transaction and resolves to what it returns.
// Each attempt takes a client from `pool` (a pg.Pool), runs the whole body in a new
// transaction and commits it, so the body must not commit or roll back itself.
// SQLSTATE 40001 is retried. A lost connection is retried only when `idempotent`
// is true, meaning that running the body twice has the same effect as running it once.
// Retries stop after `maxAttempts` attempts, and before a sleep would end within
// retrySettings.deadlineMarginMillis of `deadline` (a Date.now() value) or of the end of
// the Lambda invocation that `context` describes.
//
// Rejects with RetriesExhaustedError or AmbiguousCommitError, each with the database error
// as `cause`. Any other error reaches the caller unchanged.
export async function runTransaction(
  pool,
  body,
  { idempotent = false, context, deadline, maxAttempts = retrySettings.maxAttempts } = {},
) {
  checkArguments(body, context, deadline, maxAttempts);

  for (let attempt = 1; ; attempt += 1) {
    const outcome = await runAttempt(pool, body);
    if (!("failure" in outcome)) {
      return outcome.result;
    }
    const { failure, kind } = outcome;
    const code = sqlstateOf(failure) ?? "none";

    if (kind === NOT_RETRYABLE || (kind === CONNECTION_LOST && !idempotent)) {
      throw failure;
    }
    if (kind === COMMIT_UNKNOWN && !idempotent) {
      throw new AmbiguousCommitError(
        `the connection failed during COMMIT on attempt ${attempt} (SQLSTATE ${code}), ` +
          "so the transaction may have committed. It was not retried because the body is " +
          "not declared idempotent. Check the database before repeating the work, or make " +
          "the body idempotent, for example with a unique request id, and pass " +
          "{ idempotent: true }",
        attempt,
        failure,
      );
    }
    if (attempt >= maxAttempts) {
      throw new RetriesExhaustedError(
        `the transaction failed on all ${attempt} attempts, the last one with ${kind} ` +
          `(SQLSTATE ${code}). Reduce contention on the rows it reads and writes, or raise ` +
          "maxAttempts",
        attempt,
        failure,
      );
    }

    const delay = backoffDelay(attempt);
    const remaining = remainingMillis(context, deadline);
    if (remaining !== undefined && delay + retrySettings.deadlineMarginMillis > remaining) {
      throw new RetriesExhaustedError(
        `gave up after ${attempt} attempts, the last one failed with ${kind} ` +
          `(SQLSTATE ${code}): a retry after ${delay} ms would end within ` +
          `${retrySettings.deadlineMarginMillis} ms of the deadline, which is ${remaining} ms ` +
          "away. Raise the function timeout or reduce contention",
        attempt,
        failure,
      );
    }

    console.warn(
      `transaction attempt ${attempt} of ${maxAttempts} failed with ${kind} ` +
        `(SQLSTATE ${code}), retrying in ${delay} ms`,
    );
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
}

// Resolves to { result } or to { failure, kind }. Errors that are not from the database or
// the connection are thrown.
async function runAttempt(pool, body) {
  const client = await pool.connect();
  let connectionLost = false;
  // node-postgres emits 'error' on a client whose connection fails, and an 'error' event
  // without a listener crashes Node.js.
  const markLost = () => {
    connectionLost = true;
  };
  client.on("error", markLost);
  let committing = false;
  try {
    // PostgreSQL starts transactions at READ COMMITTED by default and CockroachDB at
    // SERIALIZABLE, so asking for SERIALIZABLE makes both behave alike.
    await client.query("BEGIN ISOLATION LEVEL SERIALIZABLE");
    const result = await body(client);
    committing = true;
    await client.query("COMMIT");
    return { result };
  } catch (error) {
    connectionLost ||= isConnectionFailure(error);
    if (!connectionLost) {
      await client.query("ROLLBACK").catch(markLost);
    }
    if (!(error instanceof pg.DatabaseError) && !connectionLost) {
      throw error;
    }
    return { failure: error, kind: classify(sqlstateOf(error), connectionLost, committing) };
  } finally {
    client.off("error", markLost);
    // With true, pg-pool destroys the client instead of handing it to the next caller.
    client.release(connectionLost);
  }
}

function sqlstateOf(error) {
  return error instanceof pg.DatabaseError ? error.code : undefined;
}

// Class 08 is "connection exception", and class 57P covers the server ending the session.
function isConnectionFailure(error) {
  const sqlstate = sqlstateOf(error);
  return sqlstate !== undefined && (sqlstate.startsWith("08") || sqlstate.startsWith("57P"));
}

function classify(sqlstate, connectionLost, committing) {
  if (sqlstate === SERIALIZATION_FAILURE) {
    return SERIALIZATION_CONFLICT;
  }
  if (committing && (connectionLost || sqlstate === STATEMENT_COMPLETION_UNKNOWN)) {
    return COMMIT_UNKNOWN;
  }
  if (connectionLost) {
    return CONNECTION_LOST;
  }
  return NOT_RETRYABLE;
}

// Milliseconds to sleep after failed `attempt`: exponential growth with full jitter. The
// random part spreads out clients that failed together, so that they are less likely to
// collide again.
export function backoffDelay(attempt) {
  const ceiling = Math.min(
    retrySettings.maxBackoffMillis,
    retrySettings.baseBackoffMillis * 2 ** (attempt - 1),
  );
  return Math.round(Math.random() * ceiling);
}

function remainingMillis(context, deadline) {
  const limits = [];
  if (context !== undefined) {
    limits.push(context.getRemainingTimeInMillis());
  }
  if (deadline !== undefined) {
    limits.push(deadline - Date.now());
  }
  return limits.length > 0 ? Math.min(...limits) : undefined;
}

function checkArguments(body, context, deadline, maxAttempts) {
  if (typeof body !== "function") {
    throw new TypeError(`body must be a function that takes the client, got ${typeof body}`);
  }
  if (!Number.isInteger(maxAttempts) || maxAttempts < 1) {
    throw new RangeError(`maxAttempts must be an integer of at least 1, got ${maxAttempts}`);
  }
  if (context !== undefined && typeof context.getRemainingTimeInMillis !== "function") {
    throw new TypeError(
      "context must be the Lambda context object with getRemainingTimeInMillis(), " +
        `got ${typeof context}`,
    );
  }
  if (deadline !== undefined && !Number.isFinite(deadline)) {
    throw new TypeError(`deadline must be a Date.now() value in milliseconds, got ${deadline}`);
  }
}

// Moves `amount` from account `source` to account `target`, once per `requestId`.
// Resolves to true when this call moved the money, and to false when the request was
// applied before: by an earlier delivery of the same event, or by an attempt whose COMMIT
// reached the database although its reply was lost. That makes the body idempotent.
export async function transfer(pool, requestId, source, target, amount, { context } = {}) {
  checkTransfer(requestId, source, target, amount);

  const body = async (client) => {
    const recorded = await client.query(
      "INSERT INTO transfers (request_id, source, target, amount) VALUES ($1, $2, $3, $4) " +
        "ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
      [requestId, source, target, amount],
    );
    if (recorded.rowCount === 0) {
      return false;
    }

    const { rows } = await client.query(
      "SELECT id, balance FROM accounts WHERE id IN ($1, $2)",
      [source, target],
    );
    // CockroachDB's INT is 64 bits wide, which node-postgres returns as a string.
    const balances = new Map(rows.map((row) => [Number(row.id), Number(row.balance)]));
    checkBalance(balances, source, amount);

    // Writing rows in id order keeps two opposite transfers from deadlocking.
    const changes = [
      [source, -amount],
      [target, amount],
    ].sort(([first], [second]) => first - second);
    for (const [account, change] of changes) {
      await client.query("UPDATE accounts SET balance = $1 WHERE id = $2", [
        balances.get(account) + change,
        account,
      ]);
    }
    return true;
  };

  return runTransaction(pool, body, { idempotent: true, context });
}

function checkTransfer(requestId, source, target, amount) {
  if (typeof requestId !== "string" || requestId === "") {
    throw new TypeError(`requestId must be a non-empty string, got ${JSON.stringify(requestId)}`);
  }
  for (const [name, account] of [
    ["source", source],
    ["target", target],
  ]) {
    if (!Number.isSafeInteger(account)) {
      throw new TypeError(`${name} must be an integer account id, got ${JSON.stringify(account)}`);
    }
  }
  if (source === target) {
    throw new RangeError(`source and target must be different accounts, got ${source} for both`);
  }
  if (!Number.isSafeInteger(amount) || amount <= 0) {
    throw new RangeError(`amount must be a positive integer, got ${JSON.stringify(amount)}`);
  }
}

function checkBalance(balances, source, amount) {
  // Both accounts exist: the foreign keys of the transfers row checked that.
  if (balances.get(source) < amount) {
    throw new RangeError(
      `insufficient funds: account ${source} has a balance of ${balances.get(source)}, ` +
        `less than the ${amount} to transfer`,
    );
  }
}
