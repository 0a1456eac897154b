// An AWS Lambda handler for API Gateway HTTP API and function URL events (payload format
// 2.0). It stores the body's {"message": "..."} as one row of the events table.

// pool.mjs is the module from the connection pool page, saved next to this file.
import { getPool, withClient } from "./pool.mjs";

const MAX_MESSAGE_CHARACTERS = 1000;

// Lambda keeps awsRequestId when it retries an invocation, so ON CONFLICT turns a retry
// into a no-op. A client that sends the HTTP request again gets a new request id.
const INSERT_EVENT =
  "INSERT INTO events (request_id, message) VALUES ($1, $2) " +
  "ON CONFLICT (request_id) DO NOTHING RETURNING id";
const SELECT_EVENT_ID = "SELECT id FROM events WHERE request_id = $1";

// The pool lives at module scope in pool.mjs, so it outlasts each invocation and serves
// the next one that this instance handles. Lambda calls only `handler`, and getPool is
// exported so that code importing this module, such as a test, can read the pool's counts.
export { getPool };

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
