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

const MAX_BODY_CHARACTERS = 32_768;
const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;
// A JSON string, or one of the characters that open, close or separate values.
const JSON_TOKEN = /"(?:[^"\\]|\\.)*"|[{}[\],:]/g;

// JSON.parse keeps the last of repeated keys, so this scans text that JSON.parse has
// accepted. Each open object has a Set of its keys, each open array a null.
function hasRepeatedKey(text) {
  const open = [];
  let expectingKey = false;
  for (const [token] of text.matchAll(JSON_TOKEN)) {
    const scope = open.at(-1);
    if (token === "{") {
      open.push(new Set());
      expectingKey = true;
    } else if (token === "[") {
      open.push(null);
    } else if (token === "}" || token === "]") {
      open.pop();
      expectingKey = false;
    } else if (token === ",") {
      expectingKey = scope instanceof Set;
    } else if (token === ":") {
      expectingKey = false;
    } else if (expectingKey) {
      const key = JSON.parse(token);
      if (scope.has(key)) {
        return true;
      }
      scope.add(key);
      expectingKey = false;
    }
  }
  return false;
}

// Buffer.from skips characters that are not base64 and replaces bytes that are not UTF-8,
// so both are checked here instead.
function decodeBase64Utf8(encoded) {
  if (!BASE64.test(encoded)) {
    return undefined;
  }
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(Buffer.from(encoded, "base64"));
  } catch {
    return undefined;
  }
}

// Returns { message } from a valid request, or { reason } to reject the request with.
function readMessage(event) {
  let body = event?.body;
  if (typeof body !== "string" || body.length === 0) {
    return { reason: "the request has no body" };
  }
  if (body.length > MAX_BODY_CHARACTERS) {
    return { reason: `the body is longer than ${MAX_BODY_CHARACTERS} characters` };
  }
  if (event.isBase64Encoded === true) {
    body = decodeBase64Utf8(body);
    if (body === undefined) {
      return { reason: "the body is not valid base64-encoded UTF-8" };
    }
  }

  let payload;
  try {
    payload = JSON.parse(body);
  } catch {
    return { reason: "the body is not JSON, or repeats a key" };
  }
  if (hasRepeatedKey(body)) {
    return { reason: "the body is not JSON, or repeats a key" };
  }

  const message = payload?.message;
  if (typeof message !== "string" || message.trim().length === 0) {
    return { reason: '"message" must be a non-empty string' };
  }
  // Counts code points, as PostgreSQL's char_length() does.
  if ([...message].length > MAX_MESSAGE_CHARACTERS) {
    return { reason: `"message" is longer than ${MAX_MESSAGE_CHARACTERS} characters` };
  }
  // PostgreSQL rejects the NUL character in text values.
  if (message.includes("\u0000")) {
    return { reason: '"message" must not contain the NUL character' };
  }
  if (!message.isWellFormed()) {
    return { reason: '"message" must not contain lone surrogates' };
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
