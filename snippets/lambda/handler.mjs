// An AWS Lambda handler for API Gateway HTTP API and function URL events (payload format
// 2.0). It stores the body's {"message": "..."} as one row of the events table.
import pg from "pg";

const MAX_MESSAGE_CHARACTERS = 1000;

// Lambda keeps awsRequestId when it retries an invocation, so ON CONFLICT turns a retry
// into a no-op. A client that sends the HTTP request again gets a new request id.
const INSERT_EVENT =
  "INSERT INTO events (request_id, message) VALUES ($1, $2) " +
  "ON CONFLICT (request_id) DO NOTHING RETURNING id";
const SELECT_EVENT_ID = "SELECT id FROM events WHERE request_id = $1";

// The pool lives at module scope, so it outlasts each invocation and serves the next one
// that this instance handles.
let pool;

function createPool() {
  const connectionString = process.env.DATABASE_URL;
  if (!connectionString) {
    throw new Error(
      "DATABASE_URL is not set. Set it to your cluster's connection string, " +
        "postgresql://USER:PASSWORD@HOST:26257/DATABASE?sslmode=verify-full",
    );
  }

  const created = new pg.Pool({
    connectionString,
    // An instance handles one request at a time, so a second connection would sit unused.
    max: 1,
    // pg-pool starts a timer per client. At 30 minutes it closes an idle client at once,
    // and a checked-out one when it is released.
    maxLifetimeSeconds: 1800,
    // A checkout fails after 5 s, whether it waits for a new connection or for the one client.
    connectionTimeoutMillis: 5000,
    // 0 turns off the idle timer, which by default closes a client idle for 10 s. A frozen
    // instance runs no timers, so one that fired at thaw could close the connection that
    // the next request is about to use.
    idleTimeoutMillis: 0,
  });

  // pg-pool emits 'error' when the connection of an idle client fails, for example when
  // the server ends it, and has already removed that client. Without a listener, Node.js
  // treats the event as an uncaught exception and the instance crashes.
  created.on("error", (error) => {
    console.error(`database pool: idle connection closed: ${error.message}`);
  });
  return created;
}

export function getPool() {
  if (pool === undefined) {
    pool = createPool();
  }
  return pool;
}

// A checked-out client has no pool listener, and an 'error' event without one crashes
// Node.js. The failure still reaches the caller through the query that it breaks.
function logClientError(error) {
  console.error(`database connection failed while checked out: ${error.message}`);
}

async function connect(pool) {
  const client = await pool.connect();
  client.on("error", logClientError);
  return client;
}

function release(client, error) {
  client.off("error", logClientError);
  // With an error, pg-pool destroys the client instead of keeping it for reuse.
  client.release(error);
}

// pg-pool hands out an idle client without testing it. If the server or the network
// closed that connection while the instance was frozen, the first query fails, so a
// cheap query tests it first and a broken client is replaced once.
// NOTE: a connection whose packets are dropped without a reset makes the test query wait
// until the kernel gives up retransmitting, which takes minutes.
async function checkOut(pool) {
  const client = await connect(pool);
  try {
    await client.query("SELECT 1");
    return client;
  } catch (error) {
    console.error(`database pool: replacing a broken connection: ${error.message}`);
    release(client, error);
  }
  // With max: 1 the broken client was the only one, so this opens a new connection.
  return connect(pool);
}

// Runs `work(client)` on a checked connection and always returns the client to the pool.
async function withClient(work) {
  const client = await checkOut(getPool());
  let failure;
  try {
    return await work(client);
  } catch (error) {
    // The failure may come from a broken connection or leave a transaction open, so the
    // client is destroyed rather than handed to the next request.
    failure = error;
    throw error;
  } finally {
    release(client, failure);
  }
}

function respond(statusCode, body) {
  return {
    statusCode,
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  };
}

// Counts code points, as PostgreSQL's char_length() does, and stops once past `limit`.
function countCharacters(text, limit) {
  let count = 0;
  for (const _ of text) {
    count += 1;
    if (count > limit) {
      break;
    }
  }
  return count;
}

// Returns { message } from a valid request, or { reason } to reject the request with.
function readMessage(event) {
  const body = event?.body;
  if (typeof body !== "string" || body.length === 0) {
    return { reason: "the request has no body" };
  }
  const text = event.isBase64Encoded ? Buffer.from(body, "base64").toString("utf8") : body;

  let payload;
  try {
    payload = JSON.parse(text);
  } catch {
    return { reason: "the body is not valid JSON" };
  }

  const message = payload?.message;
  if (typeof message !== "string") {
    return { reason: 'the body must be a JSON object with a "message" string' };
  }
  const characters = countCharacters(message, MAX_MESSAGE_CHARACTERS);
  if (characters === 0 || characters > MAX_MESSAGE_CHARACTERS) {
    return { reason: `"message" must have 1 to ${MAX_MESSAGE_CHARACTERS} characters` };
  }
  // PostgreSQL rejects the NUL character in text values.
  if (message.includes("\u0000")) {
    return { reason: '"message" must not contain the NUL character' };
  }
  return { message };
}

export const handler = async (event, context) => {
  const { message, reason } = readMessage(event);
  if (reason !== undefined) {
    return respond(400, { error: reason });
  }

  // Each statement runs on its own in autocommit mode, so the INSERT is committed when
  // it returns.
  return withClient(async (client) => {
    const inserted = await client.query(INSERT_EVENT, [context.awsRequestId, message]);
    if (inserted.rows.length === 1) {
      return respond(201, { id: inserted.rows[0].id });
    }

    const existing = await client.query(SELECT_EVENT_ID, [context.awsRequestId]);
    if (existing.rows.length === 0) {
      throw new Error(`request ${context.awsRequestId} conflicted, but its row is gone`);
    }
    return respond(200, { id: existing.rows[0].id });
  });
};
